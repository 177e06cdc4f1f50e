"""Long-context prefill: time and peak memory from 4k to 512k tokens, this package against transformers'
Llama4ForCausalLM on the same weights, plus decode memory after a long prefill.

Model: the `tiny` preset (3.1 M parameters, chunk 256, NoPE every 4th layer), fp32, random weights
(seed 0), random token ids. Each (implementation, length) runs in a fresh process: one forward over
the whole prompt with `logits_to_keep=1` (what `generate` does), no gradients, sdpa. Peak memory is
the process's peak resident set (`ru_maxrss`) and the part of it above the loaded model. The parent
watches each child's resident set and kills it past `--memory-cap-gb` (recorded as "over cap"), so a
quadratic run cannot take the machine down. Last-token logits of both implementations are saved and
compared wherever both finished.

    python bench/bench_long_context.py --lengths 4096 16384 65536 262144 524288 --implementations ours transformers
    python bench/bench_long_context.py --decode 262144 --new-tokens 32

`--prefill-chunk N` sets `config.prefill_chunk_size` of our model (0: the whole prompt in one slice).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llama4_sparse.modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig  # noqa: E402
from llama4_sparse.modeling_llama4.transformers_compat import to_transformers_config  # noqa: E402


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build(implementation: str, prefill_chunk: int | None, max_length: int):
    config = Llama4TextConfig.from_preset("tiny", max_position_embeddings=max(4096, max_length))
    config._attn_implementation = "sdpa"
    if prefill_chunk is not None:
        config.prefill_chunk_size = prefill_chunk if prefill_chunk > 0 else 1 << 40
    torch.manual_seed(0)
    model = Llama4ForCausalLM(config).eval()
    if implementation == "ours":
        return model
    from transformers import Llama4ForCausalLM as TransformersLlama4ForCausalLM

    reference = TransformersLlama4ForCausalLM._from_config(to_transformers_config(config), attn_implementation="sdpa")
    reference.load_state_dict(model.state_dict(), strict=True)
    del model
    return reference.eval()


def _cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    model = _build(args.implementation, args.prefill_chunk, args.length)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 4096, (1, args.length), generator=generator)
    loaded = _peak_mb()
    result = {"implementation": args.implementation, "length": args.length, "loaded_mb": round(loaded, 1)}
    with torch.no_grad():
        start = time.perf_counter()
        if args.new_tokens:
            out = model(ids, use_cache=True, logits_to_keep=1)
        else:
            out = model(ids, use_cache=False, logits_to_keep=1)
        result["prefill_s"] = round(time.perf_counter() - start, 2)
        result["peak_rss_mb"] = round(_peak_mb(), 1)
        result["peak_above_model_mb"] = round(_peak_mb() - loaded, 1)
        if args.logits_out:
            torch.save(out.logits[0, -1].clone(), args.logits_out)
        if args.new_tokens:
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            result["cache_mb_after_prefill"] = round(_cache_bytes(cache) / 2**20, 1)
            token = out.logits[:, -1:].argmax(-1)
            del out
            before = _peak_mb()
            start = time.perf_counter()
            for _ in range(args.new_tokens):
                step = model(token, cache=cache, use_cache=True) if args.implementation == "ours" else model(
                    token, past_key_values=cache, use_cache=True
                )
                token = step.logits[:, -1:].argmax(-1)
            result["decode_ms_per_token"] = round(1000 * (time.perf_counter() - start) / args.new_tokens, 1)
            result["cache_mb_after_decode"] = round(_cache_bytes(cache) / 2**20, 1)
            result["peak_rss_mb_after_decode"] = round(_peak_mb(), 1)
            result["decode_peak_growth_mb"] = round(_peak_mb() - before, 1)
    return result


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def run_one(implementation: str, length: int, args, logits_dir: Path) -> dict:
    logits_out = logits_dir / f"{implementation}-{length}.pt"
    command = [
        sys.executable, __file__, "--worker", "--implementation", implementation, "--length", str(length),
        "--threads", str(args.threads), "--logits-out", str(logits_out), "--new-tokens", str(args.new_tokens),
    ]
    if args.prefill_chunk is not None and implementation == "ours":
        command += ["--prefill-chunk", str(args.prefill_chunk)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cap = args.memory_cap_gb * 1024
    over = False
    start = time.perf_counter()
    while process.poll() is None:
        if _rss_mb(process.pid) > cap:
            process.kill()
            over = True
        time.sleep(0.05)
    stdout, stderr = process.communicate()
    if over:
        return {"implementation": implementation, "length": length, "status": f"over {args.memory_cap_gb} GB cap",
                "killed_after_s": round(time.perf_counter() - start, 1)}
    if process.returncode != 0:
        tail = stderr.strip().splitlines()[-1:] or ["?"]
        return {"implementation": implementation, "length": length, "status": f"failed: {tail[0]}"}
    result = json.loads(stdout.strip().splitlines()[-1])
    result["status"] = "ok"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536, 262144])
    parser.add_argument("--implementations", nargs="+", default=["ours", "transformers"], choices=["ours", "transformers"])
    parser.add_argument("--decode", type=int, nargs="*", default=None, help="prompt lengths for the decode-memory run")
    parser.add_argument("--new-tokens", type=int, default=0)
    parser.add_argument("--prefill-chunk", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-cap-gb", type=float, default=16.0)
    parser.add_argument("--skip-transformers-after-cap", action="store_true", default=True)
    parser.add_argument("--output", type=Path, default=None, help="append the JSON lines here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--implementation", default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--logits-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return

    if args.decode is not None:
        args.lengths = args.decode
        args.new_tokens = args.new_tokens or 32
    logits_dir = Path(tempfile.mkdtemp(prefix="bench_long_context_"))
    capped = set()
    for length in args.lengths:
        for implementation in args.implementations:
            if implementation in capped:
                row = {"implementation": implementation, "length": length, "status": "skipped (a shorter length was over the cap)"}
            else:
                row = run_one(implementation, length, args, logits_dir)
                if row["status"] != "ok":
                    capped.add(implementation)
            print(json.dumps(row), flush=True)
            if args.output:
                with open(args.output, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
        paths = [logits_dir / f"{name}-{length}.pt" for name in ("ours", "transformers")]
        if all(path.exists() for path in paths):
            ours, theirs = (torch.load(path) for path in paths)
            row = {"length": length, "max_abs_logit_diff": float((ours - theirs).abs().max()),
                   "same_argmax": bool(ours.argmax() == theirs.argmax())}
            print(json.dumps(row), flush=True)
            if args.output:
                with open(args.output, "a") as handle:
                    handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
