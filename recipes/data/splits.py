"""Train/test assignment by content: a hash of the question, so a held-out question never appears in
training whatever seed or size either split was generated with."""

import hashlib

SPLITS = ("train", "test")
TEST_PER_MILLE = 100


def split_of(question: str) -> str:
    digest = hashlib.sha256(question.encode()).digest()
    return "test" if int.from_bytes(digest[:4], "big") % 1000 < TEST_PER_MILLE else "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
