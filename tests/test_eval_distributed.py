"""`accelerate launch` with two processes gives the single-process numbers and samples."""

import json
import shutil
import socket
import subprocess
import sys

import pytest

from llama4_sparse.eval import evaluate
from llama4_sparse.eval.tiny_model import cached_tiny_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate launcher not installed")
def test_two_processes_match_one(tmp_path, shared_data):
    model = cached_tiny_model(shared_data)
    args = ["--model", str(model), "--tasks", "mmlu,gsm8k_cot", "--limit", "3", "--mmlu-subjects",
            "anatomy,virology", "--data-dir", str(shared_data), "--max-new-tokens", "8", "--no-progress"]
    # MULTI_GPU is the launcher mode that starts several processes; without GPUs they run on CPU over gloo.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), "-m", "llama4_sparse.eval"]
    done = subprocess.run([*launch, *args, "--output-dir", str(tmp_path / "two")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    single = evaluate(str(model), tasks=["mmlu", "gsm8k_cot"], limit=3, mmlu_subjects=["anatomy", "virology"],
                      data_dir=shared_data, max_new_tokens=8, output_dir=tmp_path / "one", progress=False)
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["config"]["world_size"] == 2
    assert two["results"] == json.loads(json.dumps(single))

    def samples(run, task):
        rows = [json.loads(x) for x in (tmp_path / run / f"samples_{task}.jsonl").read_text().splitlines()]
        return {str(r["doc_id"]): r for r in rows}

    one, two = samples("one", "mmlu"), samples("two", "mmlu")
    assert one.keys() == two.keys() and len(one) == 6
    for k in one:
        assert one[k]["extracted"] == two[k]["extracted"]
        assert max(abs(a - b) for a, b in zip(one[k]["loglikelihoods"], two[k]["loglikelihoods"])) < 1e-4
    one, two = samples("one", "gsm8k_cot"), samples("two", "gsm8k_cot")
    assert {k: v["output"] for k, v in one.items()} == {k: v["output"] for k, v in two.items()}
