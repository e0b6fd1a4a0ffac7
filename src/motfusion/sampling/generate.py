"""Transfusion decoding: text by next-token sampling, images by diffusion inside the same sequence.

- `generate_images`: prompt, BOI, then diffusion. The prompt's keys and values are computed once; each
  denoising step runs only the image's positions against that cache. Classifier-free guidance runs
  an unconditional context (BOS, BOI) beside it.
- `generate_captions`: image in (clean, t = 0), caption out, with a KV cache.
- `generate_interleaved`: sample text; when the model emits BOI, generate an image, append EOI, go on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from motfusion.config import ObjectiveConfig
from motfusion.diffusion import cfg as guide, make_process, make_sampler
from motfusion.models.transfusion import TransfusionModel
from motfusion.sampling.context import Context
from motfusion.sequence import TEXT, EncodedDoc, Image, Segment, Text, encode_document
from motfusion.tokenizer import Tokenizer


@dataclass(kw_only=True)
class SampleConfig:
    steps: int = 50  # denoising steps
    sampler: str = "auto"  # ddim for DDPM, euler for flow; or ddpm
    guidance: float = 3.0  # classifier-free guidance scale; 1 = off
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    use_cache: bool = True
    clip_x0: bool = True  # pixels live in [-1, 1]


def sample_token(logits: torch.Tensor, temperature: float, top_p: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> ids (B,): greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Generator:
    """Holds the model, tokenizer and settings that every decoding mode shares."""

    def __init__(self, model: TransfusionModel, tokenizer: Tokenizer, objective: ObjectiveConfig, image_size: int,
                 cfg: SampleConfig | None = None):
        self.model, self.tok = model.eval(), tokenizer
        self.cfg = cfg or SampleConfig()
        self.process = make_process(objective.diffusion, objective.num_timesteps)
        auto = "euler" if objective.diffusion == "flow" else "ddim"
        self.sampler_name = auto if self.cfg.sampler == "auto" else self.cfg.sampler
        self.image_shape = (model.cfg.image_channels, image_size, image_size)
        self.tokens_per_image = model.image.tokens_per_image(image_size, image_size)
        self.device = next(model.parameters()).device

    # ---- building blocks ----------------------------------------------------------------------

    def _encode(self, doc: list[Segment], then: list[int] = ()) -> EncodedDoc:
        enc = encode_document(doc, self.tok, self.model.cfg.patch_size, close=False)
        enc.tokens += list(then)
        enc.modality += [TEXT] * len(then)
        enc.image_slot += [-1] * len(then)
        return enc

    def _logits(self, out) -> torch.Tensor:
        return self.model.text_logits(out.hidden[:, -1]).float()  # (B, V)

    def decode(self, ctx: Context, logits: torch.Tensor, generator: torch.Generator | None,
               stop: tuple[int, ...]) -> list[list[int]]:
        """Sample up to max_tokens per row until every row has emitted a stop token. The stop token
        itself is returned but not run, so the caller decides what follows it."""
        B = logits.shape[0]
        out: list[list[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool)
        for _ in range(self.cfg.max_tokens):
            ids = sample_token(logits, self.cfg.temperature, self.cfg.top_p, generator)
            for b, i in enumerate(ids.tolist()):
                if not done[b]:
                    out[b].append(i)
                    done[b] = i in stop
            if done.all():
                break
            logits = self._logits(ctx.run(ctx.tokens(ids)))
        return out

    def denoise(self, ctx: Context, uncond: Context | None, B: int, generator: torch.Generator | None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """Generate one image per row after each context's BOI -> (B, C, H, W). Nothing is committed.
        `noise` (B, C, H, W) fixes the starting point; otherwise it is drawn from `generator`."""
        sampler = make_sampler(self.process, self.sampler_name, self.cfg.steps, clip_x0=self.cfg.clip_x0)
        x = noise.to(self.device) if noise is not None else torch.randn((B, *self.image_shape), generator=generator, device=self.device)
        for i in range(len(sampler)):
            t = sampler.batch_timesteps(i, x)
            pred = ctx.run(ctx.image(x, t, self.tokens_per_image), commit=False).image
            if uncond is not None:
                pred_u = uncond.run(uncond.image(x, t, self.tokens_per_image), commit=False).image
                pred = guide(pred, pred_u, self.cfg.guidance)
            x = sampler.step(pred, i, x, generator)
        return x.clamp(-1, 1) if self.cfg.clip_x0 else x

    def _unconditional(self, B: int) -> Context | None:
        if self.cfg.guidance == 1.0:
            return None
        ctx = Context(self.model, self.cfg.use_cache)
        ctx.run(ctx.prompt([self._encode([], then=[self.tok.boi])] * B, self.tok.pad))
        return ctx

    # ---- the three modes ----------------------------------------------------------------------

    @torch.no_grad()
    def images(self, prompts: list[str], generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """Text to image: one image per prompt -> (B, C, H, W) in [-1, 1]."""
        ctx = Context(self.model, self.cfg.use_cache)
        ctx.run(ctx.prompt([self._encode([Text(p)], then=[self.tok.boi]) for p in prompts], self.tok.pad))
        return self.denoise(ctx, self._unconditional(len(prompts)), len(prompts), generator, noise)

    @torch.no_grad()
    def captions(self, images: torch.Tensor, generator: torch.Generator | None = None) -> list[str]:
        """Image to text: images (B, C, H, W) -> one caption each."""
        ctx = Context(self.model, self.cfg.use_cache)
        out = ctx.run(ctx.prompt([self._encode([Image(im.cpu())]) for im in images], self.tok.pad))
        ids = self.decode(ctx, self._logits(out), generator, stop=(self.tok.eos,))
        return [self.tok.decode(i for i in row if i != self.tok.eos) for row in ids]

    @torch.no_grad()
    def interleaved(self, prompt: str, generator: torch.Generator | None = None, max_images: int = 4) -> list[Segment]:
        """Free-running: continue `prompt`, switching to diffusion whenever the model emits BOI."""
        ctx = Context(self.model, self.cfg.use_cache)
        logits = self._logits(ctx.run(ctx.prompt([self._encode([Text(prompt)] if prompt else [])], self.tok.pad)))
        segments: list[Segment] = [Text(prompt)] if prompt else []
        for _ in range(max_images + 1):
            ids = self.decode(ctx, logits, generator, stop=(self.tok.eos, self.tok.boi))[0]
            text = self.tok.decode(i for i in ids if not self.tok.is_special(i))
            if text:
                segments.append(Text(text))
            if not ids or ids[-1] != self.tok.boi or len([s for s in segments if isinstance(s, Image)]) == max_images:
                break
            ctx.run(ctx.tokens(torch.tensor([self.tok.boi], device=self.device)))
            x = self.denoise(ctx, self._unconditional(1), 1, generator)
            segments.append(Image(x[0].cpu()))
            ctx.run(ctx.image(x, torch.zeros(1, device=self.device), self.tokens_per_image))  # the clean image
            logits = self._logits(ctx.run(ctx.tokens(torch.tensor([self.tok.eoi], device=self.device))))
        return segments
