"""`python -m llama4_sparse.recipes.demo` end to end with a few steps: every stage is scored by the eval harness on
held-out problems that no training split contains, and the table, results and plot are written."""

import json

import pytest

from llama4_sparse.recipes import demo
from llama4_sparse.recipes.argv import option_value, without_option
from llama4_sparse.recipes.data.arithmetic import generate_problems

QUICK = ["--sft_steps", "3", "--rl_steps", "1", "--num_eval", "8", "--num_passk", "4", "--sft_curve_every", "2",
         "--rl_curve_every", "1", "--curve_problems", "4",
         "--sft_args=--num_train_examples 16 --per_device_train_batch_size 4"]
RL_QUICK = "--num_train_examples 16 --per_device_train_batch_size 8 --max_completion_length 16"


@pytest.fixture(scope="module")
def grpo_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, demo.main(["--output_dir", str(out), *QUICK, f"--rl_args={RL_QUICK}"])


def test_demo_stages_are_scored_on_held_out_problems_with_pass_at_8_and_curves(grpo_demo):
    tmp_path, stages = grpo_demo
    assert [s["stage"] for s in stages] == ["init", "sft_direct", "sft_cot", "grpo"]
    assert all(s["n"] == 8 and 0 <= s["strict"] <= s["flexible"] + 1e-9 <= 1 for s in stages)
    assert all(0 <= s["worked_chain_share"] <= 1 for s in stages)
    for s in stages[2:]:
        assert 0 <= s["pass@1_sampled"] <= s["pass@8"] <= 1
    assert json.loads((tmp_path / "results.json").read_text())["stages"] == stages
    assert (tmp_path / "demo.png").stat().st_size > 0
    # The held-out curve during SFT: every 2 steps and after the last step (init is scored as its own stage); each
    # stage is the checkpoint of its best point (the earliest on ties), scored beside the last step.
    for index, stage in ((1, "sft_direct"), (2, "sft_cot")):
        curve = [(h["step"], h["heldout_strict"]) for h in demo.log_history(tmp_path / stage) if "heldout_strict" in h]
        assert [step for step, _ in curve] == [2, 3]
        best_step, best_score = max(curve, key=lambda point: (point[1], -point[0]))
        assert (stages[index]["kept_step"], stages[index]["kept_validation_strict"]) == (best_step, best_score)
        assert 0 <= stages[index]["last_step_strict"] <= 1
    # GRPO keeps the checkpoint of its best validation score (the earliest on ties), scored beside the last step.
    grpo_history = json.loads((tmp_path / "grpo" / "trainer_state.json").read_text())["log_history"]
    curve = [(h["step"], h["heldout_strict"]) for h in grpo_history if "heldout_strict" in h]
    assert [step for step, _ in curve] == [0, 1]
    assert curve[0][1] == stages[2]["kept_validation_strict"]  # GRPO starts from sft_cot's kept checkpoint
    best_step, best_score = max(curve, key=lambda point: (point[1], -point[0]))
    assert (stages[3]["kept_step"], stages[3]["kept_validation_strict"]) == (best_step, best_score)
    assert 0 <= stages[3]["last_step_strict"] <= 1
    assert (tmp_path / "grpo" / "best_heldout" / "model.safetensors").is_file()
    # The direct baseline was trained on answers alone, the chain model on worked chains.
    samples = [json.loads(line) for line in open(tmp_path / "eval" / "sft_direct" / "samples_gsm8k_chat.jsonl")]
    assert len(samples) == 8
    held_out = [json.loads(line)["question"] for line in open(tmp_path / "data" / "gsm8k" / "test.jsonl")]
    training = {p.question for p in generate_problems(4000, seed=0, families=("chain",), max_operand=20)}
    assert len(held_out) == 8 and not training & set(held_out)


@pytest.mark.parametrize("method", ["dpo", "rlhf"])
def test_demo_rl_methods_start_from_the_same_sft_model(grpo_demo, method, tmp_path):
    """dpo (on-policy rounds) and rlhf (a reward model from sft_cot, then GRPO on its score) reuse the
    grpo run's SFT stages through --sft_from and add their own stage."""
    source, grpo_stages = grpo_demo
    extra = {"dpo": ["--dpo_rounds", "2", "--rl_args=--num_train_examples 4 --on_policy_samples 2 "
                                                      "--on_policy_max_new_tokens 8 --per_device_train_batch_size 4"],
             "rlhf": [f"--rl_args={RL_QUICK}", "--reward_args=--num_train_examples 4 --on_policy_samples 2 "
                                                 "--on_policy_max_new_tokens 8 --max_steps 2"]}[method]
    stages = demo.main(["--output_dir", str(tmp_path), "--sft_from", str(source), "--rl_method", method, *QUICK, *extra])
    assert [s["stage"] for s in stages] == ["init", "sft_direct", "sft_cot", method]
    assert stages[:3] == grpo_stages[:3]
    assert 0 <= stages[3]["strict"] <= 1 and 0 <= stages[3]["pass@8"] <= 1
    if method == "rlhf":
        history = json.loads((tmp_path / "rlhf" / "trainer_state.json").read_text())["log_history"]
        logged = [h for h in history if "rm_true_accuracy" in h]
        assert logged and all("rewards/learned_reward/mean" in h for h in logged)
        assert [h["kl"] for h in history if "kl" in h] and demo.RLHF_KL == ["--beta", "0.1"]  # the KL term is on
    else:
        assert (tmp_path / "dpo_rounds" / "round-2" / "model.safetensors").is_file()
        assert stages[3]["rounds"] == 2 and stages[3]["kept_step"] in (0, 1, 2)
    with pytest.raises(ValueError, match="seed"):
        demo.main(["--output_dir", str(tmp_path / "other"), "--sft_from", str(source), "--seed", "1", *QUICK])


