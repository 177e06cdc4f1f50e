"""Quantization-aware training: the model computes with quantize-dequantized weights (and, for `8da{b}w`,
activations) while its parameters stay full precision and learn through straight-through gradients.

* `nn.Linear` layers (attention, shared expert, dense MLP) become torchao's `FakeQuantizedLinear`
  (`QATConfig` with the scheme's fake-quantize configs).
* The fused routed experts are not `nn.Linear`, and torchao has no QAT for 3-D expert weights, so their
  `gate_up_proj` / `down_proj` get a `torch.nn.utils.parametrize` parametrization: every read of the
  parameter inside `Llama4TextExperts.forward` returns the fake-quantized weight, per expert, grouped along
  the reduction dimension, through torchao's own fake-quantizer (so the numbers are the linear layers').
  The experts code and every kernel (`experts.select_kernel`) stay untouched. For `8da{b}w` a forward
  pre-hook fake-quantizes the experts' input per token (int8); the input of `down_proj` (the SwiGLU
  output) lives inside the kernels and stays full precision.
* The state dict keeps its usual keys (`...experts.gate_up_proj`) through a state-dict hook, so a
  prepared model saves, checkpoints and resumes like a plain one, and `remove_fake_quant` gives back the
  plain model.

Skipped by default (`quantization_scheme.DEFAULT_SKIP`): router, embeddings, lm_head, vision tower and
projector, score head. LoRA composes: PEFT wraps a `FakeQuantizedLinear` like any `nn.Linear` (the base
path is fake-quantized, the adapter path is full precision, as in Llama 3.2's QAT + LoRA), and its
expert-parameter adapters add their delta after the fake-quantized base expert weight.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from .experts import Llama4TextExperts
from .quantization_scheme import (
    QuantizationScheme,
    activation_fake_quant_config,
    activation_fake_quantizer,
    weight_fake_quant_config,
)

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


class ExpertWeightFakeQuant(nn.Module):
    """Parametrization of a fused expert weight (E, K, N) whose reduction dimension K is the middle one:
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


def _expert_input_hook(module, args, kwargs):
    fake_quantizer = module.input_fake_quantizer
    if not fake_quantizer.enabled:
        return None
    return (fake_quantizer(args[0]), *args[1:]), kwargs


def _plain_keys_hook(module, state_dict, prefix, local_metadata):
    # `parametrizations.gate_up_proj.original` is saved as `gate_up_proj`, the key every loader expects.
    for name in EXPERT_WEIGHTS:
        key = f"{prefix}parametrizations.{name}.original"
        if key in state_dict:
            state_dict[f"{prefix}{name}"] = state_dict.pop(key)
    for key in [k for k in state_dict if k.startswith(f"{prefix}input_fake_quantizer.")]:
        del state_dict[key]


def _plain_keys_load_hook(module, state_dict, prefix, *args):
    for name in EXPERT_WEIGHTS:
        if f"{prefix}{name}" in state_dict and parametrize.is_parametrized(module, name):
            state_dict[f"{prefix}parametrizations.{name}.original"] = state_dict.pop(f"{prefix}{name}")


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
            for name in EXPERT_WEIGHTS:
                parametrize.register_parametrization(module, name, ExpertWeightFakeQuant(scheme))
            if scheme.dynamic_activations:
                module.input_fake_quantizer = activation_fake_quantizer(scheme)
                module._qat_hook = module.register_forward_pre_hook(_expert_input_hook, with_kwargs=True)
            module._qat_state_hooks = (module.register_state_dict_post_hook(_plain_keys_hook),
                                       module.register_load_state_dict_pre_hook(_plain_keys_load_hook))
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
        if isinstance(parent, Llama4TextExperts):
            for name in EXPERT_WEIGHTS:
                if parametrize.is_parametrized(parent, name):
                    parametrize.remove_parametrizations(parent, name, leave_parametrized=False)
            if hasattr(parent, "_qat_hook"):
                parent._qat_hook.remove()
                del parent._qat_hook, parent.input_fake_quantizer
            for handle in getattr(parent, "_qat_state_hooks", ()):
                handle.remove()
            parent.__dict__.pop("_qat_state_hooks", None)
    model.qat_scheme = None
    return model
