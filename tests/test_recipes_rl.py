"""The RL pieces of the recipes on the tiny model: the held-out eval callback, a learned reward model as
GRPO's reward, and on-policy iterative DPO rounds."""

import json
from pathlib import Path

import pytest
import torch
from trl import GRPOConfig, SFTConfig

from llama4_sparse.modeling_llama4 import Llama4ForCausalLM, Llama4ForSequenceClassification, Llama4TextConfig
from llama4_sparse.recipes import grpo, online_dpo, reward, sft
from llama4_sparse.recipes.callbacks import HeldOutEvalCallback, sampled_pass_at_k, write_heldout
from llama4_sparse.recipes.common import parse_recipe
from llama4_sparse.recipes.data.arithmetic import generate_problems
from llama4_sparse.recipes.learned_reward import RewardModelScorer, assistant_turn
from llama4_sparse.recipes.rewards import THINK_END, THINK_START
from llama4_sparse.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "configs" / "tiny"
QUICK = ["--num_train_examples", "8", "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true",
         "--warmup_steps", "0", "--lr_scheduler_type", "constant", "--problem_families", "add", "--max_operand", "9"]


def test_heldout_callback_logs_the_harness_score_before_during_and_after_training(tmp_path):
    trainer = sft.make_trainer(*parse_recipe(SFTConfig, sft.SFTArguments, args=[
        "--config", str(TINY / "sft.yaml"), *QUICK, "--per_device_train_batch_size", "4", "--max_steps", "5",
        "--heldout_eval_steps", "2", "--heldout_problems", "6", "--heldout_max_new_tokens", "8",
        "--output_dir", str(tmp_path)]))
    trainer.train()
    entries = [h for h in trainer.state.log_history if "heldout_strict" in h]
    assert [e["step"] for e in entries] == [0, 2, 4, 5]
    for e in entries:
        # The logged score is what the harness's own samples of that step say.
        rows = [json.loads(line) for line in open(tmp_path / "heldout_samples" / f"step-{e['step']}" / "samples_gsm8k_chat.jsonl")]
        assert len(rows) == e["heldout_n"] == 6
        assert e["heldout_strict"] == pytest.approx(sum(r["correct_strict"] for r in rows) / 6)
    assert trainer.model.training  # scoring put the model back in training mode
    with pytest.raises(ValueError, match="held-out problems"):
        HeldOutEvalCallback(trainer.processing_class, tmp_path / "nowhere", every=2)
    with pytest.raises(ValueError, match="heldout_eval_steps"):
        HeldOutEvalCallback(trainer.processing_class, tmp_path, every=0)


def test_pass_at_k_counts_a_problem_solved_by_any_sample(tmp_path):
    """A model that always writes the same wrong answer has pass@1 = pass@8 = 0; the estimator is checked
    against the samples through a real tiny model."""
    data = write_heldout(tmp_path, 3, ["add"], 9, seed=0)
    torch.manual_seed(0)
    model = Llama4ForCausalLM(Llama4TextConfig.from_preset("tiny"))
    result = sampled_pass_at_k(model, load_tokenizer(), data, k=4, max_new_tokens=4)
    assert result["n"] == 3 and result["pass@4"] == 0.0 and result["pass@1_sampled"] == 0.0


def _reward_model(path: Path) -> Path:
    reward.main(["--config", str(TINY / "reward.yaml"), "--num_train_examples", "16", "--save_strategy", "no",
                 "--disable_tqdm", "true", "--max_steps", "6", "--problem_families", "add", "--max_operand", "9",
                 "--output_dir", str(path)])
    return path


