"""Quantization-aware training: the model computes with quantize-dequantized weights (and, for `8da{b}w`,
activations) while its parameters stay full precision and learn through straight-through gradients.

* `nn.Linear` layers (attention, shared expert, dense MLP) become torchao's `FakeQuantizedLinear`
  (`QATConfig` with the scheme's fake-quantize configs).
* The fused routed experts are not `nn.Linear`, and torchao has no QAT for 3-D expert weights, so a
  prepared experts module becomes `FakeQuantTextExperts`: its weights go through torchao's own
  fake-quantizer (the linear layers' numbers) per expert, grouped along the reduction dimension, and then
  into the same kernels (`experts.select_kernel`), which stay untouched. For `8da{b}w` the experts' input
  is fake-quantized per token (int8); the input of `down_proj` (the SwiGLU output) lives inside the
  kernels and stays full precision. (Not a `torch.nn.utils.parametrize` parametrization: its
  `parametrizations.down_proj` module would match LoRA's `down_proj` target, and a parametrized weight
  would sit under PEFT's own expert-parameter parametrization, quantizing W rather than W + BA.)
* No parameter, buffer or state-dict key changes, so a prepared model saves, checkpoints and resumes
  like a plain one, and `remove_fake_quant` gives back the plain model.

Skipped by default (`quantization_scheme.DEFAULT_SKIP`): router, embeddings, lm_head, vision tower and
projector, score head. LoRA composes: PEFT wraps a `FakeQuantizedLinear` like any `nn.Linear` (the base
path is fake-quantized, the adapter path is full precision, as in Llama 3.2's QAT + LoRA); its
expert-parameter adapters add their delta to the weight before the experts fake-quantize it.
"""

from __future__ import annotations

import torch
from torch import nn

from .experts import LLAMA4_EXPERTS_KERNELS, Llama4TextExperts, compute_dtype, select_kernel
from .quantization_scheme import (
    QuantizationScheme,
    activation_fake_quant_config,
    activation_fake_quantizer,
    weight_fake_quant_config,
)


class ExpertWeightFakeQuant(nn.Module):
    """Fake-quantizer of a fused expert weight (E, K, N) whose reduction dimension K is the middle one:
    fake-quantized per expert and output column in groups of K."""

    def __init__(self, scheme: QuantizationScheme):
        super().__init__()
        from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

        self.fake_quantizer = IntxFakeQuantizer(weight_fake_quant_config(scheme))
        self.enabled = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        experts, k, n = weight.shape
        rows = weight.transpose(1, 2).reshape(experts * n, k)
        return self.fake_quantizer(rows).view(experts, n, k).transpose(1, 2).contiguous()


class FakeQuantTextExperts(Llama4TextExperts):
    """`Llama4TextExperts` whose forward reads its weights through the fake-quantizers (and, for `8da{b}w`,
    fake-quantizes its input per token). The class of a prepared experts module is swapped to this one and
    back, so parameters and state-dict keys never change."""

    def forward(self, x, top_k_index, top_k_scores, implementation: str = "auto"):
        if self.input_fake_quantizer is not None:
            x = self.input_fake_quantizer(x)
        dtype = compute_dtype(x, self.gate_up_proj)
        # Under PEFT's expert-parameter LoRA `self.gate_up_proj` already holds W + BA, so the adapted weight is
        # what gets quantized: the same weight a merged, converted model stores.
        gate_up_proj = self.gate_up_fake_quant(self.gate_up_proj).to(dtype)
        down_proj = self.down_fake_quant(self.down_proj).to(dtype)
        kernel = LLAMA4_EXPERTS_KERNELS[select_kernel(implementation, x, top_k_index, gate_up_proj)]
        return kernel(x, top_k_index, top_k_scores, gate_up_proj, down_proj)


def check_scheme_fits(model: nn.Module, scheme: QuantizationScheme) -> None:
    """Every module the scheme quantizes has a reduction dimension its group size divides (before any change)."""
    for name, module in quantizable_modules(model, scheme):
        if isinstance(module, Llama4TextExperts):
            scheme.check_divides(module.hidden_size, f"{name}.gate_up_proj (hidden_size)")
            scheme.check_divides(module.expert_dim, f"{name}.down_proj (intermediate_size)")
        else:
            scheme.check_divides(module.in_features, f"{name} (in_features)")


def quantizable_modules(model: nn.Module, scheme: QuantizationScheme):
    """(name, module) of the plain `nn.Linear` layers and the routed experts the scheme quantizes."""
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    found = []
    for name, module in model.named_modules():
        if scheme.skips(name):
            continue
        plain_linear = type(module) is nn.Linear or isinstance(module, FakeQuantizedLinear)
        if plain_linear or isinstance(module, Llama4TextExperts):
            found.append((name, module))
    return found


def prepare_qat(model: nn.Module, scheme: QuantizationScheme | str, group_size: int | None = None) -> QuantizationScheme:
    """Make `model` (in place) compute with fake-quantized weights/activations; returns the scheme used."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    if isinstance(scheme, str):
        scheme = QuantizationScheme(scheme, **({} if group_size is None else {"group_size": group_size}))
    if getattr(model, "qat_scheme", None) is not None:
        raise ValueError("the model is prepared for QAT already; call remove_fake_quant first to change the scheme")
    check_scheme_fits(model, scheme)
    targets = {id(module) for name, module in quantizable_modules(model, scheme) if type(module) is nn.Linear}
    config = QATConfig(activation_config=activation_fake_quant_config(scheme),
                       weight_config=weight_fake_quant_config(scheme), step="prepare")
    quantize_(model, config, filter_fn=lambda module, name: id(module) in targets)
    for _, module in quantizable_modules(model, scheme):
        if isinstance(module, Llama4TextExperts):
            module.__class__ = FakeQuantTextExperts
            module.gate_up_fake_quant = ExpertWeightFakeQuant(scheme)
            module.down_fake_quant = ExpertWeightFakeQuant(scheme)
            module.input_fake_quantizer = activation_fake_quantizer(scheme)
    model.qat_scheme = scheme
    return scheme


def fake_quantizers(model: nn.Module):
    """Every fake-quantizer module the QAT preparation added."""
    from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase

    return [m for m in model.modules() if isinstance(m, (FakeQuantizerBase, ExpertWeightFakeQuant))]


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    """Turn fake quantization on or off everywhere (off: the prepared model computes in full precision)."""
    for module in fake_quantizers(model):
        module.enabled = enabled


def remove_fake_quant(model: nn.Module) -> nn.Module:
    """Undo `prepare_qat` in place, keeping the trained full-precision weights: plain `nn.Linear` layers and
    plain expert parameters, ready to save or to convert."""
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, FakeQuantizedLinear):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                  device=child.weight.device, dtype=child.weight.dtype)
                plain.weight = child.weight
                if child.bias is not None:
                    plain.bias = child.bias
                setattr(parent, child_name, plain)
        if isinstance(parent, FakeQuantTextExperts):
            parent.__class__ = Llama4TextExperts
            for name in ("gate_up_fake_quant", "down_fake_quant", "input_fake_quantizer"):
                delattr(parent, name)
    model.qat_scheme = None
    return model
