"""Counting shapes in generated images: a verifiable multimodal task for multimodal SFT.

Shapes sit in distinct cells of a 3x3 grid (never overlapping), so the count is exact; the split is
a hash of the scene description, so a held-out image never appears in training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from .splits import check_split, draw_distinct, split_of

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}
GRID = 3


@dataclass(frozen=True)
class ShapeScene:
    """`cells[i]` is (shape, color) or None for the i-th cell of the grid, row-major."""

    cells: tuple
    target: str
    image_size: int

    @property
    def answer(self) -> int:
        return sum(1 for c in self.cells if c is not None and c[0] == self.target)

    @property
    def question(self) -> str:
        return f"How many {self.target}s are in the image?"

    @property
    def split(self) -> str:
        return split_of(f"{self.question} {self.cells}")

    @property
    def reasoning(self) -> str:
        seen = [f"a {color} {shape}" for shape, color in filter(None, self.cells)]
        return f"I see {', '.join(seen)}. The {self.target}s: {self.answer}."

    def image(self) -> Image.Image:
        size, cell = self.image_size, self.image_size / GRID
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        for i, content in enumerate(self.cells):
            if content is None:
                continue
            shape, color = content
            x0, y0 = (i % GRID) * cell + cell * 0.15, (i // GRID) * cell + cell * 0.15
            x1, y1 = x0 + cell * 0.7, y0 + cell * 0.7
            fill = COLORS[color]
            if shape == "circle":
                draw.ellipse((x0, y0, x1, y1), fill=fill)
            elif shape == "square":
                draw.rectangle((x0, y0, x1, y1), fill=fill)
            else:
                draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        return image

    def row(self) -> dict:
        """TRL's vision-language SFT format: one image and a conversation with an image item."""
        return {
            "images": [self.image()],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.question}]},
                # Content as a list in both turns: a dataset column cannot mix lists and strings.
                {"role": "assistant", "reasoning": self.reasoning,
                 "content": [{"type": "text", "text": f"The final answer is {self.answer}"}]},
            ],
        }


def generate_scenes(n: int, seed: int = 0, split: str = "train", image_size: int = 32) -> list[ShapeScene]:
    check_split(split)
    if image_size < 3 * GRID:
        raise ValueError(f"image_size must be at least {3 * GRID} pixels to draw a {GRID}x{GRID} grid")
    rng = random.Random(f"shapes:{seed}:{split}")

    def draw(_: int) -> ShapeScene:
        occupied = rng.sample(range(GRID * GRID), rng.randint(1, GRID * GRID))
        cells = tuple((rng.choice(SHAPES), rng.choice(sorted(COLORS))) if i in occupied else None
                      for i in range(GRID * GRID))
        return ShapeScene(cells, rng.choice(SHAPES), image_size)

    return draw_distinct(n, split, draw, lambda scene: (scene.cells, scene.target),
                         "scenes were found; ask for fewer")
