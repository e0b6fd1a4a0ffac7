"""`MotFusion`: a trained model behind a handful of verbs, the way a diffusers pipeline is.

    from motfusion import MotFusion
    m = MotFusion.from_pretrained("runs/demo")         # a run, a checkpoint, an export, a saved dir or a hub id
    images = m.generate_images(["a red circle"], n=4)  # PIL images

The pipeline picks the device, brings the run's image representation (pixels, VAE latents or VQ
codes) and speech codec along, and returns pictures, strings and waveforms rather than tensors.
`save_pretrained(dir)` writes a self-contained directory (weights, config, tokenizer, and a copy of
any VAE, VQ-VAE or speech codec the model needs); huggingface_hub's ModelHubMixin adds
`push_to_hub` and loading by hub id. Every verb draws from a torch.Generator seeded with `seed`,
exactly as `motfusion generate --seed` does, so the two give the same outputs.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from huggingface_hub import ModelHubMixin, snapshot_download
from PIL import Image as PILImage

from motfusion.codecs.audio import resample
from motfusion.codecs.speech import SpeechTokenizer, resolve_speech_dirs, speech_tokenizer_of
from motfusion.config import Config
from motfusion.data.edits import EDIT_DATASETS
from motfusion.data.images import to_pil
from motfusion.data.scan import ImageRules, read_image, to_pixels
from motfusion.sampling.batches import captions_in_batches, edits_in_batches, images_in_batches
from motfusion.sampling.generate import Generator, SampleConfig
from motfusion.sampling.load import BUNDLED_SPEECH, BUNDLED_VAE, BUNDLED_VQ, default_device, load_generator
from motfusion.sampling.speech import speech_to_text, text_to_units
from motfusion.sequence import Image, Units
from motfusion.tokenizer import TOKENIZER_FILE, trained_vocab
from motfusion.training.checkpoint import CONFIG_FILE, MODEL_FILE

ImageInput = PILImage.Image | str | Path | torch.Tensor  # a picture, a file, or (3, H, W) in [-1, 1]


class MotFusion(ModelHubMixin, library_name="motfusion", tags=["transfusion", "mixture-of-transformers"]):
    """A model ready to generate; `generator` (sampling/generate.py) and `cfg` stay reachable."""

    def __init__(self, generator: Generator, cfg: Config):
        self.generator, self.cfg = generator, cfg

    @property
    def device(self) -> torch.device:
        return self.generator.device

    # ---- loading and saving -----------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        ema: bool = True,
        sample: SampleConfig | None = None,
    ) -> MotFusion:
        """A local run directory, checkpoint, exported .safetensors file or save_pretrained directory."""
        gen, cfg = load_generator(Path(path), device or default_device(), sample, ema=ema)
        return cls(gen, cfg)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        device: str | torch.device | None = None,
        ema: bool = True,
        sample: SampleConfig | None = None,
        **hub_kwargs: Any,
    ) -> MotFusion:
        """A local path (see `load`), or a Hugging Face hub id, downloaded first (`hub_kwargs`:
        revision, token, cache_dir, ... as huggingface_hub takes them)."""
        if Path(pretrained_model_name_or_path).exists():
            return cls.load(pretrained_model_name_or_path, device, ema, sample)
        return super().from_pretrained(
            pretrained_model_name_or_path, device=device, ema=ema, sample=sample, **hub_kwargs
        )

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        device: str | torch.device | None = None,
        ema: bool = True,
        sample: SampleConfig | None = None,
        **_: Any,
    ) -> MotFusion:
        path = snapshot_download(
            model_id,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            force_download=force_download,
            local_files_only=local_files_only,
        )
        return cls.load(path, device, ema, sample)

    def _save_pretrained(self, save_directory: Path) -> None:
        """weights + config (+ the trained tokenizer) + copies of the codecs the model needs."""
        model, cfg = self.generator.model, self.cfg
        text = json.dumps(cfg.to_dict(), indent=2) + "\n"
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        safetensors.torch.save_file(state, save_directory / MODEL_FILE, metadata={"format": "pt"})
        (save_directory / CONFIG_FILE).write_text(text)
        if trained_vocab(cfg.data.tokenizer):
            (save_directory / TOKENIZER_FILE).write_text(self.generator.tok.to_json())
        if cfg.data.image_repr == "latents":
            _copy_dir(cfg.model.vae, save_directory / BUNDLED_VAE)
        if cfg.data.image_repr == "tokens":
            _copy_dir(cfg.model.vq, save_directory / BUNDLED_VQ)
        if cfg.data.dataset.startswith("speech:"):
            _copy_dir(
                resolve_speech_dirs(cfg.data.dataset.partition(":")[2])[1], save_directory / BUNDLED_SPEECH
            )

    @property
    def capabilities(self) -> frozenset[str]:
        """What this model can do: text_to_image, caption, interleaved (any model with images), speech
        (a speech tower), edit (trained on editing documents, with diffusion images)."""
        model = self.generator.model
        can = {"interleaved"}
        if model.image is not None or "image" in model.discrete:
            can |= {"text_to_image", "caption"}
        if "speech" in model.discrete:
            can.add("speech")
        if model.image is not None and self.cfg.data.dataset.partition(":")[0] in EDIT_DATASETS:
            can.add("edit")
        return frozenset(can)

    # ---- the verbs --------------------------------------------------------------------------

    def _rng(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def _sampler(self, **overrides: Any) -> Generator:
        """The generator with some sampling settings (steps, guidance, ...) changed for one call."""
        changed = {k: v for k, v in overrides.items() if v is not None}
        if not changed:
            return self.generator
        gen = self.generator
        return Generator(
            gen.model,
            gen.tok,
            self.cfg.objective,
            gen.image_size,
            dataclasses.replace(gen.cfg, **changed),
            image=gen.repr,
        )

    @torch.no_grad()
    def generate_images(
        self,
        prompts: list[str] | str,
        n: int = 1,
        seed: int = 0,
        steps: int | None = None,
        guidance: float | None = None,
        batch_size: int = 32,
        best_of: int | None = None,
    ) -> list[PILImage.Image]:
        """Text to image: `n` pictures per prompt, prompt by prompt, `batch_size` at a time; each the
        best of `best_of` drawn (SampleConfig.best_of)."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if n < 1:
            raise ValueError(f"n={n}: ask for at least one image per prompt")
        batch = [p for p in prompts for _ in range(n)]
        pixels = images_in_batches(
            self._sampler(steps=steps, guidance=guidance, best_of=best_of), batch, self._rng(seed), batch_size
        )
        return [to_pil(x, scale=1) for x in pixels]

    @torch.no_grad()
    def caption(
        self, images: list[ImageInput] | ImageInput, seed: int = 0, batch_size: int = 32
    ) -> list[str]:
        """Image to text: one caption per picture (resized to the model's image size); a tensor is one
        (3, H, W) or a batch (B, 3, H, W) in [-1, 1]."""
        if isinstance(images, torch.Tensor):
            images = list(images) if images.ndim == 4 else [images]
        images = images if isinstance(images, list) else [images]
        pixels = torch.stack([self._pixels(x) for x in images])  # (B, 3, S, S)
        return captions_in_batches(self.generator, pixels, self._rng(seed), batch_size)

    @torch.no_grad()
    def edit(
        self,
        images: list[ImageInput] | ImageInput,
        instructions: list[str] | str,
        seed: int = 0,
        steps: int | None = None,
        guidance: float | None = None,
        batch_size: int = 32,
    ) -> list[PILImage.Image]:
        """Image editing: each picture with its instruction -> the edited picture. One picture is
        edited by every instruction; otherwise pictures and instructions pair up in order."""
        images = images if isinstance(images, list) else [images]
        instructions = [instructions] if isinstance(instructions, str) else instructions
        if len(images) == 1:
            images = images * len(instructions)
        if len(images) != len(instructions):
            raise ValueError(
                f"{len(images)} pictures for {len(instructions)} instructions: give one, or one each"
            )
        pixels = torch.stack([self._pixels(x) for x in images])
        out = edits_in_batches(
            self._sampler(steps=steps, guidance=guidance),
            pixels,
            instructions,
            self._rng(seed),
            batch_size,
            self.cfg.data.edit_layout,
        )
        return [to_pil(x, scale=1) for x in out]

    @torch.no_grad()
    def interleaved(self, prompt: str, seed: int = 0) -> list[str | PILImage.Image | Units]:
        """Free-running generation from `prompt`: text, pictures where the model opens an image, and
        the units of any other span (speech)."""
        out: list[str | PILImage.Image | Units] = []
        for seg in self.generator.interleaved(prompt, self._rng(seed)):
            if isinstance(seg, Image):
                out.append(to_pil(self.generator.decode_images(seg.pixels[None].to(self.device))[0], scale=1))
            else:
                out.append(seg if isinstance(seg, Units) else seg.text)
        return out

    @torch.no_grad()
    def speak(self, text: str, seed: int = 0) -> tuple[torch.Tensor, int]:
        """Text to speech: (waveform (T,) in [-1, 1], sample rate). Needs a model with a speech tower."""
        stok = speech_tokenizer_of(self.cfg)
        units = text_to_units(self.generator, stok, [text], self._rng(seed))[0]
        return stok.decode(units), stok.sample_rate

    @torch.no_grad()
    def transcribe(
        self,
        audio: list[str | Path | torch.Tensor] | str | Path | torch.Tensor,
        seed: int = 0,
        sample_rate: int | None = None,
    ) -> list[str]:
        """Speech to text: WAV files, or waveforms at `sample_rate` (default the codec's)."""
        stok = speech_tokenizer_of(self.cfg)
        audio = audio if isinstance(audio, list) else [audio]
        units = [_units(stok, a, sample_rate) for a in audio]
        return speech_to_text(self.generator, units, self._rng(seed))

    def _pixels(self, x: ImageInput) -> torch.Tensor:
        """A picture as `motfusion generate --image` reads one: upright, RGB, center square, resized."""
        if isinstance(x, torch.Tensor):
            return x
        d = self.cfg.data
        if isinstance(x, PILImage.Image):
            return to_pixels(x, d.image_size)
        return read_image(Path(x), ImageRules(size=d.image_size, min_side=1, max_pixels=d.max_image_pixels))


def _units(stok: SpeechTokenizer, audio: str | Path | torch.Tensor, rate: int | None) -> torch.Tensor:
    """A WAV file, or a waveform (S,) at `rate` (default the codec's) -> its speech units."""
    if not isinstance(audio, torch.Tensor):
        return stok.encode_file(audio)  # resampled to the codec's rate as it is read
    rate = rate or stok.sample_rate
    if rate != stok.sample_rate:
        audio = torch.from_numpy(resample(audio.cpu().numpy(), rate, stok.sample_rate))
    return stok.encode(audio)


def _copy_dir(src: str | Path, dst: Path) -> None:
    if Path(src).resolve() != dst.resolve():
        shutil.copytree(src, dst, dirs_exist_ok=True)
