"""Llama4VisionModel against transformers' Llama4VisionModel on the same random weights (fp32)."""

import pytest
import torch
import transformers
from transformers.models.llama4.modeling_llama4 import Llama4VisionModel as ReferenceVisionModel

from llama4_sparse.modeling_llama4 import Llama4VisionConfig, Llama4VisionModel
from llama4_sparse.modeling_llama4.vision_rope import vision_rotary_angles


def reference_config(config: Llama4VisionConfig) -> transformers.Llama4VisionConfig:
    known = set(transformers.Llama4VisionConfig.__dataclass_fields__)
    skip = ("model_type", "transformers_version")
    fields = {k: v for k, v in config.to_dict().items() if k in known and k not in skip}
    return transformers.Llama4VisionConfig(**fields)


def unit_scale_(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights of unit-variance outputs (std fan_in**-0.5), random norms and biases: with the default
    0.02 init the tower's output is so small that a misplaced rotation hides under 1e-5."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                parameter.copy_(1 + 0.3 * noise)
            elif parameter.ndim >= 2 and "positional" not in name:
                parameter.copy_(noise * parameter.shape[-1] ** -0.5)
            else:
                parameter.copy_(0.5 * noise)


@pytest.fixture(scope="module")
def towers():
    config = Llama4VisionConfig.from_preset("tiny")
    ours = Llama4VisionModel(config).eval()
    unit_scale_(ours)
    theirs = ReferenceVisionModel(reference_config(config)).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def test_state_dict_keys_equal_transformers(towers):
    ours, theirs = towers
    assert sorted(ours.state_dict()) == sorted(k for k in theirs.state_dict() if "freqs" not in k)


def test_features_match_transformers(towers):
    ours, theirs = towers
    pixels = torch.rand(5, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = theirs(pixels).last_hidden_state
        got = ours(pixels).last_hidden_state
    assert got.shape == (5, 16, 128)
    assert expected.abs().mean() > 0.1  # outputs are O(1), so 1e-5 is a real bound
    assert (got - expected).abs().max() <= 1e-5


def test_rotary_positions_matter(towers):
    """Rows and columns rotate different pairs: swapping them changes the output far beyond tolerance."""
    ours, theirs = towers
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    angles = vision_rotary_angles(8, 16, 10000.0)
    assert torch.all(angles[-1] == 0)  # the class token is not rotated
    assert angles[1, 0] == 2 * angles[0, 0] and angles[8, 4] == 2 * angles[0, 4]  # column, then row pairs
    with torch.no_grad():
        transposed = ours(pixels.transpose(-1, -2)).last_hidden_state
        expected = theirs(pixels).last_hidden_state
    assert (transposed - expected).abs().max() > 1e-2


def test_tiles_are_encoded_independently(towers):
    ours, _ = towers
    pixels = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        batch = ours(pixels).last_hidden_state
        alone = torch.cat([ours(tile[None]).last_hidden_state for tile in pixels])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=0)


def test_eager_and_sdpa_agree(towers):
    ours, _ = towers
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        sdpa = ours(pixels).last_hidden_state
        ours.config._attn_implementation = "eager"
        try:
            eager = ours(pixels).last_hidden_state
        finally:
            ours.config._attn_implementation = "sdpa"
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    config = Llama4VisionConfig.from_preset("tiny")
    model = Llama4VisionModel(config).train()
    unit_scale_(model, seed=1)
    pixels = torch.rand(2, 3, 32, 32)

    def grads():
        model.zero_grad()
        model(pixels).last_hidden_state.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 32, 32), (2, 3, 16, 16), (2, 1, 32, 32), (1, 2, 3, 32, 32)])
def test_wrong_pixel_values_shape_names_the_expected_shape(towers, shape):
    ours, _ = towers
    with pytest.raises(ValueError, match=r"\(num_tiles, 3, 32, 32\)"):
        ours(torch.zeros(shape))


def test_builds_on_the_meta_device():
    with torch.device("meta"):
        model = Llama4VisionModel(Llama4VisionConfig.from_preset("scout"))
    # 850,960,896 parameters for encoder + adapter (architecture notes §5.1)
    assert sum(p.numel() for p in model.parameters()) == 850_960_896
