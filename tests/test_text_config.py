"""Text config: presets, validation, parameter counts (meta device), RoPE frequencies, conversion."""

import pytest
import torch
from transformers import Llama4TextConfig as ReferenceTextConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from llama4_sparse.modeling_llama4 import Llama4Config, Llama4TextConfig, parameter_counts
from llama4_sparse.modeling_llama4.rope import rope_inverse_frequencies
from llama4_sparse.modeling_llama4.transformers_compat import from_transformers_config, to_transformers_config


def dense_formula(c: Llama4TextConfig) -> tuple[int, int]:
    """(total, active) written out from the architecture, independent of any module."""
    d, f, e, k = c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_experts_per_tok
    attention = d * c.num_attention_heads * c.head_dim * 2 + d * c.num_key_value_heads * c.head_dim * 2
    expert = 3 * d * f
    moe = len(c.moe_layers)
    dense = c.num_hidden_layers - moe
    total = (
        2 * c.vocab_size * d  # embeddings + untied LM head
        + c.num_hidden_layers * (attention + 2 * d)  # attention + its two norms
        + moe * (d * e + expert + e * expert)  # router + shared expert + routed experts
        + dense * 3 * d * c.intermediate_size_mlp
        + d  # final norm
    )
    return total, total - moe * (e - k) * expert


@pytest.mark.parametrize(
    "name, total, active_billions",
    [("scout", 107_769_861_120, 17.17), ("maverick", 400_711_848_960, 17.18)],
)
def test_official_text_parameter_counts_on_the_meta_device(name, total, active_billions):
    config = Llama4TextConfig.from_preset(name)
    counts = parameter_counts(config)  # 400 B fp32 parameters would need 1.6 TB if allocated
    assert counts["total"] == total
    assert round(counts["active"] / 1e9, 2) == active_billions
    assert (counts["total"], counts["active"]) == dense_formula(config)


def test_tiny_preset_counts_match_the_formula():
    config = Llama4TextConfig.from_preset("tiny")
    assert tuple(parameter_counts(config).values()) == dense_formula(config)


@pytest.mark.parametrize("name, total_billions", [("scout", 108.64), ("maverick", 401.58)])
def test_composite_counts_add_the_vision_tower_and_projector(name, total_billions):
    counts = parameter_counts(Llama4Config.from_preset(name))
    assert round(counts["total"] / 1e9, 2) == total_billions
    text = parameter_counts(Llama4TextConfig.from_preset(name))
    # Vision encoder + adapter (850,960,896) and projector (20,971,520) are always active.
    assert counts["total"] - text["total"] == counts["active"] - text["active"] == 850_960_896 + 20_971_520


def test_parameter_counts_rejects_other_objects():
    with pytest.raises(TypeError, match="Llama4TextConfig or Llama4Config"):
        parameter_counts({"hidden_size": 8})


def test_official_layer_patterns():
    scout, maverick = Llama4TextConfig.from_preset("scout"), Llama4TextConfig.from_preset("maverick")
    assert scout.moe_layers == list(range(48))
    assert maverick.moe_layers == list(range(1, 48, 2))
    for config in (scout, maverick):
        nope = [i for i, rope in enumerate(config.no_rope_layers) if not rope]
        assert nope == list(range(3, 48, 4))
        assert [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"] == nope
    assert scout.use_qk_norm and not maverick.use_qk_norm
    assert scout.num_experts == 16 and maverick.num_experts == 128  # the alias TRL reads


@pytest.mark.parametrize("name", ["scout", "maverick"])
def test_rope_frequencies_equal_transformers(name):
    config = Llama4TextConfig.from_preset(name)
    reference_config = to_transformers_config(config)
    rope_type = reference_config.rope_parameters["rope_type"]
    if rope_type == "default":
        dim = reference_config.head_dim
        expected = 1.0 / (reference_config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[rope_type](reference_config)
    ours = rope_inverse_frequencies(config.rope_parameters, config.head_dim)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    if name == "scout":
        # Wavelengths above the 8192-token original context are stretched 16x: 29 of the 64 pairs.
        base = rope_inverse_frequencies({**config.rope_parameters, "rope_type": "default"}, config.head_dim)
        assert int((ours != base).sum()) == 29
        assert torch.allclose(ours[ours != base], base[ours != base] / 16)


def test_llama3_blend_band_matches_transformers():
    config = Llama4TextConfig(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](to_transformers_config(config))
    torch.testing.assert_close(rope_inverse_frequencies(config.rope_parameters, config.head_dim), expected)


def test_transformers_config_round_trip():
    config = Llama4TextConfig.from_preset("maverick")
    exported = to_transformers_config(config)
    assert isinstance(exported, ReferenceTextConfig) and exported.model_type == "llama4_text"
    assert exported.moe_layers == config.moe_layers and exported.no_rope_layers == config.no_rope_layers
    back = from_transformers_config(exported)
    assert back.to_diff_dict() == config.to_diff_dict()


def test_export_refuses_a_routing_bias_transformers_lacks():
    config = Llama4TextConfig.from_preset("tiny", moe_load_balancing="aux_loss_free")
    with pytest.raises(ValueError, match="per-expert routing bias"):
        to_transformers_config(config)


def test_legacy_rope_fields_and_official_quirks_are_accepted():
    config = Llama4TextConfig(
        rope_theta=500000.0,
        rope_scaling={"type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192},
        no_rope_layers=[],  # some shipped configs store an empty list for the default pattern
        attn_temperature_tuning=4,  # older shipped configs store an int
    )
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["rope_theta"] == 500000.0
    assert config.no_rope_layers[:4] == [1, 1, 1, 0] and config.attn_temperature_tuning is True


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_attention_heads=40, num_key_value_heads=6), "must be a multiple of num_key_value_heads"),
        (dict(num_experts_per_tok=17), r"num_experts_per_tok \(17\) must be between 1 and num_local_experts \(16\)"),
        (dict(moe_layers=[0, 48]), r"moe_layers \[48\] are outside 0..47"),
        (dict(attention_chunk_size=0), "attention_chunk_size must be a positive integer"),
        (dict(head_dim=127), "head_dim must be even"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rope_parameters .* are incomplete: .*factor"),
        (dict(rope_parameters={"rope_type": "ntk", "rope_theta": 1e4}), "rope_type 'ntk' is not supported; choose one"),
        (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0, "partial_rotary_factor": 0.5}),
         "partial_rotary_factor=0.5 with rope_type 'linear'"),
        (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}), "llama3 rope scaling needs"),
        (dict(no_rope_layers=[1, 0]), "no_rope_layers must hold a 0"),
        (dict(hidden_act="gelu"), "hidden_act must be 'silu'"),
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
    ],
)
def test_bad_configs_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        Llama4TextConfig(**overrides)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown preset 'giant'; choose one of \['maverick', 'scout', 'tiny'\]"):
        Llama4TextConfig.from_preset("giant")
