"""On-policy iterative DPO: rounds of (sample the current policy, verify, pair, train).

    python recipes/online_dpo.py --rounds 3 --config recipes/configs/tiny/dpo.yaml \
        --model_name_or_path SFT_DIR --output_dir runs/online-dpo --on_policy_samples 4 [dpo.py arguments]

Each round is one `recipes/dpo.py` run with `on_policy_samples` > 0 started from the previous round's
model: the policy samples fresh training problems (the round's own data seed), each failed sample is
paired with one of its verified samples (or the gold chain), and DPO trains on those pairs against the
round's starting model as reference. Round r is saved to OUTPUT_DIR/round-r; OUTPUT_DIR/final is the last.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from pathlib import Path

from llama4_sparse.recipes import dpo
from llama4_sparse.recipes.argv import option_value


def run_rounds(rounds: int, dpo_args: list[str], output_dir: str | Path, first_seed: int = 100,
               on_round_end: Callable[[int, Path], None] | None = None) -> Path:
    """`rounds` on-policy DPO rounds; `dpo_args` must name the starting model (--model_name_or_path) and ask
    for on-policy pairs (--on_policy_samples N > 0). Returns the folder of the final policy."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    policy = option_value(dpo_args, "--model_name_or_path")
    if not policy:
        raise ValueError("on-policy DPO starts from a saved policy: pass --model_name_or_path SFT_DIR")
    if int(option_value(dpo_args, "--on_policy_samples", "0")) < 1:
        raise ValueError("on-policy DPO samples the policy each round: pass --on_policy_samples N (N >= 1)")
    out = Path(output_dir)
    for r in range(1, rounds + 1):
        round_dir = out / f"round-{r}"
        # Later flags win in TRL's parser: this round's start, data seed and output folder.
        dpo.main([*dpo_args, "--model_name_or_path", str(policy), "--problem_seed", str(first_seed + r),
                  "--output_dir", str(round_dir)])
        policy = round_dir
        if on_round_end is not None:
            on_round_end(r, round_dir)
    final = out / "final"
    shutil.rmtree(final, ignore_errors=True)
    shutil.copytree(policy, final, ignore=shutil.ignore_patterns("checkpoint-*", "heldout_samples"))
    return final


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--first_seed", type=int, default=100, help="round r samples problems of seed first_seed + r")
    args, dpo_args = parser.parse_known_args(argv)
    output_dir = option_value(dpo_args, "--output_dir", "runs/online-dpo")
    return run_rounds(args.rounds, dpo_args, output_dir, args.first_seed)


if __name__ == "__main__":
    main()