def test_learned_reward_in_grpo_scores_completions_with_the_reward_model_and_logs_true_accuracy(tmp_path):
    rm_dir = _reward_model(tmp_path / "rm")
    start = tmp_path / "sft"
    sft.main(["--config", str(TINY / "sft.yaml"), *QUICK, "--max_steps", "6", "--output_dir", str(start)])
    trainer = grpo.make_trainer(*parse_recipe(GRPOConfig, grpo.GRPOArguments, args=[
        "--config", str(TINY / "grpo.yaml"), *QUICK, "--model_name_or_path", str(start), "--rewards", "reward_model",
        "--reward_weights", "1.0", "--reward_model_path", str(rm_dir), "--per_device_train_batch_size", "8",
        "--num_generations", "4", "--max_completion_length", "12", "--max_steps", "2", "--output_dir",
        str(tmp_path / "grpo")]))
    # The reward function gives exactly the reward model's score of prompt + completion through the chat template.
    tokenizer = trainer.processing_class
    problem = generate_problems(1, seed=0, families=("add",), max_operand=9)[0]
    text = f"{THINK_START}{problem.reasoning}{THINK_END}{problem.final}"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    fn = trainer.reward_funcs[0]
    got = fn(prompts=[problem.prompt()], completion_ids=[ids], answer=[problem.gsm8k_row()["answer"]])
    rm = Llama4ForSequenceClassification.from_pretrained(rm_dir).eval()
    full = tokenizer.apply_chat_template([*problem.prompt(), assistant_turn(text)], tokenize=True)
    full = full["input_ids"] if hasattr(full, "keys") else full
    with torch.no_grad():
        expected = rm(input_ids=torch.tensor([full])).logits[0, 0].item()
    assert got == [pytest.approx(expected, abs=1e-5)]
    trainer.train()
    logged = [h for h in trainer.state.log_history if "rm_true_accuracy" in h]
    assert len(logged) == 2 and all(0 <= h["rm_true_accuracy"] <= 1 for h in logged)
    assert all("rewards/learned_reward/mean" in h for h in logged)
    with pytest.raises(ValueError, match="reward_model_path"):
        grpo.GRPOArguments(rewards=["reward_model"])


def test_grpo_with_kl_takes_its_reference_from_this_package_and_starts_at_zero_kl(tmp_path):
    """beta > 0 from a saved multimodal folder: the reference is the starting model in this package's class (not
    transformers' Llama4 of the same name), so the first step's KL to it is zero and training runs."""
    from llama4_sparse.modeling_llama4 import Llama4ForConditionalGeneration

    start = tmp_path / "sft"
    sft.main(["--config", str(TINY / "sft.yaml"), *QUICK, "--max_steps", "2", "--model_class", "conditional_generation",
              "--output_dir", str(start)])
    trainer = grpo.make_trainer(*parse_recipe(GRPOConfig, grpo.GRPOArguments, args=[
        "--config", str(TINY / "grpo.yaml"), *QUICK, "--model_name_or_path", str(start), "--model_class",
        "conditional_generation", "--beta", "0.1", "--per_device_train_batch_size", "8", "--num_generations", "4",
        "--max_completion_length", "12", "--max_steps", "2", "--output_dir", str(tmp_path / "grpo")]))
    assert type(trainer.ref_model) is Llama4ForConditionalGeneration
    policy, reference = trainer.model.state_dict(), trainer.ref_model.state_dict()
    assert policy.keys() == reference.keys() and all(torch.equal(policy[k], reference[k]) for k in policy)
    trainer.train()
    kl = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert len(kl) == 2 and kl[0] == pytest.approx(0.0, abs=1e-6) and kl[1] >= 0


def test_reward_scorer_ranks_like_the_trained_pairs_and_refuses_a_language_model(tmp_path):
    with pytest.raises(ValueError, match="num_labels"):
        RewardModelScorer(Llama4ForCausalLM(Llama4TextConfig.from_preset("tiny")), load_tokenizer())


