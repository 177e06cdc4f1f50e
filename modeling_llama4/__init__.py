"""Llama 4 (Scout, Maverick) for transformers, computing only the routed experts."""

from .configuration_llama4 import Llama4Config, Llama4TextConfig, Llama4VisionConfig

__all__ = ["Llama4Config", "Llama4TextConfig", "Llama4VisionConfig"]
