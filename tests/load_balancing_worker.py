"""Run by tests/test_load_balancing_distributed.py under torchrun (2 processes, gloo): each rank trains on its own
half of a batch; the expert counts summed over the ranks, and the aux-loss-free bias updated from them, must equal
one model that saw the whole batch."""

import json
import sys

import torch
import torch.distributed as dist

from llama4_sparse.modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
from llama4_sparse.modeling_llama4.moe import Llama4TextMoe, sync_tokens_per_expert, update_expert_bias


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = Llama4TextConfig.from_preset("tiny", moe_load_balancing="aux_loss_free", moe_bias_update_rate=0.01)
    whole = Llama4ForCausalLM(config).train()
    model = Llama4ForCausalLM(config).train()
    model.load_state_dict(whole.state_dict())
    # Different text on each rank, so the local loads differ.
    batch = torch.randint(0, config.vocab_size, (2 * world, 32), generator=torch.Generator().manual_seed(1))
    whole(batch).logits.sum().backward()
    model(batch[rank * 2:(rank + 1) * 2]).logits.sum().backward()

    layers = [m for m in model.modules() if isinstance(m, Llama4TextMoe)]
    reference = [m for m in whole.modules() if isinstance(m, Llama4TextMoe)]
    local = [m.tokens_per_expert.clone() for m in layers]
    sync_tokens_per_expert(model)
    report = {
        "local_differs": any(not torch.equal(c, r.tokens_per_expert) for c, r in zip(local, reference)),
        "counts_equal": all(torch.equal(m.tokens_per_expert, r.tokens_per_expert) for m, r in zip(layers, reference)),
    }
    update_expert_bias(model)
    update_expert_bias(whole)
    report["bias_equal"] = all(torch.equal(m.expert_bias, r.expert_bias) for m, r in zip(layers, reference))
    report["bias_moved"] = all(bool(m.expert_bias.abs().max() > 0) for m in layers)
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
