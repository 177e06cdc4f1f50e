"""FSDP2 through `accelerate launch` on 2 CPU processes: the model really is sharded, training matches one process
with the same global batch, sharded checkpoints resume, the final folder is a normal one; a launch that would
silently train unsharded is refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama4_sparse.modeling_llama4 import Llama4ForCausalLM

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "configs" / "tiny"
FSDP2_CPU = REPO / "recipes" / "accelerate_configs" / "fsdp2_cpu.yaml"
COMMON = ["--config", str(TINY / "sft.yaml"), "--num_train_examples", "32", "--prompt_style", "plain",
          "--logging_steps", "1", "--disable_tqdm", "true", "--warmup_steps", "0", "--lr_scheduler_type",
          "constant", "--max_steps", "3", "--seed", "0"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _launch(*args, config=FSDP2_CPU) -> subprocess.CompletedProcess:
    return subprocess.run(["accelerate", "launch", "--config_file", str(config), str(REPO / "recipes" / "sft.py"),
                           *COMMON, *args], env=_env(), capture_output=True, text=True, timeout=600)


def _losses(run: Path) -> list[float]:
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def _logits(run: Path) -> torch.Tensor:
    probe = torch.tensor([list(range(4096, 4100)) + list(range(100, 160))])
    with torch.no_grad():
        return Llama4ForCausalLM.from_pretrained(run)(probe).logits


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    fsdp = _launch("--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "2",
                   "--output_dir", str(root / "fsdp"))
    single = subprocess.run([sys.executable, str(REPO / "recipes" / "sft.py"), *COMMON, "--per_device_train_batch_size",
                             "8", "--save_strategy", "no", "--output_dir", str(root / "single")],
                            env=_env(), capture_output=True, text=True, timeout=600)
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
    torch.testing.assert_close(_logits(root / "fsdp"), _logits(root / "single"), rtol=1e-3, atol=1e-3)


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
    torch.testing.assert_close(_logits(root / "resumed"), _logits(root / "fsdp"), rtol=1e-5, atol=1e-5)


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
    from llama4_sparse.tokenizer import load_tokenizer

    torch.manual_seed(0)
    from llama4_sparse.modeling_llama4 import Llama4TextConfig

    Llama4ForCausalLM(Llama4TextConfig.from_preset("tiny")).save_pretrained(tmp_path / "init")
    load_tokenizer().save_pretrained(tmp_path / "init")
    start = ["--model_name_or_path", str(tmp_path / "init"), "--save_strategy", "no"]
    zero3 = _launch(*start, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "zero3"),
                    config=REPO / "recipes" / "accelerate_configs" / "zero3_moe_cpu.yaml")
    assert zero3.returncode == 0, zero3.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: 45 of 45 parameter tensors sharded; this rank holds" in zero3.stderr + zero3.stdout
    single = subprocess.run([sys.executable, str(REPO / "recipes" / "sft.py"), *COMMON, *start,
                             "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "single")],
                            env=_env(), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    assert _losses(tmp_path / "zero3") == pytest.approx(_losses(tmp_path / "single"), rel=1e-4)
    torch.testing.assert_close(_logits(tmp_path / "zero3"), _logits(tmp_path / "single"), rtol=1e-3, atol=1e-3)
