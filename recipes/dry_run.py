"""`--dry_run`: what a recipe would train and roughly how much GPU memory it needs, before renting GPUs.

The model is built on the meta device (no memory), LoRA is applied as the run would apply it, and
the per-GPU memory is estimated from the parameter dtypes and the accelerate config's sharding:

* every parameter costs its dtype size; a trainable one also its gradient and AdamW's two moments
  (both in the parameter's dtype; PEFT keeps LoRA adapters in float32);
* FSDP full shard / ZeRO-3 divide all of that by the number of processes, SHARD_GRAD_OP / ZeRO-2
  the gradients and moments, ZeRO-1 the moments only; DDP divides nothing;
* sharded (FSDP full shard / ZeRO-3) weights are gathered for compute one layer at a time: the largest layer in
  full, twice (the next one is prefetched), plus its unsharded gradients in backward ("gathered"). For a MoE layer
  that is every routed expert: Maverick's 128 experts are ~30 GiB in bf16 per layer;
* with `expert_parallel_size N` (recipes/expert_parallel.py) each rank holds E / N experts of every MoE layer:
  the sharded states are the same (experts over N x W / N ranks, the rest over W), but a gathered MoE layer holds
  only E / N experts; without sharding of the weights the experts are still split N ways;
* activations under gradient checkpointing: every layer's input is kept (layers x tokens x hidden)
  plus one layer being recomputed (about 4 x hidden + 6 x expert width per token, top-k experts).
  The fused LM head computes logits in chunks, so they are left out. Treat this term as a lower bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from peft import get_peft_model

from .common import MODEL_CLASSES, RecipeArguments, lora_config, model_config

GIB = 1024**3
# Accelerate/DeepSpeed sharding -> which states are split across processes.
_SHARDS = {"none": (), "grads_and_optimizer": ("gradients", "optimizer"), "optimizer": ("optimizer",),
           "all": ("weights", "gradients", "optimizer")}


@dataclass
class Sharding:
    processes: int
    strategy: str
    description: str


def read_accelerate_config(path: str | None) -> Sharding:
    if path is None:
        return Sharding(1, "none", "one process")
    config = yaml.safe_load(Path(path).read_text())
    processes = int(config.get("num_processes", 1))
    kind = config.get("distributed_type", "NO")
    if kind == "FSDP":
        fsdp = config.get("fsdp_config", {})
        if fsdp.get("fsdp_version", 1) == 2:
            full = fsdp.get("fsdp_reshard_after_forward", True) in (True, "FULL_SHARD", "true")
        else:
            full = fsdp.get("fsdp_sharding_strategy", "FULL_SHARD") in ("FULL_SHARD", 1, "1")
        strategy = "all" if full else "grads_and_optimizer"
        return Sharding(processes, strategy, f"FSDP{fsdp.get('fsdp_version', 1)} over {processes} processes")
    if kind == "DEEPSPEED":
        stage = int(config.get("deepspeed_config", {}).get("zero_stage", 0))
        strategy = {0: "none", 1: "optimizer", 2: "grads_and_optimizer", 3: "all"}[stage]
        return Sharding(processes, strategy, f"DeepSpeed ZeRO-{stage} over {processes} processes")
    return Sharding(processes, "none", f"{kind} over {processes} processes (each holds a full replica)")


def _check_expert_parallel(recipe_args: RecipeArguments, model_args, sharding: Sharding, config) -> int:
    size = recipe_args.expert_parallel_size
    if size == 1:
        return 1
    experts = config.get_text_config().num_local_experts
    if not sharding.description.startswith("FSDP2"):
        raise ValueError(f"expert_parallel_size {size} composes with FSDP2 only; pass --accelerate_config "
                         f"recipes/accelerate_configs/fsdp2_ep.yaml (got: {sharding.description})")
    if sharding.processes % size or experts % size:
        raise ValueError(f"expert_parallel_size {size} must divide the number of processes ({sharding.processes}) "
                         f"and of experts ({experts})")
    if model_args.use_peft and recipe_args.lora_experts:
        raise ValueError("expert_parallel_size > 1 cannot split experts that carry LoRA adapters; set "
                         "lora_experts: false (LoRA on attention and the shared expert still trains)")
    return size


def _is_expert(name: str) -> bool:
    return ".experts." in name


def _gathered_bytes(model, ep_size: int, train_bytes_of) -> int:
    """2 x the largest shard unit (decoder or vision layer) in full, plus its trainable gradients."""
    layer_names = set(getattr(model, "_no_split_modules", None) or [])
    largest = 0
    for module in model.modules():
        if type(module).__name__ not in layer_names:
            continue
        weights = grads = 0
        for name, param in module.named_parameters():
            share = ep_size if _is_expert(name) else 1
            weights += train_bytes_of(param) / share
            grads += (train_bytes_of(param) if param.requires_grad else 0) / share
        largest = max(largest, 2 * weights + grads)
    return largest


def _activation_bytes(text_config, batch: int, length: int, dtype_bytes: int) -> int:
    tokens = batch * length
    kept = text_config.num_hidden_layers * tokens * text_config.hidden_size
    width = max(text_config.intermediate_size * (text_config.num_experts_per_tok + 1), text_config.intermediate_size_mlp)
    working = tokens * (4 * text_config.hidden_size + 3 * width)
    return (kept + working) * dtype_bytes


def dry_run(recipe_args: RecipeArguments, training_args, model_args, method: str) -> dict:
    """Parameter counts and a per-GPU memory estimate; printed, and returned for tests."""
    config = model_config(recipe_args, model_args)
    dtype = torch.float32 if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    with torch.device("meta"):
        model = MODEL_CLASSES[recipe_args.model_class](config).to(dtype)
        base_total = sum(p.numel() for p in model.parameters())
        peft = lora_config(recipe_args, model_args, "SEQ_CLS" if method == "reward" else "CAUSAL_LM")
        if peft is not None:
            model = get_peft_model(model, peft)
    parameters = list(model.parameters())
    total = sum(p.numel() for p in parameters)
    trainable = [p for p in parameters if p.requires_grad]
    # PEFT casts adapters to float32 when the run starts (autocast_adapter_dtype).

    def size_of(param) -> int:
        return param.numel() * (4 if peft is not None and param.requires_grad else param.element_size())

    train_bytes = sum(size_of(p) for p in trainable)
    frozen_bytes = sum(p.numel() * p.element_size() for p in parameters if not p.requires_grad)

    sharding = read_accelerate_config(recipe_args.accelerate_config)
    ep_size = _check_expert_parallel(recipe_args, model_args, sharding, config)
    split = _SHARDS[sharding.strategy]
    per_gpu = {
        "weights": frozen_bytes + train_bytes,
        "gradients": train_bytes,
        "optimizer": 2 * train_bytes,
    }
    per_gpu = {k: v / (sharding.processes if k in split else 1) for k, v in per_gpu.items()}
    if ep_size > 1:
        sharding.description += f", routed experts split over ep={ep_size}"
        if "weights" not in split:  # the experts' weights are split N ways even when the rest is replicated
            per_gpu["weights"] -= sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                                      if _is_expert(n)) * (1 - 1 / ep_size)
    if "weights" in split:
        per_gpu["gathered"] = _gathered_bytes(model, ep_size, size_of)
    length = getattr(training_args, "max_length", None) or 1024
    sequences = training_args.per_device_train_batch_size * (2 if method in ("dpo", "reward") else 1)
    per_gpu["activations"] = _activation_bytes(config.get_text_config(), sequences, length, 2 if dtype != torch.float32 else 4)
    report = {
        "model": type(model.get_base_model() if peft is not None else model).__name__,
        "method": method,
        "total_parameters": total,
        "base_parameters": base_total,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "processes": sharding.processes,
        "sharding": sharding.description,
        "expert_parallel_size": ep_size,
        "memory_gib": {k: v / GIB for k, v in per_gpu.items()},
    }
    report["memory_gib"]["total"] = sum(report["memory_gib"].values())
    _print(report, recipe_args, model_args)
    return report


def _print(report: dict, recipe_args: RecipeArguments, model_args) -> None:
    source = model_args.model_name_or_path or f"preset {recipe_args.model_preset}"
    lora = f"LoRA r={model_args.lora_r}{' incl. routed experts' if recipe_args.lora_experts else ''}" if model_args.use_peft else "full fine-tune"
    share = 100 * report["trainable_parameters"] / report["total_parameters"]
    memory = report["memory_gib"]
    print(f"dry run: {report['method']} on {report['model']} ({source}), {lora}")
    print(f"base parameters:      {report['base_parameters']:,}")
    print(f"total parameters:     {report['total_parameters']:,}")
    print(f"trainable parameters: {report['trainable_parameters']:,} ({share:.4f}%)")
    print(f"accelerate: {report['sharding']}")
    print("memory per GPU (GiB): " + ", ".join(f"{k} {v:,.1f}" for k, v in memory.items() if k != "total")
          + f"; total ~{memory['total']:,.1f}")
