"""`make demo`: train chain-of-thought reasoning into the tiny multimodal MoE on CPU, and show what each stage buys.

    python -m llama4_sparse.recipes.demo [--output_dir runs/demo] [--seed S] [--rl_method grpo|dpo|rlhf] [--sft_steps N] ...

The task: multi-step word problems (`chain` family: a start amount, 4 changes in order with +, -, x, totals
<= 20, and a distractor fact about someone else). Each stage records how many greedy answers work the chain
out (`worked_chain_share`): half of sft_cot's training chains are sketches (`configs/tiny/sft.yaml`), and the RL
stage shows whether working them out pays. Stages, each scored by the eval
harness (`gsm8k_chat`, the
model's own greedy generations through the chat template) on held-out problems no training split contains:

1. `init`: the freshly initialised model.
2. `sft_direct`: SFT on the same problems, steps and settings as `sft_cot`, with the chain left out
   (answer only): what the model learns without writing its reasoning down.
3. `sft_cot`: SFT on worked chains. Its pass@8 (8 samples per held-out problem) against its greedy
   accuracy is the room RL has.
4. The RL stage, from `sft_cot`:
   * `grpo` (default): GRPO with the verified answer as reward (`configs/tiny/grpo.yaml`);
   * `dpo`: on-policy iterative DPO, a few rounds of: sample the current policy on training problems,
     verify, pair a failed sample with a verified one, train;
   * `rlhf`: a reward model (`recipes/reward.py`) trained on verified vs corrupted chains and the policy's
     own failures, then GRPO against that learned reward alone, with a KL term to sft_cot (`RLHF_KL`); its score
     is logged next to the true accuracy (`rm_true_accuracy`), which is never rewarded.
   During SFT and RL a validation draw (held-out problems apart from the scored ones) is scored every N steps
   (`recipes/callbacks.py`): the curves in `demo.png` show where each stage stopped improving, and every trained
   stage keeps the checkpoint of its best validation score (for dpo, the best round; for an RL stage, the starting
   model included).
5. `results.json` (`{"stages": [{"stage", "strict", "flexible", ...}]}`), the table, and `demo.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from llama4_sparse.modeling_llama4 import Llama4Config, Llama4ForConditionalGeneration, Llama4TextConfig
from llama4_sparse.recipes import grpo, online_dpo, reward, sft
from llama4_sparse.recipes.argv import option_value, without_option
from llama4_sparse.recipes.callbacks import TASK, sampled_pass_at_k, score_heldout, write_heldout
from llama4_sparse.recipes.data.arithmetic import CHECK_MARKER
from llama4_sparse.recipes.rewards import self_check_passes
from llama4_sparse.tokenizer import load_tokenizer

_WORKED_STEP = re.compile(r"\d+ [-+*] \d+ = \d+")
CONFIGS = Path(__file__).resolve().parent / "configs" / "tiny"
RL_METHODS = ("grpo", "dpo", "rlhf")
# A worked 4-step chain with its answer is about 50 tokens; with its self-check (`--self_check`) about 100.
MAX_NEW_TOKENS = 64
MAX_NEW_TOKENS_WITH_CHECK = 128
# On-policy DPO rounds: full fine-tune (the reference is the round's starting model), pairs from 4 samples
# per training problem at temperature 1.0, an SFT term on the chosen chain (dpo.yaml's loss_type).
DPO_ON_POLICY = ["--use_peft", "false", "--on_policy_samples", "4", "--on_policy_temperature", "1.0",
                 "--num_train_examples", "256", "--learning_rate", "2e-5",
                 "--max_steps", "30"]
# The reward model's pairs: corrupted chains of 300 problems plus sft_cot's own failures on them (4 samples each).
REWARD_DATA = ["--num_train_examples", "300", "--on_policy_samples", "4"]
# RLHF's GRPO keeps a KL term to sft_cot: without it the policy drifts to what the reward model cannot tell apart
# (worked chains with wrong arithmetic) and held-out accuracy falls while the learned reward rises
# (bench/rl_study.md, round 6).
RLHF_KL = ["--beta", "0.1"]
# RLHF keeps the settings it was measured with (rounds 6-7: temperature 1.0, lr 5e-5, routers trained); grpo.yaml's
# temperature 0.5, frozen routers and lr 2e-5 were chosen for the verified reward (rounds 7-8).
RLHF_SAMPLING = ["--temperature", "1.0", "--learning_rate", "5e-5", "--freeze_router", "false"]


def load_policy(model_dir: Path):
    return Llama4ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval(), load_tokenizer(model_dir)


def chain_styles(samples_file: Path) -> dict:
    """How a stage's greedy answers reason: the share that work the chain out (`a op b = c` steps) rather than
    sketch it or answer directly, and the accuracy of each kind, so a gain shows whether it came from the
    choice of style or from better steps."""
    rows = [json.loads(line) for line in open(samples_file)]
    worked = [r for r in rows if _WORKED_STEP.search(r["output"])]
    others = [r for r in rows if not _WORKED_STEP.search(r["output"])]
    share = lambda part: round(sum(r["correct_strict"] for r in part) / len(part), 4) if part else None
    styles = {"worked_chain_share": round(len(worked) / len(rows), 4), "strict_when_worked": share(worked),
              "strict_otherwise": share(others)}
    if any(CHECK_MARKER in r["output"] for r in rows):
        styles.update(self_check_report(rows))
    return styles


def self_check_report(rows: list[dict]) -> dict:
    """How the model's own checks behave (`--sft_args=--self_check true`): how often a check holds, how often
    its verdict agrees with the truth (holds on a right answer, fails on a wrong one), and how often it
    holds on a wrong answer (a check that misses an error)."""
    holds = [self_check_passes(r["output"]) for r in rows]
    wrong = [h for h, r in zip(holds, rows) if not r["correct_strict"]]
    return {"check_holds": round(sum(holds) / len(rows), 4),
            "check_agrees_with_truth": round(sum(h == bool(r["correct_strict"]) for h, r in zip(holds, rows)) / len(rows), 4),
            "check_holds_when_wrong": round(sum(wrong) / len(wrong), 4) if wrong else None}


def generation_budget(sft_args: list[str]) -> int:
    """Longest generation the stages' scores, samples and RL completions need: a self-checked chain is about twice
    a plain one, and a truncated answer would score as wrong."""
    check = option_value(sft_args, "--self_check")
    return MAX_NEW_TOKENS_WITH_CHECK if check is not None and check.lower() in ("true", "1", "yes") else MAX_NEW_TOKENS


def demo_task() -> list:
    """`configs/tiny/sft.yaml`'s problem families, largest operand and step counts: the task of every stage."""
    import yaml

    config = yaml.safe_load((CONFIGS / "sft.yaml").read_text())
    return [config[key] for key in ("problem_families", "max_operand", "problem_steps")]


