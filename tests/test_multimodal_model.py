"""Llama4ForConditionalGeneration against transformers' Llama 4, composed from its submodules.

transformers 5.24's own `Llama4ForConditionalGeneration.forward` raises AttributeError for every
input, so the reference is its vision tower -> projector -> masked scatter into the embeddings ->
its language model, on the weights our model saved (which also tests that the folder loads there).
"""

import pytest
import torch
import transformers

from llama4_sparse.modeling_llama4 import Llama4Config, Llama4ForConditionalGeneration, parameter_counts
from llama4_sparse.modeling_llama4.modeling_multimodal import Llama4MultimodalBackbone
from llama4_sparse.modeling_llama4.processing import image_layout

# Token ids of the tiny preset: 4096 BPE ranks, then the specials at the official offsets.
SPECIAL = {"<|image_start|>": 4176, "<|image_end|>": 4177, "<|tile_x_separator|>": 4180,
           "<|tile_y_separator|>": 4181, "<|image|>": 4186, "<|patch|>": 4188}
BOS, PAD = 4096, 4114
PER_TILE = 16


def image_ids(rows: int, cols: int) -> list[int]:
    layout = image_layout(rows, cols, PER_TILE)
    pieces = layout.replace("|>", "|>\0").split("\0")
    return [SPECIAL[p] for p in pieces if p]


def prompt(*parts) -> list[int]:
    """BOS, then text tokens (ints) and images ((rows, cols) tuples) in order."""
    ids = [BOS]
    for part in parts:
        ids += image_ids(*part) if isinstance(part, tuple) else [part]
    return ids


