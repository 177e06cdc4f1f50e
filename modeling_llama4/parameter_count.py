"""Total and active (per-token) parameter counts, from a meta-device model: no memory is allocated.

"Active" counts what one token runs through: everything except the routed experts it is not sent
to, i.e. `total - routed_expert_params * (E - top_k) / E`. The embeddings and LM head are
included, which is how the official "17B active" figure is stated.
"""

import torch

from .configuration_llama4 import Llama4Config, Llama4TextConfig
from .modeling_text import Llama4ForCausalLM

_ROUTED_EXPERTS = ".feed_forward.experts."


def _meta_model(build):
    with torch.device("meta"):
        return build()


def _text_counts(config: Llama4TextConfig) -> tuple[int, int]:
    model = _meta_model(lambda: Llama4ForCausalLM(config))
    total = routed = 0
    for name, parameter in model.named_parameters():
        total += parameter.numel()
        if _ROUTED_EXPERTS in f".{name}":
            routed += parameter.numel()
    idle_fraction = (config.num_local_experts - config.num_experts_per_tok) / config.num_local_experts
    return total, total - round(routed * idle_fraction)


def parameter_counts(config: Llama4TextConfig | Llama4Config) -> dict:
    """`{"total": int, "active": int}` for a text config or a composite (vision + projector + text) one."""
    if isinstance(config, Llama4TextConfig):
        total, active = _text_counts(config)
        return {"total": total, "active": active}
    if isinstance(config, Llama4Config):
        from .modeling_vision import Llama4VisionModel

        total, active = _text_counts(config.text_config)
        vision = _meta_model(lambda: Llama4VisionModel(config.vision_config))
        # The projector is one bias-free linear map from the vision output to the text width.
        projector = config.vision_config.vision_output_dim * config.text_config.hidden_size
        others = sum(p.numel() for p in vision.parameters()) + projector
        return {"total": total + others, "active": active + others}
    raise TypeError(f"parameter_counts takes a Llama4TextConfig or Llama4Config, got {type(config).__name__}")
