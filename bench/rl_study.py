"""Each RL method of the demo over several seeds: held-out greedy accuracy per stage, mean and spread.

    python bench/rl_study.py --seeds 0 1 2 --methods grpo dpo rlhf --output_dir runs/rl_study [--jobs 2]
    python bench/rl_study.py --report runs/rl_study          # only (re)write the table from finished runs
    python bench/rl_study.py --curves runs/demo/grpo          # one RL run's per-step diagnostics
    python bench/rl_study.py --score MODEL_DIR [--passk] [--max_new_tokens 128]   # one model, the demo's metrics
    python bench/rl_study.py --rescore runs/rl_study --num_eval 1000   # the same runs' models on a larger draw

Per seed, `python -m llama4_sparse.recipes.demo --seed S` trains init -> sft_direct -> sft_cot -> grpo; the other methods
start from that run's sft_cot (`--sft_from`), so every method of a seed is compared on the same SFT model.
Writes OUTPUT_DIR/study.json and OUTPUT_DIR/study.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / f"seed{seed}" / ("demo" if method == "grpo" else method)


def run_seed(out: Path, seed: int, methods: list[str], extra: list[str], env: dict | None = None) -> None:
    base = run_dir(out, "grpo", seed)
    for method in ["grpo", *[m for m in methods if m != "grpo"]]:
        target = run_dir(out, method, seed)
        if (target / "results.json").is_file() and any(
                s["stage"] == method for s in json.loads((target / "results.json").read_text())["stages"]):
            continue  # finished earlier
        command = [sys.executable, "-m", "llama4_sparse.recipes.demo", "--seed", str(seed), "--rl_method", method,
                   "--output_dir", str(target), *(["--sft_jobs", "1"] if env else []), *extra]
        if method != "grpo":
            command += ["--sft_from", str(base)]
        print("+", " ".join(command), flush=True)
        target.mkdir(parents=True, exist_ok=True)
        with open(target / "log.txt", "a") as log:
            subprocess.run(command, cwd=REPO, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)


def run(out: Path, seeds: list[int], methods: list[str], extra: list[str], jobs: int = 1) -> None:
    """Each seed's runs in order (grpo's demo first: the others reuse its SFT stages); with `jobs` > 1, that many
    seeds at once, each process on one thread (a tiny model gains little from a second thread, so on a 2-core
    machine two single-threaded seeds finish in about the time of one two-threaded one). Logs: SEED_DIR/*/log.txt."""
    if jobs <= 1:
        for seed in seeds:
            run_seed(out, seed, methods, extra)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with ThreadPoolExecutor(jobs) as pool:
        for done in [pool.submit(run_seed, out, seed, methods, extra, env) for seed in seeds]:
            done.result()


def report(out: Path) -> str:
    rows = {}
    for results in sorted(out.glob("seed*/*/results.json")):
        data = json.loads(results.read_text())
        for stage in data["stages"]:
            rows.setdefault(stage["stage"], {})[data["seed"]] = stage
    return table(rows, out, "study")


def rescore(out: Path, num_eval: int, max_new_tokens: int) -> str:
    """Every stage model the runs under `out` kept (and, where the stopping rule kept an earlier step, the last step's
    model) scored again, greedy, on the first `num_eval` problems of the demo's held-out split: a draw of 100 problems
    is too few to tell a gain of a few points from its luck (bench/rl_study.md, round 7)."""
    import tempfile

    from llama4_sparse.recipes import demo

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = demo.heldout_sets(Path(tmp), num_eval, 1)[0]
        for results in sorted(out.glob("seed*/*/results.json")):
            data = json.loads(results.read_text())
            for stage in data["stages"]:
                folder = results.parent / stage["stage"]
                if stage["stage"] == "init" or not (folder / "config.json").is_file():
                    continue  # init scores 0; a stage reused from another run (--sft_from) is scored there
                kept, chosen = demo.best_on_validation(folder)
                score = lambda model: demo.score_model(model, data_dir, Path(tmp) / "eval", max_new_tokens)["strict"]
                entry = {"strict": score(kept), **{k: stage[k] for k in ("kept_step",) if k in stage}, **chosen}
                if kept != folder:
                    entry["last_step_strict"] = score(folder)
                rows.setdefault(stage["stage"], {})[data["seed"]] = entry
                print(f"seed {data['seed']} {stage['stage']}: {entry}", file=sys.stderr, flush=True)
    return table(rows, out, f"rescore{num_eval}")


def table(rows: dict, out: Path, basename: str) -> str:
    """The per-stage table and the gain table of `rows` (stage -> seed -> scores), also written to
    OUTPUT_DIR/{basename}.md and .json."""
    order = [s for s in ("init", "sft_direct", "sft_cot", "grpo", "dpo", "rlhf") if s in rows]
    seeds = sorted({seed for stage in rows.values() for seed in stage})
    lines = ["| stage | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | spread (max-min) | pass@8 mean |",
             "|---|" + "---|" * (len(seeds) + 3)]
    summary = {}
    for name in order:
        values = [rows[name][s]["strict"] for s in seeds if s in rows[name]]
        passk = [rows[name][s]["pass@8"] for s in seeds if s in rows[name] and "pass@8" in rows[name][s]]
        summary[name] = {"strict": {str(s): rows[name][s]["strict"] for s in seeds if s in rows[name]},
                         "mean": statistics.mean(values), "spread": max(values) - min(values)}
        cells = [f"{100 * rows[name][s]['strict']:.1f}" if s in rows[name] else "" for s in seeds]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * statistics.mean(values):.1f} | "
                     f"{100 * (max(values) - min(values)):.1f} | "
                     + (f"{100 * statistics.mean(passk):.1f}" if passk else "") + " |")
    lines += ["", *gains(rows, seeds, summary)]
    (out / f"{basename}.json").write_text(json.dumps(summary, indent=2))
    text = "\n".join(lines)
    (out / f"{basename}.md").write_text(text + "\n")
    return text


