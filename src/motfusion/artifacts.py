"""One directory format for every auxiliary model motfusion trains (VAE, VQ-VAE, speech units,
classifier, CLIP), the way diffusers' save_pretrained writes one:

    DIR/weights.safetensors   the tensors
    DIR/config.json           {"kind": "vq", "config": {the model's config dataclass}, ...info}

`info` is whatever else the trainer records (metrics, the classes it knows). `kind` makes handing
one model's directory to another's loader a one-line error that says what the directory holds.
Extra files (metrics logs, cached units) may sit beside. Directories written before this format,
with one file pair per kind (LEGACY), still load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from motfusion.errors import ConfigError

WEIGHTS, CONFIG = "weights.safetensors", "config.json"

KINDS = {  # kind -> what it is, for messages
    "vae": "a KL-VAE (motfusion train-vae)",
    "vq": "a VQ-VAE image tokenizer (motfusion train-vq)",
    "speech-units": "a speech unit codec (motfusion train-speech-tokenizer)",
    "classifier": "a Fashion-MNIST classifier (motfusion train-classifier)",
    "clip": "a CLIP model (motfusion train-clip)",
    "asr-judge": "a CTC speech recogniser (motfusion train-asr-judge)",
    "unit-vocoder": "a speech unit decoder (motfusion train-unit-vocoder)",
}

# The older layouts, kind -> (weights file, JSON file). Their JSON is the config itself (vae, vq,
# speech-units) or {"config": ..., **info} (classifier, clip).
LEGACY = {
    "vae": ("model.safetensors", "config.json"),
    "vq": ("vq.safetensors", "vq_config.json"),
    "speech-units": ("centroids.safetensors", "config.json"),
    "classifier": ("classifier.safetensors", "classifier.json"),
    "clip": ("clip.safetensors", "clip.json"),
}


@dataclass
class Artifact:
    kind: str
    config: dict[str, Any]  # the config dataclass as a dict, for its from_dict
    tensors: dict[str, torch.Tensor]
    info: dict[str, Any]  # the rest of config.json: metrics, provenance


def save_artifact(
    out: Path | str,
    kind: str,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    info: dict[str, Any] | None = None,
) -> Path:
    """Write DIR/weights.safetensors and DIR/config.json; returns DIR."""
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; known: {sorted(KINDS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, out / WEIGHTS)
    meta = {"kind": kind, "config": config, **(info or {})}
    (out / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_artifact(path: Path | str, kind: str, hint: str = "") -> Artifact:
    """The `kind` artifact in directory `path`, in this format or its kind's legacy one.

    A directory that holds something else raises ConfigError naming what it holds; one that holds
    nothing raises FileNotFoundError ending with `hint` (how to make one)."""
    path = Path(path)
    found = kind_of(path)
    if found is None:
        raise FileNotFoundError(
            f"{path} does not hold {KINDS[kind]}: expected {WEIGHTS} + {CONFIG}"
            + (f"; {hint}" if hint else "")
        )
    if found != kind:
        raise ConfigError(f"{path} holds {KINDS.get(found, found)}, not {KINDS[kind]}")
    if (path / WEIGHTS).is_file():
        meta = _read_json(path / CONFIG)
        weights, config = path / WEIGHTS, meta.pop("config", None)
        meta.pop("kind")
        if not isinstance(config, dict):
            raise ConfigError(f'{path / CONFIG} has no "config" object: write it again with save_artifact')
    else:  # the legacy layout
        weights, meta = path / LEGACY[kind][0], _read_json(path / LEGACY[kind][1])
        config, meta = (meta.pop("config"), meta) if isinstance(meta.get("config"), dict) else (meta, {})
    return Artifact(kind, config, safetensors.torch.load_file(weights), meta)


def kind_of(path: Path | str) -> str | None:
    """What directory `path` holds: an artifact kind, "a diffusers AutoencoderKL", "a motfusion
    training checkpoint", or None when none of them."""
    path = Path(path)
    if (path / WEIGHTS).is_file() and (path / CONFIG).is_file():
        return _read_json(path / CONFIG).get("kind", "a file pair of unknown kind")
    if (path / "diffusion_pytorch_model.safetensors").is_file():
        return "a diffusers AutoencoderKL"
    for kind, (weights, config) in LEGACY.items():
        if (path / weights).is_file() and (path / config).is_file():
            if kind == "vae" and {"model", "train"} <= set(_read_json(path / config)):
                return "a motfusion training checkpoint"  # the legacy VAE's file names
            return kind
    return None


def _read_json(file: Path) -> dict[str, Any]:
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{file} should hold a JSON object")
    return meta
