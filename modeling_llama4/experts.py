"""The routed experts of the Llama 4 mixture of experts, and the kernels that compute them.

`Llama4TextExperts` holds E SwiGLU feed-forwards fused as the official checkpoints store them
(`gate_up_proj (E, D, 2F)` = [gate | up], `down_proj (E, F, D)`) and is otherwise stateless: weights
in, activations out. Its forward takes the router's choice, `top_k_index (N, k)` and `top_k_scores
(N, k)`, and returns for each token `sum over its k experts e of expert_e(score_e * x)`: the score
scales the expert's *input*, as in the official models.

One vocabulary names the kernels, and `select_kernel` is the one place that picks among them:

* "grouped_mm": (token, expert) pairs sorted by expert, then two grouped matrix products
  (`torch.nn.functional.grouped_mm`). Nothing is read back to the host and every shape is static, so
  it needs no device sync and compiles with `fullgraph=True` (torch compiles it for bfloat16 only).
  CUDA bfloat16 on sm80+, CPU float32/bfloat16/float16, rows of 16-byte multiples.
* "loop": the portable fallback, any device and dtype: the same sorted pairs, one matrix product per
  expert that received tokens (it reads the per-expert counts on the host); a single token goes
  straight through its k experts, with nothing to sort.
* "padded" (CPU, several threads): each expert's pairs padded to the busiest expert's count, then
  two batched products over all experts. Every CPU matrix product is a parallel region that waits for
  all threads; on a balanced load `bench/bench_moe.py --skew` measures this 1.15-1.4x faster than the
  per-expert products at 16-128 experts, and slower once the padding adds more than about a quarter.
* "batched": each pair through its expert's weights gathered on the device (one copy of an
  expert's weights per pair): static shapes, no host sync, for a few tokens (decoding) where
  grouped_mm does not compile (CPU).
* "dense": the reference formula, every expert on every token with unselected experts scored 0:
  E times the work, static shapes.
* "auto" (default) resolves to one of them, see `select_kernel`.

Why not transformers' experts interface (`use_experts_implementation`, `ALL_EXPERTS_FUNCTIONS`): its
kernels multiply the routing weight into each expert's *output*; Llama 4 multiplies it into the
*input*, and SwiGLU is not linear, so they compute a different function. `LLAMA4_EXPERTS_KERNELS` is
a registry of the same shape (a transformers `GeneralInterface`: name -> function of the hidden
states, `top_k_index`, `top_k_scores`), plus the two weights, passed in so that the function holds
no state; `LLAMA4_EXPERTS_KERNELS.register("grouped_mm", fn)` swaps in another kernel.

Every use of the weights happens inside `Llama4TextExperts.forward`, so that wrappers of the module
(PEFT's `target_parameters` LoRA on `gate_up_proj`/`down_proj`) reach every kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers.utils.generic import GeneralInterface

from .configuration_llama4 import Llama4TextConfig

_GROUPED_MM_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# "auto" pads experts to the busiest one's count only while that adds at most a quarter to the routed
# work: `bench/bench_moe.py --skew` (2 threads) has padded and loop break even at 1.2-1.4x at 16-128
# experts; padded is 1.15-1.4x faster on a balanced load and 1.1-1.6x slower at 2x.
_MAX_PADDING = 1.25


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the expert products run in: autocast's when it is on for x's device, else the weights'."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def grouped_mm_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's grouped_mm takes these operands: CPU float32/bfloat16/float16, CUDA bfloat16 from
    sm80 (torch's documented support), and rows that are multiples of 16 bytes everywhere."""
    if not hasattr(F, "grouped_mm"):
        return False
    dtype = compute_dtype(x, weight)
    if x.is_cuda:
        if dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0):
            return False
    elif x.device.type != "cpu" or dtype not in _GROUPED_MM_CPU_DTYPES:
        return False
    row_bytes = torch.finfo(dtype).bits // 8
    return all((n * row_bytes) % 16 == 0 for n in weight.shape[1:])


