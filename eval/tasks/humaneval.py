"""HumanEval as lm-eval's `humaneval` and openai/human-eval score it.

0-shot raw prompt, greedy, at most 1024 new tokens, stop at a new top-level statement. The executed program is
`prompt + completion + "\\n" + test + "\\ncheck(" + entry_point + ")"` (human-eval's check_program), run in
eval.sandbox with a 3 s budget. With `num_samples` n > 1 and a temperature, pass@k for every k in (1, 10, 100)
up to n is the unbiased estimator averaged over problems.
"""

from __future__ import annotations

from collections import Counter

from .. import metrics
from ..data import load_humaneval
from ..runner import sample_seed
from ..sandbox import run_programs

UNTIL = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
KS = (1, 10, 100)


def program(problem: dict, completion: str) -> str:
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


class HumanEval:
    name = "humaneval"
    default_max_gen_toks = 1024

    def __init__(
        self,
        data_dir=None,
        num_fewshot=None,
        limit=None,
        max_gen_toks=None,
        num_samples: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 1234,
        timeout: float = 3.0,
        workers: int | None = None,
        allow_unsandboxed: bool = False,
    ):
        if num_fewshot:
            raise ValueError("humaneval is a 0-shot task; drop --num-fewshot for it")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if num_samples > 1 and temperature == 0:
            raise ValueError("several samples per problem need --temperature > 0 (greedy samples are identical)")
        self.data_dir, self.limit = data_dir, limit
        self.max_gen_toks = max_gen_toks or self.default_max_gen_toks
        self.num_samples, self.temperature, self.top_p, self.seed = num_samples, temperature, top_p, seed
        self.timeout, self.workers, self.allow_unsandboxed = timeout, workers, allow_unsandboxed

    def config(self) -> dict:
        return {
            "max_gen_toks": self.max_gen_toks,
            "num_samples": self.num_samples,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "timeout": self.timeout,
        }

    def problems(self) -> list[dict]:
        rows = load_humaneval(self.data_dir)
        return rows[: self.limit] if self.limit else rows

    def docs(self) -> list[dict]:
        """One doc per (problem, sample)."""
        return [
            {"doc_id": f"{p['task_id']}#{s}", "problem": p, "index": i, "sample": s, "prompt": p["prompt"]}
            for i, p in enumerate(self.problems())
            for s in range(self.num_samples)
        ]

    def chunks(self, docs: list[dict]) -> list[list[dict]]:
        return [docs[i:i + 32] for i in range(0, len(docs), 32)]

    def run(self, runner, docs: list[dict]) -> list[dict]:
        seeds = [sample_seed(self.seed, d["index"], d["sample"]) for d in docs]
        completions = runner.generate(
            [d["prompt"] for d in docs],
            until=UNTIL,
            max_gen_toks=self.max_gen_toks,
            temperature=self.temperature,
            top_p=self.top_p,
            seeds=seeds if self.temperature > 0 else None,
            desc=self.name,
        )
        return self.execute(docs, completions)

    def execute(self, docs: list[dict], completions: list[str]) -> list[dict]:
        verdicts = run_programs(
            [program(d["problem"], c) for d, c in zip(docs, completions)], self.timeout, workers=self.workers,
            allow_unsandboxed=self.allow_unsandboxed,
        )
        return [
            {
                "doc_id": d["doc_id"],
                "task_id": d["problem"]["task_id"],
                "prompt": d["prompt"],
                "output": c,
                "extracted": c,
                "correct": v.passed,
                "verdict": v.kind,
                "detail": v.detail,
            }
            for d, c, v in zip(docs, completions, verdicts)
        ]

    def predictions_docs(self, rows: list[dict]) -> tuple[list[dict], list[str]]:
        """Docs and completions from human-eval sample lines {"task_id", "completion"} (several per task allowed)."""
        problems = {p["task_id"]: p for p in self.problems()}
        counts: Counter = Counter()
        docs, completions = [], []
        for i, row in enumerate(rows):
            task_id, completion = row.get("task_id"), row.get("completion")
            if task_id not in problems or not isinstance(completion, str):
                raise ValueError(
                    f"prediction line {i + 1}: need {{\"task_id\": one of the HumanEval ids, \"completion\": str}}, "
                    f"got task_id={task_id!r}"
                )
            docs.append({"doc_id": f"{task_id}#{counts[task_id]}", "problem": problems[task_id], "prompt": problems[task_id]["prompt"]})
            completions.append(completion)
            counts[task_id] += 1
        missing = [t for t in problems if not counts[t]]
        if missing:
            raise ValueError(f"predictions miss {len(missing)} HumanEval problems, e.g. {missing[:3]}; every problem needs a completion")
        return docs, completions

    def aggregate(self, records: list[dict]) -> dict:
        if not records:
            raise ValueError("no humaneval samples to aggregate")
        per_task: dict[str, list[bool]] = {}
        for r in records:
            per_task.setdefault(r["task_id"], []).append(bool(r["correct"]))
        n_min = min(len(v) for v in per_task.values())
        out = {}
        for k in KS:
            if k <= n_min:
                out[f"pass@{k}"] = sum(metrics.pass_at_k(len(v), sum(v), k) for v in per_task.values()) / len(per_task)
        out["n"] = len(per_task)
        out["samples"] = len(records)
        out["verdicts"] = dict(Counter(r["verdict"] for r in records))
        return out
