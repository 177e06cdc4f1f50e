"""Image tiling for the Llama 4 vision tower, with PIL, numpy and torch only (no torchvision).

An image becomes `rows x cols` tiles of `tile_size` pixels plus, when there is more than one tile,
a global thumbnail appended last. Worked examples with the shipped defaults (tile 336, at most 16 tiles):

* 200x150 (W x H): every canvas needs upscaling; the least is the 1x1 canvas (scale 1.68). The
  upscaling cap (never past one tile) resizes it to 336x252, padded below to 336x336. One tile.
* 640x480: the 2x2 canvas (672x672) fits with the least upscaling (1.05); the cap keeps the image
  at 640x480, padded right and below. Four tiles + thumbnail.
* 1920x1080: no canvas fits without downscaling; the least downscaling is 0.875 on the 3 rows x
  5 cols canvas (1008x1680), giving 1680x945. Fifteen tiles + thumbnail.

Resizing is bilinear with antialiasing, rounded back to 8-bit as transformers' tensor path does;
normalisation runs in float32 (Meta's reference order), so values can differ from transformers'
bfloat16 normalisation by one bfloat16 step.
"""

from __future__ import annotations

import io
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

# Flags official preprocessor configs carry; this processor always does all of these steps.
_ALWAYS_ON = ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb")


