"""The Transfusion objective: L = L_LM + lambda * L_diffusion, with a breakdown per modality.

L_LM is the sum over the model's discrete modalities (text, and VQ image codes or speech units when
the model has them) of each one's next-token loss, weighted by `objective.loss_weights` (default 1),
each scored by its own head. With a text mixture of experts, its balance loss joins as well.

It lives outside the model (as in DiT): it draws one noise level per image, noises the clean images,
runs the model once over the whole packed batch, and scores both outputs.

With several ranks, each holds some rows of a global batch. The losses stay means over the GLOBAL
batch (text: over its LM targets, images: over its images): each rank returns sums divided by the
global counts, its share, and the shares add up to what one process computes on the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from motfusion.config import ObjectiveConfig
from motfusion.diffusion import make_process
from motfusion.models.transfusion import TransfusionModel
from motfusion.sequence import Batch


@dataclass(frozen=True)
class GlobalBatch:
    """Where one rank's rows sit in the global batch of a step (see training/distributed.locate)."""

    text_targets: int  # LM targets in the global batch: the text loss's denominator
    images: int  # images in the global batch: the image loss's denominator
    image_offset: int = 0  # global index of this rank's first image
    unit_targets: dict[str, int] = field(default_factory=dict)  # the other discrete heads' LM targets
    ranks: int = 1  # processes that share the global batch
    clean_images: int = 0  # of `images`, those that are clean context (no noise, no loss)
    image_shape: tuple[
        int, ...
    ] = ()  # (C, H, W): the largest image of the global batch (noise is drawn at it)

    def lm_targets(self, modality: str) -> int:
        """The denominator of `modality`'s LM loss."""
        return self.text_targets if modality == "text" else self.unit_targets[modality]

    @classmethod
    def of(cls, batch: Batch) -> GlobalBatch:
        """`batch` is the whole batch: one process."""
        counts = {m: idx.numel() for m, idx in batch.loss_index.items()}
        return cls(
            text_targets=counts.pop("text"),
            images=batch.images.shape[0],
            unit_targets=counts,
            image_shape=tuple(batch.images.shape[1:]),
            clean_images=int(batch.image_clean.sum()),
        )

    @property
    def scored_images(self) -> int:
        """The image loss's denominator: the images that are noised and scored."""
        return self.images - self.clean_images


