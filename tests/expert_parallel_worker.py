"""Run by tests/test_expert_parallel.py under torchrun (2 processes, gloo): the expert-parallel model on this rank's
half of a batch against the whole model on the whole batch, computed on every rank from the same weights."""

import json
import sys

import torch
import torch.distributed as dist

from llama4_sparse.modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
from llama4_sparse.modeling_llama4.expert_parallel import ExpertParallelExperts, apply_expert_parallel, gather_experts


def main(out_path: str, implementation: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = Llama4TextConfig.from_preset("tiny", moe_implementation=implementation)
    reference = Llama4ForCausalLM(config).eval()
    model = Llama4ForCausalLM(config).eval()
    model.load_state_dict(reference.state_dict())
    apply_expert_parallel(model)

    batch = torch.randint(0, config.vocab_size, (2 * world, 24), generator=torch.Generator().manual_seed(1))
    probe = torch.randn(config.vocab_size, generator=torch.Generator().manual_seed(2))
    mine = batch[rank * 2:(rank + 1) * 2]

    ref_logits = reference(batch).logits
    (ref_logits @ probe).sum().backward()
    logits = model(mine).logits
    (logits @ probe).sum().backward()

    report = {"rank": rank, "logits": (logits - ref_logits[rank * 2:(rank + 1) * 2]).abs().max().item()}
    ref_params = dict(reference.named_parameters())
    dense, expert = 0.0, 0.0
    for name, param in model.named_parameters():
        grad = param.grad
        if "experts." in name:
            module = model.get_submodule(name.rsplit(".", 1)[0])
            own = slice(module.first_expert, module.first_expert + module.num_local_experts)
            ref = ref_params[name].grad[own]
            expert = max(expert, ((grad - ref).abs().max() / ref.abs().max()).item())
        else:
            dist.all_reduce(grad)  # the data-parallel reduction EP leaves to the rest of the model
            ref = ref_params[name].grad
            dense = max(dense, ((grad - ref).abs().max() / ref.abs().max()).item())
    report.update(dense_grad=dense, expert_grad=expert)
    layer = next(m for m in model.modules() if isinstance(m, ExpertParallelExperts))
    gate_up, _ = gather_experts(layer)
    full = reference.get_submodule(next(n for n, m in model.named_modules() if m is layer))
    report["gathered"] = (gate_up - full.gate_up_proj).abs().max().item()
    report["local_experts"] = layer.num_local_experts
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
