"""Llama4Processor: prompt layout and token counts of the spec, tile order, videos, errors, save/load."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from llama4_sparse.modeling_llama4 import Llama4Config, Llama4ForConditionalGeneration, Llama4ImageProcessor, Llama4Processor
from llama4_sparse.modeling_llama4.video import sample_frame_indices
from llama4_sparse.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def official(tokenizer):
    """The shipped geometry: 336-pixel tiles of 14-pixel patches, 144 tokens per tile."""
    return Llama4Processor(Llama4ImageProcessor(), tokenizer)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """The tiny model's geometry: 32-pixel tiles of 4-pixel patches, 16 tokens per tile."""
    return Llama4Processor(Llama4ImageProcessor(size=32), tokenizer, patch_size=4)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Llama4ForConditionalGeneration(Llama4Config.from_preset("tiny")).eval()


def solid(width, height, rgb=(90, 30, 200)):
    return Image.new("RGB", (width, height), rgb)


@pytest.mark.parametrize("size, tokens", [((200, 150), 147), ((640, 480), 727), ((1920, 1080), 2322),
                                          ((4000, 4000), 2467)])
def test_image_token_counts_equal_the_spec(official, size, tokens):
    out = official(text="<|image|>", images=solid(*size), add_special_tokens=False)
    assert out["input_ids"].shape == (1, tokens)
    assert out["pixel_values"].shape[0] * 144 == int((out["input_ids"] == official.image_token_id).sum())


def test_multi_tile_layout_is_the_reference_sequence(tiny, tokenizer):
    out = tiny(text="<|image|>", images=solid(64, 32), add_special_tokens=False)  # 1 row x 2 cols + thumbnail
    tokens = tokenizer.convert_ids_to_tokens(out["input_ids"][0].tolist())
    patch = ["<|patch|>"] * 16
    expected = (["<|image_start|>"] + patch + ["<|tile_x_separator|>"] + patch + ["<|tile_y_separator|>"]
                + ["<|image|>"] + patch + ["<|image_end|>"])
    assert tokens == expected
    single = tiny(text="<|image|>", images=solid(20, 20), add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(single["input_ids"][0].tolist()) == (
        ["<|image_start|>", "<|image|>"] + patch + ["<|image_end|>"])


def test_chat_with_two_images_of_different_sizes_feeds_the_model(tiny, model):
    chat = [{"role": "user", "content": [
        {"type": "image", "image": solid(96, 32)},
        {"type": "text", "text": "Compare with"},
        {"type": "image", "image": solid(30, 30, (0, 255, 0))},
    ]}]
    inputs = tiny.apply_chat_template(chat, tokenize=True, return_dict=True, add_generation_prompt=True,
                                      return_tensors="pt")
    # 96x32 -> 1 row x 3 cols + thumbnail = 4 tiles; 30x30 -> 1 tile
    assert inputs["pixel_values"].shape == (5, 3, 32, 32)
    patches = int((inputs["input_ids"] == tiny.image_token_id).sum())
    assert patches == 5 * 16
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"])
        assert features.shape[0] == patches
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape
    with pytest.raises(ValueError, match=f"{patches} <\\|patch\\|> tokens .* 64 image features"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][:4])


def test_tiles_follow_placeholder_order_across_a_padded_batch(tiny):
    images = [solid(64, 64, (255, 0, 0)), solid(20, 10, (0, 255, 0)), solid(96, 32, (0, 0, 255))]
    out = tiny(text=["first <|image|>", "second <|image|> and <|image|> end"], images=[[images[0]], images[1:]],
               padding_side="left")
    expected = torch.cat([tiny.image_processor.tiles(image)[0] for image in images])
    torch.testing.assert_close(out["pixel_values"], expected)
    assert out["attention_mask"][0, 0] == 0 and out["attention_mask"][1].all()  # left padding
    counts = (out["input_ids"] == tiny.image_token_id).sum(1).tolist()
    assert counts == [5 * 16, (1 + 4) * 16]


def test_text_only_batch_has_no_pixel_values(tiny):
    out = tiny(text=["just text", "more text here"])
    assert "pixel_values" not in out and out["input_ids"].shape[0] == 2


