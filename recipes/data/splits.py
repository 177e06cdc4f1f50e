"""Train/test assignment by content: a hash of the question, so a held-out question never appears in
training whatever seed or size either split was generated with."""

import hashlib
from collections.abc import Callable, Hashable

SPLITS = ("train", "test")
TEST_PER_MILLE = 100


def split_of(question: str) -> str:
    digest = hashlib.sha256(question.encode()).digest()
    return "test" if int.from_bytes(digest[:4], "big") % 1000 < TEST_PER_MILLE else "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# Generators' question spaces are finite: after this many draws in a row without a new item of the
# split, there are no more to be had.
MAX_MISSES = 5_000


def draw_distinct(n: int, split: str, draw: Callable[[int], object], key: Callable[[object], Hashable],
                  shortage: str) -> list:
    """`n` distinct items of `split` from `draw(k)` (k = items accepted so far), or a ValueError that
    ends with `shortage` once new ones stop coming."""
    items, seen, misses = [], set(), 0
    while len(items) < n and misses < MAX_MISSES:
        item = draw(len(items))
        if item.split == split and key(item) not in seen:
            seen.add(key(item))
            items.append(item)
            misses = 0
        else:
            misses += 1
    if len(items) < n:
        raise ValueError(f"only {len(items)} distinct {split} {shortage}")
    return items
