"""Configs for the Llama 4 text model, vision tower and the composite multimodal model.

Every field of the official `config.json` is accepted as is (legacy `rope_theta`/`rope_scaling`
included, folded into `rope_parameters` as transformers 5 does). Fields this package adds for
training (router losses, aux-loss-free balancing) default to off, so an official checkpoint behaves
exactly as published.
"""

from __future__ import annotations

import copy

from transformers import PreTrainedConfig

from .presets import TEXT_PRESETS, VISION_PRESETS, composite_preset
from .rope import check_rope_type

MOE_BALANCING = ("none", "aux_loss_free")
# How the routed experts are computed; "auto" picks the fastest that runs on the device (see experts.py).
MOE_IMPLEMENTATIONS = ("auto", "grouped_mm", "loop", "padded", "batched", "dense")


def _preset(table: dict, name: str) -> dict:
    if name not in table:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(table)}")
    return copy.deepcopy(table[name])


def _own_auto_map(kwargs: dict) -> dict:
    """A per-instance `auto_map` (TRL loads models by path through it and needs a dict even when
    empty); a class-level dict would be shared, and `save_pretrained` writes into it."""
    return dict(kwargs.pop("auto_map", None) or {})


def _fold_rope(rope_parameters, rope_theta, rope_scaling, default_theta: float) -> dict:
    """One `rope_parameters` dict from either the transformers-5 field or the legacy pair."""
    if rope_parameters:
        params = dict(rope_parameters)
    else:
        params = dict(rope_scaling or {})
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params.pop("type")
        params.setdefault("rope_theta", rope_theta if rope_theta is not None else default_theta)
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", default_theta)
    check_rope_type(params["rope_type"])
    partial = params.get("partial_rotary_factor")
    if partial not in (None, 1, 1.0) and params["rope_type"] != "proportional":
        raise ValueError(
            f"partial_rotary_factor={partial} with rope_type {params['rope_type']!r}: Llama 4 rotates every channel "
            "pair of the head; drop partial_rotary_factor, or use rope_type 'proportional' (rotates that fraction "
            "of the pairs and leaves the rest unrotated)"
        )
    if params["rope_type"] == "llama3":
        missing = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} - set(params)
        if missing:
            raise ValueError(f"llama3 rope scaling needs {sorted(missing)} in rope_parameters")
        if params["factor"] < 1.0 or params["high_freq_factor"] < params["low_freq_factor"]:
            raise ValueError(
                "llama3 rope scaling needs factor >= 1 and high_freq_factor >= low_freq_factor, "
                f"got {params}"
            )
    if params["rope_theta"] <= 0:
        raise ValueError(f"rope_theta must be positive, got {params['rope_theta']}")
    return params


