"""Expert parallelism composed with FSDP2 in `recipes/sft.py` on 2 CPU processes (gloo): each rank holds half of the
experts, the rest of the model is FSDP2-sharded, training matches one process with the same global batch, and the
folders it writes are normal checkpoints; launches that cannot do EP are refused with the fix."""

import json
from pathlib import Path

import pytest
import torch

from llama4_sparse.modeling_llama4 import Llama4ForCausalLM
from recipe_launch import ACCELERATE_CONFIGS as CONFIGS
from recipe_launch import COMMON, TINY, accelerate_launch, history, probe_logits, save_tiny_init, single_process


def _common(recipe_config: Path | None) -> list[str]:
    return COMMON if recipe_config is None else ["--config", str(recipe_config), *COMMON[2:]]


def _launch(*args, config=CONFIGS / "fsdp2_ep_cpu.yaml", recipe_config=None):
    return accelerate_launch(config, *_common(recipe_config), "--per_device_train_batch_size", "4", *args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep")
    # Aux-loss-free balancing too: its bias must see the global expert load on every rank.
    balanced = root / "sft_balanced.yaml"
    balanced.write_text((TINY / "sft.yaml").read_text() + "model_overrides: {moe_load_balancing: aux_loss_free}\n")
    ep = _launch("--expert_parallel_size", "2", "--save_strategy", "steps", "--save_steps", "2",
                 "--output_dir", str(root / "ep"), recipe_config=balanced)
    single = single_process(*_common(balanced),
                             "--per_device_train_batch_size", "8", "--save_strategy", "no",
                             "--output_dir", str(root / "single"))
    return root, ep, single


def test_expert_parallel_splits_the_experts_and_shards_the_rest(runs):
    _, ep, _ = runs
    assert ep.returncode == 0, ep.stderr[-3000:]
    log = ep.stderr + ep.stdout
    # The tiny preset's 4 experts per MoE layer: 2 on each rank; every parameter tensor is a DTensor.
    assert "expert parallel: 2 experts per rank over ep=2, experts FSDP2-sharded over dp_mod_ep=1" in log
    for rank in (0, 1):
        assert f"rank {rank}: 45 of 45 parameter tensors sharded;" in log
    assert "(50.0%)" in log
    assert "reducer.cpp" not in log  # no DDP replica anywhere


def test_expert_parallel_matches_one_process_with_the_same_global_batch(runs):
    root, ep, single = runs
    assert ep.returncode == 0 and single.returncode == 0, (ep.stderr + single.stderr)[-3000:]
    assert history(root / "ep", "epoch")[-1] == pytest.approx(3 * 8 / 32)  # 2 ranks x 4 = 8 per step
    assert history(root / "ep", "loss") == pytest.approx(history(root / "single", "loss"), rel=1e-4)
    # The clipped norm covers every expert once: an expert gradient scaled by the ep size would change it.
    assert history(root / "ep", "grad_norm") == pytest.approx(history(root / "single", "grad_norm"), rel=1e-3)
    mine = Llama4ForCausalLM.from_pretrained(root / "ep").state_dict()
    reference = Llama4ForCausalLM.from_pretrained(root / "single").state_dict()
    assert mine.keys() == reference.keys()
    biases = [name for name in reference if name.endswith("expert_bias")]
    assert biases and all(reference[name].abs().sum() > 0 for name in biases)  # the bias did move
    # Adam normalises each element's step, so an element whose gradient is ~0 can take a step of either sign
    # from reduction-order noise (seen: 2 of 16384 elements off by up to 4.4e-3 after 3 steps at lr 3e-3).
    # A wrong gradient scale or a missed reduction moves whole tensors instead, so bound the mean and the share.
    for name, weight in reference.items():
        diff = (mine[name] - weight).abs()
        assert diff.mean() < 1e-4, (name, diff.mean())
        assert (diff > 2e-3).float().mean() < 1e-3, (name, int((diff > 2e-3).sum()))
    torch.testing.assert_close(probe_logits(root / "ep"), probe_logits(root / "single"), rtol=1e-3, atol=1e-3)


def test_expert_parallel_final_folder_is_a_full_checkpoint(runs):
    root, ep, _ = runs
    assert ep.returncode == 0, ep.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "ep")
    assert type(model) is Llama4ForCausalLM
    experts = model.model.layers[1].feed_forward.experts
    assert experts.gate_up_proj.shape == (4, 128, 512) and experts.down_proj.shape == (4, 256, 128)
    config = json.loads((root / "ep" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_text.Llama4ForCausalLM"
    assert model.generate(torch.tensor([[4096, 100, 101]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_expert_parallel_resumes_from_a_sharded_checkpoint(runs):
    root, ep, _ = runs
    assert ep.returncode == 0, ep.stderr[-3000:]
    assert (root / "ep" / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()
    resumed = _launch("--expert_parallel_size", "2", "--save_strategy", "no", "--resume_from_checkpoint",
                      str(root / "ep" / "checkpoint-2"), "--output_dir", str(root / "resumed"),
                      recipe_config=root / "sft_balanced.yaml")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert history(root / "resumed", "loss")[-1] == pytest.approx(history(root / "ep", "loss")[-1], rel=1e-5)
    torch.testing.assert_close(probe_logits(root / "resumed"), probe_logits(root / "ep"), rtol=1e-5, atol=1e-5)


def test_expert_parallel_with_lora_matches_one_process(tmp_path):
    """LoRA on attention and the shared expert of a saved model (Maverick's case); the frozen routed experts are
    split. Dropout 0, so every rank computes what one process does."""
    lora = ["--model_name_or_path", str(save_tiny_init(tmp_path / "init")), "--use_peft", "true", "--lora_experts", "false",
            "--lora_r", "8", "--lora_dropout", "0",
            "--learning_rate", "1e-2", "--save_strategy", "no"]
    ep = _launch("--expert_parallel_size", "2", *lora, "--output_dir", str(tmp_path / "ep"))
    assert ep.returncode == 0, ep.stderr[-3000:]
    single = single_process(*COMMON, *lora,
                             "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr[-3000:]
    assert history(tmp_path / "ep", "loss") == pytest.approx(history(tmp_path / "single", "loss"), rel=1e-4)
    from safetensors.torch import load_file

    mine, reference = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("ep", "single"))
    assert mine.keys() == reference.keys() and len(mine) > 0
    # Adam normalises each element's step, so an element whose gradient is ~0 can take a step of either sign
    # from reduction-order noise (seen: 2 of 16384 elements off by up to 4.4e-3 after 3 steps at lr 3e-3).
    # A wrong gradient scale or a missed reduction moves whole tensors instead, so bound the mean and the share.
    for name, weight in reference.items():
        diff = (mine[name] - weight).abs()
        assert diff.mean() < 1e-4, (name, diff.mean())
        assert (diff > 2e-3).float().mean() < 1e-3, (name, int((diff > 2e-3).sum()))


def test_expert_parallel_with_lora_on_the_experts_is_refused(tmp_path):
    refused = _launch("--expert_parallel_size", "2", "--use_peft", "true", "--lora_dropout", "0", "--save_strategy",
                      "no", "--output_dir", str(tmp_path / "refused"))
    assert refused.returncode != 0
    assert "cannot split experts that carry LoRA adapters; set lora_experts: false" in refused.stderr


def test_expert_parallel_without_fsdp2_is_refused(tmp_path):
    ddp = _launch("--expert_parallel_size", "2", "--save_strategy", "no", "--output_dir", str(tmp_path / "ddp"),
                  config=CONFIGS / "ddp_cpu.yaml")
    assert ddp.returncode != 0
    assert "composes with FSDP2 only" in ddp.stderr and "fsdp2_ep_cpu.yaml" in ddp.stderr


def test_expert_parallel_on_one_process_is_refused(tmp_path):
    alone = single_process(*COMMON, "--expert_parallel_size", "2",
                            "--save_strategy", "no", "--output_dir", str(tmp_path / "alone"))
    assert alone.returncode != 0
    assert "expert_parallel_size 2 needs that many processes" in alone.stderr
