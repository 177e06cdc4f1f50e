"""`llama4-eval` / `python -m llama4_sparse.eval`: command line over `eval.evaluate`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .evaluator import evaluate
from .sandbox import SandboxUnavailable
from .report import markdown_table
from .tasks import TASKS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llama4-eval",
        description="MMLU, GSM8K and HumanEval for any causal LM, scored as lm-evaluation-harness 0.4.13 does.",
    )
    p.add_argument("--model", help="local path or hub id of an AutoModelForCausalLM")
    p.add_argument("--tokenizer", help="tokenizer path if not the model's")
    p.add_argument("--tasks", required=True, help=f"comma-separated: {','.join(TASKS)}")
    p.add_argument("--predictions", help="score this JSONL without a model (humaneval: task_id/completion; "
                   "gsm8k*: doc_id/completion)")
    p.add_argument("--data-dir", help="local data in the layout of shared/data/README.md (default: the hub)")
    p.add_argument("--output-dir", help="results.json, results.md, results.png, samples_<task>.jsonl; reruns resume")
    p.add_argument("--limit", type=int, help="first N test documents (per subject for MMLU)")
    p.add_argument("--num-fewshot", type=int, help="override every task's shot count")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, help="override the task's generation length")
    p.add_argument("--mmlu-subjects", help="comma-separated MMLU subjects (default all 57)")
    p.add_argument("--num-samples", type=int, default=1, help="HumanEval samples per problem (pass@k for k <= n)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per HumanEval program")
    p.add_argument("--allow-unsandboxed", action="store_true",
                   help="execute HumanEval programs even when full isolation (bubblewrap) is unavailable; they can "
                   "then read and write your files and use the network. Recorded in results.json")
    p.add_argument("--niah-lengths", help="niah context lengths in tokens, comma-separated (default 1024,2048,4096,8192)")
    p.add_argument("--niah-depths", help="niah needle depths in [0, 1], comma-separated (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--niah-keys", help="niah needle counts (1 = single key, more = distractor keys; default 1,4)")
    p.add_argument("--niah-samples", type=int, default=2, help="niah documents per (keys, length, depth) cell")
    p.add_argument("--niah-digits", type=int, default=7, help="digits of each niah magic number")
    p.add_argument("--niah-seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--no-prefix-cache", action="store_true", help="recompute shared few-shot prefixes per batch")
    p.add_argument("--no-progress", action="store_true")
    return p


def _niah_options(args) -> dict:
    def numbers(text, kind):
        return [kind(v) for v in text.split(",") if v.strip()] if text else None

    return {"lengths": numbers(args.niah_lengths, int), "depths": numbers(args.niah_depths, float),
            "keys": numbers(args.niah_keys, int), "samples": args.niah_samples, "digits": args.niah_digits,
            "seed": args.niah_seed}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.model is None) == (args.predictions is None):
        print("llama4-eval: error: give exactly one of --model or --predictions", file=sys.stderr)
        return 2
    try:
        results = evaluate(
            args.model,
            args.tokenizer,
            tasks=args.tasks,
            data_dir=args.data_dir,
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            batch_size=args.batch_size,
            output_dir=args.output_dir,
            max_new_tokens=args.max_new_tokens,
            predictions=args.predictions,
            device=args.device,
            dtype=args.dtype,
            trust_remote_code=args.trust_remote_code,
            num_samples=args.num_samples,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            mmlu_subjects=args.mmlu_subjects.split(",") if args.mmlu_subjects else None,
            prefix_cache=not args.no_prefix_cache,
            timeout=args.timeout,
            allow_unsandboxed=args.allow_unsandboxed,
            progress=not args.no_progress,
            niah=_niah_options(args),
        )
    except (ValueError, TypeError, OSError, SandboxUnavailable) as e:
        print(f"llama4-eval: error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") != "0":
        return 0
    print(markdown_table(results), end="")
    print(json.dumps(results, sort_keys=True, default=float)[:2000] if args.output_dir is None else
          f"written to {args.output_dir}")
    return 0
