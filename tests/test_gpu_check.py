"""bench/gpu_check.py runs end to end at tiny widths on the CPU, so the GPU run only changes widths."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gpu_check  # noqa: E402


def test_gpu_check_tiny_on_cpu_checks_parity_speed_and_a_training_step(tmp_path):
    out = tmp_path / "gpu_check.json"
    results = gpu_check.main(["--device", "cpu", "--tiny", "--experts", "4", "--skip", "compile", "--out", str(out)])
    assert out.exists()
    fp32, bf16 = results["parity"]
    assert fp32["dtype"] == "float32" and fp32["max_abs_logit_diff"] < 1e-4 and fp32["greedy_tokens_identical"]
    assert bf16["dtype"] == "bfloat16" and bf16["top1_agreement"] > 0.8
    assert {row["model"] for row in results["speed"]} == {"dense twin", "ours (auto)", "transformers Llama4"}
    assert all(row["prefill_ms"] > 0 and row["decode_ms_per_token"] > 0 for row in results["speed"])
    assert results["training"]["grads_finite"] and results["training"]["expert_bias_moved"]


def test_gpu_check_records_a_failing_check_runs_the_rest_and_exits_nonzero(tmp_path, monkeypatch):
    """On a GPU every minute counts: one check that fails must not lose the others' results."""

    def out_of_memory(*args):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(gpu_check, "check_parity", out_of_memory)
    out = tmp_path / "gpu_check.json"
    with pytest.raises(SystemExit, match="parity failed"):
        gpu_check.main(["--device", "cpu", "--tiny", "--experts", "4", "--skip", "speed", "compile", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["parity"] == {"error": "RuntimeError: CUDA out of memory (simulated)"}
    assert results["training"]["grads_finite"] and results["training"]["expert_bias_moved"]
