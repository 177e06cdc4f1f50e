"""`Llama4Tokenizer`: the fast byte-level BPE tokenizer with a chat path that user text cannot spoof.

Public entry points
-------------------
* ``tokenizer(text)`` / ``encode`` / ``decode``: the ordinary fast-tokenizer calls. Plain encoding
  prepends ``<|begin_of_text|>`` (``add_special_tokens=False`` leaves it out) and reads special-token
  strings in ``text`` as special tokens, so pass ``split_special_tokens=True`` for untrusted plain text.
* ``apply_chat_template(conversation, ...)``: transformers' signature and defaults, rendered with the
  shipped Llama 4 template. With ``tokenize=True`` (the default) every string that comes from the
  messages or tools is encoded as plain text — ``"<|eot|>"`` typed by a user becomes the tokens of the
  characters ``<``, ``|``, ``eot``... — and only the template writes special tokens.
  ``return_assistant_tokens_mask=True`` marks the assistant's reasoning block, content, tool calls and
  closing ``<|eot|>``/``<|eom|>``. Template variable ``enable_thinking`` (default True) decides whether the
  generation prompt leaves the thinking block for the model to open (True) or closes it empty (False).
  ``sanitize_control_tokens=False`` opts out, for trusted input only: it renders to one string and
  encodes it with special-token matching, like the base class.
  ``tokenize=False`` returns the rendered string; a string cannot tell a user's ``<|eot|>`` from the
  template's, so re-encoding it gives up the protection.
* ``render_chat(conversation, ...) -> ChatRendering`` and ``encode_chat(rendering) -> (ids, mask)``: the two
  halves of the tokenized chat path, for a processor. A ``ChatRendering`` is a list of ``ChatSegment(text,
  trusted, assistant)``; trusted segments are template text. ``ChatRendering.expand("<|image|>", [...])``
  replaces the template's image placeholders, in order, with the processor's tile/patch layouts
  (``"<|video|>"`` likewise for videos) before ``encode_chat``; an unexpanded ``<|video|>`` is an error.

How the protection works: before rendering, each string in the messages and tools is swapped for a
private-use placeholder ``\\ue000<n>\\ue001`` (``role`` and item ``type`` values, which the template only
compares, stay; an unknown role is an error; tool-schema keys are template text and may not contain
``<|``), the template is rendered around the placeholders, and the rendered text is cut at the
placeholders and at the ``{% generation %}`` span edges.
Template pieces are encoded with special-token matching; each original string is encoded on its own
with ``split_special_tokens=True``. The user's text never passes through the special-token matcher,
so no escaping scheme exists to get around. A side effect: a message's tokens never merge with the
template text around it (for example a content that starts with ``"\\n"`` keeps its own newline token
after the header's ``"\\n\\n"``), which matches what the model sees when it generates the content.
"""

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from inspect import isfunction, ismethod
from pathlib import Path
from typing import Any

from transformers import BatchEncoding, PreTrainedTokenizerFast
from transformers.models.auto import tokenization_auto
from transformers.utils import get_json_schema
from transformers.utils.chat_template_utils import render_jinja_template

from .byte_level_bpe import O200K_PATTERN, build_backend
from .special_tokens import BEGIN_OF_TEXT, EOT, FINETUNE_RIGHT_PAD

_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")
_ROLES = ("system", "user", "assistant", "tool", "ipython")
# Keys whose values the template compares but never writes.
_STRUCTURAL_KEYS = ("role", "type")
_VIDEO_PLACEHOLDER = "<|video|>"


@dataclass(frozen=True)
class ChatSegment:
    text: str
    trusted: bool  # written by the template: special-token strings in it are special tokens
    assistant: bool  # inside a {% generation %} span