class Llama4TextConfig(PreTrainedConfig):
    """The decoder: GQA attention with iRoPE (chunked RoPE layers, NoPE every few layers) and a
    routed mixture of experts with a shared expert."""

    model_type = "llama4_sparse_text"
    base_config_key = "text_config"
    keys_to_ignore_at_inference = ["past_key_values"]
    # TRL and Mixtral-style losses read `num_experts`.
    attribute_map = {"num_experts": "num_local_experts"}
    # `from_pretrained(..., tp_plan="auto")`: transformers' tensor-parallel styles by parameter/module name, relative
    # to the backbone. Attention splits by heads (q/k/v by output rows, o by input columns: one all-reduce); the
    # shared expert and dense MLPs likewise. The fused experts split along each expert's intermediate width:
    # `gate_up_proj (E, D, 2F)` on its last dim with gate and up halves split separately (packed), `down_proj
    # (E, F, D)` on F, and the experts module sums the partial outputs (one all-reduce). The router stays whole, so
    # every rank routes every token alike and any experts kernel runs on its local slices.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.feed_forward.shared_expert.gate_proj": "colwise",
        "layers.*.feed_forward.shared_expert.up_proj": "colwise",
        "layers.*.feed_forward.shared_expert.down_proj": "rowwise",
        "layers.*.feed_forward.experts.gate_up_proj": "packed_rowwise",
        "layers.*.feed_forward.experts.down_proj": "colwise",
        "layers.*.feed_forward.experts": "moe_tp_experts",
        "layers.*.feed_forward.gate_proj": "colwise",
        "layers.*.feed_forward.up_proj": "colwise",
        "layers.*.feed_forward.down_proj": "rowwise",
    }
    # Pipeline stages: which backbone inputs each stage takes and what it hands on.
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    def __init__(
        self,
        vocab_size: int = 202048,
        hidden_size: int = 5120,
        intermediate_size: int = 8192,
        intermediate_size_mlp: int = 16384,
        num_hidden_layers: int = 48,
        num_attention_heads: int = 40,
        num_key_value_heads: int = 8,
        head_dim: int | None = 128,
        hidden_act: str = "silu",
        max_position_embeddings: int = 10_485_760,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        use_cache: bool = True,
        pad_token_id: int | None = 200018,
        bos_token_id: int | None = 200000,
        eos_token_id: int | list[int] | None = (200001, 200007, 200008),
        tie_word_embeddings: bool = False,
        attention_dropout: float = 0.0,
        attention_bias: bool = False,
        num_experts_per_tok: int = 1,
        num_local_experts: int = 16,
        moe_layers: list[int] | None = None,
        interleave_moe_layer_step: int = 1,
        use_qk_norm: bool = True,
        output_router_logits: bool = False,
        router_aux_loss_coef: float = 0.001,
        router_jitter_noise: float = 0.0,
        router_z_loss_coef: float = 0.0,
        moe_load_balancing: str = "none",
        moe_bias_update_rate: float = 1e-3,
        moe_implementation: str = "auto",
        rope_parameters: dict | None = None,
        rope_theta: float | None = None,
        rope_scaling: dict | None = None,
        no_rope_layers: list[int] | None = None,
        no_rope_layer_interval: int = 4,
        attention_chunk_size: int | None = 8192,
        layer_types: list[str] | None = None,
        attn_temperature_tuning: bool = True,
        floor_scale: int = 8192,
        attn_scale: float = 0.1,
        for_llm_compressor: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.intermediate_size_mlp = intermediate_size_mlp
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.attention_dropout = attention_dropout
        self.attention_bias = attention_bias
        self.num_experts_per_tok = num_experts_per_tok
        self.num_local_experts = num_local_experts
        self.interleave_moe_layer_step = interleave_moe_layer_step
        self.moe_layers = (
            list(moe_layers)
            if moe_layers is not None
            else list(range(interleave_moe_layer_step - 1, num_hidden_layers, max(interleave_moe_layer_step, 1)))
        )
        self.use_qk_norm = use_qk_norm
        self.output_router_logits = output_router_logits
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_jitter_noise = router_jitter_noise
        self.router_z_loss_coef = router_z_loss_coef
        self.moe_load_balancing = moe_load_balancing
        self.moe_bias_update_rate = moe_bias_update_rate
        self.moe_implementation = moe_implementation
        self.rope_parameters = _fold_rope(rope_parameters, rope_theta, rope_scaling, 500000.0)
        self.no_rope_layer_interval = no_rope_layer_interval
        # 1 marks a RoPE layer; an empty list in a shipped config means "the default pattern".
        self.no_rope_layers = (
            list(no_rope_layers)
            if no_rope_layers
            else [int((i + 1) % no_rope_layer_interval != 0) for i in range(num_hidden_layers)]
        )
        self.attention_chunk_size = attention_chunk_size
        self.layer_types = (
            list(layer_types)
            if layer_types is not None
            else [
                "chunked_attention" if rope and attention_chunk_size is not None else "full_attention"
                for rope in self.no_rope_layers[:num_hidden_layers]
            ]
        )
        # Older hub configs store the int 4 here; any truthy value turns tuning on.
        self.attn_temperature_tuning = bool(attn_temperature_tuning)
        self.floor_scale = floor_scale
        self.attn_scale = attn_scale
        self.for_llm_compressor = for_llm_compressor
        if isinstance(eos_token_id, tuple):
            eos_token_id = list(eos_token_id)
        self.auto_map = _own_auto_map(kwargs)
        # Before transformers' own checks, which would report some of the same problems less clearly.
        self.validate_architecture()
        try:
            super().__init__(
                pad_token_id=pad_token_id,
                bos_token_id=bos_token_id,
                eos_token_id=eos_token_id,
                tie_word_embeddings=tie_word_embeddings,
                **kwargs,
            )
        except KeyError as error:
            # transformers' own check of a scaled rope_type's fields (llama3: ours, above) names missing keys so.
            if "rope_parameters" not in str(error):
                raise
            raise ValueError(f"rope_parameters {self.rope_parameters} are incomplete: {error.args[0]}") from None

    def _validate_llama3_rope_parameters(self, rope_parameters: dict, ignore_keys=None) -> None:
        """transformers' llama3 check warns on Scout's shipped scaling (low_freq_factor == high_freq_factor,
        an empty blend band, which the formula handles); ours accepts it and rejects what is really wrong."""
        _fold_rope(rope_parameters, None, None, 500000.0)

    def validate_architecture(self) -> None:
        """Raise a ValueError naming the field and the fix for a config no model can be built from."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                f"num_local_experts ({self.num_local_experts})"
            )
        if self.interleave_moe_layer_step < 1:
            raise ValueError(f"interleave_moe_layer_step must be >= 1, got {self.interleave_moe_layer_step}")
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"moe_layers {bad} are outside 0..{self.num_hidden_layers - 1} (num_hidden_layers="
                f"{self.num_hidden_layers})"
            )
        if len(self.no_rope_layers) < self.num_hidden_layers or set(self.no_rope_layers) - {0, 1}:
            raise ValueError(
                f"no_rope_layers must hold a 0 (NoPE) or 1 (RoPE) for each of the "
                f"{self.num_hidden_layers} layers, got {self.no_rope_layers}"
            )
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - {
            "chunked_attention", "full_attention"
        }:
            raise ValueError(
                f"layer_types must list 'chunked_attention' or 'full_attention' for each of the "
                f"{self.num_hidden_layers} layers, got {self.layer_types}"
            )
        if self.attention_chunk_size is not None and self.attention_chunk_size < 1:
            raise ValueError(f"attention_chunk_size must be a positive integer or None, got {self.attention_chunk_size}")
        if self.no_rope_layer_interval < 1:
            raise ValueError(f"no_rope_layer_interval must be >= 1, got {self.no_rope_layer_interval}")
        if self.attn_temperature_tuning and self.floor_scale < 1:
            raise ValueError(f"floor_scale must be >= 1 when attn_temperature_tuning is on, got {self.floor_scale}")
        if self.moe_load_balancing not in MOE_BALANCING:
            raise ValueError(f"moe_load_balancing must be one of {MOE_BALANCING}, got {self.moe_load_balancing!r}")
        if self.moe_bias_update_rate < 0:
            raise ValueError(f"moe_bias_update_rate must be >= 0, got {self.moe_bias_update_rate}")
        if self.moe_implementation not in MOE_IMPLEMENTATIONS:
            raise ValueError(
                f"moe_implementation must be one of {MOE_IMPLEMENTATIONS}, got {self.moe_implementation!r}"
            )
        if self.router_aux_loss_coef < 0 or self.router_z_loss_coef < 0:
            raise ValueError("router_aux_loss_coef and router_z_loss_coef must be >= 0")
        if self.hidden_act != "silu":
            raise ValueError(f"Llama 4 experts use SwiGLU; hidden_act must be 'silu', got {self.hidden_act!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "Llama4TextConfig":
        """`tiny`, `scout` or `maverick`, with any field overridden by keyword."""
        return cls(**{**_preset(TEXT_PRESETS, name), **overrides})


class Llama4VisionConfig(PreTrainedConfig):
    """The ViT tower with 2D RoPE, pixel shuffle and the adapter MLP."""

    model_type = "llama4_sparse_vision"
    base_config_key = "vision_config"

    def __init__(
        self,
        hidden_size: int = 1408,
        hidden_act: str = "gelu",
        num_hidden_layers: int = 34,
        num_attention_heads: int = 16,
        num_channels: int = 3,
        intermediate_size: int = 5632,
        vision_output_dim: int = 4096,
        image_size: int = 336,
        patch_size: int = 14,
        norm_eps: float = 1e-5,
        vision_feature_layer: int = -1,
        vision_feature_select_strategy: str = "default",
        initializer_range: float = 0.02,
        pixel_shuffle_ratio: float = 0.5,
        projector_input_dim: int = 4096,
        projector_output_dim: int = 4096,
        multi_modal_projector_bias: bool = False,
        projector_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        rope_theta: float = 10000.0,
        rope_parameters: dict | None = None,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.hidden_act = hidden_act
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.intermediate_size = intermediate_size
        self.vision_output_dim = vision_output_dim
        self.image_size = image_size
        self.patch_size = patch_size
        self.norm_eps = norm_eps
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.initializer_range = initializer_range
        self.pixel_shuffle_ratio = pixel_shuffle_ratio
        self.projector_input_dim = projector_input_dim
        self.projector_output_dim = projector_output_dim
        self.multi_modal_projector_bias = multi_modal_projector_bias
        self.projector_dropout = projector_dropout
        self.attention_dropout = attention_dropout
        self.rope_parameters = dict(rope_parameters) if rope_parameters else {"rope_type": "default", "rope_theta": rope_theta}
        self.auto_map = _own_auto_map(kwargs)
        super().__init__(**kwargs)
        self.validate_architecture()

    @property
    def rope_theta(self) -> float:
        return self.rope_parameters["rope_theta"]

    def validate_architecture(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads ({self.num_attention_heads})"
            )
        if (self.hidden_size // self.num_attention_heads) % 4:
            raise ValueError(
                f"the vision head dim ({self.hidden_size // self.num_attention_heads}) must be a multiple of 4: "
                "the 2D RoPE splits each head's rotation pairs evenly between columns and rows"
            )
        grid = self.image_size // self.patch_size
        shuffled = grid * self.pixel_shuffle_ratio
        block = 1 / self.pixel_shuffle_ratio if self.pixel_shuffle_ratio > 0 else 0.5
        if shuffled != int(shuffled) or block != int(block):
            raise ValueError(
                f"pixel_shuffle_ratio {self.pixel_shuffle_ratio} must be 1/n for an integer n that divides the "
                f"{grid}x{grid} patch grid evenly (the official value is 0.5)"
            )
        if self.vision_output_dim != self.projector_output_dim:
            raise ValueError(
                f"vision_output_dim ({self.vision_output_dim}) must equal projector_output_dim "
                f"({self.projector_output_dim}): the projector reads the adapter's output"
            )
        expected = int(self.hidden_size / self.pixel_shuffle_ratio**2)
        if self.intermediate_size != expected:
            raise ValueError(
                f"intermediate_size ({self.intermediate_size}) must equal hidden_size / pixel_shuffle_ratio**2 "
                f"({expected}): the adapter MLP reads the pixel-shuffled features with it"
            )

    @property
    def tokens_per_tile(self) -> int:
        """Vision tokens each tile contributes after pixel shuffle (144 for the official models)."""
        grid = self.image_size // self.patch_size
        return int(grid * self.pixel_shuffle_ratio) ** 2

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "Llama4VisionConfig":
        return cls(**{**_preset(VISION_PRESETS, name), **overrides})


class Llama4Config(PreTrainedConfig):
    """Text decoder + vision tower + projector, with the image token ids."""

    model_type = "llama4_sparse"
    sub_configs = {"text_config": Llama4TextConfig, "vision_config": Llama4VisionConfig}
    attribute_map = {
        "image_token_id": "image_token_index",
        "boi_token_id": "boi_token_index",
        "eoi_token_id": "eoi_token_index",
    }

    def __init__(
        self,
        vision_config: dict | Llama4VisionConfig | None = None,
        text_config: dict | Llama4TextConfig | None = None,
        boi_token_index: int = 200080,
        eoi_token_index: int = 200081,
        image_token_index: int = 200092,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.text_config = self._sub(Llama4TextConfig, text_config)
        self.vision_config = self._sub(Llama4VisionConfig, vision_config)
        self.boi_token_index = boi_token_index
        self.eoi_token_index = eoi_token_index
        self.image_token_index = image_token_index
        self.auto_map = _own_auto_map(kwargs)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        if not 0 <= image_token_index < self.text_config.vocab_size:
            raise ValueError(
                f"image_token_index {image_token_index} is outside the text vocabulary "
                f"(vocab_size={self.text_config.vocab_size})"
            )

    @staticmethod
    def _sub(cls, value):
        if value is None:
            return cls()
        if isinstance(value, dict):
            # Official configs carry the transformers model_type of the sub-config; ours differs.
            value = {k: v for k, v in value.items() if k != "model_type"}
            return cls(**value)
        return value

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "Llama4Config":
        if name not in TEXT_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(TEXT_PRESETS)}")
        return cls(**{**composite_preset(name), **overrides})
