"""Total and active (per-token) parameter counts, from a meta-device model: no memory is allocated.

"Active" counts what one token runs through: everything except the routed experts it is not sent
to, i.e. `total - routed_expert_params * (E - top_k) / E`. The embeddings and LM head are
included, which is how the official "17B active" figure is stated; for the composite model the
vision tower and projector are counted as active too.
"""

import torch

from .configuration_llama4 import Llama4Config, Llama4TextConfig
from .modeling_multimodal import Llama4ForConditionalGeneration
from .modeling_text import Llama4ForCausalLM

_ROUTED_EXPERTS = ".feed_forward.experts."


def parameter_counts(config: Llama4TextConfig | Llama4Config) -> dict:
    """`{"total": int, "active": int}` for a text config (Llama4ForCausalLM) or a composite one
    (Llama4ForConditionalGeneration: vision tower + projector + text)."""
    if isinstance(config, Llama4TextConfig):
        model_class, text_config = Llama4ForCausalLM, config
    elif isinstance(config, Llama4Config):
        model_class, text_config = Llama4ForConditionalGeneration, config.text_config
    else:
        raise TypeError(f"parameter_counts takes a Llama4TextConfig or Llama4Config, got {type(config).__name__}")
    with torch.device("meta"):
        model = model_class(config)
    total = routed = 0
    for name, parameter in model.named_parameters():
        total += parameter.numel()
        if _ROUTED_EXPERTS in f".{name}":
            routed += parameter.numel()
    experts, top_k = text_config.num_local_experts, text_config.num_experts_per_tok
    return {"total": total, "active": total - routed * (experts - top_k) // experts}
