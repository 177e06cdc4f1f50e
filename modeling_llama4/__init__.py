"""Llama 4 (Scout, Maverick) for transformers, computing only the routed experts."""

from . import registration
from .configuration_llama4 import Llama4Config, Llama4TextConfig, Llama4VisionConfig
from .image_processing import Llama4ImageProcessor
from .modeling_multimodal import Llama4ForConditionalGeneration, Llama4MultiModalProjector
from .modeling_text import (
    Llama4ForCausalLM,
    Llama4ForSequenceClassification,
    Llama4PreTrainedModel,
    Llama4TextModel,
)
from .modeling_vision import Llama4VisionModel
from .parameter_count import parameter_counts
from .processing import Llama4Processor
from .transformers_compat import from_transformers_config, to_transformers_config

__all__ = [
    "Llama4Config",
    "Llama4ForCausalLM",
    "Llama4ForConditionalGeneration",
    "Llama4ForSequenceClassification",
    "Llama4ImageProcessor",
    "Llama4MultiModalProjector",
    "Llama4PreTrainedModel",
    "Llama4Processor",
    "Llama4TextConfig",
    "Llama4TextModel",
    "Llama4VisionConfig",
    "Llama4VisionModel",
    "from_transformers_config",
    "parameter_counts",
    "to_transformers_config",
]
