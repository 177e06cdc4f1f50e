"""Llama4ImageProcessor against the tiling rules of the architecture notes (§3), written out literally here."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from llama4_sparse.modeling_llama4 import Llama4ImageProcessor
from llama4_sparse.modeling_llama4.image_processing import candidate_canvases, resized_size
from llama4_sparse.modeling_llama4.processing import image_layout, image_token_count

TILE = 336


def spec_tiling(width: int, height: int, tile: int = TILE, max_tiles: int = 16):
    """§3 steps 2-4 as written: canvases of <= max_tiles tiles; least upscaling else least
    downscaling, ties to the smallest area; upscaling capped at one tile; aspect kept, floored."""
    canvases = [(r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1) if r * c <= max_tiles]
    scales = {(r, c): min(r * tile / height, c * tile / width) for r, c in canvases}
    upscaling = [s for s in scales.values() if s >= 1]
    chosen = min(upscaling) if upscaling else max(scales.values())
    rows, cols = min((rc for rc, s in scales.items() if s == chosen), key=lambda rc: rc[0] * rc[1])
    target_h = min(max(height, tile), rows * tile)
    target_w = min(max(width, tile), cols * tile)
    if target_w / width < target_h / height:
        new_w, new_h = target_w, min(math.floor(height * target_w / width), target_h)
    else:
        new_h, new_w = target_h, min(math.floor(width * target_h / height), target_w)
    return (rows, cols), (max(new_w, 1), max(new_h, 1))


# (width, height): small, square, landscape, portrait, panoramas, exact tile multiples, just-off
# multiples, very large and degenerate sizes.
SIZES = [
    (1, 1), (10, 10), (200, 150), (150, 200), (336, 336), (335, 337), (337, 335), (300, 100), (100, 300),
    (640, 480), (480, 640), (800, 600), (1024, 768), (1280, 720), (720, 1280), (1920, 1080), (1080, 1920),
    (2560, 1440), (3840, 2160), (4000, 4000), (4000, 3000), (3000, 4000), (672, 336), (336, 672),
    (1008, 336), (336, 1008), (1344, 1344), (1344, 1343), (673, 673), (671, 671), (5376, 336), (336, 5376),
    (6000, 300), (300, 6000), (10000, 100), (100, 10000), (1, 5000), (5000, 1), (512, 512), (513, 257),
    (257, 513), (999, 333), (333, 999), (1600, 1200), (1200, 1600), (2048, 1536), (700, 500), (500, 700),
    (224, 224), (448, 448), (896, 448), (448, 896), (1000, 1000), (1500, 500), (500, 1500), (1234, 567),
    (567, 1234), (2000, 100), (100, 2000), (3000, 3000), (350, 340), (64, 4096),
]


def test_canvases_are_every_grid_of_at_most_16_tiles():
    assert len(candidate_canvases(16)) == 50
    assert set(candidate_canvases(16)) == {(r, c) for r in range(1, 17) for c in range(1, 17) if r * c <= 16}


def test_tile_grid_and_resized_size_follow_the_spec_for_62_sizes():
    processor = Llama4ImageProcessor()
    assert len(SIZES) >= 50
    for width, height in SIZES:
        (rows, cols), (new_w, new_h) = spec_tiling(width, height)
        assert processor.tile_grid(height, width) == (rows, cols), (width, height)
        assert resized_size(height, width, rows, cols, TILE) == (new_h, new_w), (width, height)


@pytest.mark.parametrize(
    "width, height, grid, resized, tokens",
    [  # the worked examples of the architecture notes, §3
        (200, 150, (1, 1), (336, 252), 147),
        (640, 480, (2, 2), (640, 480), 727),
        (1920, 1080, (3, 5), (1680, 945), 2322),
        (4000, 4000, (4, 4), (1344, 1344), 2467),
    ],
)
def test_spec_examples(width, height, grid, resized, tokens):
    processor = Llama4ImageProcessor()
    rows, cols = processor.tile_grid(height, width)
    assert (rows, cols) == grid
    assert resized_size(height, width, rows, cols, TILE)[::-1] == resized
    assert image_token_count(rows, cols, 144) == tokens
    assert image_layout(rows, cols, 144).count("<|") == tokens


def _solid(width, height, rgb):
    return Image.new("RGB", (width, height), rgb)


def _normalised(rgb):
    return torch.tensor([c / 255 * 2 - 1 for c in rgb]).view(3, 1, 1)


def test_single_tile_is_padded_below_with_black_and_normalised_to_minus_one_one():
    colour = (255, 0, 128)
    out = Llama4ImageProcessor()(_solid(200, 150, colour))
    pixels = out["pixel_values"]
    assert pixels.shape == (1, 3, 336, 336) and out["aspect_ratios"].tolist() == [[1, 1]]
    assert pixels.min() >= -1 and pixels.max() <= 1
    torch.testing.assert_close(pixels[0, :, :252], _normalised(colour).expand(3, 252, 336), atol=1e-6, rtol=0)
    assert torch.all(pixels[0, :, 252:] == -1)


def test_tiles_are_row_major_with_padding_right_and_below_and_an_unpadded_thumbnail():
    colour = (10, 200, 30)
    pixels = Llama4ImageProcessor()(_solid(640, 480, colour))["pixel_values"]
    assert pixels.shape == (5, 3, 336, 336)
    expected = _normalised(colour)
    top_left, top_right, bottom_left, bottom_right, thumbnail = pixels
    torch.testing.assert_close(top_left, expected.expand(3, 336, 336), atol=1e-6, rtol=0)
    torch.testing.assert_close(top_right[:, :, : 640 - 336], expected.expand(3, 336, 304), atol=1e-6, rtol=0)
    assert torch.all(top_right[:, :, 304:] == -1)
    assert torch.all(bottom_left[:, 480 - 336 :] == -1) and torch.all(bottom_right[:, :, 304:] == -1)
    torch.testing.assert_close(thumbnail, expected.expand(3, 336, 336), atol=1e-6, rtol=0)


def test_quadrants_land_in_row_major_tile_order():
    quadrants = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    image = Image.new("RGB", (672, 672))
    for i, colour in enumerate(quadrants):
        image.paste(colour, (336 * (i % 2), 336 * (i // 2), 336 * (i % 2 + 1), 336 * (i // 2 + 1)))
    pixels = Llama4ImageProcessor()(image)["pixel_values"]
    assert pixels.shape[0] == 5
    for tile, colour in zip(pixels, quadrants):
        torch.testing.assert_close(tile, _normalised(colour).expand(3, 336, 336), atol=1e-6, rtol=0)


def test_transparent_pixels_are_laid_on_white():
    image = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    pixels = Llama4ImageProcessor(size=32)(image)["pixel_values"]
    assert torch.all(pixels[0, :, :32, :32] == 1)


def test_numpy_torch_and_pil_inputs_agree():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(70, 90, 3), dtype=np.uint8)
    processor = Llama4ImageProcessor(size=32)
    from_pil = processor(Image.fromarray(array))["pixel_values"]
    torch.testing.assert_close(processor(array)["pixel_values"], from_pil)
    torch.testing.assert_close(processor(torch.from_numpy(array).permute(2, 0, 1))["pixel_values"], from_pil)
    torch.testing.assert_close(processor(array.astype(np.float32) / 255)["pixel_values"], from_pil)


def test_every_tile_of_every_image_is_stacked_in_order():
    processor = Llama4ImageProcessor(size=32)
    images = [_solid(64, 64, (0, 0, 0)), _solid(20, 10, (255, 255, 255)), _solid(96, 32, (0, 0, 0))]
    out = processor(images)
    assert out["aspect_ratios"].tolist() == [[2, 2], [1, 1], [1, 3]]
    assert out["pixel_values"].shape[0] == 5 + 1 + 4
    assert torch.all(out["pixel_values"][5, :, :16] == 1)  # the white image, 10 px high -> 16 after upscaling


@pytest.mark.parametrize(
    "bad, error",
    [
        (np.zeros((0, 10, 3), dtype=np.uint8), ValueError),
        (Image.new("RGB", (0, 0)), ValueError),
        (b"not an image", ValueError),
        (np.zeros((5, 5, 5, 5), dtype=np.uint8), ValueError),
        (np.full((4, 4, 3), 2.0), ValueError),
        (12, TypeError),
    ],
)
def test_bad_images_raise_clear_errors(bad, error):
    with pytest.raises(error, match="image|size|pass"):
        Llama4ImageProcessor(size=32)(bad)


def test_unreadable_file_names_the_path(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="broken.png"):
        Llama4ImageProcessor()(str(path))
    good = tmp_path / "good.png"
    _solid(30, 20, (1, 2, 3)).save(good)
    assert Llama4ImageProcessor(size=32)(str(good))["pixel_values"].shape == (1, 3, 32, 32)


def test_official_config_keys_are_accepted_and_save_load_round_trips(tmp_path):
    official = dict(
        size={"height": 336, "width": 336}, max_patches=16, resize_to_max_canvas=False, do_resize=True,
        do_rescale=True, do_normalize=True, do_convert_rgb=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        rescale_factor=1 / 255, resample=2, data_format="channels_first", default_to_square=True,
    )
    processor = Llama4ImageProcessor(**official)
    processor.save_pretrained(tmp_path)
    loaded = Llama4ImageProcessor.from_pretrained(tmp_path)
    assert loaded.tile_size == 336 and loaded.max_patches == 16
    with pytest.raises(ValueError, match="do_resize"):
        Llama4ImageProcessor(do_resize=False)
    buffer = io.BytesIO()
    _solid(5, 5, (0, 0, 0)).save(buffer, format="PNG")
    assert loaded(buffer.getvalue())["pixel_values"].shape == (1, 3, 336, 336)
