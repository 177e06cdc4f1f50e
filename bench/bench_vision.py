"""Vision speed: our Llama4VisionModel against transformers' (same weights, same attention kernel), and
our image processor's tiling throughput.

Shape: the official tile geometry (336-pixel tiles, 14-pixel patches: 577 tokens per tile, 144 after
pixel shuffle) with a narrower, shallower tower (width 256, 4 layers, 4 heads) so it runs on a laptop
CPU. Both towers are timed in the same process, round-robin, median of the repeats, because the
machine's cores may be shared with other jobs.

    python bench/bench_vision.py --tiles 8 --repeats 7
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from PIL import Image
from transformers.models.llama4.modeling_llama4 import Llama4VisionModel as TransformersVisionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama4_sparse.modeling_llama4 import Llama4ImageProcessor, Llama4VisionConfig, Llama4VisionModel  # noqa: E402


def build(width: int, layers: int):
    config = Llama4VisionConfig.from_preset(
        "scout", hidden_size=width, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=4 * width,
        projector_input_dim=512, projector_output_dim=512, vision_output_dim=512,
    )
    ours = Llama4VisionModel(config).eval()
    known = set(transformers.Llama4VisionConfig.__dataclass_fields__)
    skip = ("model_type", "transformers_version")
    fields = {k: v for k, v in config.to_dict().items() if k in known and k not in skip}
    theirs = TransformersVisionModel(transformers.Llama4VisionConfig(**fields)).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    ours, theirs = build(args.width, args.layers)
    pixels = torch.rand(args.tiles, 3, 336, 336) * 2 - 1
    with torch.no_grad():
        difference = (ours(pixels).last_hidden_state - theirs(pixels).last_hidden_state).abs().max().item()
        ours_s, theirs_s = [], []
        for _ in range(args.repeats):  # round-robin so background load hits both alike
            ours_s.append(seconds(lambda: ours(pixels), 1))
            theirs_s.append(seconds(lambda: theirs(pixels), 1))
    ours_t, theirs_t = statistics.median(ours_s), statistics.median(theirs_s)

    processor = Llama4ImageProcessor()
    photo = Image.new("RGB", (1920, 1080), (120, 80, 40))
    tiling = seconds(lambda: processor(photo), args.repeats)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"vision tower, {args.tiles} tiles of 336 px, width {args.width}, {args.layers} layers, fp32:")
    print(f"  ours {ours_t * 1e3:.1f} ms, transformers {theirs_t * 1e3:.1f} ms, ratio ours/transformers "
          f"{ours_t / theirs_t:.2f} (max |diff| {difference:.1e})")
    print(f"image processor, 1920x1080 -> 15 tiles + thumbnail: {tiling * 1e3:.1f} ms per image")


if __name__ == "__main__":
    main()
