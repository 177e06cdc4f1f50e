"""The Llama 4 text decoder and its heads, as transformers `PreTrainedModel`s.

State-dict keys are those of the official checkpoints and of transformers' `Llama4ForCausalLM`
(`model.embed_tokens`, `model.layers.{i}.self_attn.q_proj`, `model.layers.{i}.feed_forward.experts.
gate_up_proj`, ..., `lm_head`), so weights move between the two without renaming.

Caches are transformers' `DynamicCache(config=...)`, which keeps only the last
`attention_chunk_size - 1` keys/values on chunked layers. With the "sdpa" backend no mask is built:
each layer gets an `AttentionLayout` (a few integers per token) and attends block-wise in memory
linear in the length (chunked_attention.py), and a long prompt without gradients goes through the
layers in slices of `config.prefill_chunk_size` tokens (default 8192) that fill the cache, so
activations are bounded by the slice. Other backends ("eager", the reference) get transformers'
dense masks: `create_causal_mask` for the NoPE (full attention) layers, `create_chunked_causal_mask`
for the RoPE (chunked) layers. Either way, chunk boundaries start at a sequence's first real token
(left padding is not counted) and, for documents packed into one row, at each document's first
token, exactly as transformers computes them.
"""

import torch
from torch import nn
from transformers import CompileConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_chunked_causal_mask
from transformers.modeling_outputs import (
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .attention import Llama4TextAttention
from .chunked_attention import build_layouts
from .configuration_llama4 import Llama4TextConfig
from .decoder_layer import Llama4TextDecoderLayer
from .moe import Llama4TextExperts, Llama4TextMoe
from .norm import Llama4RMSNorm
from .router_losses import load_balancing_loss, router_z_loss
from .rope import Llama4TextRotaryEmbedding
from .low_bit import LowBitLoading
from .saving import SavesAsOwnClass

_MASK_BUILDERS = {"full_attention": create_causal_mask, "chunked_attention": create_chunked_causal_mask}
# Prompt slice of chunked prefill when `config.prefill_chunk_size` is not set (a multiple of Scout's chunk).
DEFAULT_PREFILL_CHUNK_SIZE = 8192


class Llama4PreTrainedModel(SavesAsOwnClass, LowBitLoading, PreTrainedModel):
    config_class = Llama4TextConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Llama4TextDecoderLayer", "Llama4VisionEncoderLayer"]
    _supports_sdpa = True
    # Chunked layers need a mask that flash-attention kernels cannot take.
    _supports_flash_attn = False
    # What `output_hidden_states` / `output_attentions` / `output_router_logits` return, captured by transformers'
    # hooks (`capture_outputs` on the backbone): each layer's input and the final normed state, the eager attention
    # weights, the router logits (tokens, experts) of the MoE layers.
    _can_record_outputs = {
        "hidden_states": OutputRecorder(Llama4TextDecoderLayer, index=0),
        "attentions": OutputRecorder(Llama4TextAttention, index=1),
        "router_logits": OutputRecorder(Llama4TextDecoderLayer, index=1),
    }
    # A decode step over a StaticCache compiles with fullgraph=True (tests/test_compile.py).
    _can_compile_fullgraph = True

    @property
    def is_gradient_checkpointing(self) -> bool:
        # The name TRL 1.16 and PEFT 0.21 still read; answered without transformers' deprecation warning
        # (only their maintainers can act on it). Same value as `is_activation_checkpointing`.
        return any(getattr(module, "gradient_checkpointing", False) for module in self.modules())

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = getattr(self.config, "initializer_range", None) or self.config.get_text_config().initializer_range
        # The fused expert weights are bare 3-D parameters, which the generic rules above skip.
        if isinstance(module, Llama4TextExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, Llama4TextMoe) and module.expert_bias is not None:
            init.zeros_(module.expert_bias)


def _check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Ids outside the vocabulary, without a host sync on the hot path: in eager mode on the CPU the
    values are read (free there) for an error that names them; on an accelerator, or while compiling,
    a device-side assertion checks them without waiting for the device (a GPU reports it as a device
    assert carrying the same message)."""
    message = (
        f"input_ids must lie in [0, vocab_size={vocab_size}). Is the tokenizer the one this model was built for?"
    )
    if input_ids.device.type == "cpu" and not torch.compiler.is_compiling():
        low, high = (int(v) for v in torch.aminmax(input_ids))
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{message} Got values in [{low}, {high}].")
    else:
        torch._assert_async(((input_ids >= 0) & (input_ids < vocab_size)).all(), message)


def _check_inputs(config, input_ids, inputs_embeds, attention_mask) -> None:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, sequence), got shape {tuple(input_ids.shape)}")
        if input_ids.numel():
            _check_token_ids(input_ids, config.vocab_size)
    elif inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
        raise ValueError(
            f"inputs_embeds must be (batch, sequence, hidden_size={config.hidden_size}), got {tuple(inputs_embeds.shape)}"
        )
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        if attention_mask.shape[0] != batch:
            raise ValueError(
                f"attention_mask has batch size {attention_mask.shape[0]} but the inputs have {batch}"
            )


class Llama4TextModel(Llama4PreTrainedModel):
    """The decoder backbone: embeddings, the layers and the final norm; returns `last_hidden_state`."""

    def __init__(self, config: Llama4TextConfig):
        super().__init__(config)
        padding_idx = config.pad_token_id if config.pad_token_id is not None and config.pad_token_id < config.vocab_size else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx)
        self.layers = nn.ModuleList(Llama4TextDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Llama4RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Llama4TextRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _uses_layouts(self, attention_mask, cache) -> bool:
        """Linear-memory attention: sdpa, no ready-made masks (a dict or a 4D tensor) and a cache whose
        keys are the latest tokens in order (a `DynamicCache`; static caches get the dense masks)."""
        if self.config._attn_implementation != "sdpa" or isinstance(attention_mask, dict):
            return False
        if cache is not None and not isinstance(cache, DynamicCache):
            return False
        return not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4)

    def _prefill_slice(self, length: int, cache, wants_per_layer_outputs: bool) -> int | None:
        """Slice length for chunked prefill, or None to run the inputs in one go.

        Slicing is exact, and used when nothing needs gradients or per-layer outputs."""
        size = getattr(self.config, "prefill_chunk_size", None) or DEFAULT_PREFILL_CHUNK_SIZE
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"config.prefill_chunk_size must be a positive integer, got {size!r}")
        if length <= size or torch.is_grad_enabled() or wants_per_layer_outputs:
            return None
        return size

    def _build_masks(self, attention_mask, inputs_embeds, cache, position_ids) -> dict:
        if isinstance(attention_mask, dict):
            return attention_mask
        # transformers separates documents packed in one row only when it is given no cache; an
        # empty cache holds nothing to attend to, so it is left out for that decision.
        if (
            attention_mask is None
            and cache is not None
            and cache.get_seq_length() == 0
            and not getattr(cache, "is_compileable", False)
        ):
            cache = None
        return {
            kind: _MASK_BUILDERS[kind](
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
            )
            for kind in set(self.config.layer_types)
        }

    def _run_layers(
        self, hidden_states, rotations, position_ids, masks, cache, all_hidden, all_router_logits, all_attentions,
        output_hidden_states, output_attentions, **kwargs,
    ) -> torch.Tensor:
        """The decoder stack on some tokens; appends per-layer outputs to the given lists."""
        for layer, kind in zip(self.layers, self.config.layer_types):
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, router_logits, attention_weights = layer(
                hidden_states, rotations, position_ids, attention_mask=masks[kind], cache=cache, **kwargs
            )
            if router_logits is not None:
                all_router_logits.append(router_logits)
            if output_attentions:
                all_attentions.append(attention_weights)
        return hidden_states

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        _check_inputs(self.config, input_ids, inputs_embeds, attention_mask)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_router_logits = self.config.output_router_logits if output_router_logits is None else output_router_logits
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = False

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        length = inputs_embeds.shape[1]
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + length, device=inputs_embeds.device)[None]
        elif position_ids.dim() == 1:
            position_ids = position_ids[None]
        if position_ids.dim() != 2 or position_ids.shape[-1] != length:
            raise ValueError(
                f"position_ids must be (batch or 1, {length}) for {length} input tokens, got {tuple(position_ids.shape)}"
            )

        rotations = self.rotary_emb(inputs_embeds, position_ids)
        all_hidden, all_router_logits, all_attentions = [], [], []
        if self._uses_layouts(attention_mask, cache):
            past = cache.get_seq_length() if cache is not None else 0
            layouts = build_layouts(
                self.config.layer_types,
                self.config.attention_chunk_size,
                attention_mask,
                position_ids,
                past,
                length,
                inputs_embeds.shape[0],
            )
            per_layer = output_hidden_states or output_router_logits or output_attentions
            slice_length = self._prefill_slice(length, cache, per_layer)
            if slice_length is None:
                hidden_states = self._run_layers(
                    inputs_embeds, rotations, position_ids, layouts, cache, all_hidden, all_router_logits,
                    all_attentions, output_hidden_states, output_attentions, **kwargs,
                )
            else:
                prefill_cache = cache if cache is not None else DynamicCache(config=self.config)
                slices = []
                for begin in range(0, length, slice_length):
                    end = min(length, begin + slice_length)
                    slice_layouts = {kind: layout.for_queries(past + begin, past + end) for kind, layout in layouts.items()}
                    slices.append(
                        self._run_layers(
                            inputs_embeds[:, begin:end], rotations[:, begin:end], position_ids[:, begin:end],
                            slice_layouts, prefill_cache, [], [], [], False, False, **kwargs,
                        )
                    )
                hidden_states = torch.cat(slices, dim=1)
        else:
            masks = self._build_masks(attention_mask, inputs_embeds, cache, position_ids)
            hidden_states = self._run_layers(
                inputs_embeds, rotations, position_ids, masks, cache, all_hidden, all_router_logits,
                all_attentions, output_hidden_states, output_attentions, **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)

        return MoeModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
            router_logits=tuple(all_router_logits) if output_router_logits else None,
        )


class Llama4ForCausalLM(Llama4PreTrainedModel, GenerationMixin):
    """Backbone + untied LM head.

    With `labels`, the loss is the next-token cross-entropy, plus `router_aux_loss_coef` times the
    load-balancing loss when router logits are requested (`output_router_logits`, as in Mixtral), plus
    `router_z_loss_coef` times the router z-loss when that coefficient is > 0 (see router_losses.py).
    `aux_loss` is the unweighted load-balancing loss.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # With tp_plan="auto": each rank computes its slice of the vocabulary, gathered into whole logits.
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: Llama4TextConfig):
        super().__init__(config)
        self.model = Llama4TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def get_compiled_call(self, compile_config: CompileConfig | None):
        """The compiled forward `generate` uses for decoding steps over a static cache. transformers
        never compiles a model type containing "llama4"; this decoder's step compiles (fullgraph too)."""
        compile_config = compile_config or CompileConfig()
        if getattr(self, "_compiled_with", None) != compile_config:
            self._compiled_with = compile_config
            self._compiled_call = torch.compile(self.__call__, **compile_config.to_dict())
        return self._compiled_call

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeCausalLMOutputWithPast:
        """`output_hidden_states` / `output_attentions` (and transformers' other kwargs) pass through `kwargs` to
        the backbone, which captures them as `_can_record_outputs` says; the output carries them."""
        output_router_logits = self.config.output_router_logits if output_router_logits is None else output_router_logits
        use_z_loss = labels is not None and self.config.router_z_loss_coef > 0
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits or use_z_loss,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        router_logits = outputs.router_logits or None
        routed_mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
        aux_loss = None
        if output_router_logits and router_logits:
            aux_loss = load_balancing_loss(router_logits, self.config, routed_mask)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if aux_loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
            if use_z_loss and router_logits:
                z_loss = router_z_loss(router_logits, self.config, routed_mask)
                loss = loss + self.config.router_z_loss_coef * z_loss.to(loss.device)

        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=router_logits if output_router_logits else None,
        )


class Llama4ForSequenceClassification(Llama4PreTrainedModel):
    """Backbone + a linear `score` head read at each sequence's last real token (reward models).

    The last real token is the last position the attention mask keeps, or, without a mask, the last
    token that is not `pad_token_id`; so left and right padding both work.
    """

    def __init__(self, config: Llama4TextConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = Llama4TextModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def _last_token_index(self, input_ids, attention_mask, length: int, batch: int, device) -> torch.Tensor:
        positions = torch.arange(length, device=device)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            return (positions * attention_mask[:, -length:].to(device).bool()).argmax(-1)
        if input_ids is not None and self.config.pad_token_id is not None:
            return (positions * (input_ids != self.config.pad_token_id)).argmax(-1)
        if batch > 1:
            raise ValueError(
                "cannot find the last real token of a padded batch: pass an attention_mask, or input_ids with "
                "config.pad_token_id set"
            )
        return torch.full((batch,), length - 1, device=device)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)
        batch, length = logits.shape[:2]
        last = self._last_token_index(input_ids, attention_mask, length, batch, logits.device)
        pooled = logits[torch.arange(batch, device=logits.device), last]

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