def tiles_for(*grids, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    count = sum(r * c + (r * c > 1) for r, c in grids)
    return torch.rand(count, 3, 32, 32, generator=generator) * 2 - 1


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def unit_scale_(model: torch.nn.Module, seed: int = 0) -> None:
    """Unit-variance activations throughout (std fan_in**-0.5), random norms: differences show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                parameter.copy_(1 + 0.3 * noise)
            elif "embed_tokens" in name:
                parameter.copy_(noise)
            elif parameter.ndim == 3:  # fused experts (E, in, out)
                parameter.copy_(noise * parameter.shape[1] ** -0.5)
            elif parameter.ndim == 2 and "positional" not in name:
                parameter.copy_(noise * parameter.shape[-1] ** -0.5)
            else:
                parameter.copy_(0.5 * noise)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    ours = Llama4ForConditionalGeneration(Llama4Config.from_preset("tiny")).eval()
    unit_scale_(ours)
    folder = tmp_path_factory.mktemp("tiny_multimodal")
    ours.save_pretrained(folder)
    theirs = transformers.Llama4ForConditionalGeneration.from_pretrained(folder).eval()
    return ours, theirs


def reference_logits(theirs, input_ids, pixel_values, attention_mask=None):
    with torch.no_grad():
        embeds = theirs.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            features = theirs.vision_model(pixel_values).last_hidden_state
            projected = theirs.multi_modal_projector(features.flatten(0, 1))
            mask = (input_ids == theirs.config.image_token_index)[..., None]
            embeds = embeds.masked_scatter(mask, projected)
        return theirs.language_model(inputs_embeds=embeds, attention_mask=attention_mask).logits


def test_state_dict_has_the_official_layout(models):
    ours, theirs = models
    assert sorted(ours.state_dict()) == sorted(k for k in theirs.state_dict() if "freqs" not in k)
    assert "multi_modal_projector.linear_1.weight" in ours.state_dict()
    assert "language_model.lm_head.weight" in ours.state_dict()
    assert not any(k.startswith("model.") for k in ours.state_dict())


def test_saved_folder_loads_into_transformers_with_equal_submodules(models):
    ours, theirs = models
    for key, value in theirs.state_dict().items():
        if "freqs" not in key:
            assert torch.equal(value, ours.state_dict()[key]), key
    pixels = tiles_for((1, 1), (2, 2))
    with torch.no_grad():
        ours_vision = ours.vision_model(pixels).last_hidden_state
        torch.testing.assert_close(ours_vision, theirs.vision_model(pixels).last_hidden_state, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            ours.multi_modal_projector(ours_vision), theirs.multi_modal_projector(ours_vision), atol=1e-6, rtol=0
        )


def test_folder_written_by_transformers_loads_with_equal_weights(models, tmp_path):
    ours, theirs = models
    theirs.save_pretrained(tmp_path)  # model_type "llama4": the official checkpoint layout
    loaded = Llama4ForConditionalGeneration.from_pretrained(tmp_path).eval()
    for key, value in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    input_ids = torch.tensor([prompt(11, (1, 2), 12)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids, pixel_values=tiles_for((1, 2))).logits,
                                   ours(input_ids=input_ids, pixel_values=tiles_for((1, 2))).logits, atol=0, rtol=0)


CASES = {
    "one image": ([prompt(11, (1, 1), 12, 13)], [(1, 1)]),
    "multi-tile image": ([prompt(11, (2, 2), 12)], [(2, 2)]),
    "several images, batched": (
        [prompt(11, (1, 1), 12, (1, 3), 13), prompt(14, (2, 1), 15)],
        [(1, 1), (1, 3), (2, 1)],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(models, case):
    ours, theirs = models
    rows, grids = CASES[case]
    input_ids, attention_mask = left_pad(rows)
    pixels = tiles_for(*grids)
    expected = reference_logits(theirs, input_ids, pixels, attention_mask)
    with torch.no_grad():
        got = ours(input_ids=input_ids, pixel_values=pixels, attention_mask=attention_mask).logits
        # a mirrored image, or tiles out of order, must show far beyond the tolerance
        altered = [ours(input_ids=input_ids, pixel_values=pixels.flip(-1), attention_mask=attention_mask).logits]
        if len(pixels) > 1:
            rolled = pixels.roll(1, 0)
            altered.append(ours(input_ids=input_ids, pixel_values=rolled, attention_mask=attention_mask).logits)
    real = attention_mask.bool()
    assert (got - expected)[real].abs().max() <= 1e-4
    for logits in altered:
        assert (logits - expected)[real].abs().max() > 1e-2


def test_text_only_batch_is_the_language_model(models):
    ours, _ = models
    input_ids, attention_mask = left_pad([[BOS, 5, 6, 7, 8], [BOS, 9, 10]])
    with torch.no_grad():
        got = ours(input_ids=input_ids, attention_mask=attention_mask).logits
        expected = ours.language_model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_more_than_32_tiles_in_small_chunks_equal_one_pass(models):
    ours, _ = models
    grids = [(4, 4), (4, 4), (1, 1)]  # 17 + 17 + 1 = 35 tiles
    input_ids = torch.tensor([prompt(11, *grids, 12)])
    pixels = tiles_for(*grids)
    calls = []
    hook = ours.vision_model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            one_pass = ours(input_ids=input_ids, pixel_values=pixels).logits
            calls.clear()
            ours.vision_tiles_per_chunk = 8
            chunked = ours(input_ids=input_ids, pixel_values=pixels).logits
    finally:
        hook.remove()
        ours.vision_tiles_per_chunk = 32
    assert calls == [8, 8, 8, 8, 3]
    torch.testing.assert_close(chunked, one_pass, atol=1e-5, rtol=0)


def test_patch_count_mismatch_names_both_counts(models):
    ours, _ = models
    input_ids = torch.tensor([prompt(11, (2, 2), 12)])  # 5 tiles -> 80 <|patch|> tokens
    with pytest.raises(ValueError, match=r"80 <\|patch\|> tokens .* 64 image features \(4 tiles x 16\)"):
        ours(input_ids=input_ids, pixel_values=tiles_for((2, 2))[:4])


def test_placeholders_without_pixel_values_raise(models):
    ours, _ = models
    with pytest.raises(ValueError, match=r"16 <\|patch\|> tokens but no pixel_values"):
        ours(input_ids=torch.tensor([prompt(11, (1, 1))]))


def test_pixel_values_need_input_ids_and_the_tile_shape(models):
    ours, _ = models
    embeds = torch.zeros(1, 3, 128)
    with pytest.raises(ValueError, match="need input_ids"):
        ours(inputs_embeds=embeds, pixel_values=tiles_for((1, 1)))
    with pytest.raises(ValueError, match=r"\(num_tiles, 3, 32, 32\)"):
        ours(input_ids=torch.tensor([prompt(11, (1, 1))]), pixel_values=torch.zeros(1, 3, 336, 336))


def test_left_padded_generation_with_different_image_counts_matches_each_prompt_alone(models):
    ours, _ = models
    rows = [prompt(11, (1, 1), 12, 13, 14, 15, 16, 17), prompt(14, (2, 1), 15, (1, 1), 16)]
    grids = [[(1, 1)], [(2, 1), (1, 1)]]
    input_ids, attention_mask = left_pad(rows)
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    with torch.no_grad():
        batched = ours.generate(input_ids=input_ids, attention_mask=attention_mask,
                                pixel_values=torch.cat([tiles_for(*g, seed=i) for i, g in enumerate(grids)]),
                                **settings)
        for i, (row, grid) in enumerate(zip(rows, grids)):
            alone_ids = torch.tensor([row])
            alone = ours.generate(input_ids=alone_ids, pixel_values=tiles_for(*grid, seed=i), **settings)
            assert batched[i, -4:].tolist() == alone[0, -4:].tolist()
            # the first new token is the argmax of the full forward: the images were used at prefill
            logits = ours(input_ids=alone_ids, pixel_values=tiles_for(*grid, seed=i)).logits
            assert alone[0, len(row)].item() == logits[0, -1].argmax().item()


def test_backbone_view_feeds_trl_fused_head(models):
    from trl.trainer.utils import add_fused_lm_head

    ours, _ = models
    backbone = ours.base_model
    assert isinstance(backbone, Llama4MultimodalBackbone) and ours.model is not None
    assert {id(p) for p in backbone.parameters()} == {id(p) for p in ours.parameters()}
    input_ids = torch.tensor([prompt(11, (1, 2), 12, 13, 14)])
    pixels = tiles_for((1, 2))
    with torch.no_grad():
        hidden = backbone(input_ids=input_ids, pixel_values=pixels).last_hidden_state
        full = ours(input_ids=input_ids, pixel_values=pixels, labels=input_ids)
    torch.testing.assert_close(ours.language_model.lm_head(hidden), full.logits, atol=1e-5, rtol=0)

    patched = Llama4ForConditionalGeneration(ours.config).eval()
    patched.load_state_dict(ours.state_dict())
    add_fused_lm_head(patched)
    with torch.no_grad():
        fused = patched(input_ids=input_ids, pixel_values=pixels, labels=input_ids, fused_lm_head=True)
    torch.testing.assert_close(fused.loss, full.loss, atol=1e-4, rtol=1e-4)


def test_full_size_models_build_on_the_meta_device_with_the_official_counts():
    for preset, billions in (("scout", 108.64), ("maverick", 401.58)):
        config = Llama4Config.from_preset(preset)
        with torch.device("meta"):
            model = Llama4ForConditionalGeneration(config)
        total = sum(p.numel() for p in model.parameters())
        assert total == parameter_counts(config)["total"]
        assert round(total / 1e9, 2) == billions


def test_attention_implementation_reaches_both_towers(models, tmp_path):
    ours, _ = models
    ours.save_pretrained(tmp_path)
    eager = Llama4ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert eager.config.text_config._attn_implementation == "eager"
    assert eager.language_model.model.config._attn_implementation == "eager"
    assert eager.vision_model.config._attn_implementation == "eager"
    input_ids = torch.tensor([prompt(11, (2, 1), 12, 13)])
    with torch.no_grad():
        torch.testing.assert_close(eager(input_ids=input_ids, pixel_values=tiles_for((2, 1))).logits,
                                   ours(input_ids=input_ids, pixel_values=tiles_for((2, 1))).logits,
                                   atol=1e-4, rtol=0)
