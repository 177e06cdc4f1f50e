"""Run by tests/test_tensor_parallel.py under torchrun (2 processes, gloo): the saved model loaded with
transformers' `tp_plan="auto"` against the same folder loaded whole, on the same tokens."""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from llama4_sparse.modeling_llama4 import Llama4ForCausalLM, Llama4ForConditionalGeneration


def main(folder: str, out_path: str, how: str, kind: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model_class = Llama4ForConditionalGeneration if kind == "multimodal" else Llama4ForCausalLM
    whole = model_class.from_pretrained(folder).eval()
    if how == "tp_plan":
        sharded = model_class.from_pretrained(folder, tp_plan="auto").eval()
    else:  # transformers' newer spelling of the same request
        from transformers.distributed import DistributedConfig

        config = DistributedConfig(tp_size=dist.get_world_size(), tp_plan="auto")
        sharded = model_class.from_pretrained(folder, distributed_config=config).eval()
    vocab = whole.config.get_text_config().vocab_size
    # Every rank must see the same tokens: tensor parallelism splits the model, not the batch.
    tokens = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = whole(tokens).logits
        logits = sharded(tokens).logits
    logits = logits.full_tensor() if isinstance(logits, DTensor) else logits
    # Backward through the sharded model: every gradient, gathered, equals the whole model's.
    probe = torch.randn(vocab, generator=torch.Generator().manual_seed(2))
    (whole(tokens).logits @ probe).sum().backward()
    trained = sharded(tokens).logits
    trained = trained.full_tensor() if isinstance(trained, DTensor) else trained
    (trained @ probe).sum().backward()
    reference = dict(whole.named_parameters())
    grad = 0.0
    for name, param in sharded.named_parameters():
        mine = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        ref = reference[name].grad
        if ref is None and mine is None:
            continue  # the vision tower on text-only tokens
        grad = max(grad, ((mine - ref).abs().max() / ref.abs().max()).item())
    local = {name: list((p.to_local() if isinstance(p, DTensor) else p).shape)
             for name, p in sharded.named_parameters() if "layers.1." in name or name.endswith("lm_head.weight")}
    report = {"rank": rank, "tp_size": sharded.tp_size, "logits": (logits - expected).abs().max().item(),
              "scale": expected.abs().max().item(), "grad": grad, "local_shapes": local}
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
