"""Synthetic long-context retrieval: niah-format documents (eval/tasks/niah.py) with their answers.

Each example is a haystack of a random length in [min_length, max_length] tokens hiding 1..max_keys
key -> magic-number needles at random depths, the question about one key, and the answer " <number>."
the model must complete; then the same question and answer for every other key, so a document
supervises every needle it hides (the first question is exactly the niah format). Deterministic by seed; the niah grid draws its documents from a different seed
namespace, so no evaluation document is a training document.
"""

from __future__ import annotations

import random

from llama4_sparse.eval.tasks.niah import NEEDLE, QUESTION, haystack_document


def retrieval_example(tokenizer, rng: random.Random, length: int, max_keys: int = 4, digits: int = 7) -> dict:
    """`ids` (with BOS) and `answer_mask` (True on the tokens of every answer) of one document."""
    doc = haystack_document(tokenizer, length, rng.random(), rng.randint(1, max_keys), rng, digits)
    ids = tokenizer(doc["prompt"])["input_ids"]
    mask = [False] * len(ids)
    hidden = [(k, v) for k, v in (_needle_fields(line) for line in doc["prompt"].split(". ")) if k and k != doc["key"]]
    rng.shuffle(hidden)
    for index, (key, value) in enumerate([(doc["key"], doc["gold"]), *hidden]):
        if index:
            question = tokenizer(QUESTION.format(key=key), add_special_tokens=False)["input_ids"]
            ids, mask = ids + question, mask + [False] * len(question)
        answer = tokenizer(f" {value}.", add_special_tokens=False)["input_ids"]
        ids, mask = ids + answer, mask + [True] * len(answer)
    return {"ids": ids, "answer_mask": mask, **doc}


_PREFIX = NEEDLE.split("{key}")[0].strip()


def _needle_fields(sentence: str) -> tuple[str | None, str | None]:
    """(key, value) of a needle sentence, else (None, None)."""
    sentence = sentence.strip().rstrip(".")
    if not sentence.startswith(_PREFIX):
        return None, None
    key, _, value = sentence[len(_PREFIX):].strip().partition(" is ")
    return key, value


def retrieval_batch(tokenizer, seed: int, step: int, batch_size: int, min_length: int, max_length: int,
                    max_keys: int = 4, digits: int = 7) -> list[dict]:
    """One training batch: `batch_size` examples sharing a target length drawn for this step."""
    rng = random.Random(f"retrieval-train/{seed}/{step}")
    length = rng.randint(min_length, max_length)
    return [retrieval_example(tokenizer, rng, length, max_keys, digits) for _ in range(batch_size)]
