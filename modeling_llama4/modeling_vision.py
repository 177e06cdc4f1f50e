"""The Llama 4 vision tower: a ViT over one tile at a time, then pixel shuffle and the adapter MLP.

tile (3, 336, 336) -> 576 patch vectors (unfold 14x14, linear, no bias) -> class token appended
LAST -> + learned positional embedding -> LayerNorm -> 34 pre-norm blocks with 2D RoPE ->
LayerNorm -> class token dropped -> pixel shuffle 24x24x1408 -> 12x12x5632 -> adapter MLP
(fc1, GELU, fc2, GELU) -> 144 vectors of 4096 per tile. The projector into the text width lives
with the multimodal model.
"""

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention import eager_attention
from .configuration_llama4 import Llama4VisionConfig
from .saving import SavesAsOwnClass
from .vision_rope import apply_vision_rotary, vision_rotary_angles


class Llama4UnfoldPatchEmbedding(nn.Module):
    """Non-overlapping patches flattened channel-major (as `nn.Unfold` lays them out), then a linear map."""

    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.linear = nn.Linear(config.num_channels * config.patch_size**2, config.hidden_size, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(pixel_values, kernel_size=self.patch_size, stride=self.patch_size)
        return self.linear(patches.transpose(1, 2))


class Llama4VisionAttention(nn.Module):
    """Bidirectional multi-head attention with biases, rotating q and k by the 2D RoPE."""

    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, hidden_states: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        heads_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = apply_vision_rotary(self.q_proj(hidden_states).view(heads_shape), rotation)
        key = apply_vision_rotary(self.k_proj(hidden_states).view(heads_shape), rotation)
        value = self.v_proj(hidden_states).view(heads_shape)
        attend: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        output, _ = attend(
            self,
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
        )
        return self.o_proj(output.reshape(*hidden_states.shape[:-1], -1))


class Llama4VisionMLP(nn.Module):
    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(hidden_states)))


class Llama4VisionEncoderLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block (LayerNorm, attention, residual; LayerNorm, MLP, residual)."""

    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.self_attn = Llama4VisionAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = Llama4VisionMLP(config)

    def forward(self, hidden_states: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), rotation)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class Llama4VisionEncoder(nn.Module):
    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(Llama4VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))


def pixel_shuffle(features: torch.Tensor, ratio: float) -> torch.Tensor:
    """(tiles, g*g, C) -> (tiles, (g*ratio)**2, C / ratio**2): each block of s x s neighbouring
    patches (s = 1 / ratio) becomes one token whose channels are ordered (block row, block column, C)."""
    tiles, patches, channels = features.shape
    grid = int(round(patches**0.5))
    s = int(round(1 / ratio))
    blocks = features.view(tiles, grid // s, s, grid // s, s, channels)
    return blocks.permute(0, 1, 3, 2, 4, 5).reshape(tiles, (grid // s) ** 2, s * s * channels)


class Llama4VisionAdapterMLP(nn.Module):
    """fc1 (shuffled width -> projector_input_dim) and fc2, no biases, GELU after both."""

    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.intermediate_size, config.projector_input_dim, bias=False)
        self.fc2 = nn.Linear(config.projector_input_dim, config.projector_output_dim, bias=False)
        self.dropout = config.projector_dropout

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = F.gelu(self.fc1(hidden_states))
        hidden_states = F.dropout(hidden_states, p=self.dropout, training=self.training)
        return F.gelu(self.fc2(hidden_states))


class Llama4VisionAdapter(nn.Module):
    """Pixel shuffle then the adapter MLP (official key prefix `vision_adapter.mlp`)."""

    def __init__(self, config: Llama4VisionConfig):
        super().__init__()
        self.pixel_shuffle_ratio = config.pixel_shuffle_ratio
        self.mlp = Llama4VisionAdapterMLP(config)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(patches, self.pixel_shuffle_ratio))


class Llama4VisionModel(SavesAsOwnClass, PreTrainedModel):
    """Tiles (N, 3, image_size, image_size) -> `last_hidden_state` (N, tokens_per_tile, projector_output_dim).

    Tiles are independent: a batch of tiles gives the same features as the tiles one by one.
    """

    config_class = Llama4VisionConfig
    config: Llama4VisionConfig
    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["Llama4VisionEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: Llama4VisionConfig):
        super().__init__(config)
        self.grid_size = config.image_size // config.patch_size
        width = config.hidden_size
        self.patch_embedding = Llama4UnfoldPatchEmbedding(config)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding_vlm = nn.Parameter(torch.empty(self.grid_size**2 + 1, width))
        self.layernorm_pre = nn.LayerNorm(width, eps=config.norm_eps)
        self.layernorm_post = nn.LayerNorm(width, eps=config.norm_eps)
        self.model = Llama4VisionEncoder(config)
        self.vision_adapter = Llama4VisionAdapter(config)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Llama4VisionModel):
            # Width**-0.5, the scale of the official initialisation of both embeddings.
            init.normal_(module.class_embedding, std=module.config.hidden_size**-0.5)
            init.normal_(module.positional_embedding_vlm, std=module.config.hidden_size**-0.5)

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embedding

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        size, channels = self.config.image_size, self.config.num_channels
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (channels, size, size):
            raise ValueError(
                f"pixel_values must have shape (num_tiles, {channels}, {size}, {size}) with every tile of every "
                "image stacked along the first axis (what Llama4ImageProcessor returns); "
                f"got {tuple(pixel_values.shape)}"
            )

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False, **kwargs) -> BaseModelOutput:
        if kwargs.get("output_attentions"):
            raise ValueError("the vision tower does not return attention weights; drop output_attentions")
        self.check_pixel_values(pixel_values)
        weight = self.patch_embedding.linear.weight
        hidden = self.patch_embedding(pixel_values.to(device=weight.device, dtype=weight.dtype))
        cls = self.class_embedding.to(hidden.dtype).expand(hidden.shape[0], 1, -1)
        hidden = torch.cat([hidden, cls], dim=1) + self.positional_embedding_vlm.to(hidden.dtype)
        hidden = self.layernorm_pre(hidden)
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        angles = vision_rotary_angles(self.grid_size, head_dim, self.config.rope_theta, device=hidden.device)
        rotation = torch.polar(torch.ones_like(angles), angles)
        states = (hidden,) if output_hidden_states else None
        for layer in self.model.layers:
            hidden = layer(hidden, rotation)
            if output_hidden_states:
                states += (hidden,)
        hidden = self.layernorm_post(hidden)[:, :-1]
        return BaseModelOutput(last_hidden_state=self.vision_adapter(hidden), hidden_states=states)
