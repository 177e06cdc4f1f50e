"""Sparse-MoE speed: our Llama4ForCausalLM against transformers' Llama4 (same weights), transformers'
Mixtral with grouped_mm experts, and a dense Llama whose FFN width equals shared + one expert.

Shape (issue 2): hidden 512, 4 layers (all MoE, Scout pattern), 8 query / 2 key-value heads, expert
width 1024, top-1, vocabulary 32k. Prefill: one forward over 4 x 512 tokens building the cache and
keeping the last logits (what `generate` does). Decode: batch-1 greedy `generate` of 48 tokens after a
16-token prompt, reported per token. Every model is timed in the same process, round-robin, and the
median of the repeats is reported, because the machine's cores are shared with other jobs.

    python bench/bench_moe.py --experts 16 128 --repeats 7 --markdown bench/bench_moe.md

`--layer` times one FFN layer per kernel; `--skew 1.0 1.5 2.0 --experts 16 32 64 128` the routed experts
alone per CPU kernel as one expert's load grows (where `auto` stops padding); `--compile` eager against
compiled decoding.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM
from transformers import Llama4ForCausalLM as TransformersLlama4ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama4_sparse.modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig  # noqa: E402
from llama4_sparse.modeling_llama4.configuration_llama4 import MOE_IMPLEMENTATIONS  # noqa: E402
from llama4_sparse.modeling_llama4.mlp import Llama4TextMLP  # noqa: E402
from llama4_sparse.modeling_llama4.moe import Llama4TextMoe  # noqa: E402
from llama4_sparse.modeling_llama4.transformers_compat import to_transformers_config  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, EXPERT_WIDTH, VOCAB = 512, 4, 8, 2, 1024, 32000
TWIN_WIDTH = 2 * EXPERT_WIDTH  # shared expert + one routed expert
PROMPT_TOKENS = 16


def our_config(experts: int, implementation: str) -> Llama4TextConfig:
    config = Llama4TextConfig.from_preset(
        "scout",
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=EXPERT_WIDTH,
        intermediate_size_mlp=TWIN_WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HIDDEN // HEADS,
        num_local_experts=experts,
        num_experts_per_tok=1,
        moe_layers=None,
        no_rope_layers=None,
        layer_types=None,
        moe_implementation=implementation,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    return config


def build_models(experts: int, implementation: str) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    ours = Llama4ForCausalLM(our_config(experts, implementation)).eval()
    reference = TransformersLlama4ForCausalLM._from_config(
        to_transformers_config(ours.config), attn_implementation="sdpa"
    ).eval()
    # assign=True: the reference holds the very same tensors, so the weights exist once in memory.
    reference.load_state_dict(ours.state_dict(), strict=True, assign=True)
    mixtral = MixtralForCausalLM(
        MixtralConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=EXPERT_WIDTH,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            num_local_experts=experts,
            num_experts_per_tok=1,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    ).eval()
    mixtral.set_experts_implementation("grouped_mm")
    assert mixtral.config._experts_implementation == "grouped_mm"
    twin = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=TWIN_WIDTH,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    ).eval()
    for model in (reference, mixtral, twin):
        model.config._attn_implementation = "sdpa"
    return {
        "dense twin (Llama, FFN 2048)": twin,
        f"ours ({implementation})": ours,
        "transformers Llama4": reference,
        "transformers Mixtral grouped_mm": mixtral,
    }


def prefill(model: torch.nn.Module, ids: torch.Tensor) -> None:
    model(input_ids=ids, use_cache=True, logits_to_keep=1)


def decode(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )


CLOCKS = {
    "wall": time.perf_counter,
    # CPU time of this process: with one thread, the work done, whatever else shares the cores.
    "cpu": time.process_time,
}


def timed(fn, clock) -> float:
    start = clock()
    fn()
    return clock() - start


def check_parity(models: dict, ids: torch.Tensor, prompt: torch.Tensor, new_tokens: int) -> str:
    """Ours must compute exactly what transformers' Llama4 computes on the same weights."""
    ours = next(m for name, m in models.items() if name.startswith("ours"))
    reference = models["transformers Llama4"]
    sample = ids[:1, :128]
    diff = (ours(input_ids=sample).logits - reference(input_ids=sample).logits).abs().max().item()
    same_tokens = torch.equal(decode(ours, prompt, new_tokens), decode(reference, prompt, new_tokens))
    return (
        f"max |logit diff| vs transformers Llama4 on {sample.shape[1]} tokens: {diff:.2e}; "
        f"greedy tokens identical: {same_tokens}"
    )