def count_tokens(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) int64: how many (token, expert) pairs went to each expert. A scatter rather than
    `bincount`, whose output length depends on the values (no static shape for compilers)."""
    flat = top_k_index.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def select_kernel(implementation: str, x: torch.Tensor, top_k_index: torch.Tensor, gate_up_proj: torch.Tensor) -> str:
    """The kernel name for `config.moe_implementation` on these inputs; the only place that chooses.

    "auto" (measurements in bench/bench_moe.md):
    * off the CPU: `grouped_mm` (no host sync, static shapes), else `loop`;
    * while compiling: `grouped_mm` on CUDA, else `batched` for at most E pairs (decoding) and `dense`
      for more;
    * on the CPU: `padded` when several threads run and padding adds at most `_MAX_PADDING - 1` to the
      routed work (a skewed router, or a few decoded tokens, falls back), else `loop`, which computes
      only the experts that received tokens (torch's CPU grouped_mm visits every expert: 2-10x slower
      than the loop for one decoded token at 128 experts, and no faster for a prompt).
    """
    runs = grouped_mm_runs(x, gate_up_proj)
    if implementation == "grouped_mm" and not runs:
        raise ValueError(
            "moe_implementation='grouped_mm' needs torch.nn.functional.grouped_mm (torch >= 2.9), inputs of the "
            "weights' dtype (float32/bfloat16/float16 on CPU, bfloat16 on CUDA sm80+), and hidden_size / "
            "intermediate_size whose rows are multiples of 16 bytes; use moe_implementation='loop' or 'auto'"
        )
    if implementation != "auto":
        return implementation
    if torch.compiler.is_compiling():
        # torch's compiled grouped_mm takes only CUDA bfloat16; elsewhere a few pairs gather their
        # experts' weights, many run every expert.
        if runs and x.is_cuda:
            return "grouped_mm"
        return "batched" if top_k_index.numel() <= gate_up_proj.shape[0] else "dense"
    if x.device.type != "cpu":
        return "grouped_mm" if runs else "loop"
    pairs, num_experts = top_k_index.numel(), gate_up_proj.shape[0]
    if torch.get_num_threads() > 1 and num_experts <= _MAX_PADDING * pairs:
        counts = count_tokens(top_k_index, num_experts)
        if num_experts * int(counts.max()) <= _MAX_PADDING * pairs:
            return "padded"
    return "loop"


@dataclass
class TokenOrder:
    """The (token, expert) pairs sorted by expert, tokens in sequence order within an expert."""

    pair: torch.Tensor  # (P,) position of each sorted pair in the flattened (N, k) selection
    token: torch.Tensor  # (P,) the token of each sorted pair
    tokens_per_expert: torch.Tensor  # (E,) int64

    @classmethod
    def sort(cls, top_k_index: torch.Tensor, num_experts: int) -> "TokenOrder":
        # A stable sort keeps a fixed accumulation order (deterministic results).
        pair = top_k_index.reshape(-1).argsort(stable=True)
        return cls(pair, pair // top_k_index.shape[-1], count_tokens(top_k_index, num_experts))

    def gather(self, x: torch.Tensor, top_k_scores: torch.Tensor) -> torch.Tensor:
        """(P, D): each sorted pair's token scaled by its score."""
        return x.index_select(0, self.token) * top_k_scores.reshape(-1, 1).index_select(0, self.pair)

    def scatter(self, rows: torch.Tensor, top_k: int) -> torch.Tensor:
        """(N, D): the sorted pairs' outputs summed back per token (a copy to unique rows, then a sum
        over k: deterministic, unlike an index_add of the pairs). Every pair's row is written exactly
        once, so the copy needs no zero-filled buffer, and with one expert per token it is the output."""
        per_pair = torch.empty_like(rows).index_copy_(0, self.pair, rows)
        return per_pair if top_k == 1 else per_pair.view(-1, top_k, rows.shape[-1]).sum(1)


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def grouped_mm_experts(x, top_k_index, top_k_scores, gate_up_proj, down_proj) -> torch.Tensor:
    order = TokenOrder.sort(top_k_index, gate_up_proj.shape[0])
    offsets = order.tokens_per_expert.cumsum(0).to(torch.int32)
    routed_in = order.gather(x, top_k_scores).to(gate_up_proj.dtype)
    hidden = _swiglu(F.grouped_mm(routed_in, gate_up_proj, offs=offsets))
    return order.scatter(F.grouped_mm(hidden, down_proj, offs=offsets), top_k_index.shape[-1])