# Issue 9's acceptance: (stage, baseline, points the mean gain must reach; every seed must gain).
TARGETS = [("sft_cot", "sft_direct", 15), ("grpo", "sft_cot", 10), ("dpo", "sft_cot", 5), ("rlhf", "sft_cot", 5)]


def gains(rows: dict, seeds: list[int], summary: dict) -> list[str]:
    """Each stage's gain over its baseline per seed (points), the mean, and whether the target is met (mean gain
    at least the target and every seed up); RL stages also show the step their stopping rule kept and their last
    step's score."""
    lines = ["| gain | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | target | met | kept step (last step strict) |",
             "|---|" + "---|" * (len(seeds) + 4)]
    for stage, base, target in TARGETS:
        common = [s for s in seeds if s in rows.get(stage, {}) and s in rows.get(base, {})]
        if not common:
            continue
        delta = {s: 100 * (rows[stage][s]["strict"] - rows[base][s]["strict"]) for s in common}
        mean = statistics.mean(delta.values())
        met = mean >= target and all(d > 0 for d in delta.values()) and len(common) == len(seeds)
        summary[stage]["gain_over_" + base] = {"per_seed": {str(s): d for s, d in delta.items()}, "mean": mean,
                                               "target": target, "met": met}
        kept = ", ".join(f"{rows[stage][s]['kept_step']} ({100 * rows[stage][s].get('last_step_strict', rows[stage][s]['strict']):.0f}%)"
                         for s in common if "kept_step" in rows[stage][s])
        lines.append(f"| {stage} - {base} | " + " | ".join(f"{delta[s]:+.1f}" if s in delta else "" for s in seeds)
                     + f" | {mean:+.1f} | +{target} | {'yes' if met else 'no'} | {kept} |")
    return lines


# Per-step quantities that tell a working RL run from a collapsing one: the reward it trains on, how long and how
# often truncated its samples are, and held-out accuracy. TRL's `frac_reward_zero_std` is left out: it tests a
# group's float std against 1e-8, and eight equal rewards of 0.2 (a format weight) have a std of 1.6e-8, so with
# fractional reward weights it reports 0 for groups that carry no signal.
CURVE_KEYS = {"reward": "reward", "rewards/accuracy_reward/mean": "answer", "completions/mean_length": "length",
              "completions/clipped_ratio": "truncated", "entropy": "entropy", "heldout_strict": "held-out strict"}


def curves(run: Path) -> str:
    """A table of CURVE_KEYS per step from a run's trainer_state.json."""
    rows: dict[int, dict] = {}
    for entry in json.loads((run / "trainer_state.json").read_text())["log_history"]:
        for key in CURVE_KEYS:
            if key in entry:
                rows.setdefault(entry["step"], {})[key] = entry[key]
    keys = [k for k in CURVE_KEYS if any(k in r for r in rows.values())]
    lines = ["| step | " + " | ".join(CURVE_KEYS[k] for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for step in sorted(rows):
        lines.append(f"| {step} | " + " | ".join(f"{rows[step][k]:.3g}" if k in rows[step] else "" for k in keys) + " |")
    return "\n".join(lines)


def score(model_dir: Path, passk: bool, max_new_tokens: int) -> dict:
    """Any saved policy scored as a demo stage is (same held-out problems, metrics and pass@8 draw), so models
    trained outside the demo (longer runs, other mixes) are compared with its stages on equal terms."""
    import tempfile

    from llama4_sparse.recipes import demo

    with tempfile.TemporaryDirectory() as tmp:
        data_dir, passk_dir = demo.heldout_sets(Path(tmp), 500, 50)
        return {"model": str(model_dir), **demo.score_model(model_dir, data_dir, Path(tmp) / "eval", max_new_tokens,
                                                             passk_dir if passk else None)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["grpo", "dpo", "rlhf"], choices=["grpo", "dpo", "rlhf"])
    parser.add_argument("--output_dir", default="runs/rl_study")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once, one thread each")
    parser.add_argument("--report", default=None, help="only write the table of the runs under this folder")
    parser.add_argument("--curves", default=None, help="print one RL run's per-step diagnostics and exit")
    parser.add_argument("--score", default=None, help="score one saved policy as the demo scores a stage, and exit")
    parser.add_argument("--passk", action="store_true", help="with --score: also sampled pass@1 / pass@8")
    parser.add_argument("--rescore", default=None,
                        help="score every kept stage model of the runs under this folder on --num_eval problems")
    parser.add_argument("--num_eval", type=int, default=1000, help="with --rescore: held-out problems")
    parser.add_argument("--max_new_tokens", type=int, default=64,
                        help="with --score or --rescore: 128 for self-checked chains")
    args, extra = parser.parse_known_args(argv)
    if args.curves:
        print(curves(Path(args.curves)))
        return
    if args.score:
        print(json.dumps(score(Path(args.score), args.passk, args.max_new_tokens)))
        return
    if args.rescore:
        print(rescore(Path(args.rescore), args.num_eval, args.max_new_tokens))
        return
    out = Path(args.report or args.output_dir)
    if not args.report:
        run(out, args.seeds, args.methods, extra, args.jobs)
    print(report(out))


if __name__ == "__main__":
    main()
