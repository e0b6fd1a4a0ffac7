"""Transfusion decoding: text by next-token sampling, images by diffusion inside the same sequence.

- `generate_images`: prompt, BOI, then diffusion. The prompt's keys and values are computed once; each
  denoising step runs only the image's positions against that cache. Classifier-free guidance adds
  an unconditional prompt (BOS, BOI) per image as extra rows of the same batch, so each step is one
  forward pass of 2B rows.
- `generate_captions`: image in (clean, t = 0), caption out, with a KV cache.
- `edit`: source image (clean) and instruction in, edited image out by diffusion, guided on the instruction.
- `generate_interleaved`: sample text; when the model emits BOI, generate an image, append EOI, go on.

Discrete spans (images as VQ codes, speech units) are sampled with the head of their own modality:
after BOI exactly one image's worth of codes, then EOI is appended; after <bosp> speech units until
the speech head predicts the end of the span (or max_tokens), then <eosp> is appended. `units` (text
to units) and `transcribe` (units to text) are the entry points for a modality such as speech.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from motfusion.codecs.image import ImageRepr, Pixels
from motfusion.config import ObjectiveConfig
from motfusion.data.edits import edit_prompt
from motfusion.diffusion import Sampler, make_process, make_sampler
from motfusion.diffusion import cfg as guide
from motfusion.models.transfusion import TransfusionModel
from motfusion.sampling.context import Context
from motfusion.sequence import (
    SPAN_END,
    SPECS,
    TEXT,
    EncodedDoc,
    Image,
    Segment,
    Text,
    Units,
    encode_document,
)
from motfusion.tokenizer import Tokenizer

# best_of: the share of the denoising steps after which the candidates are compared.
PICK_AT = 0.25


def comparison_step(n: int) -> int:
    """The step of n after which best_of compares its candidates; guidance_early guides up to it."""
    return int(n * PICK_AT)


@dataclass(kw_only=True)
class SampleConfig:
    steps: int | None = None  # denoising steps; None: objective.sample_steps
    sampler: str = "auto"  # ddim for DDPM, euler for flow; or ddpm
    guidance: float | None = None  # classifier-free guidance scale, 1 = off; None: objective.guidance
    # Diffusion's scale over the steps up to best_of's comparison (the first quarter), where the layout
    # forms; None: objective.guidance_early (None there too: `guidance` throughout).
    guidance_early: float | None = None
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    use_cache: bool = True
    clip_x0: bool = True  # pixels live in [-1, 1]; never applied to VAE latents, which are not bounded
    # Text to image draws this many images per prompt and keeps the one under which the model, reading
    # it back, finds the prompt likeliest as its caption (Generator.caption_log_prob). None:
    # objective.best_of.
    best_of: int | None = None


def sample_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
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

    def __init__(
        self,
        model: TransfusionModel,
        tokenizer: Tokenizer,
        objective: ObjectiveConfig,
        image_size: int,
        cfg: SampleConfig | None = None,
        image: ImageRepr | None = None,
    ):
        """`image_size` is in pixels; `image` is the run's image representation (codecs/image.py:
        image_repr(cfg), on the model's device), pixels by default."""
        self.model, self.tok = model.eval(), tokenizer
        self.cfg = cfg or SampleConfig()
        recipe = {  # what the run's recipe chose for its model, where the caller chose nothing
            "steps": objective.sample_steps,
            "guidance": objective.guidance,
            "guidance_early": objective.guidance_early,
            "best_of": objective.best_of,
        }
        self.cfg = replace(self.cfg, **{k: v for k, v in recipe.items() if getattr(self.cfg, k) is None})
        if self.cfg.best_of < 1 or self.cfg.steps < 1:
            raise ValueError(f"steps={self.cfg.steps}, best_of={self.cfg.best_of}: both must be >= 1")
        self.process = make_process(objective.diffusion, objective.num_timesteps)
        auto = "euler" if objective.diffusion == "flow" else "ddim"
        self.sampler_name = auto if self.cfg.sampler == "auto" else self.cfg.sampler
        self.repr, self.image_size = image or Pixels(), image_size
        if self.repr.discrete != (model.image is None):
            raise ValueError(
                f"this model's images are {'VQ codes' if model.image is None else 'continuous'}: pass "
                "image=image_repr(cfg) (codecs/image.py) for its representation"
            )
        self.device = next(model.parameters()).device
        side = self.repr.side(image_size)
        self.image_shape = (model.cfg.image_channels, side, side)  # the model's image space
        if self.repr.discrete:  # VQ codes: sampled by the image head, decoded by the VQ-VAE
            self.tokens_per_image = self.repr.tokens_per_image(image_size)
        else:
            self.tokens_per_image = model.image.tokens_per_image(side, side)
        self.clip_x0 = self.cfg.clip_x0 and self.repr.name == "pixels"  # latents are not bounded

    # ---- building blocks ----------------------------------------------------------------------

    def _encode(self, doc: list[Segment], then: list[int] = ()) -> EncodedDoc:
        enc = encode_document(doc, self.tok, self.model.cfg.patch_size, close=False)
        enc.tokens += list(then)
        enc.modality += [TEXT] * len(then)
        enc.image_slot += [-1] * len(then)
        enc.learned += [True] * len(then)
        return enc

    def _logits(self, out, modality: str = "text") -> torch.Tensor:
        return self.model.logits(out.hidden[:, -1], modality).float()  # (B, V_modality)

    def decode(
        self, ctx: Context, logits: torch.Tensor, generator: torch.Generator | None, stop: tuple[int, ...]
    ) -> list[list[int]]:
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

    def span(
        self,
        ctx: Context,
        uncond: Context | None,
        modality: str,
        generator: torch.Generator | None,
        length: int | None = None,
    ) -> list[list[int]]:
        """Sample one span of `modality` per row, after each context's start marker, with that
        modality's head; `uncond` (an unconditional context, or `ctx` itself when its second half
        of rows is unconditional: see `guided_prompt`) adds classifier-free guidance.

        Every kept id is run, so the contexts end with the span and the caller appends the end
        marker. Fixed-length spans (image codes) take exactly `length` ids. Spans the model closes
        (speech) stop at SPAN_END, which is not run, or after `length` (default max_tokens) ids;
        rows stay in lockstep, and what a row samples after its end is dropped. Returns the units."""
        spec = SPECS[modality]
        paired = uncond is ctx
        B = ctx.last.hidden.shape[0] // (2 if paired else 1)
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        for _ in range(length or self.cfg.max_tokens):
            logits = self._logits(ctx.last, modality)  # (B or 2B, V_modality)
            if paired:
                logits = guide(*logits.chunk(2), self.cfg.guidance)
            elif uncond is not None:
                logits = guide(logits, self._logits(uncond.last, modality), self.cfg.guidance)
            ids = sample_token(logits, self.cfg.temperature, self.cfg.top_p, generator)
            for b, i in enumerate(ids.tolist()):
                done[b] = done[b] or (spec.model_closes and i == SPAN_END)
                if not done[b]:
                    out[b].append(i - spec.offset)
            if all(done):
                break
            if paired:
                ids = torch.cat((ids, ids))
            for c in (ctx, uncond) if uncond is not None and not paired else (ctx,):
                c.run(c.tokens(ids, spec.index))
        return out

    def denoise(
        self,
        ctx: Context,
        uncond: Context | None,
        B: int,
        generator: torch.Generator | None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Generate one image per row after each context's BOI -> (B, C, H, W). Nothing is committed.
        `uncond`: an unconditional context for guidance, or `ctx` itself when its rows B..2B-1 are
        the unconditional prompts (`guided_prompt`): then each step is one batch of 2B rows.
        `noise` (B, C, H, W) fixes the starting point; otherwise it is drawn from `generator`."""
        sampler = self._make_sampler()
        x = noise.to(self.device) if noise is not None else self._noise(B, generator)
        x, _ = self._steps(ctx, uncond, sampler, x, range(len(sampler)), generator)
        return x.clamp(-1, 1) if self.clip_x0 else x

    def _make_sampler(self) -> Sampler:
        return make_sampler(self.process, self.sampler_name, self.cfg.steps, clip_x0=self.clip_x0)

    def _noise(self, B: int, generator: torch.Generator | None) -> torch.Tensor:
        return torch.randn((B, *self.image_shape), generator=generator, device=self.device)

    def _steps(
        self,
        ctx: Context,
        uncond: Context | None,
        sampler: Sampler,
        x: torch.Tensor,
        steps: range,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run `steps` of `sampler` from x (see `denoise`); returns the new x and the clean image the
        last step predicted (None when `steps` is empty)."""
        x0 = None
        for i in steps:
            t = sampler.batch_timesteps(i, x)
            if uncond is ctx:  # conditional and unconditional rows in one pass
                both = ctx.run(
                    ctx.image(torch.cat((x, x)), torch.cat((t, t)), self.tokens_per_image), commit=False
                )
                pred = guide(*both.image.chunk(2), self._image_guidance(i, len(sampler)))
            else:
                pred = ctx.run(ctx.image(x, t, self.tokens_per_image), commit=False).image
                if uncond is not None:
                    pred_u = uncond.run(uncond.image(x, t, self.tokens_per_image), commit=False).image
                    pred = guide(pred, pred_u, self._image_guidance(i, len(sampler)))
            if i == steps[-1]:
                x0 = sampler.predict_x0(x, pred, t)
            x = sampler.step(pred, i, x, generator)
        return x, x0

    def _image_guidance(self, i: int, n: int) -> float:
        """The guidance scale of denoising step i of n: guidance_early up to the step after which
        best_of compares its candidates (the first quarter), guidance after."""
        early = self.cfg.guidance_early
        return early if early is not None and i <= comparison_step(n) else self.cfg.guidance

    @property
    def _uses_guidance(self) -> bool:
        """Whether any step guides, so that unconditional rows are needed."""
        return self.cfg.guidance != 1.0 or self.cfg.guidance_early not in (None, 1.0)

    def _guides(self, steps: range, n: int) -> bool:
        """Whether any of these steps of n guides (scale not 1), so that they need unconditional rows."""
        return any(self._image_guidance(i, n) != 1.0 for i in steps)

    def decode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space images (B, C, h, w) -> pixels (B, 3, H, W) in [-1, 1], for whatever leaves the
        library (PNG files, reports, scoring): the VAE decoder with latents, the identity with pixels."""
        return x if self.repr.discrete else self.repr.decode(x)  # VQ models' `images` are pixels already

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> the model's image space (VAE latents, or the pixels).
        A VQ model's prompt images stay pixels here: _image_segments turns them into codes."""
        return pixels if self.repr.discrete else self.repr.encode(pixels)

    def _image_segments(self, images: torch.Tensor) -> list[Segment]:
        """Model-space images (B, C, H, W) -> one prompt segment each: the image, or its VQ codes."""
        if not self.repr.discrete:
            return [Image(im.cpu()) for im in images]
        return [Units("image", codes.cpu()) for codes in self.repr.encode(images)]

    def _span_starts(self) -> dict[int, str]:
        """Start marker id -> modality, for every span modality the model can write."""
        names = (["image"] if self.model.image is not None else []) + list(self.model.discrete)
        return {self.tok.special_ids[SPECS[m].start]: m for m in names}

    def _write_span(self, ctx: Context, modality: str, generator: torch.Generator | None) -> Segment:
        """After a start marker: run one span of `modality` into `ctx` (not its end marker); return it."""
        if modality == "image" and not self.repr.discrete:  # diffusion
            x = self.denoise(ctx, self._unconditional(1), 1, generator)
            ctx.run(
                ctx.image(x, torch.zeros(1, device=self.device), self.tokens_per_image)
            )  # the clean image
            return Image(x[0].cpu())
        if modality == "image":
            codes = self.span(ctx, self._unconditional(1), "image", generator, length=self.tokens_per_image)
            return Image(self.repr.decode(torch.tensor(codes))[0].cpu())
        return Units(modality, self.span(ctx, None, modality, generator)[0])

    def _unconditional(self, B: int) -> Context | None:
        if not self._uses_guidance:
            return None
        ctx = Context(self.model, self.cfg.use_cache)
        ctx.run(ctx.prompt([self._encode([], then=[self.tok.boi])] * B, self.tok.pad))
        return ctx

    def guided_prompt(self, prompts: list[str], guided: bool | None = None) -> tuple[Context, Context | None]:
        """A context after each prompt's BOI, and what `denoise` and `span` take as `uncond`: with
        guidance, the same context, whose rows B..2B-1 hold the unconditional prompts (BOS, BOI).
        `guided`: whether to add those rows (default: whenever any step guides)."""
        return self._guided([[Text(p)] for p in prompts], [[] for _ in prompts], guided)

    def _guided(
        self,
        conditional: list[list[Segment]],
        unconditional: list[list[Segment]],
        guided: bool | None = None,
    ) -> tuple[Context, Context | None]:
        """Each conditional prompt, then BOI; with guidance, the unconditional ones as rows B..2B-1."""
        guided = self._uses_guidance if guided is None else guided
        docs = conditional + (unconditional if guided else [])
        ctx = Context(self.model, self.cfg.use_cache)
        ctx.run(ctx.prompt([self._encode(d, then=[self.tok.boi]) for d in docs], self.tok.pad))
        return ctx, ctx if guided else None

    # ---- decoding modes -----------------------------------------------------------------------

    @torch.no_grad()
    def images(
        self, prompts: list[str], generator: torch.Generator | None = None, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Text to image: one image per prompt -> (B, C, H, W) in the model's image space (pixels in
        [-1, 1], or latents: `decode_images` turns them into pixels). With VQ codes: decoded pixels.
        With best_of k: the best of k candidates per prompt (`_best_of`)."""
        if self.cfg.best_of == 1:
            return self._draw(prompts, generator, noise)
        if noise is not None:
            raise ValueError("`noise` fixes one starting point per image; it needs best_of=1")
        return self._best_of(prompts, generator)

    def _best_of(self, prompts: list[str], generator: torch.Generator | None) -> torch.Tensor:
        """k candidates per prompt as one batch (candidate j of prompt i is row j B + i); the one whose
        prompt has the highest caption_log_prob is kept. Diffusion compares the clean images the
        candidates predict a quarter of the way (PICK_AT), where their layout is settled
        (docs/RESULTS.md), and finishes only the kept one; VQ codes compare whole images."""
        k, B = self.cfg.best_of, len(prompts)
        if self.repr.discrete:
            codes = self._codes(prompts * k, generator)
            scores = self._log_prob([Units("image", c) for c in codes], prompts * k)
            best = scores.view(k, B).argmax(0).tolist()
            return self.repr.decode(torch.tensor([codes[j * B + i] for i, j in enumerate(best)]))
        sampler = self._make_sampler()
        n, pick = len(sampler), comparison_step(len(sampler))
        early, late = range(pick + 1), range(pick + 1, n)
        # Each phase runs unconditional rows only if it guides: none for the candidates' steps at an
        # early scale of 1, which then cost half as much.
        ctx, uncond = self.guided_prompt(prompts * k, guided=self._guides(early, n))
        x, x0 = self._steps(ctx, uncond, sampler, self._noise(k * B, generator), early, generator)
        best = self.caption_log_prob(x0, prompts * k).view(k, B).argmax(0)
        x = x.view(k, B, *x.shape[1:])[best, torch.arange(B, device=self.device)]
        ctx, uncond = self.guided_prompt(prompts, guided=self._guides(late, n))
        x, _ = self._steps(ctx, uncond, sampler, x, late, generator)
        return x.clamp(-1, 1) if self.clip_x0 else x

    def _draw(self, prompts: list[str], generator: torch.Generator | None, noise: torch.Tensor | None):
        """`images` without best_of: one sample per prompt."""
        if not self.repr.discrete:
            return self.denoise(*self.guided_prompt(prompts), len(prompts), generator, noise)
        if noise is not None:
            raise ValueError("`noise` is a diffusion starting point; this model samples images as VQ codes")
        return self.repr.decode(torch.tensor(self._codes(prompts, generator)))  # (B, C, H, W)

    def _codes(self, prompts: list[str], generator: torch.Generator | None) -> list[list[int]]:
        """Text to image with VQ codes: one image's codes per prompt."""
        ctx, uncond = self.guided_prompt(prompts)
        return self.span(ctx, uncond, "image", generator, length=self.tokens_per_image)

    @torch.no_grad()
    def caption_log_prob(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """log p(text, EOS | image) for each pair, in nats (B,): how likely the model finds each text
        as the caption of its image, read as a captioning document (BOS, the image, the text, EOS) in
        one pass. `images` as `images` returns them: in the model's image space, pixels for VQ."""
        return self._log_prob(self._image_segments(images), texts)

    def _log_prob(self, images: list[Segment], texts: list[str]) -> torch.Tensor:
        """caption_log_prob of image segments (Image, or Units of VQ codes)."""
        docs = [
            encode_document([seg, Text(t)], self.tok, self.model.cfg.patch_size)
            for seg, t in zip(images, texts, strict=True)
        ]
        ctx = Context(self.model, use_cache=False)
        chunk = ctx.prompt(docs, self.tok.pad)
        hidden = ctx.run(chunk).hidden[:, :-1]
        targets = chunk.tokens[:, 1:]
        # The caption: the text after the image's end marker (rows are left-padded to one length);
        # the image is its patches, or its VQ codes, the only positions that are not text.
        positions = torch.arange(chunk.tokens.shape[1], device=self.device)
        last_image = torch.where(chunk.modality != TEXT, positions, -1).amax(1, keepdim=True)
        caption = (positions[1:] > last_image + 1) & (chunk.modality[:, 1:] == TEXT)
        log_p = self.model.logits(hidden, "text").float().log_softmax(-1)
        return (log_p.gather(-1, targets[..., None]).squeeze(-1) * caption).sum(1)

    @torch.no_grad()
    def edit(
        self,
        images: torch.Tensor,
        instructions: list[str],
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        layout: str = "source-first",
    ) -> torch.Tensor:
        """Image editing (data/edits.py): source pixels (B, 3, H, W) in [-1, 1] and one instruction each
        -> the edited images, in the model's image space like `images`' output. `layout` is the one
        the model was trained with (data.edit_layout), e.g. [BOI source EOI] instruction [BOI ...;
        the unconditional rows of guidance are text to image's (BOS, BOI): edits are trained with
        their instruction always (data/edits.py says why)."""
        if self.repr.discrete:
            raise ValueError(
                "editing samples the edited image by diffusion; this model's images are VQ codes"
            )
        sources = self._image_segments(self.encode_images(images))
        ctx, uncond = self._guided(
            [edit_prompt(src, p, layout) for src, p in zip(sources, instructions, strict=True)],
            [[] for _ in sources],
        )
        return self.denoise(ctx, uncond, len(instructions), generator, noise)

    @torch.no_grad()
    def captions(self, images: torch.Tensor, generator: torch.Generator | None = None) -> list[str]:
        """Image to text: pixels (B, 3, H, W) in [-1, 1] -> one caption each (latent models encode them first)."""
        ids = self.caption_ids(images, generator, stop=(self.tok.eos,))
        return [self.tok.decode(i for i in row if i != self.tok.eos) for row in ids]

    @torch.no_grad()
    def caption_ids(
        self, images: torch.Tensor, generator: torch.Generator | None = None, stop: tuple[int, ...] = ()
    ) -> list[list[int]]:
        """The token ids `captions` decodes; `stop=()` samples max_tokens per image (benchmarks)."""
        images = self.encode_images(images)
        ctx = Context(self.model, self.cfg.use_cache)
        out = ctx.run(ctx.prompt([self._encode([seg]) for seg in self._image_segments(images)], self.tok.pad))
        return self.decode(ctx, self._logits(out), generator, stop=stop)

    @torch.no_grad()
    def units(
        self,
        prompts: list[str],
        modality: str,
        generator: torch.Generator | None = None,
        max_units: int | None = None,
    ) -> list[list[int]]:
        """Text to units (e.g. speech): after each prompt and `modality`'s start marker, sample units
        with its head until it ends the span, or for `max_units` (default max_tokens) units."""
        start = self.tok.special_ids[SPECS[modality].start]
        ctx = Context(self.model, self.cfg.use_cache)
        ctx.run(ctx.prompt([self._encode([Text(p)], then=[start]) for p in prompts], self.tok.pad))
        return self.span(ctx, None, modality, generator, length=max_units)

    @torch.no_grad()
    def transcribe(
        self, units: list[list[int]], modality: str, generator: torch.Generator | None = None
    ) -> list[str]:
        """Units to text (e.g. speech recognition): each unit sequence as a closed span, then text until EOS."""
        ctx = Context(self.model, self.cfg.use_cache)
        out = ctx.run(ctx.prompt([self._encode([Units(modality, u)]) for u in units], self.tok.pad))
        ids = self.decode(ctx, self._logits(out), generator, stop=(self.tok.eos,))
        return [self.tok.decode(i for i in row if i != self.tok.eos) for row in ids]

    @torch.no_grad()
    def interleaved(
        self, prompt: str, generator: torch.Generator | None = None, max_spans: int = 4
    ) -> list[Segment]:
        """Free-running: continue `prompt`; when the model emits a span's start marker, write that span
        (an image by diffusion or as VQ codes, speech units), append its end marker and go on.
        Diffusion images are in the model's image space, like `images`' output."""
        ctx = Context(self.model, self.cfg.use_cache)
        logits = self._logits(
            ctx.run(ctx.prompt([self._encode([Text(prompt)] if prompt else [])], self.tok.pad))
        )
        segments: list[Segment] = [Text(prompt)] if prompt else []
        starts = self._span_starts()
        for n_spans in range(max_spans + 1):
            ids = self.decode(ctx, logits, generator, stop=(self.tok.eos, *starts))[0]
            text = self.tok.decode(i for i in ids if not self.tok.is_special(i))
            if text:
                segments.append(Text(text))
            if not ids or ids[-1] not in starts or n_spans == max_spans:
                break
            modality = starts[ids[-1]]
            ctx.run(ctx.tokens(torch.tensor([ids[-1]], device=self.device)))
            segments.append(self._write_span(ctx, modality, generator))
            end = self.tok.special_ids[SPECS[modality].end]
            logits = self._logits(ctx.run(ctx.tokens(torch.tensor([end], device=self.device))))
        return segments
