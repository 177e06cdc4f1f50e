"""The recipe scripts run end to end on the tiny model on CPU: SFT (assistant-only loss, packing),
DPO with LoRA on the routed experts, GRPO with the rewards, reloading, resuming and two-process DDP.
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from trl import DPOConfig, GRPOConfig, SFTConfig

from llama4_sparse.modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
from llama4_sparse.recipes import dpo, grpo, sft
from llama4_sparse.recipes.common import parse_recipe
from llama4_sparse.recipes.data.arithmetic import generate_problems
from llama4_sparse.recipes.data.preferences import on_policy_rows
from llama4_sparse.recipes.grpo import GRPOArguments
from llama4_sparse.recipes.rewards import THINK_END, THINK_START

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "configs" / "tiny"
# Few examples, each step on the same batch, plain prompts: seconds per run on two cores.
QUICK = ["--num_train_examples", "8", "--prompt_style", "plain", "--save_strategy", "no", "--logging_steps", "1",
         "--disable_tqdm", "true", "--warmup_steps", "0", "--lr_scheduler_type", "constant"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _losses(trainer_or_dir, key="loss") -> list[float]:
    history = (trainer_or_dir.state.log_history if hasattr(trainer_or_dir, "state")
               else json.loads((Path(trainer_or_dir) / "trainer_state.json").read_text())["log_history"])
    return [h[key] for h in history if key in h]


def test_sft_trains_on_assistant_tokens_only_and_packing_gives_the_same_loss(tmp_path):
    trainer = sft.make_trainer(*parse_recipe(SFTConfig, sft.SFTArguments, args=[
        "--config", str(TINY / "sft.yaml"), *QUICK, "--per_device_train_batch_size", "8", "--max_steps", "4",
        "--output_dir", str(tmp_path / "unpacked")]))
    row = trainer.train_dataset[0]
    tokenizer = trainer.processing_class
    trained = tokenizer.decode([t for t in row["labels"] if t != -100])
    assert trained.startswith("<|reasoning_thinking_start|>") and trained.endswith("<|eot|>")
    assert "<|header_start|>" not in trained and "How many" not in trained and "collects" not in trained
    trainer.train()
    unpacked = _losses(trainer)
    assert unpacked[-1] < unpacked[0] - 0.5

    packed = sft.make_trainer(*parse_recipe(SFTConfig, sft.SFTArguments, args=[
        "--config", str(TINY / "sft.yaml"), *QUICK, "--packing", "true", "--max_length", "1024",
        "--per_device_train_batch_size", "1", "--max_steps", "1", "--output_dir", str(tmp_path / "packed")]))
    assert len(packed.train_dataset) == 1  # all eight conversations in one padding-free row
    packed.train()
    assert _losses(packed)[0] == pytest.approx(unpacked[0], rel=1e-4)


def test_multimodal_sft_on_shape_images_trains_the_vision_tower(tmp_path):
    trainer = sft.make_trainer(*parse_recipe(SFTConfig, sft.SFTArguments, args=[
        "--config", str(TINY / "sft.yaml"), *QUICK, "--model_class", "conditional_generation", "--dataset_name",
        "shapes", "--per_device_train_batch_size", "4", "--max_steps", "2", "--output_dir", str(tmp_path / "mm")]))
    before = {n: p.detach().clone() for n, p in trainer.model.vision_model.named_parameters()}
    trainer.train()
    moved = [n for n, p in trainer.model.vision_model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before), "the image features did not reach the loss"


def test_sft_checkpoint_reloads_with_from_pretrained(tmp_path):
    out = tmp_path / "sft"
    sft.main(["--config", str(TINY / "sft.yaml"), *QUICK, "--max_steps", "2", "--output_dir", str(out)])
    assert (out / "model.safetensors").is_file() and (out / "chat_template.jinja").is_file()
    reloaded = Llama4ForCausalLM.from_pretrained(out)
    saved = load_file(out / "model.safetensors")
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_on_policy_dpo_pairs_each_failed_sample_with_a_verified_one(tmp_path):
    """The pairs come from the starting model's own samples, checked by the rewards; problems it always
    solves give none, and the gold chain stands in where no sample verified."""
    problems = generate_problems(2, seed=0, split="train", families=("add",), max_operand=9)
    right = [f"{THINK_START}{p.reasoning}{THINK_END}{p.final}" for p in problems]
    wrong = f"{THINK_START}1 + 1 = 2{THINK_END}The final answer is {problems[0].answer + 1}"
    rows = on_policy_rows(problems, [[right[0], wrong, wrong, "no thinking block"], [right[1]] * 3])
    assert len(rows) == 2 and all(r["prompt"] == problems[0].prompt() for r in rows)
    assert {r["rejected"][0]["content"] for r in rows} == {f"The final answer is {problems[0].answer + 1}",
                                                          "no thinking block"}
    assert all(r["chosen"] == [{"role": "assistant", "reasoning": problems[0].reasoning, "content": problems[0].final}]
               for r in rows)
    gold = on_policy_rows(problems[:1], [[wrong]])
    assert gold[0]["chosen"] == problems[0].messages()[1:]

    args = parse_recipe(DPOConfig, dpo.DPOArguments, args=[
        "--config", str(TINY / "dpo.yaml"), *QUICK, "--use_peft", "false", "--on_policy_samples", "2",
        "--max_steps", "1", "--output_dir", str(tmp_path)])
    trainer = dpo.make_trainer(*args)
    # A fresh model never verifies, so every one of its distinct samples is a rejected completion.
    assert 8 <= len(trainer.train_dataset) <= 16


@pytest.mark.parametrize("experts", [False, True], ids=["attn+shared", "experts"])
def test_dpo_lora_prefers_the_verified_chain(tmp_path, experts):
    out = tmp_path / "dpo"
    args = parse_recipe(DPOConfig, args=["--config", str(TINY / "dpo.yaml"), *QUICK, "--per_device_train_batch_size",
                                         "8", "--max_steps", "4", "--learning_rate", "5e-3", "--output_dir", str(out),
                                         "--lora_experts", str(experts).lower(), "--loss_type", "sigmoid"])
    trainer = dpo.make_trainer(*args)
    adapted = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert any("shared_expert" in n for n in adapted) and any("self_attn" in n for n in adapted)
    assert any("feed_forward.experts" in n for n in adapted) == experts
    assert not [n for n in adapted if "router" in n or "lm_head" in n]
    trainer.train()
    trainer.save_model(str(out))
    losses = _losses(trainer)
    # Policy == reference at the start: log 2, plus the MoE load-balancing term TRL adds.
    aux = _losses(trainer, "aux_loss")[0]
    assert losses[0] == pytest.approx(math.log(2) + trainer.router_aux_loss_coef * aux, abs=1e-4)
    assert losses[-1] < losses[0] - 0.1
    adapter = json.loads((out / "adapter_config.json").read_text())
    expected = {"feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"} if experts else set()
    assert set(adapter["target_parameters"] or []) == expected

    torch.manual_seed(args[1].seed)
    base = Llama4ForCausalLM(Llama4TextConfig.from_preset("tiny"))
    reloaded = PeftModel.from_pretrained(base, out).eval()
    ids = torch.tensor([trainer.processing_class("3 + 4 = 7").input_ids])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trainer.model(ids).logits, rtol=1e-5, atol=1e-5)


def test_grpo_raises_the_reward_it_is_given(tmp_path):
    """GRPO from a briefly SFT-ed model, rewarded by the length penalty (answer and format rewards are
    computed and logged too, with weight 0): the penalised long completions become rarer."""
    start = tmp_path / "sft"
    sft.main(["--config", str(TINY / "sft.yaml"), *QUICK, "--num_train_examples", "32", "--max_steps", "24",
              "--per_device_train_batch_size", "8", "--adam_beta2", "0.999", "--output_dir", str(start)])
    trainer = grpo.make_trainer(*parse_recipe(GRPOConfig, GRPOArguments, args=[
        "--config", str(TINY / "grpo.yaml"), *QUICK, "--model_name_or_path", str(start), "--rewards", "length",
        "format", "accuracy", "--reward_weights", "1.0", "0.0", "0.0", "--length_soft_limit", "4",
        "--length_hard_limit", "24", "--num_train_examples", "64", "--max_steps", "10", "--learning_rate", "1e-3",
        "--per_device_train_batch_size", "16", "--loss_type", "dapo", "--scale_rewards", "group",
        "--mask_truncated_completions", "false", "--temperature", "1.0",
        "--max_completion_length", "24", "--output_dir", str(tmp_path / "grpo")]))
    trainer.train()
    length = _losses(trainer, "rewards/length_reward/mean")
    assert len(length) == 10 and len(_losses(trainer, "rewards/format_reward/mean")) == 10
    assert all(0 <= r <= 1 for r in _losses(trainer, "rewards/accuracy_reward/mean"))
    assert sum(length[-3:]) / 3 > sum(length[:3]) / 3 + 0.1, length


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc={proc.returncode}) before writing {path}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"no {path} after {timeout}s")
        time.sleep(0.2)


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, str(REPO / "recipes" / "sft.py"), "--config", str(TINY / "sft.yaml"), *QUICK,
               "--save_strategy", "steps", "--save_steps", "2", "--max_steps", "30", "--output_dir", str(out)]
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(out / "checkpoint-2" / "trainer_state.json", proc)
    proc.kill()
    proc.wait()
    assert not (out / "model.safetensors").exists()

    resumed = subprocess.run([*command[:-4], "--max_steps", "6", "--output_dir", str(out), "--resume_from_checkpoint",
                              "last"], env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    # The resumed run starts after the checkpoint: it logs steps 3..6 on top of the restored 1..2.
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4, 5, 6]


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    common = [str(REPO / "recipes" / "sft.py"), "--config", str(TINY / "sft.yaml"), *QUICK, "--num_train_examples",
              "32", "--max_steps", "3", "--seed", "0"]
    ddp = subprocess.run(["accelerate", "launch", "--config_file", str(REPO / "recipes" / "accelerate_configs" / "ddp_cpu.yaml"),
                          *common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "ddp")],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable, *common, "--per_device_train_batch_size", "8", "--output_dir",
                             str(tmp_path / "single")], env=_env(), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp_state = json.loads((tmp_path / "ddp" / "trainer_state.json").read_text())
    # Two processes of 4 consumed 8 of the 32 examples per step, as the single process of 8 did.
    assert ddp_state["epoch"] == pytest.approx(3 * 8 / 32)
    assert _losses(tmp_path / "ddp") == pytest.approx(_losses(tmp_path / "single"), rel=1e-4)
    # Adam can move a weight whose gradient is only reduction-order noise by up to lr per step, so
    # compare what the models compute rather than every element.
    probe = torch.tensor([list(range(4096, 4100)) + list(range(100, 160))])
    with torch.no_grad():
        logits = [Llama4ForCausalLM.from_pretrained(tmp_path / run)(probe).logits for run in ("ddp", "single")]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-3, atol=1e-3)


def test_reward_model_learns_to_rank_verified_chains_above_corrupted_ones(tmp_path):
    from llama4_sparse.recipes import reward

    from llama4_sparse.modeling_llama4 import Llama4ForSequenceClassification

    out = tmp_path / "reward"
    reward.main(["--config", str(TINY / "reward.yaml"), "--num_train_examples", "8", "--save_strategy", "no",
                 "--logging_steps", "1", "--disable_tqdm", "true", "--max_steps", "12", "--output_dir", str(out)])
    losses = _losses(out)
    assert losses[0] == pytest.approx(math.log(2), abs=0.1)  # untrained scores: chosen and rejected tie
    assert losses[-1] < losses[0] - 0.2
    model = Llama4ForSequenceClassification.from_pretrained(out)
    assert model.score.out_features == 1