def heldout_sets(out: Path, num_eval: int, num_passk: int) -> tuple[Path, Path]:
    """The demo's held-out problems (the test split of the demo's task, seed 0) and the subset sampled for
    pass@k, as gsm8k-layout folders under `out`."""
    task = demo_task()
    return (write_heldout(out / "data", num_eval, *task, seed=0), write_heldout(out / "data_passk", num_passk, *task, seed=0))


def score_model(model_dir: Path, data_dir: Path, output_dir: Path, max_new_tokens: int = MAX_NEW_TOKENS,
                passk_dir: Path | None = None, seed: int = 0) -> dict:
    """A stage's scores: greedy strict/flexible through the eval harness (samples under `output_dir`), how the
    answers reason (`chain_styles`), and, with `passk_dir`, sampled pass@1 and pass@8 there."""
    # Every run trains its models anew, so samples an earlier run scored belong to other weights.
    shutil.rmtree(output_dir, ignore_errors=True)
    model, tokenizer = load_policy(model_dir)
    result = score_heldout(model, tokenizer, data_dir, max_new_tokens=max_new_tokens, output_dir=output_dir)
    entry = {"strict": result["exact_match_strict"], "flexible": result["exact_match_flexible"], "n": result["n"],
             **chain_styles(output_dir / "samples_gsm8k_chat.jsonl")}
    if passk_dir is not None:
        sampled = sampled_pass_at_k(model, tokenizer, passk_dir, k=8, max_new_tokens=max_new_tokens, seed=seed)
        entry.update({"pass@1_sampled": sampled["pass@1_sampled"], "pass@8": sampled["pass@8"]})
    return entry


