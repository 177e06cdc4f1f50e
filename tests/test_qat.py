"""Quantization-aware training and low-bit export on the tiny model: fake quantization against a reference
written here, straight-through gradients, every experts kernel, LoRA on top, the converted model against the
fake-quantized one, the saved folder, the recipe flag and the errors."""

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from llama4_sparse.modeling_llama4 import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig
from llama4_sparse.modeling_llama4.experts import Llama4TextExperts
from llama4_sparse.modeling_llama4.fake_quant import (
    ExpertWeightFakeQuant,
    FakeQuantTextExperts,
    prepare_qat,
    remove_fake_quant,
    set_fake_quant,
)
from llama4_sparse.modeling_llama4.low_bit import LowBitLinear, LowBitTextExperts, convert_to_low_bit, low_bit_bytes
from llama4_sparse.modeling_llama4.quantization_scheme import QuantizationScheme, pack, unpack
from llama4_sparse.modeling_llama4.quantize import main as quantize_cli
from llama4_sparse.recipes.common import LORA_EXCLUDED, LORA_EXPERT_PARAMETERS, LORA_TARGET_MODULES

KERNELS = ["loop", "padded", "batched", "dense", "grouped_mm"]


def _model(seed=0):
    torch.manual_seed(seed)
    return Llama4ForCausalLM(Llama4TextConfig.from_preset("tiny")).eval()


def _ids(seed=1, shape=(2, 19)):
    return torch.randint(0, 6000, shape, generator=torch.Generator().manual_seed(seed))