def run(experts: int, args) -> list[dict]:
    models = build_models(experts, args.implementation)
    if args.also_grouped_mm:
        models["ours (grouped_mm)"] = models[f"ours ({args.implementation})"]
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (args.batch, args.seq_len), generator=generator)
    prompt = torch.randint(3, VOCAB, (1, PROMPT_TOKENS), generator=generator)
    times = {name: {"prefill": [], "decode": []} for name in models}

    def prepare(name: str) -> torch.nn.Module:
        """The model to time; "ours (grouped_mm)" is our model with its MoE layers switched over."""
        if name.startswith("ours"):
            wanted = "grouped_mm" if name == "ours (grouped_mm)" else args.implementation
            for module in models[name].modules():
                if isinstance(module, Llama4TextMoe):
                    module.implementation = wanted
        return models[name]

    with torch.inference_mode():
        parity = check_parity(models, ids, prompt, 8)
        print(f"[{experts} experts] {parity}", flush=True)
        for name in models:  # warm-up: allocator, oneDNN primitives, first-call paths
            model = prepare(name)
            prefill(model, ids[:, :64])
            decode(model, prompt, 2)
        for repeat in range(args.repeats):
            for name in models:
                if name == "transformers Llama4" and repeat >= args.reference_repeats:
                    continue
                model = prepare(name)
                clock = CLOCKS[args.clock]
                times[name]["prefill"].append(timed(lambda: prefill(model, ids), clock))
                decode_time = timed(lambda: decode(model, prompt, args.new_tokens), clock)
                times[name]["decode"].append(decode_time / args.new_tokens)
            print(f"[{experts} experts] repeat {repeat + 1}/{args.repeats} done", flush=True)

    twin = "dense twin (Llama, FFN 2048)"
    twin_prefill = statistics.median(times[twin]["prefill"])
    twin_decode = statistics.median(times[twin]["decode"])
    rows = []
    for name in models:
        p, d = statistics.median(times[name]["prefill"]), statistics.median(times[name]["decode"])
        rows.append(
            dict(
                experts=experts,
                model=name,
                prefill_ms=p * 1e3,
                prefill_speed=twin_prefill / p,
                decode_ms=d * 1e3,
                decode_speed=twin_decode / d,
                runs=len(times[name]["prefill"]),
                spread=(min(times[name]["prefill"]) * 1e3, max(times[name]["prefill"]) * 1e3),
            )
        )
    rows[0]["parity"] = parity
    del models
    gc.collect()
    return rows


def compile_rows(experts: int, args) -> list[dict]:
    """Batch-1 greedy decoding over transformers' StaticCache, eager against `torch.compile`d decode
    steps (fullgraph, what `generate` does on an accelerator), per token; ours only. The compiled
    step is warmed up by two whole calls first (a window-filling static cache compiles ~3 graphs)."""
    torch.manual_seed(0)
    model = Llama4ForCausalLM(our_config(experts, args.implementation)).eval()
    prompt = torch.randint(3, VOCAB, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    settings = dict(cache_implementation="static")
    candidates = {
        "eager, DynamicCache": dict(disable_compile=True, cache_implementation=None),
        "eager, StaticCache": dict(settings, disable_compile=True),
        "compiled, StaticCache": dict(settings, compile_config=compile_config),
    }
    clock = CLOCKS[args.clock]
    with torch.inference_mode():
        start = clock()
        # Two calls: the first compiles, the second still loads/recompiles graphs (measured: 4 s of 4.4).
        for _ in range(2):
            compiled = generate_with(model, prompt, args.new_tokens, **candidates["compiled, StaticCache"])
        warmup = clock() - start
        eager = generate_with(model, prompt, args.new_tokens, **candidates["eager, StaticCache"])
        same = torch.equal(compiled, eager)
        times = {name: [] for name in candidates}
        for _ in range(args.repeats):
            for name, kwargs in candidates.items():
                times[name].append(timed(lambda: generate_with(model, prompt, args.new_tokens, **kwargs), clock))
    rows = [
        {"experts": experts, "decode": name, "ms_per_token": statistics.median(values) * 1e3 / args.new_tokens}
        for name, values in times.items()
    ]
    rows[0]["note"] = f"compiled tokens identical to eager: {same}; compile warm-up {warmup:.1f} s"
    return rows


def generate_with(model, prompt: torch.Tensor, new_tokens: int, **kwargs) -> torch.Tensor:
    return model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=0, **kwargs,
    )


