"""GPU check of the sparse MoE at Scout widths, no downloads, a few minutes on one GPU.

1. parity: our Llama4ForCausalLM against transformers' on the very same tensors, fp32 and bf16, two
   layers at Scout widths (hidden 5120, 40/8 heads, expert width 8192, 16 experts; layer 0 chunked
   RoPE, layer 1 NoPE), vocabulary cut to 8192: max |logit diff| and greedy tokens.
2. speed and peak memory, bf16, one MoE layer at Scout widths with 16 and with 128 experts: ours
   (`auto`: grouped_mm on CUDA) vs transformers' Llama 4 (every expert on every token) vs a dense
   Llama twin whose FFN width is shared + one expert (16384); prefill of 1 x 2048 tokens and batch-1
   greedy decoding of 32 tokens.
3. one training step (forward, backward, SGD) of ours at Scout widths, 16 experts, bf16, with
   aux-loss-free balancing updated at the step: time, peak memory, finite gradients.
4. a torch.compile'd (fullgraph) decode over a StaticCache equals eager decoding, small widths.

A check that fails is recorded as {"error": ...} and the others still run; `--out` is rewritten after
every check, and the exit status is non-zero if any failed.

    python bench/gpu_check.py --out gpu_check.json          # on a GPU
    python bench/gpu_check.py --device cpu --tiny           # the same code paths at tiny widths (CI)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM
from transformers import Llama4ForCausalLM as TransformersLlama4ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama4_sparse.modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig  # noqa: E402
from llama4_sparse.modeling_llama4.moe import Llama4TextMoe, update_expert_bias  # noqa: E402
from llama4_sparse.modeling_llama4.transformers_compat import to_transformers_config  # noqa: E402

WIDTHS = {
    "scout": dict(hidden_size=5120, intermediate_size=8192, num_attention_heads=40, num_key_value_heads=8,
                  head_dim=128, vocab_size=8192),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, vocab_size=256),
}
SIZES = {  # tokens: parity prompt, prefill length, decoded tokens, training tokens, timing repeats
    "scout": dict(parity=512, prefill=2048, decode=32, train=1024, repeats=3),
    "tiny": dict(parity=24, prefill=64, decode=8, train=32, repeats=2),
}


def our_config(widths: dict, experts: int, layers: int, **overrides) -> Llama4TextConfig:
    config = Llama4TextConfig.from_preset(
        "scout", **widths, num_local_experts=experts, num_experts_per_tok=1, num_hidden_layers=layers,
        no_rope_layers=[1, 0][:layers], layer_types=None, moe_layers=None,
        intermediate_size_mlp=2 * widths["intermediate_size"], bos_token_id=1, eos_token_id=2, pad_token_id=0,
        **overrides,
    )
    config._attn_implementation = "sdpa"
    return config


def build(config: Llama4TextConfig, device: str, dtype: torch.dtype, reference: bool):
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in `dtype` directly: 128 Scout experts are 32 GiB in bf16
    try:
        with torch.device(device):
            ours = Llama4ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.device(device):
        theirs = None
        if reference:
            theirs = TransformersLlama4ForCausalLM._from_config(
                to_transformers_config(config), attn_implementation="sdpa", dtype=dtype
            ).eval()
            # assign=True: both models hold the very same tensors, so the weights exist once.
            theirs.load_state_dict(ours.state_dict(), strict=True, assign=True)
    return ours, theirs


def twin_for(config: Llama4TextConfig, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    twin = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=2 * config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    with torch.device(device):
        return LlamaForCausalLM._from_config(twin, attn_implementation="sdpa", dtype=dtype).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def greedy(model, prompt: torch.Tensor, new_tokens: int, **kwargs) -> torch.Tensor:
    return model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=0, **kwargs,
    )


def check_parity(args, widths, sizes) -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        config = our_config(widths, 16 if not args.tiny else 4, layers=2)
        ours, theirs = build(config, args.device, dtype, reference=True)
        ids = torch.randint(3, config.vocab_size, (1, sizes["parity"]), generator=torch.Generator().manual_seed(1))
        ids = ids.to(args.device)
        with torch.inference_mode():
            a, b = ours(ids).logits.float(), theirs(ids).logits.float()
            same = torch.equal(greedy(ours, ids[:, :16], 8), greedy(theirs, ids[:, :16], 8))
        rows.append(dict(
            dtype=str(dtype).removeprefix("torch."), max_abs_logit_diff=(a - b).abs().max().item(),
            logit_scale=b.abs().max().item(), top1_agreement=(a.argmax(-1) == b.argmax(-1)).float().mean().item(),
            greedy_tokens_identical=same,
        ))
        del ours, theirs
        peak_reset(args.device)
    return rows


def check_speed(args, widths, sizes) -> list[dict]:
    rows = []
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    for experts in args.experts:
        config = our_config(widths, experts, layers=1)
        ours, theirs = build(config, args.device, dtype, reference=True)
        twin_model = twin_for(config, args.device, dtype)
        models = {"dense twin": twin_model, "ours (auto)": ours, "transformers Llama4": theirs}
        generator = torch.Generator().manual_seed(2)
        ids = torch.randint(3, config.vocab_size, (1, sizes["prefill"]), generator=generator).to(args.device)
        prompt = ids[:, :16]
        times = {name: {"prefill": [], "decode": [], "peak_gib": None} for name in models}
        with torch.inference_mode():
            for name, model in models.items():  # warm-up (kernels, allocator)
                model(ids[:, :64], use_cache=True, logits_to_keep=1)
                greedy(model, prompt, 2)
            for _ in range(sizes["repeats"]):
                for name, model in models.items():
                    peak_reset(args.device)
                    times[name]["prefill"].append(
                        timed(lambda: model(ids, use_cache=True, logits_to_keep=1), args.device)
                    )
                    times[name]["peak_gib"] = peak_gib(args.device)
                    times[name]["decode"].append(
                        timed(lambda: greedy(model, prompt, sizes["decode"]), args.device) / sizes["decode"]
                    )
        twin = {kind: statistics.median(times["dense twin"][kind]) for kind in ("prefill", "decode")}
        for name in models:
            prefill, decode = (statistics.median(times[name][kind]) for kind in ("prefill", "decode"))
            rows.append(dict(
                experts=experts, model=name, prefill_ms=prefill * 1e3, prefill_vs_twin=twin["prefill"] / prefill,
                decode_ms_per_token=decode * 1e3, decode_vs_twin=twin["decode"] / decode,
                peak_gib_during_prefill=times[name]["peak_gib"],
            ))
        del models, ours, theirs, twin_model
        peak_reset(args.device)
    return rows


def check_training(args, widths, sizes) -> dict:
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    config = our_config(widths, 16 if not args.tiny else 4, layers=1, moe_load_balancing="aux_loss_free")
    model, _ = build(config, args.device, dtype, reference=False)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    ids = torch.randint(3, config.vocab_size, (1, sizes["train"]), generator=torch.Generator().manual_seed(3))
    ids = ids.to(args.device)
    peak_reset(args.device)

    def step():
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        update_expert_bias(model)
        optimizer.zero_grad(set_to_none=False)
        return loss

    loss = step()  # warm-up
    grads_finite = all(torch.isfinite(p.grad).all().item() for p in model.parameters() if p.grad is not None)
    seconds = timed(step, args.device)
    moe = next(m for m in model.modules() if isinstance(m, Llama4TextMoe))
    return dict(
        loss=loss.item(), grads_finite=grads_finite, step_seconds=seconds, peak_gib=peak_gib(args.device),
        expert_bias_moved=bool(torch.count_nonzero(moe.expert_bias).item()), tokens=sizes["train"],
    )


def check_compile(args) -> dict:
    """Small widths: a compiled (fullgraph) static-cache decode equals eager, across a chunk boundary."""
    widths = dict(WIDTHS["tiny"], vocab_size=512)
    config = our_config(widths, 4, layers=2, attention_chunk_size=16)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, _ = build(config, args.device, dtype, reference=False)
    prompt = torch.randint(3, 512, (1, 10), generator=torch.Generator().manual_seed(4)).to(args.device)
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True
    with torch.inference_mode():
        eager = greedy(model, prompt, 24, cache_implementation="static", disable_compile=True)
        start = time.perf_counter()
        compiled = greedy(model, prompt, 24, cache_implementation="static", compile_config=compile_config)
        seconds = time.perf_counter() - start
    return dict(identical_tokens=torch.equal(eager, compiled), compile_and_decode_seconds=seconds)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny widths: the same code paths in seconds (CI, CPU)")
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--skip", nargs="*", default=[], choices=["parity", "speed", "training", "compile"])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        parser.error("Scout widths need a GPU; on the CPU pass --tiny")
    widths, sizes = WIDTHS["tiny" if args.tiny else "scout"], SIZES["tiny" if args.tiny else "scout"]
    started = time.perf_counter()
    results = dict(
        device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        torch=torch.__version__, widths="tiny" if args.tiny else "scout",
    )
    checks = {
        "parity": lambda: check_parity(args, widths, sizes),
        "speed": lambda: check_speed(args, widths, sizes),
        "training": lambda: check_training(args, widths, sizes),
        "compile": lambda: check_compile(args),
    }
    failed = []
    for name, check in checks.items():
        if name in args.skip:
            continue
        t = time.perf_counter()
        # Device time is scarce: a check that fails (an unsupported kernel, out of memory) is recorded and
        # the others still run, and the results are written after every check so a timeout keeps them.
        try:
            results[name] = check()
        except Exception as error:  # noqa: BLE001 - reported below and turned into a failing exit
            traceback.print_exc()
            results[name] = {"error": f"{type(error).__name__}: {error}"}
            failed.append(name)
            peak_reset(args.device)
        print(f"[{time.perf_counter() - t:.0f} s] {name}: {json.dumps(results[name], indent=1)}", flush=True)
        results["total_seconds"] = time.perf_counter() - started
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
    results["total_seconds"] = time.perf_counter() - started
    print(f"total {results['total_seconds']:.0f} s")
    if failed:
        raise SystemExit(f"gpu_check: {', '.join(failed)} failed (errors recorded in the results)")
    return results


if __name__ == "__main__":
    main()
