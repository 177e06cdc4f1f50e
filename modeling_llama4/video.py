"""Videos as sequences of frames for Llama 4, which has no video tokens of its own.

A video is a list of frames (PIL images or arrays) or one array of shape (T, H, W, C) / (T, C, H, W).
Up to `num_frames` frames are sampled uniformly: the video is cut into `num_frames` equal segments
and the frame at the middle of each is kept (all frames when there are fewer). Each sampled frame
is encoded as ONE tile (resized to fit the tile, aspect kept, padded), so a frame costs
`tokens_per_tile` + 3 image tokens plus its label.

Prompt layout of a video of n sampled frames, frames in time order, one per line; the label names
the frame's rank and, when the frame rate is known, its time in seconds (original frame index / fps):

    Frame 1/n at 0.50s: <|image_start|><|image|><|patch|>x144<|image_end|>
    Frame 2/n at 1.50s: <|image_start|><|image|><|patch|>x144<|image_end|>
    ...

(without `fps`: "Frame 1/n: ..."). The frames are ordinary single-tile images to the model, so the
official weights read them as such; the labels make their order and spacing visible in text.
"""

from __future__ import annotations

import numpy as np
import torch

from .image_processing import to_uint8_chw


def sample_frame_indices(total: int, num_frames: int) -> list[int]:
    """Indices of the frames kept: the middle frame of each of `num_frames` equal segments."""
    if total < 1:
        raise ValueError("the video has no frames")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if total <= num_frames:
        return list(range(total))
    return [int((2 * k + 1) * total // (2 * num_frames)) for k in range(num_frames)]


def video_frames(video) -> list:
    """The frames of a video given as a list of frames or a 4-D array."""
    if isinstance(video, (str, bytes)) or hasattr(video, "__fspath__"):
        raise TypeError(
            "videos must be given as decoded frames (a list of PIL images/arrays or a (T, H, W, C) array); "
            "decode the file first, e.g. with PyAV or decord"
        )
    if isinstance(video, (np.ndarray, torch.Tensor)):
        if video.ndim != 4:
            raise ValueError(f"a video array must be 4-D (T, H, W, C) or (T, C, H, W); got shape {tuple(video.shape)}")
        return list(video)
    if isinstance(video, (list, tuple)):
        return list(video)
    raise TypeError(f"unsupported video type {type(video).__name__}; pass a list of frames or a 4-D array")


def frame_label(rank: int, count: int, index: int, fps: float | None) -> str:
    time = f" at {index / fps:.2f}s" if fps else ""
    return f"Frame {rank}/{count}{time}: "


def select_frames(video, num_frames: int, max_frames: int, do_sample_frames: bool = True) -> tuple[list, list[int]]:
    """(frames as uint8 tensors, their original indices) after checking the frame budget."""
    if num_frames > max_frames:
        raise ValueError(
            f"num_frames={num_frames} is more than the processor's video_max_frames={max_frames}; ask for fewer "
            "frames or raise video_max_frames (each frame costs one tile of image tokens)"
        )
    frames = video_frames(video)
    if not frames:
        raise ValueError("the video has no frames")
    if do_sample_frames:
        indices = sample_frame_indices(len(frames), num_frames)
    else:
        if len(frames) > max_frames:
            raise ValueError(
                f"the video has {len(frames)} frames but at most video_max_frames={max_frames} are allowed without "
                "sampling; pass do_sample_frames=True (uniform sampling) or fewer frames"
            )
        indices = list(range(len(frames)))
    return [to_uint8_chw(frames[i]) for i in indices], indices
