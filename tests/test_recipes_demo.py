"""`python -m recipes.demo` end to end with a few steps: every stage is scored by the eval harness on
held-out problems that no training split contains, and the table, results and plot are written."""

import json

from recipes import demo
from recipes.data.arithmetic import generate_problems


def test_demo_pipeline_scores_each_stage_on_held_out_problems(tmp_path):
    stages = demo.main(["--output_dir", str(tmp_path), "--sft_steps", "3", "--rl_steps", "1", "--num_eval", "8",
                        "--sft_args=--num_train_examples 16", "--rl_args=--num_train_examples 16"])
    assert [s["stage"] for s in stages] == ["init", "sft", "dpo"]
    assert all(s["n"] == 8 and 0 <= s["strict"] <= 1 for s in stages)
    assert json.loads((tmp_path / "results.json").read_text())["stages"] == stages
    assert (tmp_path / "demo.png").stat().st_size > 0
    held_out = [json.loads(line)["question"] for line in open(tmp_path / "data" / "gsm8k" / "test.jsonl")]
    training = {p.question for p in generate_problems(4000, seed=0, families=("add", "sub", "add_sub"), max_operand=9)}
    assert len(held_out) == 8 and not training & set(held_out)
