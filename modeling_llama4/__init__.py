"""Llama 4 (Scout, Maverick) for transformers, computing only the routed experts."""

from . import registration
from .configuration_llama4 import Llama4Config, Llama4TextConfig, Llama4VisionConfig
from .modeling_text import (
    Llama4ForCausalLM,
    Llama4ForSequenceClassification,
    Llama4PreTrainedModel,
    Llama4TextModel,
)
from .parameter_count import parameter_counts

__all__ = [
    "Llama4Config",
    "Llama4ForCausalLM",
    "Llama4ForSequenceClassification",
    "Llama4PreTrainedModel",
    "Llama4TextConfig",
    "Llama4TextModel",
    "Llama4VisionConfig",
    "parameter_counts",
]