class TransfusionObjective:
    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg
        self.process = make_process(cfg.diffusion, cfg.num_timesteps, cfg.flow_timesteps, cfg.flow_shift)

    def max_timesteps(self, image_first: torch.Tensor) -> torch.Tensor:
        """(N,) noise cap per image: images that precede their caption are capped (Transfusion 4.2)."""
        T = float(self.cfg.num_timesteps)
        cap = T if self.cfg.image_first_noise_cap is None else float(self.cfg.image_first_noise_cap)
        return torch.where(image_first, cap, T)

    def draw(
        self, batch: Batch, whole: GlobalBatch, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps (N,) and noise (N, C, H, W) for this rank's images.

        They are drawn for every image of the global batch, in document order, and the rank keeps its
        own, so an image gets the same timestep and noise whatever the number of ranks (and however
        its batch grouped images by size)."""
        x0 = batch.images  # (N, C, H, W)
        mine = whole.image_offset + batch.image_order
        caps = torch.full((whole.images,), float(self.cfg.num_timesteps), device=x0.device)
        caps[mine] = self.max_timesteps(
            batch.image_first
        )  # other ranks' caps do not change this rank's draws
        t = self.process.sample_timesteps(whole.images, generator, x0.device, max_t=caps)  # (N_global,)
        shape = whole.image_shape or x0.shape[1:]
        noise = torch.randn((whole.images, *shape), generator=generator, device=x0.device, dtype=x0.dtype)
        return t[mine], noise[mine, :, : x0.shape[2], : x0.shape[3]]  # images of other sizes: their top-left

    def __call__(
        self,
        model: TransfusionModel,
        batch: Batch,
        generator: torch.Generator | None = None,
        whole: GlobalBatch | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns the total loss and a breakdown (detached): "loss/M" for each discrete modality M of
        the model, "loss/image" for diffusion, "loss/moe_balance" with a text mixture of experts.

        `whole`: the global batch this rank's `batch` belongs to; the values are then its shares of the
        global means. None: `batch` is the whole batch and the values are its means."""
        x0 = batch.images  # (N, C, H, W)
        N = x0.shape[0]
        whole = whole or GlobalBatch.of(batch)
        clean = batch.image_clean  # (N,) context images: the model sees them clean, at t = 0
        if N:
            t, noise = self.draw(batch, whole, generator)
            t = t.masked_fill(clean, 0.0)
        else:  # nothing to noise; x0 is a (0, C, 1, 1) placeholder
            t, noise = torch.zeros(0, device=x0.device), x0
        x_t = torch.where(clean[:, None, None, None], x0, self.process.add_noise(x0, noise, t))
        out = model(batch, x_t, t)

        zero = out.hidden.sum() * 0  # keeps the graph connected when a modality is absent
        core = getattr(model, "module", model)  # under DDP: the heads run after forward, outside the wrapper
        parts = {m: self.lm_loss(core, out.hidden, batch, m, whole) for m in core.token_modalities}
        loss = sum(self.cfg.loss_weights.get(m, 1.0) * value for m, value in parts.items())
        if core.image is not None:  # continuous images: diffusion
            if N:
                target = self.process.target(x0, noise, t)
                error = (out.image.float() - target).pow(2)
                per_image = torch.cat(
                    [
                        error[rows, :, :H, :W].mean(dim=(1, 2, 3))  # (N,) mean over each image
                        for rows, H, W, _ in batch.groups()
                    ]
                )
                per_image = per_image.masked_fill(clean, 0.0)  # scored: noised images only
                parts["image"] = per_image.sum() / max(whole.scored_images, 1)
            else:
                parts["image"] = zero
            loss = loss + self.cfg.image_loss_weight * parts["image"]
        if core.cfg.text_moe_experts:
            # A mean over this rank's text tokens: its share is its part of the global text targets.
            share = batch.text_loss_index.numel() / max(whole.text_targets, 1)
            parts["moe_balance"] = zero if out.moe_balance is None else out.moe_balance * share
            loss = loss + self.cfg.moe_balance_weight * parts["moe_balance"]
        if self.cfg.contrastive_weight:
            parts["contrastive"] = self.contrastive_loss(core, out.hidden, batch, whole)
            loss = loss + self.cfg.contrastive_weight * parts["contrastive"]
        return loss, {f"loss/{m}": value.detach() for m, value in parts.items()}

    @staticmethod
    def lm_loss(
        model: TransfusionModel, hidden: torch.Tensor, batch: Batch, modality: str, whole: GlobalBatch
    ) -> torch.Tensor:
        """Next-token cross-entropy of the positions whose target `modality`'s head predicts."""
        idx = batch.loss_index[modality]
        if not idx.numel():
            return hidden.sum() * 0
        logits = model.logits(hidden.flatten(0, 1)[idx], modality).float()  # (n, V_modality)
        return F.cross_entropy(logits, batch.targets.flatten()[idx], reduction="sum") / whole.lm_targets(
            modality
        )

    @staticmethod
    def contrastive_loss(
        model: TransfusionModel, hidden: torch.Tensor, batch: Batch, whole: GlobalBatch
    ) -> torch.Tensor:
        """InfoNCE between each image and the text of its document, over the pairs of the GLOBAL batch
        (gathered from every rank), images with equal captions counting as matches. Returns this
        rank's share: the global loss divided by the number of ranks."""
        image, text, keys = alignment_pairs(hidden, batch)
        image = gather_rows(model.align["image"](image))
        text = gather_rows(model.align["text"](text))
        keys = gather_rows(keys)
        if image.shape[0] < 2:  # no negatives: nothing to contrast
            return (hidden.sum() + model.align_scale.sum()) * 0
        loss = info_nce(image, text, model.align_scale, positives=keys[:, None] == keys[None, :])
        return loss / whole.ranks


def alignment_pairs(hidden: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled (image, text) pairs: each image with a caption -> the mean hidden state over its patches,
    the mean over the text positions of its document, and its caption key: (P, D), (P, D), (P,).

    In one causal sequence the later of the two sees the earlier one (a caption-first image attends to
    its caption), so the loss mostly shapes what the later one carries about the earlier one."""
    B, T, D = hidden.shape
    flat = hidden.reshape(B * T, D)
    image = torch.cat([flat[idx].mean(dim=1) for _, _, _, idx in batch.groups()])  # (N, D)
    doc = (
        torch.arange(B, device=hidden.device)[:, None] * T + batch.doc
    ).flatten()  # a key per (row, document)
    text_idx = batch.modality_index["text"]
    text_idx = text_idx[batch.doc.flatten()[text_idx] >= 0]  # not padding
    sums = flat.new_zeros(B * T, D).index_add(0, doc[text_idx], flat[text_idx])
    counts = flat.new_zeros(B * T).index_add(0, doc[text_idx], flat.new_ones(text_idx.shape[0]))
    image_doc = doc[batch.image_index[:, 0]]  # (N,)
    keep = (batch.image_caption != 0) & (counts[image_doc] > 0)
    text = sums[image_doc] / counts[image_doc].clamp(min=1)[:, None]
    return image[keep], text[keep], batch.image_caption[keep]


class _GatherRows(torch.autograd.Function):
    """Every rank's rows, concatenated in rank order; the gradient of this rank's rows is the sum of
    the gradients all ranks computed for them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        counts = torch.tensor([x.shape[0]], device=x.device)
        table = [torch.empty_like(counts) for _ in range(dist.get_world_size())]
        dist.all_gather(table, counts)
        counts = [int(c) for c in table]  # one host sync
        padded = x.new_zeros(max(counts), *x.shape[1:])
        padded[: x.shape[0]] = x
        rows = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(rows, padded)
        ctx.counts, ctx.rank = counts, dist.get_rank()
        return torch.cat([r[:n] for r, n in zip(rows, counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """(n_rank, ...) on each rank -> (sum of n_rank, ...) on every rank, differentiable; x itself on one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherRows.apply(x)


MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's cap on the learned temperature


def info_nce(
    a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float, positives: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE over N pairs (a_i, b_i): a (N, D), b (N, D), normalized here.

    logits = exp(logit_scale) * cos(a_i, b_j); the loss is the mean of the a->b and b->a cross
    entropies. `positives` (N, N) bool marks every (i, j) that also matches (e.g. two pictures of
    the same class): each row's target is then uniform over its positives. Default: the identity.
    With uninformative embeddings and logit_scale = 0 the loss is about log(N).
    """
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    scale = (
        torch.as_tensor(logit_scale, dtype=torch.float32, device=a.device).clamp(max=MAX_LOGIT_SCALE).exp()
    )
    logits = scale * a @ b.T  # (N, N)
    if positives is None:
        target = torch.arange(a.shape[0], device=a.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    p = positives.float()
    return (
        F.cross_entropy(logits, p / p.sum(1, keepdim=True))
        + F.cross_entropy(logits.T, p.T / p.T.sum(1, keepdim=True))
    ) / 2
