"""Tiny text models for the text tests: our model and transformers' reference on the same weights."""

import torch
from transformers import Llama4ForCausalLM as ReferenceForCausalLM

from llama4_sparse.modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
from llama4_sparse.modeling_llama4.transformers_compat import to_transformers_config

# Layer patterns of the two official models at 4 layers: layer 3 is NoPE in both.
PATTERNS = {
    # Scout: every layer MoE, QK-norm on, llama3-scaled RoPE (with a blend band here, so all three
    # frequency regimes are exercised).
    "scout": dict(
        interleave_moe_layer_step=1,
        use_qk_norm=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    # Maverick: dense and MoE layers alternate, no QK-norm, plain RoPE.
    "maverick": dict(interleave_moe_layer_step=2, use_qk_norm=False, rope_scaling=None),
    "dense": dict(moe_layers=[], use_qk_norm=True, rope_scaling=None),
}


def tiny_config(pattern: str = "scout", attn: str = "sdpa", **overrides) -> Llama4TextConfig:
    """4 layers, chunk 8, temperature tuning from position 3 on (floor_scale 4), top-1 of 4 experts."""
    fields = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=48,
        intermediate_size_mlp=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=1,
        attention_chunk_size=8,
        attn_temperature_tuning=True,
        floor_scale=4,
        attn_scale=0.1,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **PATTERNS[pattern],
    )
    fields.update(overrides)
    config = Llama4TextConfig(**fields)
    config._attn_implementation = attn
    return config


def our_model(config: Llama4TextConfig, seed: int = 0) -> Llama4ForCausalLM:
    torch.manual_seed(seed)
    model = Llama4ForCausalLM(config).eval()
    # Random norm weights too, so a norm applied in the wrong place cannot hide behind weight 1.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    return model


def reference_twin(model: Llama4ForCausalLM) -> ReferenceForCausalLM:
    """transformers' Llama4ForCausalLM holding exactly `model`'s weights (strict key match)."""
    reference = ReferenceForCausalLM._from_config(
        to_transformers_config(model.config), attn_implementation=model.config._attn_implementation
    ).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    return reference
