"""TRL's LM-head statistics on CPU: its tiled `ChunkedLogProbFunction` against `recipes/dense_lm_head.py`, forward
and backward, at the shapes the tiny recipes hand it (one process, same inputs, outputs checked equal first).

    python bench/bench_lm_head.py [--repeats 5] [--threads 1]

Shapes: `sft` = a tiny SFT batch (8 sequences padded to about 300 tokens, hidden 128, vocabulary 6144, log-probs +
entropy + top-1 as SFTTrainer asks); `grpo` = a tiny GRPO batch (64 completions of prompt + 64 tokens, log-probs
only). Prints milliseconds per call and the speed-up (tiled time / dense time), best of `--repeats`.
"""

from __future__ import annotations

import argparse
import time

import torch
from trl.kernels import ChunkedLogProbFunction

from llama4_sparse.recipes.dense_lm_head import dense_token_statistics

SHAPES = {"sft": (2400, 128, 6144, ("log_probs", "entropy", "is_top1")),
          "grpo": (64 * 175, 128, 6144, ("log_probs",))}


def time_call(function, hidden, weight, targets, outputs, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        out = function(hidden, weight, None, targets, 1.0, 32768, None, 1.0, outputs)
        loss = -out[0].sum() + (out[1].sum() if out[1] is not None else 0)
        loss.backward()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    for name, (tokens, width, vocab, outputs) in SHAPES.items():
        torch.manual_seed(0)
        hidden = torch.randn(tokens, width).requires_grad_()
        weight = (torch.randn(vocab, width) / width ** 0.5).requires_grad_()
        targets = torch.randint(0, vocab, (tokens,))
        with torch.no_grad():
            tiled = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, outputs)
            dense = dense_token_statistics(hidden, weight, None, targets, 1.0, 32768, None, 1.0, outputs)
        torch.testing.assert_close(dense[0], tiled[0], atol=1e-5, rtol=1e-5)
        reference = time_call(ChunkedLogProbFunction.apply, hidden, weight, targets, outputs, args.repeats)
        ours = time_call(dense_token_statistics, hidden, weight, targets, outputs, args.repeats)
        results[name] = {"tiled_ms": 1e3 * reference, "dense_ms": 1e3 * ours, "speedup": reference / ours}
        print(f"{name}: {tokens} tokens x vocabulary {vocab}: TRL tiled {1e3 * reference:.0f} ms, dense "
              f"{1e3 * ours:.0f} ms per forward+backward: {reference / ours:.2f}x", flush=True)
    return results


if __name__ == "__main__":
    main()