class _LoopGroupedMatmul(torch.autograd.Function):
    """`grouped_mm` semantics, one `mm` per non-empty expert, for devices/dtypes without the kernel.

    A custom backward so that the weight gradient is written once into one (E, K, N) tensor; autograd
    through per-expert `weight[e]` views would materialise a full-size zero tensor per expert.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.counts = counts
        out = x.new_empty(x.shape[0], weight.shape[-1])
        start = 0
        for e, count in enumerate(counts):
            if count:
                torch.mm(x[start : start + count], weight[e], out=out[start : start + count])
                start += count
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_out.new_empty(x.shape) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        start = 0
        for e, count in enumerate(ctx.counts):
            if not count:
                if grad_w is not None:
                    grad_w[e].zero_()
                continue
            rows = slice(start, start + count)
            if grad_x is not None:
                torch.mm(grad_out[rows], weight[e].t(), out=grad_x[rows])
            if grad_w is not None:
                torch.mm(x[rows].t(), grad_out[rows], out=grad_w[e])
            start += count
        return grad_x, grad_w, None


def loop_experts(x, top_k_index, top_k_scores, gate_up_proj, down_proj) -> torch.Tensor:
    if x.shape[0] == 1:
        # One token (batch-1 decoding): its k experts are distinct, so there is nothing to sort or gather.
        out = None
        for slot, expert in enumerate(top_k_index[0].tolist()):
            routed_in = (x * top_k_scores[:, slot : slot + 1]).to(gate_up_proj.dtype)
            routed_out = _swiglu(routed_in @ gate_up_proj[expert]) @ down_proj[expert]
            out = routed_out if out is None else out + routed_out
        return out
    order = TokenOrder.sort(top_k_index, gate_up_proj.shape[0])
    counts = order.tokens_per_expert.tolist()
    routed_in = order.gather(x, top_k_scores).to(gate_up_proj.dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (routed_in, gate_up_proj, down_proj)):
        hidden = _swiglu(_LoopGroupedMatmul.apply(routed_in, gate_up_proj, counts))
        routed_out = _LoopGroupedMatmul.apply(hidden, down_proj, counts)
    else:
        # Without autograd, each expert's whole SwiGLU in one go (decoding: per-call overhead counts).
        routed_out = routed_in.new_empty(routed_in.shape[0], down_proj.shape[-1])
        start = 0
        for e, count in enumerate(counts):
            if count:
                rows = slice(start, start + count)
                torch.mm(_swiglu(routed_in[rows] @ gate_up_proj[e]), down_proj[e], out=routed_out[rows])
                start += count
    return order.scatter(routed_out, top_k_index.shape[-1])


def padded_experts(x, top_k_index, top_k_scores, gate_up_proj, down_proj) -> torch.Tensor:
    """Pair p (token t, expert e) goes to row `e * capacity + (p's rank among e's pairs)` of an (E * capacity, D)
    block, capacity being the busiest expert's count; padding rows stay zero and are never read back. The rows
    are written from, and read back into, the selection's own (token, k) order, so no sorted copy of the tokens
    is made on the way in or out (two passes over the activations fewer than gather/scatter)."""
    num_experts, (num_tokens, top_k) = gate_up_proj.shape[0], top_k_index.shape
    order = TokenOrder.sort(top_k_index, num_experts)
    counts = order.tokens_per_expert
    capacity = int(counts.max())
    expert = top_k_index.reshape(-1).index_select(0, order.pair)
    first = counts.cumsum(0) - counts
    sorted_row = expert * capacity + torch.arange(expert.numel(), device=x.device) - first.index_select(0, expert)
    row = torch.empty_like(sorted_row).index_copy_(0, order.pair, sorted_row)
    routed_in = (x.unsqueeze(1) * top_k_scores.unsqueeze(-1)).reshape(-1, x.shape[-1]).to(gate_up_proj.dtype)
    block = routed_in.new_zeros(num_experts * capacity, routed_in.shape[-1]).index_copy(0, row, routed_in)
    hidden = _swiglu(torch.bmm(block.view(num_experts, capacity, -1), gate_up_proj))
    out = torch.bmm(hidden, down_proj).reshape(num_experts * capacity, -1).index_select(0, row)
    return out if top_k == 1 else out.view(num_tokens, top_k, -1).sum(1)


def batched_experts(x, top_k_index, top_k_scores, gate_up_proj, down_proj) -> torch.Tensor:
    """Each (token, expert) pair through a copy of its expert's weights, gathered on the device: static
    shapes and no host sync, at the cost of copying one expert's weights per pair (for a few pairs)."""
    num_tokens, top_k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    routed_in = (x.unsqueeze(1) * top_k_scores.unsqueeze(-1)).reshape(-1, 1, x.shape[-1]).to(gate_up_proj.dtype)
    hidden = _swiglu(torch.bmm(routed_in, gate_up_proj.index_select(0, flat)))
    return torch.bmm(hidden, down_proj.index_select(0, flat)).view(num_tokens, top_k, -1).sum(1)


