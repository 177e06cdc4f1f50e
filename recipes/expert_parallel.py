"""Expert parallelism composed with FSDP2 in the recipes (`expert_parallel_size: N` with an FSDP2 launch).

The world's W ranks form a 2-D mesh (dp_mod_ep = W / N, ep = N):

- every MoE layer's routed experts are split over `ep` (each rank holds E / N experts; tokens travel by
  all-to-all, `modeling_llama4/expert_parallel.py`) and those shards are FSDP2-sharded again over `dp_mod_ep`;
- everything else (attention, router, shared expert, dense MLPs, embeddings, lm_head) is FSDP2-sharded over all W
  ranks, one unit per decoder layer plus the root, as with plain FSDP2.

Why `fully_shard` is applied here and not by accelerate: accelerate 1.16's FSDP2 plugin shards the whole model over
one mesh (its `ParallelismConfig` knows dp/tp/cp/sp, no ep), so it cannot give the experts their own mesh. When the
model is already an `FSDPModule`, accelerate leaves it as it is and does the rest (optimizer, gradient clipping
grouped by mesh, full or sharded state dicts).

Gradient scale: the loss the trainer backpropagates on each rank is that rank's share of a global mean that FSDP
completes by averaging over W. A dense parameter's gradient is averaged over W by its reduce-scatter. An expert
shard already receives, through the all-to-all, the gradients of the tokens of all N ranks of its ep group, and its
reduce-scatter runs over only W / N ranks, so its divide factor is set to W, not W / N: otherwise experts would train
with N times the learning rate.

Loading: accelerate's `fsdp_cpu_ram_efficient_loading` means rank 0's full weights are broadcast into every rank's
shards, and other ranks may hold only meta placeholders (transformers 5.25 on 2 CPU processes still loaded real
weights on rank 1: the log says how many placeholders each rank had). The split and the sharding work on either;
then rank 0's full state dict is broadcast into the shards, as accelerate does for plain FSDP2.

Saving: the expert weights are DTensors on the 2-D mesh, so a full state dict (`full_tensor`) holds all E experts
under the official names and shapes: the final folder is a normal checkpoint, and sharded checkpoints
(torch.distributed.checkpoint) record every shard.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from llama4_sparse.modeling_llama4.experts import Llama4TextExperts
from llama4_sparse.modeling_llama4.expert_parallel import ExpertParallelExperts, apply_expert_parallel

logger = logging.getLogger("recipes")

FIX = ("launch with an FSDP2 accelerate config, e.g. recipes/accelerate_configs/fsdp2_ep_cpu.yaml (2 CPU processes) "
       "or fsdp2_ep.yaml (GPUs)")


def check_expert_parallel(trainer, expert_parallel_size: int) -> None:
    """Refuse an `expert_parallel_size` the launch cannot honour, naming the fix."""
    if expert_parallel_size < 1:
        raise ValueError(f"expert_parallel_size must be >= 1, got {expert_parallel_size}")
    if expert_parallel_size == 1:
        return
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        raise ValueError(f"expert_parallel_size {expert_parallel_size} needs that many processes; {FIX}")
    if not trainer.is_fsdp_enabled or not trainer.accelerator.is_fsdp2:
        raise ValueError(f"expert_parallel_size {expert_parallel_size} composes with FSDP2 only (DDP would reduce "
                         f"each rank's distinct experts as if they were replicas); {FIX}")
    if world % expert_parallel_size:
        raise ValueError(f"expert_parallel_size {expert_parallel_size} must divide the number of processes "
                         f"({world})")
    if trainer.accelerator.state.fsdp_plugin.activation_checkpointing:
        raise ValueError("expert_parallel_size > 1 with fsdp_activation_checkpointing is not supported; use the "
                         "recipe's gradient_checkpointing instead")
    experts = {m.experts.num_experts for m in trainer.model.modules()
               if isinstance(getattr(m, "experts", None), Llama4TextExperts)}
    if any(isinstance(m, Llama4TextExperts) for m in trainer.model.modules()) and not experts:
        # PEFT's parameter adapters (lora_experts) wrap the experts module: splitting it would leave them behind.
        raise ValueError("expert_parallel_size > 1 cannot split experts that carry LoRA adapters; set "
                         "lora_experts: false (LoRA on attention and the shared expert still trains) or "
                         "use_peft: false")
    if not experts:
        raise ValueError("expert_parallel_size > 1, but the model has no routed experts to split")
    for count in experts:
        if count % expert_parallel_size:
            raise ValueError(f"{count} experts cannot be split evenly over expert_parallel_size "
                             f"{expert_parallel_size}; use a size that divides {count}")


def shard_with_expert_parallel(trainer, expert_parallel_size: int) -> nn.Module:
    """Apply EP and FSDP2 to `trainer.model` in place, before `trainer.train()` prepares it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    check_expert_parallel(trainer, expert_parallel_size)
    world = dist.get_world_size()
    plugin = trainer.accelerator.state.fsdp_plugin
    device = trainer.accelerator.device
    mesh = init_device_mesh(device.type, (world // expert_parallel_size, expert_parallel_size),
                            mesh_dim_names=("dp_mod_ep", "ep"))
    # All W ranks for the dense parameters, flattened from the same root so every DTensor shares one device tree.
    dense_mesh = mesh._flatten("dp")
    model = trainer.model
    if trainer.accelerator.mixed_precision != "no":
        # fp32 master weights, as accelerate's FSDP2 preparation gives; the policy casts for compute.
        for param in model.parameters():
            if param.requires_grad and param.is_floating_point():
                param.data = param.data.to(torch.float32)
    full = model.state_dict() if dist.get_rank() == 0 else {}
    placeholders = sum(p.is_meta for p in model.parameters())
    # Not in any state dict, so not broadcast: kept through to_empty (transformers gives every rank real values).
    keep = {f"{owner}.{name}".lstrip("."): buffer.detach().clone() for owner, module in model.named_modules()
            for name, buffer in module._buffers.items()
            if buffer is not None and name in module._non_persistent_buffers_set}
    apply_expert_parallel(model, mesh=mesh["ep"])
    kwargs = {"reshard_after_forward": plugin.reshard_after_forward,
              "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy()}
    for module in model.modules():
        if isinstance(module, ExpertParallelExperts):
            fully_shard(module, mesh=mesh["dp_mod_ep"], **kwargs)
            module.set_gradient_divide_factor(float(world))
    layer_names = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layer_names:
            fully_shard(module, mesh=dense_mesh, **kwargs)
    fully_shard(model, mesh=dense_mesh, **kwargs)
    model.to_empty(device=device)
    for name, buffer in keep.items():
        owner, _, attribute = name.rpartition(".")
        model.get_submodule(owner).register_buffer(attribute, buffer.to(device), persistent=False)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    logger.info("rank %d: %d of %d parameter tensors were meta placeholders; every shard now holds rank 0's weights",
                dist.get_rank(), placeholders, len(list(model.parameters())))
    logger.info("expert parallel: %d experts per rank over ep=%d, experts FSDP2-sharded over dp_mod_ep=%d, the rest "
                "over all %d ranks", next(m.num_local_experts for m in model.modules()
                                          if isinstance(m, ExpertParallelExperts)),
                expert_parallel_size, world // expert_parallel_size, world)
    return model
