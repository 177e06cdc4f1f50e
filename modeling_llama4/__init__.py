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
from .moe import Llama4TextMoe, expert_load_metrics
from .parameter_count import parameter_counts
from .processing import Llama4Processor
from .registration import (
    official_model_types,
    official_model_types_registered,
    register_official_model_types,
    unregister_official_model_types,
)
from .router_losses import load_balancing_loss, router_z_loss
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
    "Llama4TextMoe",
    "Llama4VisionConfig",
    "Llama4VisionModel",
    "expert_load_metrics",
    "from_transformers_config",
    "load_balancing_loss",
    "official_model_types",
    "official_model_types_registered",
    "parameter_counts",
    "register_official_model_types",
    "router_z_loss",
    "to_transformers_config",
    "unregister_official_model_types",
]
