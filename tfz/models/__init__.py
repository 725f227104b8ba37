"""Models tfz trains and profiles: a LLaMA-style decoder split into pipeline stages."""

from tfz.models.llama import PRESETS, LlamaConfig, LlamaStage, build_stages, split_layers

__all__ = ["PRESETS", "LlamaConfig", "LlamaStage", "build_stages", "split_layers"]
