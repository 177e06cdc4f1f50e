"""Real low-bit weights: converting a model (QAT-trained or not: post-training quantization through the same
path) into modules that store packed integers and scales, and loading such a folder with `from_pretrained`.

Storage and numbers: `quantization_scheme.py`. At run time the converted modules dequantize their weights
(integers times scales, exactly the values the fake-quantized model computed with) and run the usual float
products; `8da{b}w` layers quantize-dequantize their input to int8 per token on every call, as training
did. So the gain is bytes (on disk and at rest), not speed: CPU int4 matmul kernels (torchao's
`da8w4_linear_cpu`, its CUDA int4 kernels) would each need their own layout and cover no fused experts.

A converted model's config carries `llama4_quantization` (the scheme as a dict); the package's model classes
read it when they are built (`LowBitLoading.post_init`) and swap in the low-bit modules before the weights
load, so `from_pretrained` / `AutoModelForCausalLM.from_pretrained` of a converted folder gives the converted
model. (Not `quantization_config`: transformers treats that key as one of its own quantizers.)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .experts import Llama4TextExperts
from .quantization_scheme import QuantizationScheme, activation_fake_quantizer, dequantize_rows, pack, quantize_rows, unpack

CONFIG_KEY = "llama4_quantization"


class _DynamicInput(nn.Module):
    """Holds the scheme and, for `8da{b}w`, torchao's int8 per-token quantize-dequantize of the input."""

    def _set_scheme(self, scheme: QuantizationScheme) -> None:
        self.scheme = scheme
        self.input_fake_quantizer = activation_fake_quantizer(scheme)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_fake_quantizer is None else self.input_fake_quantizer(x)

    def _weight(self, name: str) -> torch.Tensor:
        stored, scale = getattr(self, f"{name}_packed"), getattr(self, f"{name}_scale")
        return dequantize_rows(unpack(stored, self.scheme), scale.float(), self.scheme.group_size)


