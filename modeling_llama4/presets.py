"""Named model sizes. Data only: the config classes turn these into validated configs.

`scout` and `maverick` are the values the official Hugging Face checkpoints ship in their
`config.json` (see docs/architecture notes), not transformers' class defaults. `tiny` is the
CPU-sized model the tests, recipes and demo use; its special-token ids follow the shipped
default tokenizer (4096 BPE ranks, then the 2048 Llama 4 special tokens at the same offsets as
the official 200000-rank vocabulary).
"""

_OFFICIAL_BASE_VOCAB = 200_000
_TINY_BASE_VOCAB = 4096


def _special_ids(base: int) -> dict:
    """Token ids the configs carry, at the official offsets above the BPE ranks."""
    return {
        "bos_token_id": base + 0,  # <|begin_of_text|>
        "eos_token_id": [base + 1, base + 7, base + 8],  # <|end_of_text|>, <|eom|>, <|eot|>
        "pad_token_id": base + 18,  # <|finetune_right_pad|>
        "boi_token_index": base + 80,  # <|image_start|>
        "eoi_token_index": base + 81,  # <|image_end|>
        "image_token_index": base + 92,  # <|patch|>
    }


def _text(base_vocab: int, **fields) -> dict:
    ids = _special_ids(base_vocab)
    return {
        "vocab_size": base_vocab + 2048,
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "pad_token_id": ids["pad_token_id"],
        **fields,
    }


_SHARED_TEXT = dict(
    hidden_size=5120,
    intermediate_size=8192,
    intermediate_size_mlp=16384,
    num_hidden_layers=48,
    num_attention_heads=40,
    num_key_value_heads=8,
    head_dim=128,
    attention_chunk_size=8192,
    attn_temperature_tuning=True,
    floor_scale=8192,
    attn_scale=0.1,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    num_experts_per_tok=1,
    router_aux_loss_coef=0.001,
)

TEXT_PRESETS = {
    "scout": _text(
        _OFFICIAL_BASE_VOCAB,
        **_SHARED_TEXT,
        num_local_experts=16,
        interleave_moe_layer_step=1,
        use_qk_norm=True,
        max_position_embeddings=10_485_760,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 16.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "maverick": _text(
        _OFFICIAL_BASE_VOCAB,
        **_SHARED_TEXT,
        num_local_experts=128,
        interleave_moe_layer_step=2,
        use_qk_norm=False,
        max_position_embeddings=1_048_576,
        rope_scaling=None,
    ),
    "tiny": _text(
        _TINY_BASE_VOCAB,
        hidden_size=128,
        intermediate_size=256,
        intermediate_size_mlp=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=2,
        use_qk_norm=True,
        attention_chunk_size=256,
        attn_temperature_tuning=True,
        floor_scale=256,
        attn_scale=0.1,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=4096,
        router_aux_loss_coef=0.001,
    ),
}

_OFFICIAL_VISION = dict(
    hidden_size=1408,
    num_hidden_layers=34,
    num_attention_heads=16,
    intermediate_size=5632,
    image_size=336,
    patch_size=14,
    num_channels=3,
    hidden_act="gelu",
    norm_eps=1e-5,
    pixel_shuffle_ratio=0.5,
    projector_input_dim=4096,
    projector_output_dim=4096,
    vision_output_dim=4096,
    multi_modal_projector_bias=False,
    projector_dropout=0.0,
    attention_dropout=0.0,
    rope_theta=10000.0,
    vision_feature_layer=-1,
    vision_feature_select_strategy="default",
    initializer_range=0.02,
)

VISION_PRESETS = {
    "scout": dict(_OFFICIAL_VISION),
    "maverick": dict(_OFFICIAL_VISION),
    # 8x8 patch grid of 4-pixel patches on 32-pixel tiles: 16 tokens per tile after pixel shuffle.
    "tiny": dict(
        _OFFICIAL_VISION,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,  # the adapter reads the pixel-shuffled width, hidden / ratio**2
        image_size=32,
        patch_size=4,
        projector_input_dim=128,
        projector_output_dim=128,
        vision_output_dim=128,
    ),
}


def composite_preset(name: str) -> dict:
    base = _TINY_BASE_VOCAB if name == "tiny" else _OFFICIAL_BASE_VOCAB
    ids = _special_ids(base)
    return {
        "text_config": dict(TEXT_PRESETS[name]),
        "vision_config": dict(VISION_PRESETS[name]),
        "boi_token_index": ids["boi_token_index"],
        "eoi_token_index": ids["eoi_token_index"],
        "image_token_index": ids["image_token_index"],
    }
