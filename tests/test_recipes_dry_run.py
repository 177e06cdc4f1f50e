"""`--dry_run` on Scout and Maverick: parameter counts equal the published sizes (from a dense
formula and the architecture notes), LoRA counts equal r x (in + out) per adapted matrix, and the
memory estimate splits as the accelerate config says."""

from pathlib import Path

import pytest

from llama4_sparse.modeling_llama4 import Llama4TextConfig
from llama4_sparse.recipes import sft
from llama4_sparse.recipes.dry_run import GIB

REPO = Path(__file__).resolve().parents[1]
CONFIGS = "recipes/configs"
FSDP2 = "recipes/accelerate_configs/fsdp2.yaml"
# Vision encoder + adapter (850,960,896) and projector (20,971,520), architecture notes section 5.1.
VISION_AND_PROJECTOR = 850_960_896 + 20_971_520


def _text_total(c: Llama4TextConfig) -> int:
    d, f, e = c.hidden_size, c.intermediate_size, c.num_local_experts
    attention = d * c.num_attention_heads * c.head_dim * 2 + d * c.num_key_value_heads * c.head_dim * 2
    moe = d * e + e * 3 * d * f + 3 * d * f  # router, routed experts, shared expert
    dense = 3 * d * c.intermediate_size_mlp
    layers = sum(attention + 2 * d + (moe if i in c.moe_layers else dense) for i in range(c.num_hidden_layers))
    return 2 * c.vocab_size * d + layers + d


def _lora_total(c: Llama4TextConfig, r: int) -> int:
    d, f, e, hd = c.hidden_size, c.intermediate_size, c.num_local_experts, c.head_dim
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    attention = r * ((d + q) * 2 + (d + kv) * 2)
    moe = r * 3 * (d + f) + r * e * ((d + 2 * f) + (f + d))  # shared expert + one adapter per expert
    dense = r * 3 * (d + c.intermediate_size_mlp)
    return sum(attention + (moe if i in c.moe_layers else dense) for i in range(c.num_hidden_layers))


@pytest.mark.parametrize("size, published_billions", [("scout", 108.64), ("maverick", 401.58)])
def test_dry_run_counts_match_the_preset(size, published_billions, capsys):
    report = sft.main(["--config", f"{CONFIGS}/{size}/sft.yaml", "--dry_run", "--accelerate_config", FSDP2])
    text = Llama4TextConfig.from_preset(size)
    base = _text_total(text) + VISION_AND_PROJECTOR
    assert report["base_parameters"] == base
    assert round(base / 1e9, 2) == published_billions
    lora = _lora_total(text, r=16)
    assert report["trainable_parameters"] == lora
    assert report["total_parameters"] == base + lora
    printed = capsys.readouterr().out
    assert f"{base:,}" in printed and f"{lora:,}" in printed
    # bf16 frozen weights and float32 adapters, fully sharded over the config's 8 processes.
    assert report["processes"] == 8
    assert report["memory_gib"]["weights"] == pytest.approx((2 * base + 4 * lora) / 8 / GIB)
    assert report["memory_gib"]["optimizer"] == pytest.approx(2 * 4 * lora / 8 / GIB)


def test_dry_run_without_sharding_keeps_full_replicas():
    report = sft.main(["--config", f"{CONFIGS}/scout/sft_full.yaml", "--dry_run"])
    base = _text_total(Llama4TextConfig.from_preset("scout")) + VISION_AND_PROJECTOR
    assert report["trainable_parameters"] == report["total_parameters"] == base
    # Full fine-tune in bf16: weights, gradients and two AdamW moments, all unsharded.
    assert report["memory_gib"]["weights"] + report["memory_gib"]["gradients"] + report["memory_gib"]["optimizer"] \
        == pytest.approx(8 * base / GIB)


def _maverick_ep(tmp_path, processes: int, *args):
    config = tmp_path / f"fsdp2_ep_{processes}.yaml"
    text = (REPO / "recipes" / "accelerate_configs" / "fsdp2_ep.yaml").read_text()
    config.write_text(text.replace("num_processes: 8", f"num_processes: {processes}"))
    return sft.main(["--config", f"{CONFIGS}/maverick/sft.yaml", "--dry_run", "--accelerate_config", str(config),
                     "--lora_experts", "false", *args])


def test_dry_run_with_expert_parallel_gathers_only_the_local_experts(tmp_path, capsys):
    """Maverick, LoRA off the experts, FSDP2 over 16 GPUs: the sharded states are the same with and without EP; the
    gathered MoE layer holds 16 of the 128 experts with ep=8 instead of all of them."""
    plain = _maverick_ep(tmp_path, 16)
    ep = _maverick_ep(tmp_path, 16, "--expert_parallel_size", "8")
    assert "routed experts split over ep=8" in capsys.readouterr().out
    assert ep["expert_parallel_size"] == 8
    for key in ("weights", "gradients", "optimizer", "activations"):
        assert ep["memory_gib"][key] == pytest.approx(plain["memory_gib"][key])
    text = Llama4TextConfig.from_preset("maverick")
    experts_bf16 = text.num_local_experts * 3 * text.hidden_size * text.intermediate_size * 2
    # Current and prefetched layer: twice the experts that are not held locally any more.
    saved = plain["memory_gib"]["gathered"] - ep["memory_gib"]["gathered"]
    assert saved == pytest.approx(2 * experts_bf16 * (1 - 1 / 8) / GIB)
    assert ep["memory_gib"]["total"] < 64 < plain["memory_gib"]["total"]


def test_dry_run_refuses_expert_parallel_it_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="composes with FSDP2 only"):
        sft.main(["--config", f"{CONFIGS}/maverick/sft.yaml", "--dry_run", "--lora_experts", "false",
                  "--expert_parallel_size", "8"])
    with pytest.raises(ValueError, match="must divide the number of processes"):
        _maverick_ep(tmp_path, 12, "--expert_parallel_size", "8")
    with pytest.raises(ValueError, match="set lora_experts: false"):
        sft.main(["--config", f"{CONFIGS}/maverick/sft.yaml", "--dry_run", "--accelerate_config",
                  "recipes/accelerate_configs/fsdp2_ep.yaml", "--expert_parallel_size", "8"])
