"""A growing generation context: the positions committed so far, with or without a KV cache.

Generation appends chunks to B rows in lockstep: a left-padded prompt, one token per row, or one
image per row. With `use_cache` each chunk runs alone against the cached keys and values; without
it, every call re-runs the whole sequence (the reference the cache is tested against). A chunk run
with `commit=False` (a denoising step) leaves the context unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from motfusion.models.transfusion import KVCache, ModelOutput, TransfusionModel
from motfusion.sequence import IMAGE, MODALITIES, TEXT, Batch, EncodedDoc, ImageGroup


@dataclass
class Chunk:
    tokens: torch.Tensor  # (B, n)
    modality: torch.Tensor  # (B, n)
    doc: torch.Tensor  # (B, n) 0 for content, -1 for left padding
    pos: torch.Tensor  # (B, n) RoPE positions
    image: torch.Tensor  # (B, n) image id, -1 elsewhere; ids grow with time
    images: torch.Tensor  # (N, C, H, W) in id order
    t: torch.Tensor  # (N,) their timesteps

    @staticmethod
    def cat(chunks: list[Chunk]) -> Chunk:
        per_pos = [
            torch.cat([getattr(c, f) for c in chunks], dim=1)
            for f in ("tokens", "modality", "doc", "pos", "image")
        ]
        with_images = [c for c in chunks if c.images.shape[0]]
        images = torch.cat([c.images for c in with_images]) if with_images else chunks[0].images
        t = torch.cat([c.t for c in with_images]) if with_images else chunks[0].t
        return Chunk(*per_pos, images, t)

    def to_batch(self) -> Batch:
        B, n = self.tokens.shape
        flat_image = self.image.flatten()
        ids = self.image.unique()
        ids = ids[ids >= 0]
        image_index = [(flat_image == i).nonzero().squeeze(1) for i in ids.tolist()]
        flat_mod = self.modality.flatten()
        return Batch(
            tokens=self.tokens,
            modality=self.modality,
            doc=self.doc,
            pos=self.pos,
            image=self.image,
            targets=torch.full_like(self.tokens, -100),
            images=self.images,
            image_index=torch.stack(image_index) if image_index else self.tokens.new_zeros(0, 1),
            image_first=torch.zeros(len(image_index), dtype=torch.bool, device=self.tokens.device),
            image_clean=torch.zeros(len(image_index), dtype=torch.bool, device=self.tokens.device),
            image_caption=torch.zeros(len(image_index), dtype=torch.long, device=self.tokens.device),
            image_order=torch.arange(len(image_index), device=self.tokens.device),
            image_groups=(ImageGroup(0, len(image_index), *self.images.shape[-2:], image_index[0].numel()),)
            if image_index
            else (),
            modality_index={m: (flat_mod == i).nonzero().squeeze(1) for m, i in MODALITIES.items()},
            loss_index={m: self.tokens.new_zeros(0) for m in MODALITIES},
        )


class Context:
    def __init__(self, model: TransfusionModel, use_cache: bool = True):
        self.model, self.use_cache = model, use_cache
        self.device = next(model.parameters()).device
        self.cache = KVCache() if use_cache else None
        self.committed: list[Chunk] = []
        self.next_pos: torch.Tensor | None = None  # (B,) RoPE position of each row's next element
        self.num_images = 0
        self.last: ModelOutput | None = None  # the outputs of the last committed chunk

    def run(self, chunk: Chunk, commit: bool = True) -> ModelOutput:
        """Run `chunk` after the committed positions; returns outputs for the chunk's positions."""
        if self.use_cache:
            out = self.model(chunk.to_batch(), chunk.images, chunk.t, cache=self.cache, commit=commit)
        else:
            full = Chunk.cat(self.committed + [chunk])
            out = self.model(full.to_batch(), full.images, full.t)
            n, N = chunk.tokens.shape[1], chunk.images.shape[0]
            out = ModelOutput(hidden=out.hidden[:, -n:], image=out.image[out.image.shape[0] - N :])
        if commit:
            self.committed.append(chunk)
            self.next_pos = chunk.pos[:, -1] + 1
            self.num_images += chunk.images.shape[0]
            self.last = out
        return out

    # ---- chunk builders -----------------------------------------------------------------------

    def prompt(self, docs: list[EncodedDoc], pad_id: int) -> Chunk:
        """Left-pad the rows' prompts to one length, so that every row's next position is aligned."""
        B, T = len(docs), max(len(d) for d in docs)
        c = self._empty(B, T, pad_id)
        images = []
        for b, d in enumerate(docs):
            off = T - len(d)
            c.tokens[b, off:] = torch.tensor(d.tokens)
            c.modality[b, off:] = torch.tensor(d.modality)
            c.doc[b, off:] = 0
            c.pos[b, off:] = torch.arange(len(d))
            slot = torch.tensor(d.image_slot, device=self.device)
            c.image[b, off:] = torch.where(slot >= 0, slot + self.num_images + len(images), -1)
            images += list(d.images)
        if images:
            c.images = torch.stack(images).to(self.device)
            c.t = torch.zeros(len(images), device=self.device)  # prompt images are clean
        return c

    def tokens(self, ids: torch.Tensor, modality: int = TEXT) -> Chunk:
        """One token per row: ids (B,), local to `modality`'s vocabulary."""
        B = ids.shape[0]
        c = self._empty(B, 1, 0)
        c.tokens[:, 0] = ids
        c.modality.fill_(modality)
        c.doc.zero_()
        c.pos[:, 0] = self.next_pos
        return c

    def image(self, x: torch.Tensor, t: torch.Tensor, tokens_per_image: int) -> Chunk:
        """One image per row: x (B, C, H, W) at timesteps t (B,)."""
        B, L = x.shape[0], tokens_per_image
        c = self._empty(B, L, 0)
        c.modality.fill_(IMAGE)
        c.doc.zero_()
        c.pos = self.next_pos[:, None] + torch.arange(L, device=self.device)
        c.image = (self.num_images + torch.arange(B, device=self.device))[:, None].expand(B, L).contiguous()
        c.images, c.t = x, t
        return c

    def _empty(self, B: int, n: int, pad_id: int) -> Chunk:
        full = lambda v: torch.full((B, n), v, dtype=torch.long, device=self.device)
        return Chunk(
            full(pad_id),
            full(TEXT),
            full(-1),
            full(0),
            full(-1),
            torch.zeros(0, device=self.device),
            torch.zeros(0, device=self.device),
        )
