"""Llama 4 tokenizer: tiktoken-exact byte-level BPE, the 2048-token special layout and the chat format.

``load_tokenizer()`` returns the shipped default (4096 BPE ranks + specials at 4096..6143, sized for
the ``tiny`` model preset); ``load_tokenizer(path)`` any folder this package saved. Importing the package
makes ``AutoTokenizer.from_pretrained`` resolve ``"tokenizer_class": "Llama4Tokenizer"`` to our class.
The special-token table is ``tokenizer.special_tokens.SPECIAL_TOKEN_NAMES`` (offset i -> name; id =
number of BPE ranks + i). Chat entry points are described in ``tokenizer.tokenization_llama4``.
"""

from pathlib import Path

from .special_tokens import NUM_SPECIAL_TOKENS, SPECIAL_TOKEN_NAMES, special_token_ids
from .tokenization_llama4 import ChatRendering, ChatSegment, Llama4Tokenizer

DEFAULT_TOKENIZER_DIR = str(Path(__file__).resolve().parent / "default")


def load_tokenizer(path: str | Path | None = None) -> Llama4Tokenizer:
    """The tokenizer saved at ``path`` (default: the shipped one), as a Llama4Tokenizer, offline."""
    folder = Path(path) if path is not None else Path(DEFAULT_TOKENIZER_DIR)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {folder}; pass a folder written by save_pretrained, or "
                                "rebuild the default with `python -m llama4_sparse.tokenizer.build_default`")
    return Llama4Tokenizer.from_pretrained(str(folder), local_files_only=True)


__all__ = ["DEFAULT_TOKENIZER_DIR", "NUM_SPECIAL_TOKENS", "SPECIAL_TOKEN_NAMES", "ChatRendering", "ChatSegment",
           "Llama4Tokenizer", "load_tokenizer", "special_token_ids"]