def test_online_dpo_round_trains_on_the_policys_own_samples_and_chains_rounds(tmp_path):
    start = tmp_path / "sft"
    sft.main(["--config", str(TINY / "sft.yaml"), *QUICK, "--max_steps", "4", "--output_dir", str(start)])
    seen = []
    final = online_dpo.run_rounds(2, [
        "--config", str(TINY / "dpo.yaml"), *QUICK, "--use_peft", "false", "--model_name_or_path", str(start),
        "--on_policy_samples", "2", "--on_policy_max_new_tokens", "12", "--per_device_train_batch_size", "4",
        "--max_steps", "1"], tmp_path / "dpo", on_round_end=lambda r, d: seen.append((r, d)))
    assert [r for r, _ in seen] == [1, 2]
    # Each round moved the weights, and the final folder is the last round.
    final_weights = Llama4ForCausalLM.from_pretrained(final).state_dict()
    round2 = Llama4ForCausalLM.from_pretrained(seen[1][1]).state_dict()
    round1 = Llama4ForCausalLM.from_pretrained(seen[0][1]).state_dict()
    initial = Llama4ForCausalLM.from_pretrained(start).state_dict()
    assert all(torch.equal(final_weights[k], round2[k]) for k in round2)
    assert any(not torch.equal(round1[k], round2[k]) for k in round2)
    assert any(not torch.equal(initial[k], round1[k]) for k in round1)
    with pytest.raises(ValueError, match="on_policy_samples"):
        online_dpo.run_rounds(1, ["--model_name_or_path", str(start)], tmp_path / "x")


def test_step_reward_gives_partial_credit_for_the_gold_chain_steps_in_order():
    from llama4_sparse.recipes.step_rewards import step_reward

    problem = generate_problems(1, seed=0, families=("chain",))[0]
    gold = [problem.gsm8k_row()["answer"]]
    right = f"{THINK_START}{problem.reasoning}{THINK_END}{problem.final}"
    assert step_reward([right], gold) == [1.0]
    # The last result off by one: every step but the last still matches.
    wrong_last = problem.reasoning.rsplit("= ", 1)[0] + f"= {problem.answer + 1}."
    n = problem.reasoning.count(" = ")
    assert step_reward([f"{THINK_START}{wrong_last}{THINK_END}x"], gold) == [pytest.approx((n - 1) / n)]
    # No thinking block, or an extra step: less credit; no gold steps: not applicable.
    assert step_reward([problem.final], gold) == [0.0]
    extra = f"{THINK_START}{problem.reasoning} 1 + 1 = 2.{THINK_END}x"
    assert step_reward([extra], gold) == [pytest.approx(n / (n + 1))]
    assert step_reward([right], ["#### 5"]) == [None]


def test_freeze_router_keeps_the_routers_fixed_while_the_rest_trains(tmp_path):
    """GRPO with --freeze_router from a saved model: after two steps the routers' weights equal the start's and
    every other trained tensor has moved; a model without routers is refused by name."""
    start = tmp_path / "sft"
    sft.main(["--config", str(TINY / "sft.yaml"), *QUICK, "--max_steps", "2", "--output_dir", str(start)])
    trainer = grpo.make_trainer(*parse_recipe(GRPOConfig, grpo.GRPOArguments, args=[
        "--config", str(TINY / "grpo.yaml"), *QUICK, "--model_name_or_path", str(start), "--freeze_router", "true",
        "--learning_rate", "1e-3", "--per_device_train_batch_size", "8", "--num_generations", "4",
        "--max_completion_length", "12", "--max_steps", "2", "--output_dir", str(tmp_path / "grpo")]))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    routers = [k for k in before if k.endswith("router.weight")]
    assert routers and all(not p.requires_grad for n, p in trainer.model.named_parameters() if n in routers)
    trainer.train()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in routers)
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"])
    dense = tmp_path / "dense.yaml"
    dense.write_text((TINY / "grpo.yaml").read_text() + "model_overrides: {moe_layers: []}\n")
    with pytest.raises(ValueError, match="no MoE router"):
        grpo.make_trainer(*parse_recipe(GRPOConfig, grpo.GRPOArguments, args=[
            "--config", str(dense), *QUICK, "--freeze_router", "true", "--output_dir", str(tmp_path / "dense")]))
