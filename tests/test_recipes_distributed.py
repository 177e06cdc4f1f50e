"""FSDP2 through `accelerate launch` on 2 CPU processes: the model really is sharded, training matches one process
with the same global batch, sharded checkpoints resume, the final folder is a normal one; a launch that would
silently train unsharded is refused."""

import json

import pytest
import torch

from llama4_sparse.modeling_llama4 import Llama4ForCausalLM
from recipe_launch import (ACCELERATE_CONFIGS, COMMON, accelerate_launch, history, probe_logits, save_tiny_init,
                           single_process)

FSDP2_CPU = ACCELERATE_CONFIGS / "fsdp2_cpu.yaml"


def _launch(*args, config=FSDP2_CPU):
    return accelerate_launch(config, *COMMON, *args)


def _losses(run):
    return history(run, "loss")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    fsdp = _launch("--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "2",
                   "--output_dir", str(root / "fsdp"))
    single = single_process(*COMMON, "--per_device_train_batch_size",
                             "8", "--save_strategy", "no", "--output_dir", str(root / "single"))
    return root, fsdp, single


def test_fsdp2_on_cpu_shards_every_parameter(runs):
    root, fsdp, _ = runs
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    log = fsdp.stderr + fsdp.stdout
    for rank in (0, 1):
        # The tiny model's 45 parameter tensors are DTensors and each rank holds half of the elements.
        assert f"rank {rank}: 45 of 45 parameter tensors sharded;" in log
        assert "(50.0%)" in log
    assert "reducer.cpp" not in log  # no DDP replica anywhere
    # Sharded checkpoints, written once (rank 0 writes the metadata, each rank its shard).
    assert (root / "fsdp" / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()


def test_fsdp2_matches_one_process_with_the_same_global_batch(runs):
    root, fsdp, single = runs
    assert fsdp.returncode == 0 and single.returncode == 0, (fsdp.stderr + single.stderr)[-3000:]
    state = json.loads((root / "fsdp" / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(3 * 8 / 32)  # 2 ranks x 4 = the single process's 8 per step
    assert _losses(root / "fsdp") == pytest.approx(_losses(root / "single"), rel=1e-4)
    torch.testing.assert_close(probe_logits(root / "fsdp"), probe_logits(root / "single"), rtol=1e-3, atol=1e-3)


def test_fsdp2_final_folder_is_a_normal_one(runs):
    root, fsdp, _ = runs
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    out = root / "fsdp"
    config = json.loads((out / "config.json").read_text())
    # The sharded model's class is torch's generated FSDP subclass; the folder must name ours.
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_text.Llama4ForCausalLM"
    assert not list(out.glob("_fsdp*.py"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model) is Llama4ForCausalLM
    assert model.generate(torch.tensor([[4096, 100, 101]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_fsdp2_resumes_from_a_sharded_checkpoint(runs):
    root, fsdp, _ = runs
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    resumed = _launch("--per_device_train_batch_size", "4", "--save_strategy", "no", "--resume_from_checkpoint",
                      str(root / "fsdp" / "checkpoint-2"), "--output_dir", str(root / "resumed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(root / "resumed")[-1] == pytest.approx(_losses(root / "fsdp")[-1], rel=1e-5)
    torch.testing.assert_close(probe_logits(root / "resumed"), probe_logits(root / "fsdp"), rtol=1e-5, atol=1e-5)


def test_a_launch_that_would_train_unsharded_is_refused(tmp_path):
    # use_cpu false on a machine without GPUs: transformers would only warn and let every rank train alone.
    refused = _launch("--per_device_train_batch_size", "4", "--save_strategy", "no", "--use_cpu", "false",
                      "--output_dir", str(tmp_path / "refused"))
    assert refused.returncode != 0
    assert "every rank would train alone" in refused.stderr
    assert not (tmp_path / "refused" / "model.safetensors").exists()


def test_zero3_on_cpu_shards_and_matches_one_process(tmp_path):
    """DeepSpeed ZeRO-3 with the MoE block as a leaf, 2 CPU processes vs one, from the same saved weights
    (ZeRO-3 initialises a preset model partition by partition, so a preset would start from other values)."""
    start = ["--model_name_or_path", str(save_tiny_init(tmp_path / "init")), "--save_strategy", "no"]
    zero3 = _launch(*start, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "zero3"),
                    config=ACCELERATE_CONFIGS / "zero3_moe_cpu.yaml")
    assert zero3.returncode == 0, zero3.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: 45 of 45 parameter tensors sharded; this rank holds" in zero3.stderr + zero3.stdout
    single = single_process(*COMMON, *start,
                             "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr[-3000:]
    assert _losses(tmp_path / "zero3") == pytest.approx(_losses(tmp_path / "single"), rel=1e-4)
    torch.testing.assert_close(probe_logits(tmp_path / "zero3"), probe_logits(tmp_path / "single"), rtol=1e-3, atol=1e-3)
