"""Byte-level BPE defined by tiktoken ranks, and its exact equivalent as a `tokenizers` pipeline.

tiktoken encodes a pre-token by repeatedly merging the adjacent pair whose concatenation has the
lowest rank, and returns a pre-token that is itself a token without merging. A `tokenizers` BPE
reproduces that when (1) every vocabulary entry is the byte string written through the GPT-2
byte-to-unicode table, (2) its merge list holds *every* split ``(a, b)`` of each token ``a+b`` whose
halves are both tokens, ordered by the rank of ``a+b`` — so the lowest-priority applicable merge is
always the lowest-rank concatenation — and (3) ``ignore_merges`` is on, the whole-pre-token lookup.
"""

import base64
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from .special_tokens import BEGIN_OF_TEXT, SPECIAL_TOKEN_NAMES

# tiktoken's o200k_base `pat_str`, which Meta's Llama 4 tokenizer uses unchanged.
O200K_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's table: printable Latin-1 bytes stand for themselves, the other 68 take code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(shifted)
            shifted += 1
    return table


BYTE_TO_UNICODE = _byte_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


def token_to_str(token: bytes) -> str:
    return "".join(BYTE_TO_UNICODE[b] for b in token)


def str_to_token(text: str) -> bytes:
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in text)
    except KeyError as error:
        raise ValueError(f"{text!r} is not a byte-level token string (character {error} has no byte)") from None


def pre_tokenizer(pattern: str = O200K_PATTERN) -> pre_tokenizers.PreTokenizer:
    """Split with tiktoken's regex, then write each piece's bytes through the byte-to-unicode table."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def validate_ranks(ranks: dict[bytes, int]) -> None:
    """Ranks must be 0..n-1, hold all 256 single bytes, and each longer token must be a merge of two lower ranks."""
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("ranks must be the integers 0..n-1, each used once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"byte-level BPE needs every single byte as a token; missing bytes {missing[:10]}...")
    for token, rank in ranks.items():
        if len(token) > 1 and not any(
            ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank for i in range(1, len(token))
        ):
            raise ValueError(f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens")


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[str, str]]:
    """Every split of every multi-byte token into two tokens, in the order of the merged token's rank."""
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(token_to_str(left), token_to_str(right)) for _, _, _, left, right in merges]


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Meta's / tiktoken's format: one ``<base64 token> <rank>`` pair per line."""
    ranks = {}
    for number, line in enumerate(Path(path).read_text(encoding="ascii").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected '<base64 token> <rank>', got {line[:80]!r}")
        token = base64.b64decode(parts[0], validate=True)
        if token in ranks:
            raise ValueError(f"{path}:{number}: token {token!r} appears twice")
        ranks[token] = int(parts[1])
    return ranks


def write_tiktoken_ranks(ranks: dict[bytes, int], path: str | Path) -> None:
    in_rank_order = sorted(ranks.items(), key=lambda item: item[1])
    lines = [f"{base64.b64encode(token).decode('ascii')} {rank}" for token, rank in in_rank_order]
    Path(path).write_text("\n".join(lines) + "\n", encoding="ascii")


def build_backend(ranks: dict[bytes, int], pattern: str = O200K_PATTERN,
                  special_tokens: tuple[str, ...] = SPECIAL_TOKEN_NAMES) -> Tokenizer:
    """The `tokenizers` pipeline equal to tiktoken's ``Encoding(pat_str=pattern, mergeable_ranks=ranks, ...)``.

    Special tokens get the ids ``len(ranks) + i``. Encoding with special tokens on prepends
    ``<|begin_of_text|>``, as Meta's ``encode(bos=True)`` does.
    """
    validate_ranks(ranks)
    vocab = {token_to_str(token): rank for token, rank in ranks.items()}
    bpe = models.BPE(vocab=vocab, merges=merges_from_ranks(ranks), ignore_merges=True, fuse_unk=False)
    backend = Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizer(pattern)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in special_tokens])
    for offset, name in enumerate(special_tokens):
        if backend.token_to_id(name) != len(ranks) + offset:
            raise ValueError(f"special token {name} did not land at id {len(ranks) + offset}; is it also a BPE token?")
    if BEGIN_OF_TEXT in special_tokens:
        bos = (BEGIN_OF_TEXT, backend.token_to_id(BEGIN_OF_TEXT))
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BEGIN_OF_TEXT} $A:0", pair=f"{BEGIN_OF_TEXT} $A:0 {BEGIN_OF_TEXT}:1 $B:1", special_tokens=[bos])
    return backend
