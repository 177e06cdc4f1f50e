"""`Llama4Processor`: tokenizer + image tiling + the Llama 4 image/video prompt layout.

Each `<|image|>` placeholder in the text (what the chat template writes for an image item) becomes
the image's token layout; each `<|video|>` placeholder becomes its frames (see `video.py`).
Image layout, with P = `<|patch|>` repeated tokens_per_tile (144) times:

    one tile:      <|image_start|><|image|>P<|image_end|>
    rows x cols:   <|image_start|> (P<|tile_x_separator|>)*(cols-1) P<|tile_y_separator|>  [each row]
                   <|image|>P<|image_end|>                                                 [thumbnail]

so an image costs 147 tokens alone, or 3 + 144*(rows*cols + 1) + rows*cols tokens when tiled.
`pixel_values` holds the tiles of every image and video frame, in the order their placeholders
appear, sample after sample; that is the order the model fills the `<|patch|>` tokens in.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing import Llama4ImageProcessor, flatten_images
from .video import frame_label, select_frames

IMAGE_PLACEHOLDER = "<|image|>"
VIDEO_PLACEHOLDER = "<|video|>"
_PLACEHOLDERS = re.compile(re.escape(IMAGE_PLACEHOLDER) + "|" + re.escape(VIDEO_PLACEHOLDER))
_TOKENIZER_KWARGS = ("padding", "padding_side", "pad_to_multiple_of", "truncation", "max_length",
                     "add_special_tokens", "return_attention_mask")


def image_layout(rows: int, cols: int, tokens_per_tile: int) -> str:
    """The token string of one image split into rows x cols tiles (plus thumbnail when more than one)."""
    patches = "<|patch|>" * tokens_per_tile
    body = ""
    if rows * cols > 1:
        row = "<|tile_x_separator|>".join([patches] * cols)
        body = (row + "<|tile_y_separator|>") * rows
    return f"<|image_start|>{body}<|image|>{patches}<|image_end|>"


def image_token_count(rows: int, cols: int, tokens_per_tile: int) -> int:
    if rows * cols == 1:
        return tokens_per_tile + 3
    return 3 + tokens_per_tile * (rows * cols + 1) + rows * (cols - 1) + rows


class Llama4Processor(ProcessorMixin):
    """Builds `input_ids`, `attention_mask` and `pixel_values` for `Llama4ForConditionalGeneration`.

    `processor(text=..., images=..., videos=...)` takes texts holding `<|image|>` / `<|video|>`
    placeholders; `processor.apply_chat_template(messages, tokenize=True, return_dict=True)` takes
    chats whose content items are {"type": "image", "image": ...} or {"type": "video", "video": frames}.
    Images are consumed in placeholder order (a flat list, or one list per text).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        patch_size: int = 14,
        pixel_shuffle_ratio: float = 0.5,
        video_max_frames: int = 32,
        **kwargs,
    ):
        if chat_template is None and tokenizer is not None:
            chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.patch_size = patch_size
        self.pixel_shuffle_ratio = pixel_shuffle_ratio
        self.video_max_frames = video_max_frames
        tile = image_processor.tile_size
        if tile % patch_size:
            raise ValueError(f"the tile size ({tile}) must be a multiple of patch_size ({patch_size})")
        self.tokens_per_tile = int((tile // patch_size) * pixel_shuffle_ratio) ** 2
        self.image_token_id = tokenizer.convert_tokens_to_ids("<|patch|>")

    # -- placeholder expansion -------------------------------------------------------------

    def _expand(self, kinds: list[str], images: list, videos: list, num_frames: int | None, fps, do_sample_frames):
        """(layout strings, tiles) for the placeholders `kinds` in order, consuming images/videos."""
        images, videos = iter(images), iter(videos)
        layouts, tiles = [], []
        for kind in kinds:
            if kind == IMAGE_PLACEHOLDER:
                pixel, (rows, cols) = self.image_processor.tiles(next(images))
                layouts.append(image_layout(rows, cols, self.tokens_per_tile))
                tiles.append(pixel)
            else:
                video_fps = fps.pop(0) if isinstance(fps, list) else fps
                frames, indices = select_frames(next(videos), num_frames or self.video_max_frames,
                                                self.video_max_frames, do_sample_frames)
                single = image_layout(1, 1, self.tokens_per_tile)
                layouts.append("\n".join(frame_label(rank + 1, len(frames), index, video_fps) + single
                                         for rank, index in enumerate(indices)))
                tiles.extend(self.image_processor.tiles(frame, max_patches=1)[0] for frame in frames)
        return layouts, tiles

    @staticmethod
    def _check_counts(kinds_per_sample: list[list[str]], images: list, videos: list) -> None:
        wanted_images = sum(k.count(IMAGE_PLACEHOLDER) for k in kinds_per_sample)
        wanted_videos = sum(k.count(VIDEO_PLACEHOLDER) for k in kinds_per_sample)
        if wanted_images != len(images):
            raise ValueError(
                f"the text has {wanted_images} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images were given; "
                f"put one {IMAGE_PLACEHOLDER} where each image goes (or an image content item in a chat)"
            )
        if wanted_videos != len(videos):
            raise ValueError(
                f"the text has {wanted_videos} {VIDEO_PLACEHOLDER} placeholders but {len(videos)} videos were given; "
                f"put one {VIDEO_PLACEHOLDER} where each video goes (or a video content item in a chat)"
            )

    # -- public API ---------------------------------------------------------------------

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        videos=None,
        num_frames: int | None = None,
        fps: float | list[float] | None = None,
        do_sample_frames: bool = True,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        if text is None:
            raise ValueError("text is required: a string (or list) with one <|image|> placeholder per image")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a list of strings")
        kinds_per_sample = [_PLACEHOLDERS.findall(t) for t in texts]
        if _is_per_sample(images, len(texts)):
            for row, (kinds, row_images) in enumerate(zip(kinds_per_sample, images)):
                wanted = kinds.count(IMAGE_PLACEHOLDER)
                if wanted != len(flatten_images(row_images)):
                    raise ValueError(
                        f"text {row} has {wanted} {IMAGE_PLACEHOLDER} placeholders but its image list holds "
                        f"{len(flatten_images(row_images))} images"
                    )
        images = flatten_images(images)
        videos = _as_video_list(videos)
        self._check_counts(kinds_per_sample, images, videos)
        fps = list(fps) if isinstance(fps, (list, tuple)) else fps
        layouts, tiles = self._expand([k for kinds in kinds_per_sample for k in kinds], images, videos,
                                      num_frames, fps, do_sample_frames)
        layouts = iter(layouts)
        expanded = [_PLACEHOLDERS.sub(lambda _: next(layouts), t) for t in texts]
        tokenizer_kwargs = {k: kwargs.pop(k) for k in _TOKENIZER_KWARGS if k in kwargs}
        kwargs.pop("return_mm_token_type_ids", None)
        if kwargs.pop("audio", None) is not None:
            raise ValueError("Llama 4 takes no audio")
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        tokenizer_kwargs.setdefault("padding", True)
        encoded = self.tokenizer(expanded, **tokenizer_kwargs)
        return self._finish(encoded["input_ids"], None, tiles, expanded_patch_counts=[
            t.count("<|patch|>") for t in expanded], tokenizer_kwargs=tokenizer_kwargs,
            return_tensors=return_tensors, already_padded=True, attention_mask=encoded.get("attention_mask"),
            batched=not isinstance(text, str))

    def apply_chat_template(
        self,
        conversation,
        chat_template: str | None = None,
        tools=None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = None,
        return_assistant_tokens_mask: bool = False,
        processor_kwargs: dict | None = None,
        **kwargs,
    ):
        """The chat in the Llama 4 format with its images and videos expanded and tiled.

        `tokenize=False` returns the rendered text with the bare placeholders (as the chat
        template writes them); `tokenize=True, return_dict=True, return_tensors="pt"` returns what the
        model takes. Without `return_tensors` the ids are batched lists, one per chat, as transformers'
        processors return them (TRL's template checks rely on that).
        With this package's tokenizer, message text is encoded as plain text (a user's "<|eot|>"
        stays characters); other tokenizers (e.g. an official checkpoint's) go through
        transformers' generic path, which renders one string and calls this processor on it."""
        if not hasattr(self.tokenizer, "render_chat"):
            return super().apply_chat_template(
                conversation, chat_template=chat_template, tools=tools, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tokenize=tokenize, return_dict=return_dict,
                return_tensors=return_tensors, return_assistant_tokens_mask=return_assistant_tokens_mask,
                processor_kwargs=processor_kwargs, **kwargs,
            )
        options = dict(processor_kwargs or {})
        media_options = {k: options.pop(k) for k in ("num_frames", "fps", "do_sample_frames") if k in options}
        media_options.update({k: kwargs.pop(k) for k in ("num_frames", "fps", "do_sample_frames") if k in kwargs})
        if isinstance(media_options.get("fps"), (list, tuple)):
            media_options["fps"] = list(media_options["fps"])  # consumed one per video, in order
        options.pop("return_tensors", None)
        batched = bool(conversation) and isinstance(conversation, (list, tuple)) and isinstance(
            conversation[0], (list, tuple)
        )
        chats = list(conversation) if batched else [conversation]
        renderings = [
            self.tokenizer.render_chat(chat, tools=tools, chat_template=chat_template,
                                       add_generation_prompt=add_generation_prompt,
                                       continue_final_message=continue_final_message, **kwargs)
            for chat in chats
        ]
        if not tokenize:
            texts = [r.text for r in renderings]
            return texts if batched else texts[0]
        all_tiles, ids, masks, patch_counts = [], [], [], []
        for chat, rendering in zip(chats, renderings):
            images, videos = _media_of(chat)
            kinds = [m.group(0) for s in rendering.segments if s.trusted for m in _PLACEHOLDERS.finditer(s.text)]
            self._check_counts([kinds], images, videos)
            layouts, tiles = self._expand(kinds, images, videos, media_options.get("num_frames"),
                                          media_options.get("fps"), media_options.get("do_sample_frames", True))
            image_layouts = [l for k, l in zip(kinds, layouts) if k == IMAGE_PLACEHOLDER]
            video_layouts = [l for k, l in zip(kinds, layouts) if k == VIDEO_PLACEHOLDER]
            rendering = rendering.expand(IMAGE_PLACEHOLDER, image_layouts).expand(VIDEO_PLACEHOLDER, video_layouts)
            sample_ids, mask = self.tokenizer.encode_chat(rendering)
            if options.get("add_special_tokens") and self.tokenizer.bos_token_id is not None and (
                not sample_ids or sample_ids[0] != self.tokenizer.bos_token_id
            ):
                sample_ids, mask = [self.tokenizer.bos_token_id] + sample_ids, [0] + mask
            ids.append(sample_ids)
            masks.append(mask)
            all_tiles.extend(tiles)
            patch_counts.append(sum(l.count("<|patch|>") for l in layouts))
        tokenizer_kwargs = {k: options.pop(k) for k in _TOKENIZER_KWARGS if k in options}
        options.pop("return_offsets_mapping", None)
        options.pop("return_text_replacement_offsets", None)
        if options:
            raise TypeError(f"unexpected processor_kwargs {sorted(options)}")
        if tokenizer_kwargs.get("truncation"):
            limit = tokenizer_kwargs.get("max_length") or self.tokenizer.model_max_length
            ids = [seq[:limit] for seq in ids]
            masks = [seq[:limit] for seq in masks]
        # Batched like transformers' processors (lists by default), whether one chat or several came in.
        out = self._finish(ids, masks if return_assistant_tokens_mask else None, all_tiles, patch_counts,
                           tokenizer_kwargs, return_tensors, already_padded=False, batched=True)
        return out if return_dict else out["input_ids"]

    def _finish(self, ids, assistant_masks, tiles, expanded_patch_counts, tokenizer_kwargs, return_tensors,
                already_padded, attention_mask=None, batched=True) -> BatchFeature:
        for row, (sample, wanted) in enumerate(zip(ids, expanded_patch_counts)):
            found = sum(1 for token in sample if token == self.image_token_id)
            if found != wanted:
                raise ValueError(
                    f"sample {row} keeps {found} of its {wanted} <|patch|> tokens after tokenization; truncation "
                    "would cut an image's tokens. Raise max_length or drop truncation"
                )
        if not already_padded:
            pad_kwargs = {k: v for k, v in tokenizer_kwargs.items()
                          if k in ("padding", "padding_side", "pad_to_multiple_of", "max_length")}
            pad_kwargs.setdefault("padding", True)
            if pad_kwargs["padding"] != "max_length":
                # Truncation happened above; max_length here only sizes "max_length" padding (passed with
                # padding=True it makes transformers warn that it is ignored).
                pad_kwargs.pop("max_length", None)
            padded = self.tokenizer.pad({"input_ids": ids}, **pad_kwargs)
            side = pad_kwargs.get("padding_side", self.tokenizer.padding_side)
            if assistant_masks is not None:
                width = len(padded["input_ids"][0])
                assistant_masks = [
                    m + [0] * (width - len(m)) if side == "right" else [0] * (width - len(m)) + m
                    for m in assistant_masks
                ]
            ids, attention_mask = padded["input_ids"], padded["attention_mask"]
        data = {"input_ids": ids, "attention_mask": attention_mask}
        if assistant_masks is not None:
            data["assistant_masks"] = assistant_masks
        if return_tensors == "pt":
            data = {k: torch.as_tensor(v) for k, v in data.items()}
        elif return_tensors is not None:
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        if not batched and return_tensors is None:
            data = {k: v[0] for k, v in data.items()}
        if tiles:
            data["pixel_values"] = torch.cat(tiles)
        return BatchFeature(data)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # Official folders name transformers' torchvision image processor ("Llama4ImageProcessorFast");
        # their settings are the same fields, so this package's processor reads them directly.
        subfolder = kwargs.pop("subfolder", "")
        image_processor = Llama4ImageProcessor.from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
        tokenizer = cls._load_tokenizer_from_pretrained("tokenizer", pretrained_model_name_or_path,
                                                        subfolder=subfolder, **kwargs)
        return [image_processor, tokenizer]

    # transformers resolves a saved "processor_class" by name before looking at registered classes,
    # and its own Llama 4 processor has this class's name. Without the entry, AutoProcessor picks
    # this class from the folder's model config (or, with trust_remote_code, from auto_map).
    def to_dict(self) -> dict:
        data = super().to_dict()
        data.pop("processor_class", None)
        return data

    def save_pretrained(self, save_directory, **kwargs):
        saved = super().save_pretrained(save_directory, **kwargs)
        tokenizer_config = Path(save_directory) / "tokenizer_config.json"
        if tokenizer_config.is_file():
            data = json.loads(tokenizer_config.read_text(encoding="utf-8"))
            if data.pop("processor_class", None) is not None:
                tokenizer_config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return saved

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


def _is_per_sample(images, count: int) -> bool:
    """Whether images are given as one list per text (rather than one flat list)."""
    return (isinstance(images, (list, tuple)) and len(images) == count
            and all(isinstance(item, (list, tuple)) for item in images))


def _as_video_list(videos) -> list:
    """A list of videos from one video (a 4-D array or a list of frames) or a list of videos."""
    if videos is None:
        return []
    if isinstance(videos, (np.ndarray, torch.Tensor)) or (
        isinstance(videos, (list, tuple)) and videos and _is_frame(videos[0])
    ):
        return [videos]
    return list(videos)


def _is_frame(item) -> bool:
    return isinstance(item, Image.Image) or (isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim in (2, 3))


def _media_of(chat) -> tuple[list, list]:
    """Images and videos of a chat's content items, in order."""
    messages = getattr(chat, "messages", chat)
    images, videos = [], []
    for message in messages:
        content = message.get("content") if hasattr(message, "get") else None
        if not isinstance(content, (list, tuple)):
            continue
        for item in content:
            kind = item.get("type")
            if kind == "image":
                source = next((item[k] for k in ("image", "path", "url") if item.get(k) is not None), None)
                if source is None:
                    raise ValueError("an image content item needs the image under 'image' (or a file under 'path')")
                images.append(source)
            elif kind == "video":
                source = next((item[k] for k in ("video", "frames") if item.get(k) is not None), None)
                if source is None:
                    raise ValueError("a video content item needs its frames under 'video'")
                videos.append(source)
    return images, videos
