"""The 2048 Llama 4 special tokens, in id order, and the offsets the rest of the package relies on.

Meta's tokenizer places these tokens directly after the BPE ranks: with the official 200,000 ranks,
offset ``i`` has id ``200000 + i``; a smaller vocabulary keeps the same offsets above its own rank
count (the shipped default: 4096 + i). Reserved slots keep their official names so a checkpoint's
ids never move when a token is put to use.
"""

NUM_SPECIAL_TOKENS = 2048

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
HEADER_START = "<|header_start|>"
HEADER_END = "<|header_end|>"
EOM = "<|eom|>"
EOT = "<|eot|>"
PYTHON_START = "<|python_start|>"
PYTHON_END = "<|python_end|>"
FINETUNE_RIGHT_PAD = "<|finetune_right_pad|>"
IMAGE_START = "<|image_start|>"
IMAGE_END = "<|image_end|>"
TILE_X_SEPARATOR = "<|tile_x_separator|>"
TILE_Y_SEPARATOR = "<|tile_y_separator|>"
IMAGE = "<|image|>"
PATCH = "<|patch|>"
REASONING_THINKING_START = "<|reasoning_thinking_start|>"
REASONING_THINKING_END = "<|reasoning_thinking_end|>"


def _reserved(family: str, numbers) -> list[str]:
    return [f"<|{family}_reserved_special_token_{n}|>" for n in numbers]


def _build_names() -> tuple[str, ...]:
    basic = [BEGIN_OF_TEXT, END_OF_TEXT, "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
             HEADER_START, HEADER_END, EOM, EOT, "<|step|>"]
    # Meta's numbering of the reserved text slots skips 6 and 7; the three named tokens sit in between.
    text_post_train = [*_reserved("text_post_train", range(0, 6)), PYTHON_START, PYTHON_END,
                       FINETUNE_RIGHT_PAD, *_reserved("text_post_train", range(8, 69))]
    vision = [IMAGE_START, IMAGE_END, *_reserved("vision", range(0, 2)), TILE_X_SEPARATOR, TILE_Y_SEPARATOR,
              *_reserved("vision", range(2, 6)), IMAGE, *_reserved("vision", [6]), PATCH,
              *_reserved("vision", range(7, 1048))]
    reasoning = [*_reserved("reasoning", range(0, 8)), REASONING_THINKING_START, REASONING_THINKING_END]
    head = basic + text_post_train + vision + reasoning
    tail = [f"<|reserved_special_token_{n}|>" for n in range(NUM_SPECIAL_TOKENS - len(head))]
    names = tuple(head + tail)
    if len(set(names)) != NUM_SPECIAL_TOKENS:
        raise AssertionError("the special-token table must hold 2048 distinct names")
    return names


SPECIAL_TOKEN_NAMES: tuple[str, ...] = _build_names()
"""Offset i (0..2047) -> token string; the token's id is ``num_base_tokens + i``."""

SPECIAL_TOKEN_OFFSETS: dict[str, int] = {name: i for i, name in enumerate(SPECIAL_TOKEN_NAMES)}

# The tokens the chat template writes; user-supplied text must never produce them (see tokenization_llama4).
CHAT_CONTROL_TOKENS = (BEGIN_OF_TEXT, HEADER_START, HEADER_END, EOM, EOT, PYTHON_START, PYTHON_END,
                       IMAGE, REASONING_THINKING_START, REASONING_THINKING_END)


def special_token_ids(num_base_tokens: int) -> dict[str, int]:
    """Every special token's id above a BPE vocabulary of ``num_base_tokens`` ranks."""
    if num_base_tokens < 256:
        raise ValueError(f"a byte-level BPE needs at least the 256 byte tokens, got num_base_tokens={num_base_tokens}")
    return {name: num_base_tokens + i for i, name in enumerate(SPECIAL_TOKEN_NAMES)}
