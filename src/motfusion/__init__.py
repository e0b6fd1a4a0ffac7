"""motfusion: one transformer over interleaved text and images (Transfusion) with per-modality weights
(Mixture-of-Transformers)."""

from motfusion.config import Config
from motfusion.errors import ConfigError
from motfusion.models.transfusion import TransfusionModel
from motfusion.objectives import TransfusionObjective
from motfusion.recipes import get_recipe
from motfusion.sequence import Image, Text, pack_documents
from motfusion.tokenizer import ByteTokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer", "Config", "ConfigError", "Image", "Text", "TransfusionModel", "TransfusionObjective",
    "build_tokenizer", "get_recipe", "pack_documents",
]