class LowBitLinear(_DynamicInput):
    """`nn.Linear` with `weight_packed (out, in / 2 or in)` and `weight_scale (out, in / group)`."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantizationScheme, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._set_scheme(scheme)
        width = in_features // 2 if scheme.packed else in_features
        storage = torch.uint8 if scheme.packed else torch.int8
        self.register_buffer("weight_packed", torch.zeros(out_features, width, dtype=storage))
        self.register_buffer("weight_scale", torch.ones(out_features, in_features // scheme.group_size))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantizationScheme) -> "LowBitLinear":
        module = cls(linear.in_features, linear.out_features, scheme, bias=linear.bias is not None)
        q, scale = quantize_rows(linear.weight, scheme)
        module.weight_packed.copy_(pack(q, scheme))
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone())
        return module.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._input(x), self._weight("weight").to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.scheme}, group_size={self.scheme.group_size}"


class LowBitTextExperts(_DynamicInput):
    """The routed experts with packed weights stored transposed, reduction dimension last:
    `gate_up_proj_packed (E, 2F, D / 2)`, `down_proj_packed (E, D, F / 2)` and their scales. The fused
    `gate_up_proj (E, D, 2F)` / `down_proj (E, F, D)` are dequantized on read, so `Llama4TextExperts.forward`
    and every kernel run unchanged."""

    forward_unquantized_input = Llama4TextExperts.forward

    def __init__(self, num_experts: int, hidden_size: int, expert_dim: int, scheme: QuantizationScheme):
        super().__init__()
        self.num_experts, self.hidden_size, self.expert_dim = num_experts, hidden_size, expert_dim
        self._set_scheme(scheme)
        storage = torch.uint8 if scheme.packed else torch.int8
        for name, out, k in (("gate_up_proj", 2 * expert_dim, hidden_size), ("down_proj", hidden_size, expert_dim)):
            width = k // 2 if scheme.packed else k
            self.register_buffer(f"{name}_packed", torch.zeros(num_experts, out, width, dtype=storage))
            self.register_buffer(f"{name}_scale", torch.ones(num_experts, out, k // scheme.group_size))

    @classmethod
    def from_experts(cls, experts: Llama4TextExperts, scheme: QuantizationScheme) -> "LowBitTextExperts":
        module = cls(experts.num_experts, experts.hidden_size, experts.expert_dim, scheme)
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(experts, name).detach()  # (E, K, N)
            rows = weight.transpose(1, 2).reshape(-1, weight.shape[1])  # (E * N, K)
            q, scale = quantize_rows(rows, scheme)
            getattr(module, f"{name}_packed").copy_(pack(q, scheme).view(weight.shape[0], weight.shape[2], -1))
            getattr(module, f"{name}_scale").copy_(scale.view(weight.shape[0], weight.shape[2], -1))
        return module.to(experts.gate_up_proj.device)

    @property
    def gate_up_proj(self) -> torch.Tensor:
        return self._weight("gate_up_proj").transpose(1, 2).contiguous()

    @property
    def down_proj(self) -> torch.Tensor:
        return self._weight("down_proj").transpose(1, 2).contiguous()

    def forward(self, x, top_k_index, top_k_scores, implementation: str = "auto"):
        return self.forward_unquantized_input(self._input(x), top_k_index, top_k_scores, implementation)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, scheme={self.scheme.scheme}, group_size={self.scheme.group_size}"


def _replace(model: nn.Module, scheme: QuantizationScheme, from_weights: bool) -> int:
    """Swap every module the scheme quantizes for its low-bit version; returns how many were swapped."""
    from .fake_quant import quantizable_modules

    swapped = 0
    for name, module in quantizable_modules(model, scheme):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(module, Llama4TextExperts):
            new = (LowBitTextExperts.from_experts(module, scheme) if from_weights else
                   LowBitTextExperts(module.num_experts, module.hidden_size, module.expert_dim, scheme))
        else:
            new = (LowBitLinear.from_linear(module, scheme) if from_weights else
                   LowBitLinear(module.in_features, module.out_features, scheme, bias=module.bias is not None))
        setattr(parent, child, new)
        swapped += 1
    return swapped


@torch.no_grad()
def convert_to_low_bit(model: nn.Module, scheme: QuantizationScheme | str | None = None,
                       group_size: int | None = None) -> QuantizationScheme:
    """Quantize `model` in place to real low-bit weights and record the scheme in its config.

    A QAT-prepared model converts with its own scheme (giving another is an error); any other model is
    post-training quantized with `scheme` (name or `QuantizationScheme`) and `group_size`."""
    from .fake_quant import check_scheme_fits, remove_fake_quant

    trained = getattr(model, "qat_scheme", None)
    if isinstance(scheme, str):
        scheme = QuantizationScheme(scheme, **({} if group_size is None else {"group_size": group_size}))
    if trained is not None:
        if scheme is not None and scheme.to_dict() != trained.to_dict():
            raise ValueError(f"the model was prepared for QAT with {trained.scheme}/group {trained.group_size}; "
                             f"convert it with that scheme (pass scheme=None), not {scheme.scheme}/group {scheme.group_size}")
        scheme = trained
        remove_fake_quant(model)
    if scheme is None:
        raise ValueError("convert_to_low_bit needs a scheme for a model not prepared for QAT: pass scheme='8da4w' or 'int4' (and group_size)")
    if getattr(model.config, CONFIG_KEY, None):
        raise ValueError("the model is converted already")
    check_scheme_fits(model, scheme)
    if not _replace(model, scheme, from_weights=True):
        raise ValueError(f"nothing to quantize: every linear layer and expert matched skip={list(scheme.skip)}")
    setattr(model.config, CONFIG_KEY, scheme.to_dict())
    return scheme


class LowBitLoading:
    """Model-class mixin: a config carrying `llama4_quantization` builds the low-bit modules, so the packed
    weights of a converted folder load into them."""

    def post_init(self):
        super().post_init()
        spec = getattr(self.config, CONFIG_KEY, None)
        if spec:
            _replace(self, QuantizationScheme.from_dict(spec), from_weights=False)


def low_bit_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes the model stores: routed experts (packed + scales), other quantized linears, everything else."""
    out = {"experts": 0, "linear": 0, "other": 0}
    for module in model.modules():
        kind = "experts" if isinstance(module, LowBitTextExperts) else "linear" if isinstance(module, LowBitLinear) else "other"
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        out[kind] += sum(t.numel() * t.element_size() for t in tensors)
    return out