def train_side_by_side(stage_args: dict[str, list[str]], out: Path) -> dict[str, float]:
    """The SFT stages as concurrent processes, one thread each: the tiny model gains little from a second
    thread, so two cores train both stages in about the time of one. Returns each stage's seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs, logs, start = {}, {}, time.time()
    for stage, stage_argv in stage_args.items():
        logs[stage] = open(out / f"{Path(option_value(stage_argv, '--output_dir')).name}.log", "w")
        procs[stage] = subprocess.Popen([sys.executable, "-m", "llama4_sparse.recipes.sft", *stage_argv], env=env,
                                        stdout=logs[stage], stderr=subprocess.STDOUT)
    print(f"[demo] training {' and '.join(procs)} side by side, one thread each; logs: "
          f"{', '.join(log.name for log in logs.values())}", flush=True)
    seconds = {}
    try:
        for stage, proc in procs.items():
            if proc.wait() != 0:
                raise RuntimeError(f"SFT stage {stage} failed (exit {proc.returncode}); see {logs[stage].name}")
            seconds[stage] = time.time() - start
    finally:
        for stage, proc in procs.items():
            if proc.poll() is None:
                proc.kill()
            logs[stage].close()
    return seconds


def log_history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "trainer_state.json").read_text())["log_history"]


def train_sft_stages(stage_args: dict[str, list[str]], out: Path, jobs: int) -> dict[str, float]:
    """Each SFT stage (`stage_args` name their output folders); with `jobs` > 1 side by side. Returns each stage's
    seconds."""
    if jobs > 1:
        return train_side_by_side(stage_args, out)
    seconds = {}
    for stage, argv in stage_args.items():
        t = time.time()
        sft.main(argv)
        seconds[stage] = time.time() - t
    return seconds


def best_on_validation(run_dir: Path) -> tuple[Path, dict]:
    """The checkpoint a run kept at its best validation score (`--heldout_keep_best`), or the run's last model when
    the run kept none, with what to record about the choice."""
    best = run_dir / "best_heldout"
    if not (best / "heldout_best.json").is_file():
        return run_dir, {}
    chosen = json.loads((best / "heldout_best.json").read_text())
    return best, {"kept_step": chosen["step"], "kept_validation_strict": chosen["heldout_strict"]}


def plot(stages: list[dict], curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, history) for name, history in curves.items() if history]
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(5 * (1 + len(panels)), 4), squeeze=False)
    axes = axes[0]
    names = [s["stage"] for s in stages]
    axes[0].bar(names, [100 * s["strict"] for s in stages], color="tab:blue", label="greedy strict")
    axes[0].plot(names, [100 * s["flexible"] for s in stages], "o--", color="tab:orange", label="greedy flexible")
    passk = [(s["stage"], 100 * s["pass@8"]) for s in stages if "pass@8" in s]
    if passk:
        axes[0].plot(*zip(*passk), "k^", label="pass@8 (sampled)")
    axes[0].set(ylabel=f"{TASK} accuracy (%)", title="held-out problems", ylim=(0, 100))
    axes[0].tick_params(axis="x", rotation=20)
    axes[0].legend(fontsize=8)
    for ax, (name, history) in zip(axes[1:], panels):
        for key, style in (("heldout_strict", "o-"), ("reward", ".-"), ("rm_true_accuracy", "x-"),
                           ("rewards/learned_reward/mean", "s-")):
            points = [(h["step"], h[key]) for h in history if key in h]
            if points:
                ax.plot(*zip(*points), style, label=key, markersize=4)
        ax.set(xlabel="step", title=f"{name}: held-out accuracy during training")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_initial_model(out: Path, seed: int) -> Path:
    """The tiny preset as a multimodal MoE, freshly initialised, saved with the shipped tokenizer."""
    torch.manual_seed(seed)
    model = Llama4ForConditionalGeneration(Llama4Config.from_preset("tiny", text_config=Llama4TextConfig.from_preset("tiny")))
    path = out / "stage0-init"
    model.save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    return path


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="runs/demo")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every stage and the data seed offset")
    parser.add_argument("--rl_method", choices=RL_METHODS, default="grpo")
    parser.add_argument("--sft_steps", type=int, default=None,
                        help="SFT steps of sft_direct and sft_cot; default: configs/tiny/sft.yaml's max_steps")
    parser.add_argument("--rl_steps", type=int, default=None,
                        help="GRPO steps (grpo, rlhf) or DPO steps per round (dpo); default: the config's max_steps")
    parser.add_argument("--dpo_rounds", type=int, default=3, help="on-policy DPO rounds (--rl_method dpo)")
    # 500 and 200, not 100 and 50: a tiny model's arithmetic errors hit some sums and not others, so one checkpoint's
    # accuracy differs by 10+ points between draws of 100 problems, as does a stage's gain (bench/rl_study.md, round 7).
    parser.add_argument("--num_eval", type=int, default=500, help="held-out problems scored at each stage")
    parser.add_argument("--num_passk", type=int, default=50, help="held-out problems sampled 8 times for pass@8")
    parser.add_argument("--sft_curve_every", type=int, default=200,
                        help="score a held-out slice every this many SFT steps while training (0: off)")
    parser.add_argument("--rl_curve_every", type=int, default=10,
                        help="score a held-out slice every this many GRPO steps while training (0: off)")
    parser.add_argument("--curve_problems", type=int, default=200,
                        help="held-out problems in each of those scores (the stopping rule's validation draw)")
    parser.add_argument("--sft_from", default=None,
                        help="reuse init, sft_direct and sft_cot of an earlier demo output dir (same --seed) and "
                             "train only the RL stage")
    parser.add_argument("--sft_jobs", type=int, default=2 if (os.cpu_count() or 1) >= 2 else 1,
                        help="train sft_direct and sft_cot at once as two single-threaded processes (2, the default "
                             "with 2+ cores) or one after the other in this process (1)")
    parser.add_argument("--sft_args", type=shlex.split, default=[],
                        help='extra sft.py arguments in one string, e.g. --sft_args="--learning_rate 3e-3"')
    parser.add_argument("--rl_args", type=shlex.split, default=[], help="extra arguments of the RL script, likewise")
    parser.add_argument("--reward_args", type=shlex.split, default=[], help="extra reward.py arguments (rlhf)")
    args = parser.parse_args(argv)
    if args.dpo_rounds < 1:
        parser.error(f"--dpo_rounds must be >= 1, got {args.dpo_rounds}")

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_dir, passk_dir = heldout_sets(out, args.num_eval, args.num_passk)
    # The RL stages' curves and stopping rule use the callback's own draw (seed 1), never the scored problems.
    validation_dir = write_heldout(out / "data_validation", args.curve_problems, *demo_task())
    budget = generation_budget(args.sft_args)

    common = ["--model_class", "conditional_generation", "--seed", str(args.seed), "--save_strategy", "no",
              "--disable_tqdm", "true"]
    curve = ["--heldout_problems", str(args.curve_problems), "--heldout_max_new_tokens", str(budget)]
    # Every trained stage keeps the checkpoint of its best validation score. SFT starts from init, which is scored
    # already (0%): its curve starts at the first interval; an RL stage's includes its start, sft_cot.
    sft_curve = ["--heldout_eval_steps", str(args.sft_curve_every), "--heldout_at_start", "false",
                 "--heldout_keep_best", "true", *curve]
    rl_curve = ["--heldout_eval_steps", str(args.rl_curve_every), "--heldout_keep_best", "true", *curve]
    completions = ["--max_completion_length", str(budget)]
    stages, curves = [], {}
    start = time.time()

    def record(stage: str, model_dir: Path, seconds: float, passk: bool = False, **extra) -> None:
        entry = {"stage": stage, **score_model(model_dir, data_dir, out / "eval" / stage, budget,
                                               passk_dir if passk else None, args.seed),
                 "train_seconds": round(seconds, 1), **extra}
        stages.append(entry)
        print(f"[demo] {stage}: strict {entry['strict']:.1%}, flexible {entry['flexible']:.1%}"
              + (f", pass@8 {entry['pass@8']:.1%}" if passk else "") + f", chain worked out in "
              f"{entry['worked_chain_share']:.0%}" + (f"; kept step {extra['kept_step']} (validation "
              f"{extra['kept_validation_strict']:.0%}), last step {extra.get('last_step_strict', entry['strict']):.1%}"
              if "kept_step" in extra else "") + f" ({time.time() - start:.0f}s elapsed)",
              flush=True)
        # Written after every stage, so an interrupted demo keeps what it measured.
        (out / "results.json").write_text(json.dumps({"stages": stages, "seconds": round(time.time() - start, 1),
                                                      "seed": args.seed, "rl_method": args.rl_method}, indent=2))

    def record_kept(stage: str, run_dir: Path, seconds: float, passk: bool = False) -> None:
        """A trained stage is the checkpoint of its best validation score (for an RL stage the start, sft_cot,
        included; for dpo, the best round), so a run that peaks and then falls, as a hacked learned reward does,
        keeps its peak; the last step's greedy score is recorded beside it."""
        chosen, kept = best_on_validation(run_dir)
        if chosen != run_dir:
            kept["last_step_strict"] = score_model(run_dir, data_dir, out / "eval" / f"{stage}_last_step", budget)["strict"]
        record(stage, chosen, seconds, passk=passk, **kept)

    if args.sft_from:
        # Another demo run's init and SFT stages (same seed): only the RL stage is trained here.
        source = Path(args.sft_from)
        previous = json.loads((source / "results.json").read_text())
        if previous.get("seed") != args.seed:
            raise ValueError(f"--sft_from {source} was run with seed {previous.get('seed')}, not {args.seed}")
        for stage in ("init", "sft_direct", "sft_cot"):
            stages.append(next(s for s in previous["stages"] if s["stage"] == stage))
            if stage != "init":
                curves[stage] = log_history(source / stage)
        sft_dir = best_on_validation(source / "sft_cot")[0]
    else:
        init_dir = build_initial_model(out, args.seed)
        record("init", init_dir, 0.0)
        sft_steps = ["--max_steps", str(args.sft_steps)] if args.sft_steps else []
        # sft_direct is sft_cot's data with the chain left out: a self_check has no chain to check there.
        direct_args = without_option(args.sft_args, "--self_check")
        stage_args = {stage: ["--config", str(CONFIGS / "sft.yaml"), "--model_name_or_path", str(init_dir), "--output_dir",
                              str(out / stage), "--chain_of_thought", cot, *common, *sft_curve, *sft_steps, *extra]
                      for stage, cot, extra in (("sft_direct", "false", direct_args), ("sft_cot", "true", args.sft_args))}
        seconds = train_sft_stages(stage_args, out, args.sft_jobs)
        for stage in stage_args:
            record_kept(stage, out / stage, seconds[stage], passk=stage == "sft_cot")
            curves[stage] = log_history(out / stage)
        sft_dir = best_on_validation(out / "sft_cot")[0]

    rl_steps = ["--max_steps", str(args.rl_steps)] if args.rl_steps else []
    t = time.time()

    if args.rl_method in ("grpo", "rlhf"):
        rl_dir = out / args.rl_method
        rewards = []
        if args.rl_method == "rlhf":
            rm_dir = out / "reward_model"
            # The reward model starts from sft_cot's text backbone and learns from corrupted chains and sft_cot's own
            # failed samples (vs its verified ones).
            reward.main(["--config", str(CONFIGS / "reward.yaml"), "--model_name_or_path", str(sft_dir), "--output_dir",
                         str(rm_dir), "--seed", str(args.seed), "--save_strategy", "no", "--disable_tqdm", "true",
                         "--policy_name_or_path", str(sft_dir), *REWARD_DATA, "--on_policy_max_new_tokens", str(budget),
                         *args.reward_args])
            rewards = ["--rewards", "reward_model", "--reward_weights", "1.0", "--reward_model_path", str(rm_dir),
                       *RLHF_KL, *RLHF_SAMPLING]
        grpo.main(["--config", str(CONFIGS / "grpo.yaml"), "--model_name_or_path", str(sft_dir), "--output_dir",
                   str(rl_dir), *common, *rl_curve, *completions, *rewards, *rl_steps, *args.rl_args])
        curves[args.rl_method] = log_history(rl_dir)
        record_kept(args.rl_method, rl_dir, time.time() - t, passk=True)
    else:
        # Round 0 is sft_cot: the rounds' stopping rule, like the GRPO callback's, may keep the starting model.
        history, best = [], {}

        def after_round(r: int, round_dir: Path) -> None:
            model, tokenizer = load_policy(round_dir)
            score = score_heldout(model, tokenizer, validation_dir, max_new_tokens=budget)["exact_match_strict"]
            history.append({"step": r, "heldout_strict": score})
            if not best or score > best["heldout_strict"]:
                best.update(step=r, heldout_strict=score, dir=round_dir)
            print(f"[demo] dpo round {r}: validation strict {score:.1%}", flush=True)

        after_round(0, sft_dir)
        final = online_dpo.run_rounds(args.dpo_rounds, [
            "--config", str(CONFIGS / "dpo.yaml"), "--model_name_or_path", str(sft_dir), *common, *DPO_ON_POLICY,
            "--on_policy_max_new_tokens", str(budget), *rl_steps, *args.rl_args], out / "dpo_rounds",
            first_seed=100 + 10 * args.seed, on_round_end=after_round)
        curves["dpo (x = round)"] = history
        shutil.rmtree(out / "dpo", ignore_errors=True)
        shutil.copytree(best["dir"], out / "dpo", ignore=shutil.ignore_patterns("checkpoint-*", "heldout_samples"))
        kept = {"rounds": args.dpo_rounds, "kept_step": best["step"], "kept_validation_strict": best["heldout_strict"]}
        if best["step"] != args.dpo_rounds:
            kept["last_step_strict"] = score_model(final, data_dir, out / "eval" / "dpo_last_step", budget)["strict"]
        record("dpo", out / "dpo", time.time() - t, passk=True, **kept)

    print(f"\n| stage | {TASK} strict | flexible | pass@8 | chain worked out | train s |\n|---|---|---|---|---|---|")
    for s in stages:
        passk = f"{s['pass@8']:.1%}" if "pass@8" in s else ""
        worked = f"{s['worked_chain_share']:.0%}" if "worked_chain_share" in s else ""
        print(f"| {s['stage']} | {s['strict']:.1%} | {s['flexible']:.1%} | {passk} | {worked} | {s['train_seconds']} |")
    print(f"total {time.time() - start:.0f}s; {args.num_eval} held-out problems; outputs in {out}")
    plot(stages, curves, out / "demo.png")
    return stages


if __name__ == "__main__":
    main()