def test_demo_refuses_zero_dpo_rounds(tmp_path):
    with pytest.raises(SystemExit):
        demo.main(["--output_dir", str(tmp_path), "--rl_method", "dpo", "--dpo_rounds", "0"])


def test_chain_styles_tell_worked_chains_from_sketches_and_score_each(tmp_path):
    rows = [{"output": "3 + 4 = 7. 7 * 2 = 14.The final answer is 14", "correct_strict": True},
            {"output": "3 + 4 = 7. 7 * 2 = 15.The final answer is 15", "correct_strict": False},
            {"output": "3 + 4, * 2.The final answer is 14", "correct_strict": True},
            {"output": "3 + 4, * 2.The final answer is 11", "correct_strict": False},
            {"output": "The final answer is 9", "correct_strict": False}]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert demo.chain_styles(path) == {"worked_chain_share": 0.4, "strict_when_worked": 0.5, "strict_otherwise": 0.3333}


def test_self_check_report_scores_the_checks_against_the_truth():
    right = "3 + 4 = 7. 7 * 2 = 14. Check: 14 / 2 = 7. 7 - 4 = 3. Back to 3, the start.The final answer is 14"
    missed = "3 + 4 = 7. 7 * 2 = 15. Check: 15 / 2 = 7. 7 - 4 = 3. Back to 3, the start.The final answer is 15"
    caught = "3 + 4 = 8. 8 * 2 = 16. Check: 16 / 2 = 8. 8 - 4 = 4. Back to 3, the start.The final answer is 16"
    rows = [{"output": right, "correct_strict": True}, {"output": missed, "correct_strict": False},
            {"output": caught, "correct_strict": False}, {"output": right, "correct_strict": True}]
    # `missed` botches its check (15 / 2 is not 7) and `caught` undoes to 4, not 3: neither holds, as neither answer is right.
    assert demo.self_check_report(rows) == {"check_holds": 0.5, "check_agrees_with_truth": 1.0, "check_holds_when_wrong": 0.0}
    rows[1]["output"] = right.replace("final answer is 14", "final answer is 15")  # a check that skips its own answer
    assert demo.self_check_report(rows)["check_holds"] == 0.5


def test_without_option_drops_the_option_and_its_value():
    assert without_option(["--a", "1", "--self_check", "true", "--b"], "--self_check") == ["--a", "1", "--b"]
    assert without_option(["--self_check=true", "--x"], "--self_check") == ["--x"]


def test_self_checked_chains_get_the_longer_generation_budget():
    # A self-checked 4-step chain with its answer is ~100 tokens: scoring it within 64 would cut the answer off.
    from llama4_sparse.recipes.data.arithmetic import generate_problems
    from llama4_sparse.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    problem = generate_problems(1, families=("chain",))[0]
    reply = problem.messages(self_check=True)[-1]
    length = len(tokenizer(reply["reasoning"] + reply["content"], add_special_tokens=False)["input_ids"]) + 3
    assert demo.MAX_NEW_TOKENS < length <= demo.MAX_NEW_TOKENS_WITH_CHECK
    for argv in (["--self_check", "true"], ["--self_check=True"], ["--x", "1", "--self_check"]):
        assert demo.generation_budget(argv) == demo.MAX_NEW_TOKENS_WITH_CHECK, argv
    for argv in ([], ["--self_check", "false"], ["--self_check=true", "--self_check", "false"]):
        assert demo.generation_budget(argv) == demo.MAX_NEW_TOKENS, argv
    assert option_value(["--a", "1", "--a=2"], "--a") == "2" and option_value(["--ab", "1"], "--a") is None


def test_rl_study_rescore_of_a_run_agrees_with_the_demos_own_scores_on_the_same_problems(grpo_demo, tmp_path):
    """`bench/rl_study.py --rescore` on a study holding this demo run as seed 0: on the demo's own number of problems
    (the same draw) it reproduces every trained stage's score and kept step, and scores the last step where the
    stopping rule kept an earlier one."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("rl_study", Path(demo.__file__).resolve().parents[1] / "bench" / "rl_study.py")
    rl_study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rl_study)
    out, stages = grpo_demo
    (tmp_path / "seed0").mkdir()
    (tmp_path / "seed0" / "demo").symlink_to(out)
    table = rl_study.rescore(tmp_path, num_eval=8, max_new_tokens=demo.MAX_NEW_TOKENS)
    summary = json.loads((tmp_path / "rescore8.json").read_text())
    assert set(summary) == {"sft_direct", "sft_cot", "grpo"}
    for stage in stages[1:]:
        assert summary[stage["stage"]]["strict"]["0"] == stage["strict"], stage["stage"]
    # The gain table names the step each stage kept and its last step's score, as the demo recorded them.
    for stage, base in (("sft_cot", "sft_direct"), ("grpo", "sft_cot")):
        kept = next(s for s in stages if s["stage"] == stage)
        row = next(line for line in table.splitlines() if line.startswith(f"| {stage} - {base} |"))
        assert row.endswith(f"| {kept['kept_step']} ({100 * kept.get('last_step_strict', kept['strict']):.0f}%) |"), row
