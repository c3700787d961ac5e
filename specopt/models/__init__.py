"""Models used by the CLI, tests and benchmarks."""

from specopt.models.llama import PRESETS, Llama, LlamaConfig

__all__ = ["PRESETS", "Llama", "LlamaConfig"]
