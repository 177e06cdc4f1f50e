"""Tensor parallelism through transformers on 2 CPU processes (gloo): a saved folder loaded with `tp_plan="auto"`
(the config's `base_model_tp_plan`) holds half of every attention projection, shared-expert/dense MLP and routed
expert on each rank, and its logits and gradients equal the whole model's (text model, and the text tower of the
multimodal model)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama4_sparse.modeling_llama4 import (
    Llama4Config,
    Llama4ForCausalLM,
    Llama4ForConditionalGeneration,
    Llama4TextConfig,
)

REPO = Path(__file__).resolve().parents[1]


def test_tp_plan_names_real_parameters_and_modules():
    model = Llama4ForCausalLM(Llama4TextConfig.from_preset("tiny"))
    names = {name for name, _ in model.model.named_parameters()} | {name for name, _ in model.model.named_modules()}
    for pattern in model.config.base_model_tp_plan:
        layer_wise = {pattern.replace("*", str(i)) for i in range(model.config.num_hidden_layers)}
        assert layer_wise & names, f"{pattern} matches nothing in the backbone"
    assert set(model.config.base_model_pp_plan) <= {name for name, _ in model.model.named_children()}


@pytest.mark.parametrize("how, kind", [("tp_plan", "text"), ("distributed_config", "text"), ("tp_plan", "multimodal")])
def test_tp_plan_auto_on_two_processes_equals_one(tmp_path, how, kind):
    torch.manual_seed(0)
    text = Llama4TextConfig.from_preset("tiny")
    if kind == "multimodal":  # the text tower inside it is sharded by the same plan; the vision tower stays whole
        model = Llama4ForConditionalGeneration(Llama4Config.from_preset("tiny", text_config=text))
    else:
        model = Llama4ForCausalLM(text)
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(REPO / "tests" / "tensor_parallel_worker.py"), str(tmp_path / "model"), str(out), how, kind],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads(Path(f"{out}.{rank}").read_text())
        assert report["tp_size"] == 2
        assert report["logits"] <= 1e-5 * report["scale"] + 1e-6
        assert report["grad"] <= 1e-5  # relative to the largest gradient of each parameter
        prefix = "language_model." if kind == "multimodal" else ""
        shapes = {name.removeprefix(prefix): shape for name, shape in report["local_shapes"].items()}
        # tiny: 4 query heads and 2 key/value heads of 32, hidden 128, 4 experts of width 256, vocab 6144.
        assert shapes["model.layers.1.self_attn.q_proj.weight"] == [64, 128]
        assert shapes["model.layers.1.self_attn.k_proj.weight"] == [32, 128]
        assert shapes["model.layers.1.self_attn.o_proj.weight"] == [128, 64]
        assert shapes["model.layers.1.feed_forward.experts.gate_up_proj"] == [4, 128, 256]
        assert shapes["model.layers.1.feed_forward.experts.down_proj"] == [4, 128, 128]
        assert shapes["model.layers.1.feed_forward.router.weight"] == [4, 128]  # whole: routing is the same
        assert shapes["lm_head.weight"] == [3072, 128]
