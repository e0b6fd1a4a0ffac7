"""Samplers: text, image and interleaved generation with a KV cache."""

from motfusion.sampling.context import Chunk, Context
from motfusion.sampling.generate import Generator, SampleConfig, sample_token

__all__ = ["Chunk", "Context", "Generator", "SampleConfig", "sample_token"]
