"""Config conversion to and from transformers' own Llama 4 text classes.

The weights need no conversion (the state-dict keys and layouts are the same); only the config
differs: transformers' `Llama4TextConfig` has `model_type` "llama4_text" and knows none of this
package's training fields (router z-loss, aux-loss-free balancing, MoE implementation choice).
"""

from transformers import Llama4TextConfig as TransformersLlama4TextConfig

from .configuration_llama4 import Llama4TextConfig

# Serialisation bookkeeping, not architecture.
_NOT_CARRIED = ("model_type", "transformers_version", "auto_map", "architectures")


def to_transformers_config(config: Llama4TextConfig) -> TransformersLlama4TextConfig:
    """transformers' config for the same architecture, so `transformers.Llama4ForCausalLM` can load
    this package's weights. Refuses configs whose behaviour transformers cannot reproduce."""
    if config.moe_load_balancing != "none":
        raise ValueError(
            f"moe_load_balancing={config.moe_load_balancing!r} adds a per-expert routing bias that transformers' "
            "Llama 4 does not have; export a model trained with it only after folding or dropping the bias"
        )
    known = set(TransformersLlama4TextConfig.__dataclass_fields__)
    fields = {k: v for k, v in config.to_dict().items() if k in known and k not in _NOT_CARRIED}
    converted = TransformersLlama4TextConfig(**fields)
    converted._attn_implementation = config._attn_implementation
    return converted


def from_transformers_config(config: TransformersLlama4TextConfig) -> Llama4TextConfig:
    """This package's config for a model described by transformers' `Llama4TextConfig`."""
    fields = {k: v for k, v in config.to_dict().items() if k not in _NOT_CARRIED}
    return Llama4TextConfig(**fields)
