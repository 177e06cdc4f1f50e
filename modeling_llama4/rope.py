"""Rotary position embeddings of the Llama 4 text model.

Llama 4 rotates *adjacent* pairs of head channels (channels 2i and 2i+1 form one complex number),
not the two halves of the head as Llama 2/3 in transformers do. The official q/k weights are stored
for this layout, so using the half-split form would silently scramble positions.

Scout stretches the low frequencies with the llama3 rule (factor 16, one cut at 8192 tokens of
original context); Maverick uses plain RoPE.
"""

import math

import torch
from torch import nn


def rope_inverse_frequencies(rope_parameters: dict, head_dim: int, device=None) -> torch.Tensor:
    """Angular frequency of each channel pair, in fp32, llama3-scaled when the config asks for it."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (rope_parameters["rope_theta"] ** exponents)
    if rope_parameters.get("rope_type", "default") == "llama3":
        inv_freq = _llama3_scale(inv_freq, rope_parameters)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    """Keep short wavelengths, divide long ones by `factor`, blend linearly in between.

    The band edges are `original_max_position_embeddings / high_freq_factor` (below: kept) and
    `original_max_position_embeddings / low_freq_factor` (above: divided). Scout sets both factors
    to 1, so the blend band is empty.
    """
    factor = params["factor"]
    context = params["original_max_position_embeddings"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    wavelength = 2 * math.pi / inv_freq
    scaled = inv_freq / factor
    if high > low:
        blend = ((context / wavelength) - low) / (high - low)
        between = (1 - blend) * scaled + blend * inv_freq
    else:
        between = inv_freq
    long_cut, short_cut = context / low, context / high
    return torch.where(wavelength < short_cut, inv_freq, torch.where(wavelength > long_cut, scaled, between))


class Llama4TextRotaryEmbedding(nn.Module):
    """Maps position ids to unit complex rotations `exp(i * position * inv_freq)`, one per channel pair.

    The frequencies are recomputed from the config on every call (a few tiny ops) rather than kept
    in a buffer: `model.to(torch.bfloat16)` would round a buffer to 8 mantissa bits, which shifts
    the angle by whole radians past a few thousand tokens, and a buffer would also need special
    care on meta-device initialisation.
    """

    def __init__(self, config):
        super().__init__()
        self.rope_parameters = dict(config.rope_parameters)
        self.head_dim = config.head_dim

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """position_ids (B, T) -> complex64 rotations (B, T, head_dim / 2)."""
        inv_freq = rope_inverse_frequencies(self.rope_parameters, self.head_dim, device=position_ids.device)
        angles = position_ids[..., None].float() * inv_freq
        return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent channel pair of x (B, T, heads, head_dim) by rotations (B, T, head_dim / 2).

    Computed in fp32 whatever x's dtype, then cast back.
    """
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotations[:, :, None, :]).flatten(-2).to(x.dtype)
