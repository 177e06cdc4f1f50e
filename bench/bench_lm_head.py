"""TRL's LM-head statistics on CPU: its tiled `ChunkedLogProbFunction` against `recipes/dense_lm_head.py`, forward
and backward, at the shapes the tiny recipes hand it (one process, same inputs, outputs checked equal first).

    python bench/bench_lm_head.py [--repeats 5] [--threads 1]
    python bench/bench_lm_head.py --sft_steps 60 [--threads 1]   # whole SFT steps, labelled positions vs every position

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
    parser.add_argument("--sft_steps", type=int, default=0,
                        help="instead: time this many steps of the demo's tiny SFT with the LM head scoring only the "
                             "labelled positions (what install() does on CPU) and every position (TRL's CPU default), "
                             "alternating, two runs each")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.sft_steps:
        return sft_steps(args.sft_steps)
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


def sft_steps(steps: int) -> dict:
    """Seconds of `steps` SFT steps of `configs/tiny/sft.yaml` from a fresh tiny model (train_runtime, model building and
    saving left out) with only labelled positions scored and with every position scored, two runs each, alternating."""
    import tempfile
    from pathlib import Path

    import trl.trainer.utils as trl_utils

    from llama4_sparse.recipes import dense_lm_head, sft

    config = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "tiny" / "sft.yaml"
    install, times = dense_lm_head.install, {"labelled positions": [], "every position": []}
    try:
        for mode in list(times) * 2:
            def patched(mode=mode):
                install()
                if mode == "every position":
                    trl_utils._use_triton = lambda device: False
            dense_lm_head.install = patched
            with tempfile.TemporaryDirectory() as tmp:
                trainer_output = sft.main(["--config", str(config), "--output_dir", tmp, "--save_strategy", "no",
                                           "--max_steps", str(steps), "--disable_tqdm", "true", "--logging_steps", "1000"])
            times[mode].append(trainer_output["train_runtime"])
            print(f"{mode}: {steps} SFT steps in {times[mode][-1]:.1f} s", flush=True)
    finally:
        dense_lm_head.install = install
        install()
    best = {mode: min(t) for mode, t in times.items()}
    print(f"speed-up: {best['every position'] / best['labelled positions']:.2f}x (best of two)")
    return best


if __name__ == "__main__":
    main()
