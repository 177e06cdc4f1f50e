"""What the multi-process recipe tests share: the environment and arguments of a short tiny SFT run, a single-process
run to compare a launch with, and readers of what a run wrote (logged history, logits on a fixed probe)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from llama4_sparse.modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
from llama4_sparse.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "configs" / "tiny"
ACCELERATE_CONFIGS = REPO / "recipes" / "accelerate_configs"
SFT = REPO / "recipes" / "sft.py"
# Worked chains at lr 3e-3: the data and step size the distributed tolerances were set on (sft.yaml's demo
# defaults mix in sketches at lr 1e-3).
COMMON = ["--config", str(TINY / "sft.yaml"), "--terse_chain_share", "0", "--learning_rate", "3e-3",
          "--num_train_examples", "32", "--prompt_style", "plain",
          "--logging_steps", "1", "--disable_tqdm", "true", "--warmup_steps", "0", "--lr_scheduler_type",
          "constant", "--max_steps", "3", "--seed", "0"]


def env() -> dict:
    # One thread per process: two ranks on a 2-core CI machine would otherwise oversubscribe it.
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def accelerate_launch(config: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["accelerate", "launch", "--config_file", str(config), str(SFT), *args],
                          env=env(), capture_output=True, text=True, timeout=600)


def single_process(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SFT), *args], env=env(), capture_output=True, text=True, timeout=600)


def history(run: Path, key: str) -> list[float]:
    """`key` at every logged training step (the end-of-training summary left out)."""
    log = json.loads((run / "trainer_state.json").read_text())["log_history"]
    return [h[key] for h in log if key in h and "train_runtime" not in h]


def probe_logits(run: Path) -> torch.Tensor:
    probe = torch.tensor([list(range(4096, 4100)) + list(range(100, 160))])
    with torch.no_grad():
        return Llama4ForCausalLM.from_pretrained(run)(probe).logits


def save_tiny_init(folder: Path) -> Path:
    """A seeded tiny model and the tokenizer in one folder, for runs that must start from the same saved weights
    (a sharded launch initialises a preset model partition by partition, so a preset would start elsewhere)."""
    torch.manual_seed(0)
    Llama4ForCausalLM(Llama4TextConfig.from_preset("tiny")).save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    return folder
