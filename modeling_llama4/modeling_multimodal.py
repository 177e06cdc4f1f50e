"""Llama 4 with images: early fusion of projected tile features into the text sequence.

Each tile of `pixel_values` gives `tokens_per_tile` vision features (144 for the official models),
projected to the text width. They replace the embeddings of the prompt's `<|patch|>` tokens in
order: batch row by batch row, left to right, so tiles must be stacked in the order their
placeholders appear (what `Llama4Processor` produces). All other image tokens (`<|image_start|>`,
`<|image|>`, tile separators, `<|image_end|>`) keep their text embeddings.

The parameters sit under the official checkpoint prefixes (`language_model.model.*`,
`language_model.lm_head.weight`, `vision_model.*`, `multi_modal_projector.linear_1.weight`), so
official weights load, and folders saved here load into transformers' Llama4ForConditionalGeneration.
`model.model` (= `model.base_model`) is a view sharing the model's modules without being registered
on it (so it adds no keys): the fused backbone that takes `input_ids` + `pixel_values` and returns
`last_hidden_state`, which TRL's fused LM-head loss calls.
"""

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_llama4 import Llama4Config
from .modeling_text import Llama4ForCausalLM, _check_inputs
from .modeling_vision import Llama4VisionModel
from .low_bit import LowBitLoading
from .saving import SavesAsOwnClass


class Llama4MultiModalProjector(nn.Module):
    """Adapter output (vision_output_dim) -> text width; one linear map, no activation."""

    def __init__(self, config: Llama4Config):
        super().__init__()
        self.linear_1 = nn.Linear(
            config.vision_config.vision_output_dim,
            config.text_config.hidden_size,
            bias=config.vision_config.multi_modal_projector_bias,
        )

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_1(image_features)


class Llama4MultimodalBackbone(nn.Module):
    """Image fusion + text decoder, returning `last_hidden_state` (no LM head).

    A view over a `Llama4ForConditionalGeneration`, made afresh on each access: it shares the
    model's submodules (so `parameters()` and the device are the model's) but is not itself
    registered on the model, so it adds nothing to the model's state dict, and it always sees the
    model's current submodules (after PEFT, FSDP or `.to()`)."""

    # PreTrainedModel.supports_tp_plan / supports_pp_plan read these on `base_model`.
    _tp_plan = None
    _pp_plan = None

    def __init__(self, owner: "Llama4ForConditionalGeneration"):
        super().__init__()
        object.__setattr__(self, "_owner", owner)
        self.config = owner.config
        self.vision_model = owner.vision_model
        self.multi_modal_projector = owner.multi_modal_projector
        self.language_model = owner.language_model
        self.training = owner.training

    def get_input_embeddings(self) -> nn.Embedding:
        return self._owner.get_input_embeddings()

    def get_decoder(self) -> nn.Module:
        return self._owner.language_model.model

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        inputs_embeds = self._owner.embed_with_images(input_ids, pixel_values, inputs_embeds, attention_mask, cache)
        return self._owner.language_model.model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )


class Llama4ForConditionalGeneration(SavesAsOwnClass, LowBitLoading, PreTrainedModel, GenerationMixin):
    """Vision tower + projector + `Llama4ForCausalLM`, with images fused at the `<|patch|>` tokens.

    Any number of images and tiles per prompt and per batch: the tower encodes the tiles in chunks
    of `vision_tiles_per_chunk` to bound its activation memory. Image features are only used when
    the sequence is prefilled; decoding reads them from the KV cache.
    """

    config_class = Llama4Config
    config: Llama4Config
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Llama4TextDecoderLayer", "Llama4VisionEncoderLayer"]
    _supports_sdpa = True
    # The text model's chunked attention needs masks flash-attention kernels cannot take.
    _supports_flash_attn = False
    vision_tiles_per_chunk = 32

    def __init__(self, config: Llama4Config):
        super().__init__(config)
        self.vision_model = Llama4VisionModel(config.vision_config)
        self.multi_modal_projector = Llama4MultiModalProjector(config)
        self.language_model = Llama4ForCausalLM(config.text_config)
        self.post_init()

    @property
    def model(self) -> Llama4MultimodalBackbone:
        return Llama4MultimodalBackbone(self)

    @property
    def is_gradient_checkpointing(self) -> bool:
        # The name TRL 1.16 and PEFT 0.21 still read; answered without transformers' deprecation warning
        # (only their maintainers can act on it). Same value as `is_activation_checkpointing`.
        return any(getattr(module, "gradient_checkpointing", False) for module in self.modules())

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers writes one auto class per model class into config.json's `auto_map`; a saved folder
        also names this class for AutoModel and AutoModelForCausalLM, so it loads through them with
        `trust_remote_code=True` where this package is not installed."""
        if self._auto_class is not None:
            # This module and class by name (not type(self), which FSDP2 swaps for a torch-generated subclass).
            entry = f"{__name__.rsplit('.', 1)[-1]}.{Llama4ForConditionalGeneration.__name__}"
            for auto_class in ("AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText"):
                self.config.auto_map.setdefault(auto_class, entry)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.model

    def set_decoder(self, decoder: nn.Module) -> None:
        self.language_model.model = decoder

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected features (tiles * tokens_per_tile, text hidden) of every tile, in order."""
        self.vision_model.check_pixel_values(pixel_values)
        features = torch.cat(
            [self.vision_model(chunk).last_hidden_state for chunk in pixel_values.split(self.vision_tiles_per_chunk)]
        )
        return self.multi_modal_projector(features.flatten(0, 1))

    def embed_with_images(
        self,
        input_ids: torch.LongTensor | None,
        pixel_values: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the `<|patch|>` positions replaced by the image features."""
        _check_inputs(self.config.text_config, input_ids, inputs_embeds, attention_mask)
        if inputs_embeds is not None:
            if pixel_values is not None:
                raise ValueError(
                    "pixel_values need input_ids to find the <|patch|> placeholders; pass input_ids instead of "
                    "inputs_embeds, or merge the image features into inputs_embeds yourself"
                )
            return inputs_embeds
        inputs_embeds = self.get_input_embeddings()(input_ids)
        placeholders = input_ids == self.config.image_token_index
        if pixel_values is None:
            prefill = cache is None or cache.get_seq_length() == 0
            if prefill and bool(placeholders.any()):
                raise ValueError(
                    f"the prompt has {int(placeholders.sum())} <|patch|> tokens but no pixel_values were given; "
                    "pass the images' pixel_values (from Llama4Processor) or remove the image placeholders"
                )
            return inputs_embeds
        features = self.get_image_features(pixel_values)
        num_tokens, num_features = int(placeholders.sum()), features.shape[0]
        if num_tokens != num_features:
            per_tile = self.config.vision_config.tokens_per_tile
            raise ValueError(
                f"the prompt has {num_tokens} <|patch|> tokens but pixel_values give {num_features} image features "
                f"({pixel_values.shape[0]} tiles x {per_tile}); the prompt must hold {per_tile} <|patch|> tokens per "
                "tile, in tile order. Build prompt and pixel_values together with Llama4Processor"
            )
        return inputs_embeds.masked_scatter(placeholders[..., None], features.to(inputs_embeds.dtype))

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        inputs_embeds = self.embed_with_images(input_ids, pixel_values, inputs_embeds, attention_mask, cache)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            labels=labels,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
