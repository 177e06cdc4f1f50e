"""The per-token log-probabilities TRL's trainers take from their LM head, computed in one matmul on CPU.

TRL 1.16 scores every trainer's tokens (SFT's loss, GRPO's and DPO's log-probabilities) through
`ChunkedLogProbFunction`, which never materialises the `[tokens, vocab]` logits: it folds vocabulary tiles into
running log-sum-exp statistics. On a GPU that is a Triton kernel over the labelled positions only. On a CPU the same
fold runs as torch ops, 1024 vocabulary entries at a time, over every position (prompt and padding included), and
its backward recomputes the tiles: on the tiny model that is about 70% of an SFT step (torch profiler, one thread).

Where the logits fit (`MAX_DENSE_LOGITS`), `dense_token_statistics` computes the same outputs from the full logits,
and autograd differentiates them. `install()` routes TRL's calls through `token_statistics`, which takes the dense
path only off Triton devices and within that size, and TRL's own function otherwise. It also lets TRL pass only the
labelled positions on CPU, as it does on Triton devices: TRL scores every position elsewhere so that tile shapes stay
fixed for compiling backends (Neuron), which a CPU does not need, and the prompt and padding positions it would score
are most of an SFT or GRPO batch.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger("recipes")

# Logits (tokens x vocabulary) the dense path materialises at most: 2^26 fp32 values are 256 MiB, and backward keeps
# about three such tensors. Above it (a long batch of a 200k-vocabulary model), TRL's tiled function keeps memory flat.
MAX_DENSE_LOGITS = 1 << 26


def dense_token_statistics(hidden, weight, bias, targets, temperature: float, chunk_size: int | None = None,
                           final_logit_softcapping=None, logit_scale: float = 1.0, outputs=("log_probs",)):
    """`(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)` per row of `hidden` (`[N, H]`) for the
    `targets` (`[N]`) under the LM head `weight` (`[V, H]`) and `bias`, each optional output `None` unless named in
    `outputs`: the values of TRL's `ChunkedLogProbFunction`, with its arguments (same transform: scale, soft cap,
    temperature; `chunk_size`, its vocabulary tile, has no use here)."""
    logits = F.linear(hidden, weight, bias).float() * logit_scale
    if final_logit_softcapping is not None:
        logits = final_logit_softcapping * torch.tanh(logits / final_logit_softcapping)
    if temperature != 1.0:  # SFT's case: a [tokens, vocab] division saved
        logits = logits / temperature
    log_softmax = logits.log_softmax(-1)
    log_probs = log_softmax.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(log_softmax.exp() * log_softmax).sum(-1) if "entropy" in outputs else None
    with torch.no_grad():  # TRL marks these three non-differentiable
        log_sum_sq_probs = torch.logsumexp(2 * log_softmax, -1) if "log_sum_sq_probs" in outputs else None
        mean_logits = logits.mean(-1) if "mean_logits" in outputs else None
        # argmax picks the first maximum, as TRL's kernel does: a tie with an earlier token is not a top-1 prediction.
        is_top1 = logits.argmax(-1) == targets if "is_top1" in outputs else None
    return log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1


def _tiled():
    from trl.kernels import ChunkedLogProbFunction

    return ChunkedLogProbFunction


class token_statistics:  # noqa: N801 - stands in for TRL's autograd Function, called as `.apply(...)`
    """TRL's `_ChunkedLogProbFunction.apply` signature: the dense statistics on CPU where the logits fit, TRL's tiled
    function elsewhere."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0,
              outputs=("log_probs",)):
        from trl.kernels.chunked_logprob import _use_triton

        if _use_triton(hidden.device) or hidden.shape[0] * weight.shape[0] > MAX_DENSE_LOGITS:
            return _tiled().apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping,
                                  logit_scale, outputs)
        return dense_token_statistics(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping,
                                      logit_scale, outputs)


def _scores_labelled_positions_only(device: torch.device) -> bool:
    """TRL's choice of passing only the labelled positions to the LM head (its `_use_triton`), made on CPU too."""
    from trl.kernels.chunked_logprob import _use_triton

    return device.type == "cpu" or _use_triton(device)


def install() -> None:
    """Route TRL's LM-head statistics through `token_statistics`, and score only labelled positions on CPU
    (idempotent). Raises if this TRL has no such hooks, so a TRL upgrade that moves them is seen rather than
    silently slow."""
    import trl.trainer.utils as trl_utils

    for hook in ("_ChunkedLogProbFunction", "_use_triton"):
        if not hasattr(trl_utils, hook):
            raise RuntimeError(f"trl.trainer.utils.{hook} is gone in this TRL version; update "
                               "recipes/dense_lm_head.py to its new LM-head hooks")
    trl_utils._ChunkedLogProbFunction = token_statistics
    trl_utils._use_triton = _scores_labelled_positions_only
