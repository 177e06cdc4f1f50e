"""One pre-norm decoder block: `h = x + attn(norm(x))`, `out = h + ffn(norm(h))`.

The feed-forward is the routed mixture of experts on the layers listed in `config.moe_layers`
(all 48 in Scout, every other one in Maverick) and a dense SwiGLU of width
`intermediate_size_mlp` elsewhere.
"""

import torch
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import Llama4TextAttention
from .mlp import Llama4TextMLP
from .moe import Llama4TextMoe
from .norm import Llama4RMSNorm


class Llama4TextDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_moe_layer = layer_idx in config.moe_layers
        self.self_attn = Llama4TextAttention(config, layer_idx)
        if self.is_moe_layer:
            self.feed_forward = Llama4TextMoe(config)
        else:
            self.feed_forward = Llama4TextMLP(config.hidden_size, config.intermediate_size_mlp)
        self.input_layernorm = Llama4RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Llama4RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotations: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Returns the new hidden states, the router logits (B*T, E) of an MoE layer (else None)
        and the attention weights when the kernel gives them (eager)."""
        attended, attention_weights = self.self_attn(
            self.input_layernorm(hidden_states), rotations, position_ids, attention_mask, cache=cache, **kwargs
        )
        hidden_states = hidden_states + attended
        router_logits = None
        if self.is_moe_layer:
            mixed, router_logits = self.feed_forward(self.post_attention_layernorm(hidden_states))
        else:
            mixed = self.feed_forward(self.post_attention_layernorm(hidden_states))
        return hidden_states + mixed, router_logits, attention_weights
