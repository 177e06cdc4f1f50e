"""What a low-bit scheme is, and the number format its weights are stored in.

A scheme name is `int{b}` (weight-only) or `8da{b}w` (int8 dynamic activations, b-bit weights), b in 2..8;
"int4" and "8da4w" are the ones Llama 4 deployments use, lower widths exist to study where a tiny model
breaks. Weights are symmetric and groupwise along the *reduction* dimension of each product (a linear
layer's `in_features`; `hidden_size` for the experts' `gate_up_proj (E, D, 2F)`, `intermediate_size` for
`down_proj (E, F, D)`), so one scale multiplies one partial dot product.

The numbers are torchao's (its symmetric group mapping, which its QAT fake-quantizers also use, so a
converted model reproduces the fake-quantized one exactly):

    scale = max|w over the group| / ((qmax - qmin) / 2)      # int4: max / 7.5
    q     = clamp(round(w * (1 / scale)), qmin, qmax)        # int4: [-8, 7]
    w'    = q * scale

Activations of `8da{b}w` are int8 per token, asymmetric, recomputed on every call (torchao's per-token
fake-quantizer, used by training and by the converted model alike).

Storage (`pack` / `unpack`): for b <= 4 two values per byte, `q + 8` as an unsigned nibble, the even
reduction index in the low nibble; for b > 4 one int8 per byte. Packed tensors are laid out output-major
with the reduction dimension last and contiguous: `(out, in / 2)` for a linear layer (its `weight` is
already (out, in)); `(E, 2F, D / 2)` and `(E, D, F / 2)` for the experts, i.e. their fused weights
transposed. Scales are float32 `(..., reduction / group_size)`.

Meta's `int4_mixed` (Scout's on-the-fly int4) also stores symmetric int4 in [-8, 7] two to a byte, but
row-wise (one scale per output row), with scale = max|w| / 8, and only on the experts and the shared
expert; here groups are finer (any `group_size` dividing the reduction dimension), the divisor is 7.5,
and attention is quantized as well by default.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch

SCHEME_HELP = "'int4' (weight-only) or '8da4w' (int8 dynamic activations, int4 weights); int2..int8 / 8da2w..8da8w also"
_SCHEME = re.compile(r"^(?:int(?P<wo>[2-8])|8da(?P<da>[2-8])w)$")
# Full precision unless asked otherwise: routing decisions, the tied embedding/lm_head, normalisation, and the
# vision side (the seeds name the text experts as the bulk of the bytes).
DEFAULT_SKIP = ("router", "lm_head", "embed_tokens", "vision_model", "multi_modal_projector", "score")


@dataclass
class QuantizationScheme:
    scheme: str = "8da4w"
    group_size: int = 32
    # Module-name substrings left in full precision.
    skip: tuple[str, ...] = field(default=DEFAULT_SKIP)

    def __post_init__(self):
        match = _SCHEME.match(str(self.scheme))
        if match is None:
            raise ValueError(f"unknown quantization scheme {self.scheme!r}: use {SCHEME_HELP}")
        if not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"group_size must be an integer >= 2 (e.g. 32), got {self.group_size!r}")
        self.skip = tuple(self.skip)
        self.weight_bits = int(match["wo"] or match["da"])
        self.dynamic_activations = match["da"] is not None

    @property
    def qmin(self) -> int:
        return -(2 ** (self.weight_bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.weight_bits - 1) - 1

    @property
    def packed(self) -> bool:
        return self.weight_bits <= 4

    def skips(self, module_name: str) -> bool:
        return any(part in module_name for part in self.skip)

    def check_divides(self, size: int, what: str) -> None:
        if size % self.group_size:
            divisors = [g for g in (16, 32, 64, 128, 256) if size % g == 0]
            raise ValueError(
                f"group_size {self.group_size} does not divide the reduction dimension {size} of {what}; "
                f"choose a group_size that divides it (e.g. {divisors or [size]}) or skip that module"
            )

    def to_dict(self) -> dict:
        out = asdict(self)
        out["skip"] = list(self.skip)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "QuantizationScheme":
        return cls(scheme=data["scheme"], group_size=int(data["group_size"]), skip=tuple(data.get("skip", DEFAULT_SKIP)))


def weight_fake_quant_config(scheme: QuantizationScheme):
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    return IntxFakeQuantizeConfig(getattr(torch, f"int{scheme.weight_bits}"), group_size=scheme.group_size,
                                  is_symmetric=True)


def activation_fake_quant_config(scheme: QuantizationScheme):
    if not scheme.dynamic_activations:
        return None
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    return IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)


def activation_fake_quantizer(scheme: QuantizationScheme):
    """torchao's int8 per-token quantize-dequantize module, or None for a weight-only scheme."""
    config = activation_fake_quant_config(scheme)
    if config is None:
        return None
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    return IntxFakeQuantizer(config)


@torch.no_grad()
def quantize_rows(weight: torch.Tensor, scheme: QuantizationScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (R, K), scale float32 (R, K / group)) of a 2-D weight whose reduction dimension K is last,
    with the same scales torchao's fake-quantizer computes."""
    from torchao.quantization.utils import get_group_qparams_symmetric

    w = weight.detach().float()
    scale, _ = get_group_qparams_symmetric(w, scheme.weight_bits, scheme.group_size, torch.float32)
    groups = w.view(w.shape[0], -1, scheme.group_size)
    # Times the reciprocal, as torchao's fake-quantizer rounds (a division rounds some ties the other way).
    q = torch.clamp(torch.round(groups * (1.0 / scale.unsqueeze(-1))), scheme.qmin, scheme.qmax)
    return q.to(torch.int8).view_as(w), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 (..., K) from int8 q (..., K) and scales (..., K / group)."""
    groups = q.float().unflatten(-1, (-1, group_size))
    return (groups * scale.unsqueeze(-1)).flatten(-2)


def pack(q: torch.Tensor, scheme: QuantizationScheme) -> torch.Tensor:
    """uint8 storage of int8 q along its last dimension: two nibbles per byte for <= 4 bits, else q as is."""
    if not scheme.packed:
        return q.to(torch.int8)
    if q.shape[-1] % 2:
        raise ValueError(f"packing two values per byte needs an even last dimension, got {q.shape[-1]}")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack(stored: torch.Tensor, scheme: QuantizationScheme) -> torch.Tensor:
    """int8 q from `pack`'s storage."""
    if not scheme.packed:
        return stored
    low = (stored & 0x0F).to(torch.int8) - 8
    high = (stored >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).flatten(-2)
