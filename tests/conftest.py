"""Shared test settings: CPU-only, deterministic, and the path to the real benchmark data."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Real GSM8K/MMLU data, loaded by path (never copied into the repo): LLAMA4_SHARED_DATA or ../shared/data."""
    path = Path(os.environ.get("LLAMA4_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not (path / "gsm8k" / "test.jsonl").exists():
        pytest.skip(f"benchmark data not found at {path}; set LLAMA4_SHARED_DATA")
    return path