def _reference_fake_quant(w, bits, group):
    """Symmetric groupwise quantize-dequantize along the last dimension, from the formula alone."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    groups = w.reshape(*w.shape[:-1], -1, group)
    scale = groups.abs().amax(-1, keepdim=True) / ((qmax - qmin) / 2)
    q = torch.clamp(torch.round(groups * (1.0 / scale)), qmin, qmax)
    return (q * scale).reshape(w.shape)


def _set_kernel(model, kernel):
    for layer in model.model.layers:
        if hasattr(layer.feed_forward, "implementation"):
            layer.feed_forward.implementation = kernel


@pytest.mark.parametrize("bits,group", [(4, 32), (2, 64), (8, 16)])
def test_expert_fake_quant_equals_a_reference_per_expert_along_the_reduction_dim(bits, group):
    scheme = QuantizationScheme(f"int{bits}", group)
    weight = torch.randn(3, 128, 96) * 0.05  # (E, K=reduction, N)
    got = ExpertWeightFakeQuant(scheme)(weight)
    for e in range(3):
        # Groups run down each output column of expert e: quantize the transpose along its last dim.
        expected = _reference_fake_quant(weight[e].t(), bits, group).t()
        torch.testing.assert_close(got[e], expected, rtol=0, atol=1e-7)
    assert len(torch.unique(got[0, :group, 0])) <= 2 ** bits


def test_linear_fake_quant_equals_the_reference_and_the_experts_numbers():
    model = _model()
    prepare_qat(model, "int4", 32)
    q_proj = model.model.layers[0].self_attn.q_proj
    expected = _reference_fake_quant(q_proj.weight.detach(), 4, 32)
    torch.testing.assert_close(q_proj.weight_fake_quantizer(q_proj.weight).detach(), expected, rtol=0, atol=1e-7)


def test_straight_through_gradient_reaches_the_full_precision_weights():
    scheme = QuantizationScheme("int4", 32)
    weight = (torch.randn(2, 64, 32) * 0.05).requires_grad_()
    upstream = torch.randn(2, 64, 32)
    (ExpertWeightFakeQuant(scheme)(weight) * upstream).sum().backward()
    # Reference: torchao's straight-through estimator: rounding passes the gradient through, the clamp after it
    # zeroes it outside [qmin, qmax] (the group maximum, at 7.5 -> 8, among them), and the scale is a constant.
    groups = weight.detach().transpose(1, 2).reshape(2, 32, 2, 32)
    scale = groups.abs().amax(-1, keepdim=True) / 7.5
    rounded = torch.round(groups * (1.0 / scale))
    inside = ((rounded >= -8) & (rounded <= 7)).reshape(2, 32, 64).transpose(1, 2)
    torch.testing.assert_close(weight.grad, upstream * inside)
    assert inside.float().mean() > 0.9

    model = _model()
    prepare_qat(model, "8da4w", 32)
    model.train()
    model(_ids(), labels=_ids()).loss.backward()
    experts = model.model.layers[1].feed_forward.experts
    for param in (experts.gate_up_proj, experts.down_proj, model.model.layers[0].self_attn.q_proj.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0


@pytest.mark.parametrize("scheme", ["8da4w", "int4"])
def test_every_experts_kernel_agrees_fake_quantized_and_converted(scheme):
    model = _model()
    prepare_qat(model, scheme, 32)
    ids = _ids()
    reference = model(ids).logits
    for kernel in KERNELS:
        _set_kernel(model, kernel)
        torch.testing.assert_close(model(ids).logits, reference, rtol=0, atol=1e-5, msg=kernel)
    convert_to_low_bit(model)
    for kernel in KERNELS:
        _set_kernel(model, kernel)
        torch.testing.assert_close(model(ids).logits, reference, rtol=0, atol=1e-5, msg=kernel)


@pytest.mark.parametrize("scheme", ["8da4w", "int4", "int2"])
def test_converted_logits_equal_fake_quantized_and_reload_and_generate(tmp_path, scheme):
    model = _model()
    fp_logits = model(_ids()).logits
    prepare_qat(model, scheme, 32)
    fake = model(_ids()).logits
    assert (fake - fp_logits).abs().max() > 1e-3  # the fake quantization does something
    convert_to_low_bit(model)
    assert isinstance(model.model.layers[1].feed_forward.experts, LowBitTextExperts)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LowBitLinear)
    assert type(model.model.layers[1].feed_forward.router).__name__ == "Llama4Router"
    converted = model(_ids()).logits
    torch.testing.assert_close(converted, fake, rtol=0, atol=1e-4)

    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["llama4_quantization"]["scheme"] == scheme
    reloaded = Llama4ForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.model.layers[1].feed_forward.experts, LowBitTextExperts)
    torch.testing.assert_close(reloaded(_ids()).logits, converted, rtol=0, atol=1e-6)
    out = reloaded.generate(_ids(shape=(1, 6)), max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 14)


def test_expert_weights_on_disk_are_at_most_0_16_of_fp32():
    model = _model()
    experts = [m for m in model.modules() if isinstance(m, Llama4TextExperts)]
    fp32_bytes = sum((m.gate_up_proj.numel() + m.down_proj.numel()) * 4 for m in experts)
    convert_to_low_bit(model, "8da4w", 32)
    stored = low_bit_bytes(model)
    assert stored["experts"] / fp32_bytes <= 0.16
    packed = model.model.layers[1].feed_forward.experts.gate_up_proj_packed
    assert packed.dtype == torch.uint8 and packed.shape == (4, 512, 64)  # (E, 2F, D / 2)


def test_pack_round_trips_every_value():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)
    scheme = QuantizationScheme("int4")
    stored = pack(q, scheme)
    assert stored.dtype == torch.uint8 and stored.shape == (3, 16)
    assert torch.equal(unpack(stored, scheme), q)
    # Low nibble holds the even index: -8 -> 0, -7 -> 1.
    assert stored[0, 0].item() == 0x10
    q8 = torch.arange(-128, 128, dtype=torch.int8).view(4, 64)
    assert torch.equal(unpack(pack(q8, QuantizationScheme("int8")), QuantizationScheme("int8")), q8)


def test_post_training_quantization_cli_and_multimodal_model(tmp_path):
    torch.manual_seed(0)
    model = Llama4ForConditionalGeneration(Llama4Config.from_preset("tiny", text_config=Llama4TextConfig.from_preset("tiny")))
    model.save_pretrained(tmp_path / "fp")
    quantize_cli(["--scheme", "int4", "--group_size", "64", str(tmp_path / "fp"), str(tmp_path / "q")])
    loaded = Llama4ForConditionalGeneration.from_pretrained(tmp_path / "q").eval()
    names = {type(m).__name__ for m in loaded.modules()}
    assert {"LowBitLinear", "LowBitTextExperts"} <= names
    assert all(type(m) is torch.nn.Linear or not isinstance(m, LowBitLinear)
               for n, m in loaded.named_modules() if "vision" in n)
    expected = copy.deepcopy(model).eval()
    convert_to_low_bit(expected, "int4", 64)
    ids = _ids()
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_lora_on_top_of_qat_trains_and_merges_into_a_converted_model():
    model = _model()
    model.train()
    prepare_qat(model, "8da4w", 32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGET_MODULES,
                        target_parameters=LORA_EXPERT_PARAMETERS, exclude_modules=LORA_EXCLUDED)
    peft_model = get_peft_model(model, config)
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "FakeQuantizedLinear"
    ids = _ids(shape=(4, 24))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    lora_b = q_proj.lora_B["default"].weight.detach().clone()
    losses = []
    for _ in range(6):
        loss = peft_model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert not torch.equal(q_proj.lora_B["default"].weight, lora_b)
    merged = peft_model.merge_and_unload().eval()
    fake = merged(ids).logits
    convert_to_low_bit(merged)
    torch.testing.assert_close(merged(ids).logits, fake, rtol=0, atol=1e-4)


def test_fake_quant_switches_off_and_removes_cleanly():
    model = _model()
    fp_logits = model(_ids()).logits
    keys = set(model.state_dict())
    prepare_qat(model, "8da4w", 32)
    assert set(model.state_dict()) == keys  # saves and resumes like a plain model
    set_fake_quant(model, False)
    torch.testing.assert_close(model(_ids()).logits, fp_logits, rtol=0, atol=1e-6)
    set_fake_quant(model, True)
    remove_fake_quant(model)
    assert not any(isinstance(m, FakeQuantTextExperts) for m in model.modules())
    assert all(type(m).__name__ != "FakeQuantizedLinear" for m in model.modules())
    torch.testing.assert_close(model(_ids()).logits, fp_logits, rtol=0, atol=1e-6)


def test_bad_input_raises_errors_that_name_the_fix():
    with pytest.raises(ValueError, match="unknown quantization scheme 'int5w'.*'int4'.*'8da4w'"):
        QuantizationScheme("int5w")
    with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
        QuantizationScheme("int4", 1)
    model = _model()
    with pytest.raises(ValueError, match="group_size 48 does not divide .* 128 .*choose a group_size that divides it"):
        prepare_qat(model, "int4", 48)
    assert not any(isinstance(m, FakeQuantTextExperts) for m in model.modules())  # nothing half-prepared
    with pytest.raises(ValueError, match="needs a scheme"):
        convert_to_low_bit(model)
    prepare_qat(model, "int4", 32)
    with pytest.raises(ValueError, match="prepared for QAT with int4/group 32"):
        convert_to_low_bit(model, "8da4w", 32)
    with pytest.raises(ValueError, match="prepared for QAT already"):
        prepare_qat(model, "int4", 32)


def test_recipe_qat_flag_trains_and_writes_loadable_full_precision_and_low_bit_folders(tmp_path):
    from llama4_sparse.recipes import sft
    from llama4_sparse.recipes.common import parse_recipe
    from trl import SFTConfig

    tiny = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "tiny" / "sft.yaml"
    quick = ["--config", str(tiny), "--num_train_examples", "8", "--prompt_style", "plain", "--save_strategy", "no",
             "--logging_steps", "1", "--disable_tqdm", "true", "--warmup_steps", "0", "--max_steps", "2"]
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        parse_recipe(SFTConfig, sft.SFTArguments, [*quick, "--output_dir", str(tmp_path / "x"), "--qat", "int5w"])
    with pytest.raises(ValueError, match="save_low_bit converts a QAT-trained model; set --qat"):
        parse_recipe(SFTConfig, sft.SFTArguments, [*quick, "--output_dir", str(tmp_path / "x"), "--save_low_bit", "true"])

    out = tmp_path / "qat"
    sft.main([*quick, "--output_dir", str(out), "--qat", "8da4w", "--qat_start_step", "1", "--save_low_bit", "true"])
    plain = Llama4ForCausalLM.from_pretrained(out).eval()
    assert all(type(m).__name__ not in ("FakeQuantizedLinear", "LowBitLinear") for m in plain.modules())
    low_bit = Llama4ForCausalLM.from_pretrained(out / "low_bit").eval()
    assert isinstance(low_bit.model.layers[1].feed_forward.experts, LowBitTextExperts)
    # The low-bit folder is the saved full-precision weights, converted.
    convert_to_low_bit(plain, "8da4w", 32)
    torch.testing.assert_close(low_bit(_ids()).logits, plain(_ids()).logits, rtol=0, atol=1e-5)
    assert low_bit.generate(_ids(shape=(1, 5)), max_new_tokens=4, do_sample=False).shape == (1, 9)
    assert "Quantization-aware training:** `8da4w`" in (out / "README.md").read_text()
