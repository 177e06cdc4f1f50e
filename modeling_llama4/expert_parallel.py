"""Expert parallelism: the routed experts of every MoE layer split across the ranks of a process group.

`apply_expert_parallel(model, group)` replaces each `Llama4TextExperts` with an `ExpertParallelExperts` that
keeps only this rank's E / world experts (`gate_up_proj (E/world, D, 2F)`, `down_proj (E/world, F, D)`). The
router, the shared expert and everything else stay whole on every rank. A forward:

1. takes the router's choice for the rank's own tokens and scales each (token, expert) pair's input by its score
   (Llama 4 scales the expert *input*);
2. sorts the pairs by expert (so also by the rank that owns it) and sends each rank its pairs with one
   all-to-all (the pair counts go first, in a second, small all-to-all);
3. runs the received pairs through the local experts with the package's expert kernels;
4. sends the results back with the reverse all-to-all and sums each token's k results.

Both all-to-alls are differentiable (`all_to_all_single_autograd`), so the backward pass
returns gradients to the tokens' ranks and leaves each expert's weight gradient on the rank that holds it: with
the same global batch, the forward output and every gradient equal one process holding all experts
(tests/test_expert_parallel.py, 2 processes over gloo).

Given a 1-D `DeviceMesh` instead of a bare process group, the expert weights become `DTensor`s sharded on dim 0
over that mesh: `state_dict`/`full_tensor()`, torch.distributed.checkpoint and FSDP2 (which composes with such
parameters as it does with tensor parallelism) then see all E experts under the official names and shapes, which is
how the recipes save a normal checkpoint (`recipes/expert_parallel.py`). With a bare group the weights are plain
local tensors; gather them with `gather_experts`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from .experts import LLAMA4_EXPERTS_KERNELS, Llama4TextExperts, select_kernel


class ExpertParallelExperts(nn.Module):
    """This rank's share of a `Llama4TextExperts`; same forward signature and result."""

    def __init__(self, experts: Llama4TextExperts, group: dist.ProcessGroup | None = None,
                 mesh: DeviceMesh | None = None):
        super().__init__()
        if mesh is not None:
            if mesh.ndim != 1:
                raise ValueError(f"expert parallelism takes a 1-D mesh (the EP dimension), got {mesh.ndim}-D; pass "
                                 f"e.g. mesh['ep']")
            group = mesh.get_group()
        self.group = group if group is not None else dist.group.WORLD
        self.world = dist.get_world_size(self.group)
        rank = dist.get_rank(self.group)
        self.num_experts = experts.num_experts
        if self.num_experts % self.world:
            raise ValueError(f"{self.num_experts} experts cannot be split evenly over {self.world} ranks; use a "
                             f"world size that divides the number of experts")
        self.num_local_experts = self.num_experts // self.world
        self.first_expert = rank * self.num_local_experts
        own = slice(self.first_expert, self.first_expert + self.num_local_experts)
        local = [experts.gate_up_proj.detach()[own].clone(), experts.down_proj.detach()[own].clone()]
        if mesh is not None:
            local = [DTensor.from_local(w, mesh, [Shard(0)], run_check=False) for w in local]
        # Frozen experts (LoRA elsewhere) stay frozen: a new Parameter would default to trainable.
        self.gate_up_proj, self.down_proj = (nn.Parameter(w, requires_grad=original.requires_grad)
                                             for w, original in zip(local, (experts.gate_up_proj, experts.down_proj)))

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_scores: torch.Tensor,
                implementation: str = "auto") -> torch.Tensor:
        tokens, hidden = x.shape
        top_k = top_k_index.shape[1]
        experts = top_k_index.reshape(-1)
        pairs = (x.unsqueeze(1) * top_k_scores.unsqueeze(-1).to(x.dtype)).reshape(-1, hidden)
        order = torch.argsort(experts, stable=True)
        owner = experts[order] // self.num_local_experts
        send_counts = torch.bincount(owner, minlength=self.world)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()

        received = wait_tensor(all_to_all_single_autograd(pairs[order], recv, send, self.group))
        received_experts = experts.new_empty(sum(recv))
        dist.all_to_all_single(received_experts, experts[order].contiguous(), recv, send, group=self.group)
        local_index = (received_experts - self.first_expert).unsqueeze(1)

        gate_up_proj, down_proj = (_local(w).to(x.dtype) for w in (self.gate_up_proj, self.down_proj))
        kernel = LLAMA4_EXPERTS_KERNELS[select_kernel(implementation, received, local_index, gate_up_proj)]
        # Each received row is one pair already scaled by its score: one expert, weight 1.
        outputs = kernel(received, local_index, torch.ones_like(local_index, dtype=x.dtype), gate_up_proj,
                         down_proj)

        returned = wait_tensor(all_to_all_single_autograd(outputs, send, recv, self.group))
        unsorted = torch.empty_like(returned).index_copy(0, order, returned)
        return unsorted.view(tokens, top_k, hidden).sum(1)


def _local(weight: torch.Tensor) -> torch.Tensor:
    # The kernels compute on this rank's experts; to_local keeps the gradient flowing back into the DTensor.
    return weight.to_local() if isinstance(weight, DTensor) else weight


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup | None = None,
                          mesh: DeviceMesh | None = None) -> nn.Module:
    """Split the routed experts of every MoE layer of `model` across `group` or the 1-D `mesh` (default: the
    world), in place."""
    if not dist.is_initialized():
        raise RuntimeError("expert parallelism needs torch.distributed: initialise a process group first "
                           "(e.g. launch with torchrun or accelerate launch)")
    for module in list(model.modules()):
        if isinstance(getattr(module, "experts", None), Llama4TextExperts):
            module.experts = ExpertParallelExperts(module.experts, group, mesh)
    return model


def gather_experts(experts: ExpertParallelExperts) -> tuple[torch.Tensor, torch.Tensor]:
    """All experts' weights, concatenated from every rank in expert order (for saving in the official layout)."""
    gathered = []
    for weight in (experts.gate_up_proj, experts.down_proj):
        parts = [torch.empty_like(weight) for _ in range(experts.world)]
        dist.all_gather(parts, _local(weight.detach()).contiguous(), group=experts.group)
        gathered.append(torch.cat(parts))
    return gathered[0], gathered[1]