def candidate_canvases(max_patches: int) -> list[tuple[int, int]]:
    """Every (rows, cols) grid with at most `max_patches` tiles."""
    return [(r, c) for r in range(1, max_patches + 1) for c in range(1, max_patches // r + 1)]


def best_fit(height: int, width: int, tile_size: int, max_patches: int, resize_to_max_canvas: bool = False):
    """(rows, cols) of the canvas the image fits with the least upscaling, else the least downscaling;
    ties go to the smallest canvas. Scales are exact fractions so ties are real ties."""
    scored = []
    for rows, cols in candidate_canvases(max_patches):
        scale = min(Fraction(rows * tile_size, height), Fraction(cols * tile_size, width))
        scored.append((scale, rows * cols, rows, cols))
    upscaling = [s for s in scored if s[0] >= 1]
    if upscaling:
        chosen = max(upscaling, key=lambda s: s[0]) if resize_to_max_canvas else min(upscaling, key=lambda s: s[0])
    else:
        chosen = max(scored, key=lambda s: s[0])
    ties = [s for s in scored if s[0] == chosen[0]]
    _, _, rows, cols = min(ties, key=lambda s: s[1])
    return rows, cols


def resized_size(height: int, width: int, rows: int, cols: int, tile_size: int, resize_to_max_canvas: bool = False):
    """(height, width) the image is resized to before padding onto its rows x cols canvas.

    Upscaling stops at one tile (unless `resize_to_max_canvas`): a small image is made to fill a
    tile, never the whole canvas. The aspect ratio is kept, flooring the side that does not touch
    the target box."""
    target_h, target_w = rows * tile_size, cols * tile_size
    if not resize_to_max_canvas:
        target_h = min(max(height, tile_size), target_h)
        target_w = min(max(width, tile_size), target_w)
    if Fraction(target_w, width) < Fraction(target_h, height):
        new_w, new_h = target_w, min(height * target_w // width, target_h)
    else:
        new_h, new_w = target_h, min(width * target_h // height, target_w)
    return max(new_h, 1), max(new_w, 1)


def _open(path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(
            f"cannot read image {path!r}: {err}. Pass a readable image file, a PIL image or an array"
        ) from err
    return image


def to_uint8_chw(image) -> torch.Tensor:
    """Any supported image as a (3, H, W) uint8 RGB tensor; transparent pixels are laid on white.

    Accepts PIL images, file paths / bytes, numpy arrays and torch tensors. Arrays are (H, W),
    (H, W, C) or (C, H, W) with C in {1, 3, 4}; integer arrays are 0..255, float arrays 0..1.
    """
    if isinstance(image, (str, os.PathLike)):
        image = _open(Path(image))
    elif isinstance(image, (bytes, bytearray)):
        image = _open(io.BytesIO(image))
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image has zero size ({image.width}x{image.height}); pass an image with pixels")
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        array = np.asarray(image.convert("RGB"))
        return torch.from_numpy(array.copy()).permute(2, 0, 1)
    if isinstance(image, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(image))
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
    else:
        raise TypeError(
            f"unsupported image type {type(image).__name__}; pass a PIL image, a path, bytes, a numpy array "
            "or a torch tensor"
        )
    return _array_to_uint8_chw(tensor)


def _array_to_uint8_chw(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.ndim == 2:
        tensor = tensor[None]
    elif tensor.ndim == 3:
        if tensor.shape[-1] in (1, 3, 4) and tensor.shape[0] not in (1, 3, 4):
            tensor = tensor.permute(2, 0, 1)
        elif tensor.shape[0] not in (1, 3, 4):
            raise ValueError(f"image array of shape {tuple(tensor.shape)} has no channel axis of size 1, 3 or 4")
    else:
        raise ValueError(f"image array must be (H, W), (H, W, C) or (C, H, W); got shape {tuple(tensor.shape)}")
    if tensor.shape[-1] == 0 or tensor.shape[-2] == 0:
        raise ValueError(f"image has zero size (shape {tuple(tensor.shape)}); pass an image with pixels")
    if tensor.is_floating_point():
        if tensor.min() < 0 or tensor.max() > 1:
            raise ValueError("float image arrays must hold values in [0, 1]; pass uint8 for 0..255 data")
        tensor = (tensor.float() * 255).round()
    elif tensor.dtype == torch.bool:
        tensor = tensor.float() * 255
    else:
        if tensor.min() < 0 or tensor.max() > 255:
            raise ValueError("integer image arrays must hold values in 0..255")
        tensor = tensor.float()
    if tensor.shape[0] == 4:
        alpha = tensor[3:] / 255
        tensor = tensor[:3] * alpha + 255 * (1 - alpha)
    elif tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    return tensor.round().clamp(0, 255).to(torch.uint8)


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if tuple(image.shape[-2:]) == (height, width):
        return image.float()
    resized = F.interpolate(
        image[None].float(), size=(height, width), mode="bilinear", align_corners=False, antialias=True
    )
    return resized[0].round().clamp(0, 255)


class Llama4ImageProcessor(BaseImageProcessor):
    """Tiles images for Llama 4: best-fit canvas, aspect-preserving resize, zero padding,
    normalisation to [-1, 1], row-major tiles and a global thumbnail.

    `pixel_values` stacks every tile of every image along the first dimension (each image's tiles
    in row-major order, then its thumbnail); `aspect_ratios` gives (rows, cols) per image.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: dict | int | None = None,
        max_patches: int = 16,
        resize_to_max_canvas: bool = False,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        rescale_factor: float = 1 / 255,
        **kwargs,
    ):
        for flag in _ALWAYS_ON:
            if kwargs.pop(flag, True) is False:
                raise ValueError(f"{flag}=False is not supported: Llama 4 tiles need every preprocessing step")
        # Keys of the official (torchvision) processor config that have no meaning here.
        for unused in ("resample", "data_format", "input_data_format", "device", "default_to_square",
                       "crop_size", "do_center_crop", "do_pad", "disable_grouping", "return_tensors"):
            kwargs.pop(unused, None)
        super().__init__(**kwargs)
        if size is None:
            size = 336
        if isinstance(size, int):
            size = {"height": size, "width": size}
        if size.get("height") != size.get("width") or not isinstance(size.get("height"), int) or size["height"] < 1:
            raise ValueError(f"size must be a square tile, e.g. {{'height': 336, 'width': 336}}; got {size}")
        if not isinstance(max_patches, int) or max_patches < 1:
            raise ValueError(f"max_patches must be a positive integer, got {max_patches!r}")
        if len(image_mean) != 3 or len(image_std) != 3 or min(image_std) <= 0:
            raise ValueError("image_mean and image_std need three values, std positive")
        self.size = dict(size)
        self.max_patches = max_patches
        self.resize_to_max_canvas = resize_to_max_canvas
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.rescale_factor = rescale_factor

    @property
    def tile_size(self) -> int:
        return self.size["height"]

    def tile_grid(self, height: int, width: int, max_patches: int | None = None) -> tuple[int, int]:
        """(rows, cols) an image of this size is split into."""
        return best_fit(height, width, self.tile_size, max_patches or self.max_patches, self.resize_to_max_canvas)

    def _normalize(self, image: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        return (image * self.rescale_factor - mean) / std

    def tiles(self, image, max_patches: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """(tiles (n, 3, T, T) float32, (rows, cols)) for one image; n = rows*cols (+1 thumbnail if > 1)."""
        pixels = to_uint8_chw(image)
        height, width = pixels.shape[-2:]
        tile = self.tile_size
        rows, cols = self.tile_grid(height, width, max_patches)
        new_h, new_w = resized_size(height, width, rows, cols, tile, self.resize_to_max_canvas)
        canvas = torch.zeros(3, rows * tile, cols * tile)
        canvas[:, :new_h, :new_w] = _resize(pixels, new_h, new_w)
        grid = self._normalize(canvas)
        # (3, R*T, C*T) -> (R*C, 3, T, T), row-major
        grid = grid.view(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
        if rows * cols > 1:
            thumbnail = self._normalize(_resize(pixels, tile, tile))
            grid = torch.cat([grid, thumbnail[None]], dim=0)
        return grid, (rows, cols)

    def preprocess(
        self, images, max_patches: int | None = None, return_tensors: str | None = "pt", **kwargs
    ) -> BatchFeature:
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt', got {return_tensors!r}")
        images = flatten_images(images)
        if not images:
            raise ValueError("no images given")
        all_tiles, ratios = [], []
        for image in images:
            tiles, grid = self.tiles(image, max_patches)
            all_tiles.append(tiles)
            ratios.append(grid)
        return BatchFeature(
            {"pixel_values": torch.cat(all_tiles), "aspect_ratios": torch.tensor(ratios, dtype=torch.long)}
        )

    __call__ = preprocess


def flatten_images(images) -> list:
    """One flat list of images from an image, a list, or a list of per-prompt lists."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        flat = []
        for item in images:
            flat.extend(flatten_images(item) if isinstance(item, (list, tuple)) else [item])
        return flat
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]