def test_assistant_mask_covers_the_reply(tiny, tokenizer):
    chat = [{"role": "user", "content": [{"type": "image", "image": solid(40, 40)}, {"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": "A square."}]
    tokenizer(["warm up the backend", "with padding"], padding=True)  # must not leak into chat encoding
    out = tiny.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                  return_tensors="pt")
    reply = out["input_ids"][0][out["assistant_masks"][0].bool()]
    assert tokenizer.decode(reply) == "A square.<|eot|>"
    assert int((out["input_ids"] == tokenizer.pad_token_id).sum()) == 0


@pytest.mark.parametrize(
    "text, images, message",
    [
        ("no placeholder here", [solid(10, 10)], r"0 <\|image\|> placeholders but 1 images"),
        ("<|image|> and <|image|>", [solid(10, 10)], r"2 <\|image\|> placeholders but 1 images"),
        ("<|image|>", None, r"1 <\|image\|> placeholders but 0 images"),
        ("<|image|>", [np.zeros((0, 5, 3), dtype=np.uint8)], "zero size"),
        ("<|image|>", [b"garbage bytes"], "cannot read image"),
    ],
)
def test_bad_inputs_raise_clear_errors(tiny, text, images, message):
    with pytest.raises(ValueError, match=message):
        tiny(text=text, images=images)


def test_per_text_image_lists_must_match_each_text(tiny):
    with pytest.raises(ValueError, match=r"text 0 has 1 <\|image\|> placeholders but its image list holds 2"):
        tiny(text=["<|image|>", "<|image|>"], images=[[solid(8, 8), solid(8, 8)], []])


def test_truncation_that_would_cut_an_image_raises(tiny):
    with pytest.raises(ValueError, match="truncation would cut an image"):
        tiny(text="<|image|>", images=solid(64, 64), truncation=True, max_length=20)


def test_video_frames_are_sampled_uniformly_and_labelled_in_order(tiny, tokenizer):
    assert sample_frame_indices(10, 4) == [1, 3, 6, 8]
    assert sample_frame_indices(3, 8) == [0, 1, 2]
    frames = [solid(40, 30, (25 * i, 0, 0)) for i in range(10)]
    chat = [{"role": "user", "content": [{"type": "video", "video": frames},
                                         {"type": "text", "text": "What happens?"}]}]
    out = tiny.apply_chat_template(chat, tokenize=True, return_dict=True, add_generation_prompt=True,
                                   num_frames=4, fps=2.0, return_tensors="pt")
    expected = torch.cat([tiny.image_processor.tiles(frames[i], max_patches=1)[0] for i in (1, 3, 6, 8)])
    torch.testing.assert_close(out["pixel_values"], expected)
    text = tokenizer.decode(out["input_ids"][0]).replace("<|patch|>" * 16, "P")
    block = "<|image_start|><|image|>P<|image_end|>"
    assert (f"Frame 1/4 at 0.50s: {block}\nFrame 2/4 at 1.50s: {block}\n"
            f"Frame 3/4 at 3.00s: {block}\nFrame 4/4 at 4.00s: {block}What happens?") in text
    as_array = tiny(text="<|video|>", videos=np.stack([np.asarray(f) for f in frames]), num_frames=4)
    torch.testing.assert_close(as_array["pixel_values"], expected)


def test_too_many_frames_raise(tiny):
    frames = [solid(8, 8)] * 40
    with pytest.raises(ValueError, match="more than the processor's video_max_frames=32"):
        tiny(text="<|video|>", videos=frames, num_frames=33)
    with pytest.raises(ValueError, match="40 frames but at most video_max_frames=32"):
        tiny(text="<|video|>", videos=frames, do_sample_frames=False)
    with pytest.raises(ValueError, match=r"1 <\|video\|> placeholders but 0 videos"):
        tiny(text="<|video|>")


def test_video_and_images_feed_the_model_in_order(tiny, model):
    frames = [solid(32, 32, (10 * i, 5, 5)) for i in range(3)]
    out = tiny(text="a <|image|> then <|video|> then <|image|>", images=[solid(64, 32), solid(16, 16)],
               videos=[frames])
    assert out["pixel_values"].shape[0] == 3 + 3 + 1
    with torch.no_grad():
        assert model(**out).logits.shape[1] == out["input_ids"].shape[1]


def test_save_and_load_with_trust_remote_code(tiny, model, tmp_path):
    model.save_pretrained(tmp_path)
    tiny.save_pretrained(tmp_path)
    chat = [{"role": "user", "content": [{"type": "image", "image": solid(64, 48, (200, 10, 10))},
                                         {"type": "text", "text": "Describe"}]}]
    with torch.no_grad():
        expected = model(**tiny.apply_chat_template(chat, tokenize=True, return_dict=True, return_tensors="pt")).logits[0, -1]
    # A fresh interpreter where this package cannot be imported: everything comes from the folder.
    script = textwrap.dedent(f"""
        import sys
        sys.modules["modeling_llama4"] = None
        sys.modules["tokenizer"] = None
        import torch
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor
        processor = AutoProcessor.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        model = AutoModelForImageTextToText.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        chat = [{{"role": "user", "content": [{{"type": "image", "image": Image.new("RGB", (64, 48), (200, 10, 10))}},
                                             {{"type": "text", "text": "Describe"}}]}}]
        with torch.no_grad():
            logits = model(**processor.apply_chat_template(chat, tokenize=True, return_dict=True, return_tensors="pt")).logits[0, -1]
        print(" ".join(repr(x) for x in logits.tolist()))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    remote = torch.tensor([float(x) for x in result.stdout.split()])
    torch.testing.assert_close(remote, expected, atol=1e-5, rtol=0)


def test_auto_classes_load_the_saved_processor(tiny, model, tmp_path):
    from transformers import AutoImageProcessor, AutoProcessor

    tiny.save_pretrained(tmp_path)
    assert isinstance(Llama4Processor.from_pretrained(tmp_path), Llama4Processor)
    model.config.save_pretrained(tmp_path)  # AutoProcessor finds the class through the model's config
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(processor, Llama4Processor) and processor.tokens_per_tile == 16
    assert isinstance(AutoImageProcessor.from_pretrained(tmp_path), Llama4ImageProcessor)
    image = solid(50, 70)
    torch.testing.assert_close(processor(text="<|image|>", images=image)["pixel_values"],
                               tiny(text="<|image|>", images=image)["pixel_values"])


def test_a_plain_fast_tokenizer_gives_the_same_chat_inputs(tiny, tokenizer):
    """Official checkpoints ship a plain PreTrainedTokenizerFast: the generic chat path must agree."""
    from transformers import PreTrainedTokenizerFast

    from llama4_sparse.tokenizer import DEFAULT_TOKENIZER_DIR

    plain = PreTrainedTokenizerFast(
        tokenizer_file=f"{DEFAULT_TOKENIZER_DIR}/tokenizer.json", chat_template=tokenizer.chat_template,
        bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token,
    )
    chat = [{"role": "user", "content": [{"type": "image", "image": solid(64, 32)},
                                         {"type": "text", "text": "Describe"}]}]
    settings = dict(tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt")
    expected = tiny.apply_chat_template(chat, **settings)
    got = Llama4Processor(tiny.image_processor, plain, patch_size=4).apply_chat_template(chat, **settings)
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["pixel_values"], expected["pixel_values"])


def test_loads_an_official_style_processor_folder(tokenizer, tmp_path):
    """The hub layout: preprocessor_config.json naming transformers' torchvision processor, and
    processor_config.json with the token strings transformers' processor takes."""
    import json

    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Llama4ImageProcessorFast", "processor_class": "Llama4Processor",
        "size": {"height": 336, "width": 336}, "max_patches": 16, "resize_to_max_canvas": False,
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255, "resample": 2,
        "data_format": "channels_first", "default_to_square": True, "crop_size": None, "do_center_crop": None,
    }))
    (tmp_path / "processor_config.json").write_text(json.dumps({
        "processor_class": "Llama4Processor", "patch_size": 14, "pixel_shuffle_ratio": 0.5,
        "fake_image_token": "<|image|>", "image_token": "<|image|>", "patch_token": "<|patch|>",
    }))
    processor = Llama4Processor.from_pretrained(tmp_path)
    assert isinstance(processor.image_processor, Llama4ImageProcessor) and processor.tokens_per_tile == 144
    out = processor(text="<|image|>", images=solid(640, 480), add_special_tokens=False)
    assert out["input_ids"].shape == (1, 727)


def test_chat_output_is_batched_lists_by_default_and_passes_trls_template_check(tiny, tokenizer):
    """Like transformers' processors: without return_tensors, one list of ids per chat. TRL's
    `assistant_only_loss` check reads the processor's output that way."""
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    chat = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}]
    out = tiny.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert isinstance(out["input_ids"], list) and isinstance(out["input_ids"][0], list)
    assert len(out["input_ids"][0]) == len(out["assistant_masks"][0])
    assert is_chat_template_stop_token_trained(tiny)
