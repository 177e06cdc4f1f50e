"""Rotary position embeddings of the Llama 4 text model.

Llama 4 rotates *adjacent* pairs of head channels (channels 2i and 2i+1 form one complex number),
not the two halves of the head as Llama 2/3 in transformers do. The official q/k weights are stored
for this layout, so using the half-split form would silently scramble positions. The frequency of
pair i is the same in both layouts, so the frequencies of every scaled `rope_type` come from
transformers' own RoPE initialisation functions (`ROPE_INIT_FUNCTIONS`: llama3, linear, dynamic,
yarn, longrope, ...); only plain RoPE (`default`) is computed here.

Scout stretches the low frequencies with the llama3 rule (factor 16, one cut at 8192 tokens of
original context); Maverick uses plain RoPE.
"""

import torch
from torch import nn
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

# Types whose frequencies depend on how long the sequence is; transformers recomputes them as it grows.
LENGTH_DEPENDENT_ROPE_TYPES = ("dynamic", "longrope")


def supported_rope_types() -> tuple[str, ...]:
    """`default` plus every type transformers' ROPE_INIT_FUNCTIONS knows (in the installed version)."""
    return ("default", *ROPE_INIT_FUNCTIONS)


def check_rope_type(rope_type: str) -> None:
    if rope_type not in supported_rope_types():
        raise ValueError(
            f"rope_type {rope_type!r} is not supported; choose one of {list(supported_rope_types())} (the types "
            "transformers' ROPE_INIT_FUNCTIONS provides, plus 'default')"
        )


def rope_frequencies(config, device=None, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequency of each channel pair in fp32, attention scaling of the rotations) for
    `config.rope_parameters`. `seq_len` matters only for the length-dependent types."""
    params = config.rope_parameters
    rope_type = params.get("rope_type", "default")
    check_rope_type(rope_type)
    if rope_type == "default":
        exponents = torch.arange(0, config.head_dim, 2, dtype=torch.int64, device=device).float() / config.head_dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device, seq_len)
    return inv_freq.float(), float(attention_scaling)


def rope_inverse_frequencies(rope_parameters: dict, head_dim: int, device=None, **config_fields) -> torch.Tensor:
    """Angular frequency of each channel pair, in fp32, for a bare `rope_parameters` dict (extra config fields,
    e.g. `max_position_embeddings`, by keyword)."""
    config = PreTrainedConfig()
    config.rope_parameters = dict(rope_parameters)
    config.head_dim = head_dim
    config.max_position_embeddings = rope_parameters.get("original_max_position_embeddings")
    for name, value in config_fields.items():
        setattr(config, name, value)
    return rope_frequencies(config, device)[0]


class Llama4TextRotaryEmbedding(nn.Module):
    """Maps position ids to complex rotations `scaling * exp(i * position * inv_freq)`, one per channel pair.

    `forward(x, position_ids)` as transformers' rotary embeddings (x gives the device); it returns the complex
    rotations (B, T, head_dim / 2) that `apply_rotary_emb` takes, rather than a (cos, sin) pair. The scaling is
    1 except for yarn/longrope (transformers' attention factor, applied to cos and sin alike).

    The frequencies are computed once, on the CPU in fp32, and kept as a plain attribute, not a buffer:
    `model.to(torch.bfloat16)` would round a buffer to 8 mantissa bits, which shifts the angle by whole radians
    past a few thousand tokens, and a buffer would be empty after meta-device initialisation. Length-dependent
    types (dynamic, longrope) are recomputed for each call's longest position, as transformers does.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        check_rope_type(self.rope_type)
        # Even while the model is built on the meta device.
        with torch.device("cpu"):
            inv_freq, self.attention_scaling = rope_frequencies(config)
        self.inv_freq = inv_freq

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """x (any tensor on the target device), position_ids (B, T) -> complex64 rotations (B, T, head_dim / 2)."""
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be (batch, sequence), got shape {tuple(position_ids.shape)}")
        if self.rope_type in LENGTH_DEPENDENT_ROPE_TYPES:
            inv_freq, scaling = rope_frequencies(self.config, x.device, seq_len=int(position_ids.max()) + 1)
        else:
            inv_freq, scaling = self.inv_freq.to(x.device), self.attention_scaling
        angles = position_ids[..., None].float() * inv_freq
        return torch.polar(torch.full_like(angles, scaling), angles)


def apply_rotary_emb(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent channel pair of x (B, T, heads, head_dim) by rotations (B, T, head_dim / 2).

    Computed in fp32 whatever x's dtype, then cast back.
    """
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotations[:, :, None, :]).flatten(-2).to(x.dtype)