@dataclass(frozen=True)
class ChatRendering:
    segments: tuple[ChatSegment, ...]

    @property
    def text(self) -> str:
        return "".join(segment.text for segment in self.segments)

    def expand(self, placeholder: str, expansions: list[str]) -> "ChatRendering":
        """Replace the template's ``placeholder`` occurrences, in order, with ``expansions`` (one each)."""
        found = sum(segment.text.count(placeholder) for segment in self.segments if segment.trusted)
        if found != len(expansions):
            raise ValueError(f"the chat has {found} {placeholder} placeholders but {len(expansions)} expansions were "
                             f"given; every image/video item in the messages needs exactly one input")
        remaining = iter(expansions)
        segments = []
        for segment in self.segments:
            if segment.trusted and placeholder in segment.text:
                pieces = segment.text.split(placeholder)
                text = pieces[0] + "".join(next(remaining) + piece for piece in pieces[1:])
                segment = replace(segment, text=text)
            segments.append(segment)
        return ChatRendering(tuple(segments))


class Llama4Tokenizer(PreTrainedTokenizerFast):
    """Byte-level BPE (tiktoken-exact, o200k pre-tokenizer) with the Llama 4 special tokens and chat format."""

    model_input_names = ["input_ids", "attention_mask"]

    @classmethod
    def from_ranks(cls, ranks: dict[bytes, int], pattern: str = O200K_PATTERN, **init_kwargs) -> "Llama4Tokenizer":
        """The tokenizer equal to tiktoken with these ranks and pattern, the 2048 specials after the ranks,
        bos/eos/pad as the official instruct models use them, and the shipped chat template."""
        defaults = dict(bos_token=BEGIN_OF_TEXT, eos_token=EOT, pad_token=FINETUNE_RIGHT_PAD,
                        chat_template=Path(__file__).with_name("chat_template.jinja").read_text(encoding="utf-8"))
        return cls(tokenizer_object=build_backend(ranks, pattern), **{**defaults, **init_kwargs})

    def apply_chat_template(
        self,
        conversation,
        tools: list[dict | Callable] | None = None,
        documents: list[dict[str, str]] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = True,
        sanitize_control_tokens: bool = True,
        padding=False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors=None,
        return_dict: bool = True,
        return_assistant_tokens_mask: bool = False,
        tokenizer_kwargs: dict[str, Any] | None = None,
        **kwargs,
    ):
        if not sanitize_control_tokens:
            return super().apply_chat_template(
                conversation, tools=tools, documents=documents, chat_template=chat_template,
                add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                tokenize=tokenize, sanitize_control_tokens=False, padding=padding, truncation=truncation,
                max_length=max_length, return_tensors=return_tensors, return_dict=return_dict,
                return_assistant_tokens_mask=return_assistant_tokens_mask, tokenizer_kwargs=tokenizer_kwargs,
                **kwargs)
        if return_assistant_tokens_mask and not (tokenize and return_dict):
            raise ValueError("return_assistant_tokens_mask=True needs tokenize=True and return_dict=True")
        if continue_final_message and return_assistant_tokens_mask:
            raise ValueError("continue_final_message leaves the last turn open, so it has no assistant mask; "
                             "drop one of the two")
        if documents is not None:
            raise ValueError("the Llama 4 chat format has no slot for documents; put retrieved text in a message")
        conversations, batched = _as_batch(conversation)
        renderings = [
            self.render_chat(chat, tools=tools, chat_template=chat_template,
                             add_generation_prompt=add_generation_prompt,
                             continue_final_message=continue_final_message, **kwargs)
            for chat in conversations
        ]
        if not tokenize:
            texts = [rendering.text for rendering in renderings]
            return texts if batched else texts[0]

        pad_kwargs = dict(tokenizer_kwargs or {})
        unknown = set(pad_kwargs) - {"pad_to_multiple_of", "padding_side", "return_attention_mask"}
        if unknown:
            raise ValueError(f"tokenizer_kwargs {sorted(unknown)} are not supported by the chat path; "
                             "supported: pad_to_multiple_of, padding_side, return_attention_mask")
        encoded = [self.encode_chat(rendering) for rendering in renderings]
        input_ids = [ids for ids, _ in encoded]
        masks = [mask for _, mask in encoded]
        if truncation:
            limit = max_length if max_length is not None else self.model_max_length
            start = (lambda seq: 0) if self.truncation_side == "right" else (lambda seq: max(0, len(seq) - limit))
            input_ids = [ids[start(ids): start(ids) + limit] for ids in input_ids]
            masks = [mask[start(mask): start(mask) + limit] for mask in masks]
        # Truncated above: max_length only sizes "max_length" padding (else transformers warns it is ignored).
        out = self.pad({"input_ids": input_ids}, padding=padding,
                       max_length=max_length if padding == "max_length" else None, **pad_kwargs)
        data = dict(out)
        if return_assistant_tokens_mask:
            side = pad_kwargs.get("padding_side", self.padding_side)
            data["assistant_masks"] = [
                (mask + [0] * (len(ids) - len(mask))) if side == "right" else ([0] * (len(ids) - len(mask)) + mask)
                for ids, mask in zip(data["input_ids"], masks)
            ]
        if not batched and not return_tensors:
            data = {key: value[0] for key, value in data.items()}
        out = BatchEncoding(data, tensor_type=return_tensors)
        return out if return_dict else out["input_ids"]

    def render_chat(
        self,
        conversation,
        tools: list[dict | Callable] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        **template_kwargs,
    ) -> ChatRendering:
        """Render one conversation into trusted template segments and untrusted message strings."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message continues the last message and add_generation_prompt starts a "
                             "new one; pass only one of them")
        messages = _messages(conversation)
        originals: list[str] = []
        hidden_messages = [_hide_strings(message, originals) for message in messages]
        hidden_tools = None if tools is None else [_hide_strings(_tool_schema(tool), originals, in_json=True)
                                                   for tool in tools]
        template = self.get_chat_template(chat_template, tools)
        has_generation = re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None
        rendered, spans = render_jinja_template(
            conversations=[hidden_messages], tools=hidden_tools, chat_template=template,
            return_assistant_tokens_mask=has_generation, add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens_map, **template_kwargs})
        rendered = rendered[0]
        spans = spans[0] if has_generation else []
        if continue_final_message:
            rendered = _cut_after_final_message(rendered, hidden_messages[-1], continue_final_message)
        return ChatRendering(tuple(_segments(rendered, spans, originals)))

    def encode_chat(self, rendering: ChatRendering) -> tuple[list[int], list[int]]:
        """Token ids of a rendered chat and its assistant mask (1 on tokens inside a generation span)."""
        segments = [segment for segment in rendering.segments if segment.text]
        for segment in segments:
            if segment.trusted and _VIDEO_PLACEHOLDER in segment.text:
                raise ValueError("the chat has a video item; expand its frames with Llama4Processor (or "
                                 "ChatRendering.expand) before encoding")
        backend = self._tokenizer
        # The Rust backend keeps the padding/truncation of the last ordinary call; left on, it would pad
        # or cut the chat's pieces against each other.
        previous = backend.encode_special_tokens
        padding, truncation = backend.padding, backend.truncation
        backend.no_padding()
        backend.no_truncation()
        try:
            backend.encode_special_tokens = False
            trusted = backend.encode_batch([s.text for s in segments if s.trusted], add_special_tokens=False)
            backend.encode_special_tokens = True
            untrusted = backend.encode_batch([s.text for s in segments if not s.trusted], add_special_tokens=False)
        finally:
            backend.encode_special_tokens = previous
            if padding is not None:
                backend.enable_padding(**padding)
            if truncation is not None:
                backend.enable_truncation(**truncation)
        trusted, untrusted = iter(trusted), iter(untrusted)
        ids, mask = [], []
        for segment in segments:
            piece = next(trusted if segment.trusted else untrusted).ids
            ids.extend(piece)
            mask.extend([int(segment.assistant)] * len(piece))
        return ids, mask


# AutoTokenizer.register needs a config class, and the configs live in modeling_llama4, which imports the
# models; `tokenizer_class` in tokenizer_config.json needs only the class name registered, so that is done
# here (modeling_llama4's registration also keys its configs to this class). Saved folders get an auto_map
# and a copy of this module, for `trust_remote_code=True` where the package is not installed.
tokenization_auto.REGISTERED_TOKENIZER_CLASSES[Llama4Tokenizer.__name__] = Llama4Tokenizer
Llama4Tokenizer.register_for_auto_class("AutoTokenizer")


def _as_batch(conversation) -> tuple[list, bool]:
    if isinstance(conversation, (list, tuple)) and not conversation:
        raise ValueError("cannot apply the chat template to an empty conversation; give at least one message")
    first = conversation[0] if isinstance(conversation, (list, tuple)) else None
    if isinstance(first, (list, tuple)) or hasattr(first, "messages"):
        return list(conversation), True
    return [conversation], False


def _messages(conversation) -> list[dict]:
    messages = getattr(conversation, "messages", conversation)
    if not messages:
        raise ValueError("cannot apply the chat template to an empty conversation; give at least one message")
    result = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in _ROLES:
            raise ValueError(f"message {i} has role {role!r}; the Llama 4 format knows {', '.join(_ROLES)}")
        message = {key: value for key, value in message.items() if value is not None}
        if isinstance(message.get("tool_calls"), list):
            message["tool_calls"] = [_serialise_arguments(call) for call in message["tool_calls"]]
        result.append(message)
    return result


def _serialise_arguments(call: Mapping) -> Mapping:
    """Tool-call arguments become their JSON text first, so the JSON is encoded as untrusted text as a whole."""
    call = dict(call)
    target = dict(call["function"]) if isinstance(call.get("function"), Mapping) else call
    if "arguments" in target and not isinstance(target["arguments"], str):
        target["arguments"] = json.dumps(target["arguments"], ensure_ascii=False)
    if target is not call:
        call["function"] = target
    return call


def _tool_schema(tool) -> Mapping:
    if isfunction(tool) or ismethod(tool):
        tool = get_json_schema(tool)
    if not isinstance(tool, Mapping):
        raise TypeError(f"tools must be JSON-schema dicts or functions with type hints and docstrings, got {tool!r}")
    return tool


def _hide_strings(value, originals: list[str], in_json: bool = False):
    """Swap every string (except structural keys' values) for a placeholder indexing ``originals``.

    Inside a tool schema, which the template writes with ``tojson``, the placeholder sits between the JSON
    quotes, so the original is stored JSON-escaped; the schema's keys stay template text and must not
    contain special-token strings.
    """
    if isinstance(value, str):
        originals.append(json.dumps(value, ensure_ascii=False)[1:-1] if in_json else value)
        return f"\ue000{len(originals) - 1}\ue001"
    if isinstance(value, Mapping):
        if in_json and any("<|" in str(key) for key in value):
            raise ValueError(f"tool schema keys {list(value)} contain '<|'; keys are written as template text")
        return {key: item if key in _STRUCTURAL_KEYS and not in_json else _hide_strings(item, originals, in_json)
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_hide_strings(item, originals, in_json) for item in value]
    return value


def _cut_after_final_message(rendered: str, hidden: dict, field: bool | str) -> str:
    field = field if isinstance(field, str) else "content"
    value = hidden.get(field)
    if field in ("reasoning", "reasoning_content", "thinking"):
        value = next((hidden[key] for key in ("reasoning_content", "reasoning", "thinking") if key in hidden), None)
    if isinstance(value, list):
        value = next((item["text"] for item in reversed(value) if isinstance(item, Mapping) and "text" in item), None)
    if not isinstance(value, str):
        raise ValueError(f"continue_final_message: the final message has no text {field!r} to continue")
    end = rendered.rfind(value)
    if end < 0:
        raise ValueError(f"continue_final_message: the template does not render the final message's {field!r}")
    return rendered[: end + len(value)]


def _segments(rendered: str, spans: list[tuple[int, int]], originals: list[str]):
    edges = sorted({edge for span in spans for edge in span})

    def inside(position: int) -> bool:
        return any(start <= position < end for start, end in spans)

    def template_pieces(start: int, end: int):
        cuts = [start, *[edge for edge in edges if start < edge < end], end]
        for left, right in zip(cuts, cuts[1:]):
            yield ChatSegment(rendered[left:right], trusted=True, assistant=inside(left))

    position = 0
    for match in _PLACEHOLDER.finditer(rendered):
        yield from template_pieces(position, match.start())
        yield ChatSegment(originals[int(match.group(1))], trusted=False, assistant=inside(match.start()))
        position = match.end()
    yield from template_pieces(position, len(rendered))