def dense_experts(x, top_k_index, top_k_scores, gate_up_proj, down_proj) -> torch.Tensor:
    num_experts = gate_up_proj.shape[0]
    dense_scores = top_k_scores.new_zeros(x.shape[0], num_experts).scatter(1, top_k_index, top_k_scores)
    routed_in = (x.unsqueeze(0) * dense_scores.t().unsqueeze(-1)).to(gate_up_proj.dtype)
    return torch.bmm(_swiglu(torch.bmm(routed_in, gate_up_proj)), down_proj).sum(0)


class Llama4ExpertsKernels(GeneralInterface):
    """Kernel name -> `fn(x (N, D), top_k_index (N, k), top_k_scores (N, k), gate_up_proj, down_proj)`
    returning (N, D); the weights arrive already in the compute dtype."""

    _global_mapping = {
        "grouped_mm": grouped_mm_experts,
        "loop": loop_experts,
        "padded": padded_experts,
        "batched": batched_experts,
        "dense": dense_experts,
    }


LLAMA4_EXPERTS_KERNELS = Llama4ExpertsKernels()


class Llama4TextExperts(nn.Module):
    """E SwiGLU experts stored fused, as the official checkpoints do: `gate_up_proj` holds [gate | up]."""

    def __init__(self, config: Llama4TextConfig):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.hidden_size = config.hidden_size
        self.expert_dim = config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_size, 2 * self.expert_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.expert_dim, self.hidden_size))
        nn.init.normal_(self.gate_up_proj, std=config.initializer_range)
        nn.init.normal_(self.down_proj, std=config.initializer_range)

    def forward(
        self,
        x: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_scores: torch.Tensor,
        implementation: str = "auto",
    ) -> torch.Tensor:
        """(N, D) tokens, their k experts and scores -> (N, D), in the compute dtype."""
        # Under autocast the products run in its dtype like the nn.Linear layers around them (gradients
        # still reach the full-precision parameters through the cast).
        dtype = compute_dtype(x, self.gate_up_proj)
        gate_up_proj, down_proj = self.gate_up_proj.to(dtype), self.down_proj.to(dtype)
        kernel = LLAMA4_EXPERTS_KERNELS[select_kernel(implementation, x, top_k_index, gate_up_proj)]
        return kernel(x, top_k_index, top_k_scores, gate_up_proj, down_proj)
