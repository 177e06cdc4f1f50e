"""Grouped-query self-attention of the Llama 4 text model (iRoPE).

Two kinds of layers, chosen per layer by `config.no_rope_layers` (1 = RoPE):
* RoPE layers rotate q/k, optionally RMS-normalise them afterwards (weightless QK-norm, Scout only)
  and attend within absolute chunks of `attention_chunk_size` tokens.
* NoPE layers (every 4th) see the whole causal context without positions; their queries are
  scaled up with the position (attention temperature tuning) so attention stays sharp at long
  range: `1 + attn_scale * log(floor((pos + 1) / floor_scale) + 1)`.

With "sdpa" the model passes an `AttentionLayout` instead of a mask and attention runs block-wise in
memory linear in the length (chunked_attention.py). Other backends get transformers' dense masks and
are picked by `config._attn_implementation` through `ALL_ATTENTION_FUNCTIONS`, with `eager_attention`
below as the "eager" one, the reference.
"""

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers.cache_utils import Cache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .chunked_attention import AttentionLayout, linear_memory_attention
from .norm import rms_normalize
from .rope import apply_rotary_emb


def attention_temperature(position_ids: torch.Tensor, floor_scale: int, attn_scale: float) -> torch.Tensor:
    """Per-token query scale of NoPE layers, from the 0-based position of each token (fp32).

    Taking the positions from `position_ids` (not from how many tokens the cache holds) keeps a
    left-padded prompt and a packed document identical to the same text run alone.
    """
    positions = position_ids.float()
    return 1.0 + attn_scale * torch.log1p(torch.floor((positions + 1.0) / floor_scale))


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention; q (B, H, T, d), k/v (B, Hkv, S, d) -> (B, T, H, d) and the weights.

    The mask is transformers' eager mask (additive, 0 / dtype-min) or a boolean keep-mask. The
    softmax runs in fp32 so bf16 models do not lose small attention weights.
    """
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attention_mask = attention_mask[..., : key.shape[-2]]
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class Llama4TextAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        # Read by transformers' sdpa wrapper to expand the key/value heads.
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.is_causal = True
        self.scaling = self.head_dim**-0.5
        self.use_rope = bool(config.no_rope_layers[layer_idx])
        self.use_qk_norm = bool(config.use_qk_norm) and self.use_rope
        self.use_temperature_tuning = bool(config.attn_temperature_tuning) and not self.use_rope
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotations: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | AttentionLayout | None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = hidden_states.shape
        # -1, not the config's head counts: under tensor parallelism q/k/v hold only this rank's heads.
        query = self.q_proj(hidden_states).view(batch, length, -1, self.head_dim)
        key = self.k_proj(hidden_states).view(batch, length, -1, self.head_dim)
        value = self.v_proj(hidden_states).view(batch, length, -1, self.head_dim)

        if self.use_rope:
            query = apply_rotary_emb(query, rotations)
            key = apply_rotary_emb(key, rotations)
            if self.use_qk_norm:
                query = rms_normalize(query, self.config.rms_norm_eps)
                key = rms_normalize(key, self.config.rms_norm_eps)
        elif self.use_temperature_tuning:
            scale = attention_temperature(position_ids, self.config.floor_scale, self.config.attn_scale)
            query = (query * scale[..., None, None]).to(query.dtype)

        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        dropout = self.config.attention_dropout if self.training else 0.0
        if isinstance(attention_mask, AttentionLayout):
            output = linear_memory_attention(query, key, value, attention_mask, self.scaling, dropout)
            return self.o_proj(output.reshape(batch, length, -1)), None
        attend: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        output, weights = attend(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(output.reshape(batch, length, -1)), weights