def compile_table(rows: list[dict]) -> str:
    twin = {r["experts"]: r["ms_per_token"] for r in rows if r["decode"] == "eager, DynamicCache"}
    lines = ["| experts | decode | ms/token (median) | vs eager DynamicCache |", "|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['experts']} | {r['decode']} | {r['ms_per_token']:.2f} | {twin[r['experts']] / r['ms_per_token']:.2f}x |"
        )
    return "\n".join(lines)


def layer_rows(experts: int, args) -> list[dict]:
    """One FFN layer alone, per MoE implementation, forward and forward+backward, against the twin's
    SwiGLU of width 2048: the evidence behind `moe_implementation="auto"`."""
    torch.manual_seed(0)
    clock = CLOCKS[args.clock]
    moe = Llama4TextMoe(our_config(experts, "auto"))
    twin = Llama4TextMLP(HIDDEN, TWIN_WIDTH)
    x = torch.randn(args.batch, args.seq_len, HIDDEN)
    token = torch.randn(1, 1, HIDDEN)
    upstream = torch.randn_like(x)
    # Not "batched": it copies one expert's weights per (token, expert) pair, 13 GB for this prefill.
    implementations = ["loop", "grouped_mm", "padded"] + (["dense"] if experts <= 16 else [])
    candidates = {"twin SwiGLU 2048": (lambda h: twin(h))}
    for implementation in implementations:
        candidates[f"moe {implementation}"] = (lambda h, i=implementation: _moe_with(moe, i, h))
    times = {name: {"forward": [], "train": [], "decode": []} for name in candidates}
    for _ in range(args.repeats):
        for name, fn in candidates.items():
            with torch.inference_mode():
                times[name]["forward"].append(timed(lambda: fn(x), clock))
                times[name]["decode"].append(timed(lambda: [fn(token) for _ in range(20)], clock) / 20)
            times[name]["train"].append(timed(lambda: (fn(x) * upstream).sum().backward(), clock))
    rows = []
    for name in candidates:
        medians = {kind: statistics.median(values) * 1e3 for kind, values in times[name].items()}
        rows.append({"experts": experts, "layer": name, **medians})
    return rows


def _moe_with(moe: Llama4TextMoe, implementation: str, hidden: torch.Tensor) -> torch.Tensor:
    moe.implementation = implementation
    return moe(hidden)[0]


