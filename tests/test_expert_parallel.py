"""Expert parallelism on 2 CPU processes (gloo): each rank holds half of the experts, tokens travel by all-to-all,
and the forward output and every gradient equal one process holding all experts on the whole batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("implementation", ["loop", "grouped_mm"])
def test_expert_parallel_forward_and_backward_equal_one_process(tmp_path, implementation):
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(REPO / "tests" / "expert_parallel_worker.py"), str(out), implementation],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads(Path(f"{out}.{rank}").read_text())
        assert report["local_experts"] == 2  # the tiny preset's 4 experts over 2 ranks
        assert report["logits"] <= 1e-5
        assert report["dense_grad"] <= 1e-5 and report["expert_grad"] <= 1e-5  # relative to the largest gradient
        assert report["gathered"] == 0.0


def test_frozen_experts_stay_frozen_when_split(tmp_path):
    """LoRA elsewhere freezes the experts: splitting them must not make them trainable again (a one-rank group)."""
    import torch
    import torch.distributed as dist

    from llama4_sparse.modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
    from llama4_sparse.modeling_llama4.expert_parallel import ExpertParallelExperts, apply_expert_parallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = Llama4ForCausalLM(Llama4TextConfig.from_preset("tiny"))
        model.model.layers[1].feed_forward.experts.requires_grad_(False)
        apply_expert_parallel(model)
        split = [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]
        assert [p.requires_grad for p in split[0].parameters()] == [False, False]
        assert all(p.requires_grad for m in split[1:] for p in m.parameters())
    finally:
        dist.destroy_process_group()
