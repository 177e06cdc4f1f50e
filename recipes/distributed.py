"""What `accelerate launch` asked for is what the recipes train with: FSDP2 also on CPU, never a silent fallback.

Two gaps in the pinned stack, both seen with `recipes/accelerate_configs/fsdp2_cpu.yaml` on 2 CPU processes:

- accelerate 1.15 turns a launch's FSDP request into FSDP only for accelerator devices (MULTI_GPU, MULTI_XPU,
  ...). On CPU the state stays MULTI_CPU, and the Trainer wraps the model in DDP: a replica on every rank, no
  sharding, no error. PyTorch's `fully_shard` itself runs on CPU over gloo, so `enable_fsdp_on_cpu` promotes the
  MULTI_CPU state to FSDP when the launch asked for it, exactly as accelerate does for GPUs; the rest (wrapping
  per decoder layer, gathering the full state dict for saving, sharded optimizer checkpoints) is accelerate's.
- with `use_cpu: false` and no GPU, transformers only warns "process group is initialized, but parallel_mode !=
  ParallelMode.DISTRIBUTED" and every rank trains alone on its own batches. `check_parallelism` refuses that and
  any other launch whose FSDP or DeepSpeed request the trainer would not honour.

`ShardingReport` logs, when training starts with several processes, how the model is actually distributed.
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import TrainerCallback
from transformers.training_args import ParallelMode

logger = logging.getLogger("recipes")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def enable_fsdp_on_cpu() -> None:
    """Let an FSDP launch shard on CPU (gloo). Idempotent; a no-op unless the launch asked for FSDP."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if not _env_flag("ACCELERATE_USE_FSDP") or getattr(AcceleratorState.__init__, "_fsdp_on_cpu", False):
        return
    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # Later AcceleratorState() calls copy PartialState's view back in: it must agree.
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    init._fsdp_on_cpu = True
    AcceleratorState.__init__ = init


def check_parallelism(trainer) -> None:
    """Raise when the launch asked for more than one process, FSDP or DeepSpeed and the trainer would do less."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    fix = ("Pair the accelerate config with `use_cpu: true` in the recipe config on a machine without GPUs "
           "(recipes/accelerate_configs/*_cpu.yaml), or run on GPUs.")
    if world > 1 and trainer.args.parallel_mode != ParallelMode.DISTRIBUTED:
        raise ValueError(f"launched {world} processes, but the trainer is not distributed: every rank would train "
                         f"alone on its own batches. {fix}")
    if _env_flag("ACCELERATE_USE_FSDP") and not trainer.is_fsdp_enabled:
        raise ValueError(f"the accelerate config asks for FSDP, but the trainer would train an unsharded replica on "
                         f"every rank. {fix}")
    if _env_flag("ACCELERATE_USE_DEEPSPEED") and not trainer.is_deepspeed_enabled:
        raise ValueError("the accelerate config asks for DeepSpeed, but the trainer would not use it; install "
                         "deepspeed (`pip install deepspeed`) and run on GPUs.")


def _sizes(param) -> tuple[bool, int, int]:
    """(sharded, elements on this rank, elements in all) for a plain, FSDP2 (DTensor) or ZeRO-3 parameter."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        return True, param.to_local().numel(), param.numel()
    if hasattr(param, "ds_tensor"):  # DeepSpeed ZeRO-3 keeps a partition and an empty placeholder
        return True, param.ds_tensor.numel(), param.ds_numel
    return False, param.numel(), param.numel()


class ShardingReport(TrainerCallback):
    """Logs once, at the start of training, whether the parameters are sharded and how much this rank holds."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
            return  # one process: nothing to report
        sizes = [_sizes(p) for p in model.parameters()]
        sharded = sum(s for s, _, _ in sizes)
        local, total = sum(n for _, n, _ in sizes), sum(n for _, _, n in sizes)
        rank = torch.distributed.get_rank()
        logger.info("rank %d: %d of %d parameter tensors sharded; this rank holds %d of %d elements (%.1f%%)",
                    rank, sharded, len(sizes), local, total, 100 * local / max(total, 1))
