"""Output directory: per-sample JSONL (appended as results arrive, so a rerun resumes), results.json,
results.md and a bar chart."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

# The headline metric of each task, for the table and the chart.
HEADLINE = {
    "mmlu": ("acc", "acc_macro"),
    "gsm8k": ("exact_match_strict", "exact_match_flexible"),
    "gsm8k_cot": ("exact_match_strict", "exact_match_flexible"),
    "gsm8k_chat": ("exact_match_strict", "exact_match_flexible"),
    "humaneval": ("pass@1", "pass@10", "pass@100"),
    "niah": ("accuracy",),
}


class SampleStore:
    """samples_<task>.jsonl in the output directory, tied to the task's configuration.

    A rerun with the same configuration reuses the finished samples; a different configuration in the same
    directory is an error rather than a silent mix of two runs.
    """

    def __init__(
        self, output_dir: str | Path | None, task: str, fingerprint: dict, writer: bool = True, fresh: bool = False
    ):
        self.path = Path(output_dir) / f"samples_{task}.jsonl" if output_dir else None
        self.writer = writer
        self.records: dict[str, dict] = {}
        if self.path is None:
            return
        meta_path = self.path.with_suffix(".config.json")
        if fresh and writer:
            # Scoring a predictions file is cheap and self-contained: its samples replace any earlier ones.
            self.path.unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)
        if meta_path.exists():
            previous = json.loads(meta_path.read_text())
            if previous != fingerprint:
                changed = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
                raise ValueError(
                    f"{self.path.parent} holds {task} samples from a different configuration (differs in {changed}); "
                    "use another --output-dir or delete the old samples"
                )
        elif writer:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            meta_path.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        for i, line in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    # The last line of an interrupted write: drop it; its sample is simply recomputed.
                    warnings.warn(f"{self.path}: ignoring an incomplete last line", stacklevel=3)
                    if self.writer:
                        self.path.write_text("".join(lines[:-1]), encoding="utf-8")
                    continue
                raise ValueError(f"{self.path}:{i + 1} is not valid JSON; delete the file to start over") from None
            self.records[str(record["doc_id"])] = record

    def done(self, doc_id) -> bool:
        return str(doc_id) in self.records

    def add(self, records: list[dict]) -> None:
        for r in records:
            self.records[str(r["doc_id"])] = r
        if self.path is None or not self.writer or not records:
            return
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_report(output_dir: str | Path, results: dict, config: dict) -> None:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"results": results, "config": config}, indent=2, sort_keys=True))
    (out / "results.md").write_text(markdown_table(results))
    bar_chart(results, out / "results.png")


def _headline(results: dict) -> list[tuple[str, str, float, int]]:
    rows = []
    for task, metrics in results.items():
        for name in HEADLINE.get(task, ()):
            if name in metrics:
                rows.append((task, name, metrics[name], metrics.get("n", 0)))
    return rows


def markdown_table(results: dict) -> str:
    lines = ["| task | metric | value | n |", "|---|---|---:|---:|"]
    lines += [f"| {t} | {m} | {v:.4f} | {n} |" for t, m, v, n in _headline(results)]
    return "\n".join(lines) + "\n"


def bar_chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _headline(results)
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows)), 3.5))
    labels = [f"{t}\n{m}" for t, m, _, _ in rows]
    bars = ax.bar(range(len(rows)), [v for _, _, v, _ in rows], color="tab:blue")
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