def skewed_routing(num_tokens: int, num_experts: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """(N, 1) top-1 choices: one expert gets `ratio` times the mean count, the others share the rest
    evenly, in a random token order."""
    busiest = round(ratio * num_tokens / num_experts)
    rest, others = num_tokens - busiest, num_experts - 1
    counts = [busiest] + [rest // others + (e < rest % others) for e in range(others)]
    choice = torch.repeat_interleave(torch.arange(num_experts), torch.tensor(counts))
    return choice[torch.randperm(num_tokens, generator=generator)].unsqueeze(1)


def skew_rows(experts: int, args) -> list[dict]:
    """The routed experts alone (no router, no shared expert) per CPU kernel, as the busiest expert's load
    grows: the evidence behind when `auto` pads (`experts._PADDED_MAX_PAIRS_PER_EXPERT`)."""
    torch.manual_seed(0)
    module = Llama4TextMoe(our_config(experts, "auto")).experts
    num_tokens = args.batch * args.seq_len
    x, scores = torch.randn(num_tokens, HIDDEN), torch.rand(num_tokens, 1)
    generator = torch.Generator().manual_seed(1)
    clock = CLOCKS[args.clock]
    rows = []
    for ratio in args.skew:
        index = skewed_routing(num_tokens, experts, ratio, generator)
        times = {name: [] for name in SKEW_KERNELS}
        with torch.inference_mode():
            for name in SKEW_KERNELS:  # warm-up
                module(x, index, scores, name)
            for _ in range(args.repeats):
                for name in SKEW_KERNELS:
                    times[name].append(timed(lambda: module(x, index, scores, name), clock))
        medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        rows.append({"experts": experts, "pairs_per_expert": num_tokens / experts, "ratio": ratio, **medians})
    return rows


SKEW_KERNELS = ("loop", "grouped_mm", "padded")


def skew_table(rows: list[dict]) -> str:
    lines = [
        "| experts | pairs per expert (mean) | busiest / mean | " + " | ".join(f"{k} (ms)" for k in SKEW_KERNELS) + " |",
        "|---|---|---|" + "---|" * len(SKEW_KERNELS),
    ]
    for r in rows:
        cells = " | ".join(f"{r[k]:.1f}" for k in SKEW_KERNELS)
        lines.append(f"| {r['experts']} | {r['pairs_per_expert']:.0f} | {r['ratio']:.2f} | {cells} |")
    return "\n".join(lines)


def layer_table(rows: list[dict], args) -> str:
    lines = [
        f"| experts | layer | forward {args.batch}x{args.seq_len} (ms) | forward+backward (ms) | one token (ms) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['experts']} | {r['layer']} | {r['forward']:.1f} | {r['train']:.1f} | {r['decode']:.3f} |")
    return "\n".join(lines)


def table(rows: list[dict], args) -> str:
    lines = [
        f"| experts | model | prefill {args.batch}x{args.seq_len} (ms, median) | prefill speed vs twin "
        "| decode (ms/token, median) | decode speed vs twin | runs | prefill min..max (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['experts']} | {r['model']} | {r['prefill_ms']:.1f} | {r['prefill_speed']:.2f}x | "
            f"{r['decode_ms']:.2f} | {r['decode_speed']:.2f}x | {r['runs']} | "
            f"{r['spread'][0]:.0f}..{r['spread'][1]:.0f} |"
        )
    return "\n".join(lines)


def machine() -> str:
    load = os.getloadavg()
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--reference-repeats", type=int, default=3, help="repeats for transformers' Llama4 (slow: every expert)"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--implementation", default="auto", choices=list(MOE_IMPLEMENTATIONS))
    parser.add_argument("--also-grouped-mm", action="store_true", help="also time our model with grouped_mm")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall",
        help="wall: elapsed time; cpu: process CPU time (use with --threads 1 on a shared machine)",
    )
    parser.add_argument(
        "--layer", action="store_true",
        help="time one FFN layer per MoE implementation (forward, forward+backward, one token) instead",
    )
    parser.add_argument(
        "--compile", action="store_true",
        help="time our decoding eager vs torch.compile'd steps over a StaticCache instead",
    )
    parser.add_argument(
        "--skew", type=float, nargs="+", default=None, metavar="RATIO",
        help="time the routed experts alone per CPU kernel, the busiest expert at RATIO x the mean load, instead",
    )
    parser.add_argument("--markdown", type=Path, default=None, help="append the results table to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    before = machine()
    if args.layer:
        body = layer_table([row for experts in args.experts for row in layer_rows(experts, args)], args)
        notes = [f"clock: {args.clock}; medians of {args.repeats} repeats"]
    elif args.skew:
        body = skew_table([row for experts in args.experts for row in skew_rows(experts, args)])
        notes = [f"clock: {args.clock}; medians of {args.repeats} repeats, kernels round-robin"]
    elif args.compile:
        rows = [row for experts in args.experts for row in compile_rows(experts, args)]
        body = compile_table(rows)
        notes = [f"{r['experts']} experts: {r['note']}" for r in rows if "note" in r]
        notes.append(f"clock: {args.clock}; medians of {args.repeats} repeats of {args.new_tokens} new tokens")
    else:
        rows = [row for experts in args.experts for row in run(experts, args)]
        body = table(rows, args)
        notes = [
            *[f"{r['experts']} experts: {r['parity']}" for r in rows if "parity" in r],
            f"clock: {args.clock}; speed vs twin = twin time / model time (higher is faster)",
        ]
    report = "\n".join([f"machine at start: {before}", f"machine at end:   {machine()}", *notes, "", body])
    print(report)
    if args.markdown:
        with args.markdown.open("a") as f:
            f.write(f"\n```\n$ python bench/bench_moe.py {' '.join(argv or sys.argv[1:])}\n```\n\n{report}\n")


if __name__ == "__main__":
    main()
