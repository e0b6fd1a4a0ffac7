"""motfusion: one transformer over interleaved text, images and speech (Transfusion) with per-modality
weights (Mixture-of-Transformers).

    from motfusion import MotFusion
    m = MotFusion.from_pretrained("runs/demo")
    m.generate_images(["a red circle"], n=4)

Names are imported on first use, so `import motfusion` (and the CLI's --help) does not load torch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("motfusion")
except PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0.0.0+unknown"

_EXPORTS = {
    "MotFusion": "motfusion.pipeline",
    "Config": "motfusion.config",
    "ConfigError": "motfusion.errors",
    "get_recipe": "motfusion.recipes",
    "TransfusionModel": "motfusion.models.transfusion",
    "TransfusionObjective": "motfusion.objectives",
    "Image": "motfusion.sequence",
    "Text": "motfusion.sequence",
    "pack_documents": "motfusion.sequence",
    "ByteTokenizer": "motfusion.tokenizer",
    "build_tokenizer": "motfusion.tokenizer",
    "Generator": "motfusion.sampling.generate",
    "SampleConfig": "motfusion.sampling.generate",
    "load_generator": "motfusion.sampling.load",
    "train": "motfusion.training.trainer",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'motfusion' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once
    return value
