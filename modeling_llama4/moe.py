"""The Llama 4 mixture-of-experts block: a sigmoid top-k router, routed SwiGLU experts, a shared expert.

Routing follows the official models: top-k over the raw router logits, each selected expert scored by
the sigmoid of its logit (in fp32), and that score multiplies the expert's *input*. The block returns
`shared_expert(x) + sum_selected expert_e(score_e * x)`.

Unlike the reference implementations, only the routed (token, expert) pairs are computed: the
assignments are sorted by expert, the tokens gathered into one contiguous block per expert, pushed
through grouped matrix products over the fused `gate_up_proj (E, D, 2F)` / `down_proj (E, F, D)`
parameters, and added back to their tokens.

`config.moe_implementation` picks how the routed experts are computed:
* "grouped_mm": torch's grouped GEMM kernel (CUDA bfloat16 on sm80+; CPU float32/bfloat16/float16);
* "loop": one matrix product per expert that received tokens (any device and dtype), with its own
  backward;
* "padded": each expert's tokens padded to the busiest expert's count, then two batched products
  (bmm) over all experts: more FLOPs, but one parallel region per product on a multi-threaded CPU;
* "dense": every expert on every token, unselected ones scored 0 — the reference implementations'
  formula, E times the work, but with static shapes (for compilers and graph capture);
* "auto" (default): on CUDA grouped_mm; on a CPU running several threads "padded" while padding at
  most doubles the work, else grouped_mm where it runs, else the loop.
Outside "dense" and "grouped_mm", decoding a handful of tokens without expert gradients sends each
(token, expert) pair straight through its expert's weights, skipping the sort/gather/scatter.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .configuration_llama4 import Llama4TextConfig
from .mlp import Llama4TextMLP

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Up to this many (token, expert) pairs, decoding skips the sort/gather/scatter machinery.
_DIRECT_PAIRS = 4
# "auto" pads experts to the busiest one's token count only while that at most doubles the work.
_MAX_PADDING = 2


class Llama4Router(nn.Linear):
    """Token-to-expert affinities: a bias-free projection D -> E returning the raw logits.

    A plain linear layer (selection lives in `route`) so that adapters such as LoRA can wrap it.
    """

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__(hidden_size, num_experts, bias=False)


def route(
    router_logits: torch.Tensor, top_k: int, selection_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, experts), both (N, top_k): the top-k experts of each token and their sigmoid scores.

    `selection_bias` (aux-loss-free balancing) shifts which experts win, never how much they weigh:
    the score is always the sigmoid of the raw logit.
    """
    if selection_bias is None:
        top_logits, experts = torch.topk(router_logits, top_k, dim=-1)
    else:
        experts = torch.topk(router_logits + selection_bias, top_k, dim=-1).indices
        top_logits = router_logits.gather(-1, experts)
    # At least fp32 for the sigmoid, as the official models compute it, then back to the model dtype.
    precision = torch.promote_types(top_logits.dtype, torch.float32)
    scores = torch.sigmoid(top_logits.to(precision)).to(router_logits.dtype)
    return scores, experts


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
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.new_empty(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty_like(weight)
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


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the expert products run in: autocast's when it is on for x's device, else the weights'."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def _grouped_mm_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's grouped_mm kernel takes these operands: on CPU float32/bfloat16/float16, on
    CUDA bfloat16 from sm80 (torch's documented support), and 16-byte aligned rows everywhere."""
    dtype = compute_dtype(x, weight)
    if not _HAS_GROUPED_MM:
        return False
    if x.is_cuda:
        if dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0):
            return False
    elif x.device.type != "cpu" or dtype not in _GROUPED_MM_DTYPES:
        return False
    row_bytes = torch.finfo(dtype).bits // 8
    return all((n * row_bytes) % 16 == 0 for n in (weight.shape[1], weight.shape[2]))


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
        routed_in: torch.Tensor,
        implementation: str,
        tokens_per_expert: torch.Tensor | None = None,
        expert_index: list[int] | None = None,
    ) -> torch.Tensor:
        """SwiGLU of rows by their experts; every expert computation goes through here, so that wrappers
        of this module (PEFT's LoRA on `gate_up_proj`/`down_proj`) see each use of the weights.

        * "grouped_mm" / "loop": `routed_in` (M, D) sorted by expert, `tokens_per_expert[e]`
          consecutive rows for expert e.
        * "batched": `routed_in` (E, N, D), every expert on its own N rows (padded and dense paths).
        * "direct": `routed_in` (P, D), row p through expert `expert_index[p]` (decoding a few tokens).
        """
        dtype = compute_dtype(routed_in, self.gate_up_proj)
        # Under autocast, run in its dtype like the nn.Linear layers around (grads still reach the
        # full-precision parameters through the cast).
        routed_in, gate_up_proj, down_proj = (t.to(dtype) for t in (routed_in, self.gate_up_proj, self.down_proj))
        if implementation == "batched":
            gate, up = torch.bmm(routed_in, gate_up_proj).chunk(2, dim=-1)
            return torch.bmm(F.silu(gate) * up, down_proj)
        if implementation == "direct":
            rows = []
            for row, expert in enumerate(expert_index):
                gate, up = (routed_in[row : row + 1] @ gate_up_proj[expert]).chunk(2, dim=-1)
                rows.append((F.silu(gate) * up) @ down_proj[expert])
            return torch.cat(rows)
        if implementation == "grouped_mm":
            offsets = tokens_per_expert.cumsum(0).to(torch.int32)
            gate, up = F.grouped_mm(routed_in, gate_up_proj, offs=offsets).chunk(2, dim=-1)
            return F.grouped_mm(F.silu(gate) * up, down_proj, offs=offsets)
        counts = tokens_per_expert.tolist()
        gate, up = _LoopGroupedMatmul.apply(routed_in, gate_up_proj, counts).chunk(2, dim=-1)
        return _LoopGroupedMatmul.apply(F.silu(gate) * up, down_proj, counts)


def _in_backward_pass() -> bool:
    """True while autograd is running a backward, e.g. recomputing a checkpointed layer."""
    return torch._C._current_graph_task_id() != -1


class Llama4TextMoe(nn.Module):
    """Routed experts plus an always-on shared expert; `forward` returns (output, raw router logits)."""

    def __init__(self, config: Llama4TextConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.hidden_dim = config.hidden_size
        self.num_experts = config.num_local_experts
        self.implementation = config.moe_implementation
        self.jitter_noise = config.router_jitter_noise
        self.router = Llama4Router(config.hidden_size, config.num_local_experts)
        self.experts = Llama4TextExperts(config)
        self.shared_expert = Llama4TextMLP(config.hidden_size, config.intermediate_size)
        self.balancing = config.moe_load_balancing
        self.bias_update_rate = config.moe_bias_update_rate
        if self.balancing == "aux_loss_free":
            self.register_buffer("expert_bias", torch.zeros(config.num_local_experts))
        else:
            self.expert_bias = None
        # The latest forward's expert choices (N, top_k), kept for `last_expert_load`; a plain attribute,
        # not a buffer, so that dtype casts and meta-device loading leave it alone.
        self._last_selection: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_dim:
            raise ValueError(
                f"Llama4TextMoe expects hidden_states of shape (batch, seq_len, {self.hidden_dim}), "
                f"got {tuple(hidden_states.shape)}"
            )
        batch, seq_len, _ = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_dim)
        router_in = x
        if self.training and self.jitter_noise > 0:
            # Switch-Transformer jitter: perturbs only the routing decision, not the experts' input.
            router_in = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        router_logits = self.router(router_in)
        scores, experts = route(router_logits, self.top_k, self.expert_bias)
        self._last_selection = experts.detach()

        implementation = self._implementation(x, experts.numel())
        if implementation == "dense":
            self._update_expert_bias(None)
            out = self.shared_expert(x) + self._routed_dense(x, scores, experts)
        elif implementation == "direct":
            self._update_expert_bias(None)
            out = self.shared_expert(x) + self._routed_direct(x, scores, experts)
        else:
            flat_experts = experts.reshape(-1)
            tokens_per_expert = torch.bincount(flat_experts, minlength=self.num_experts)
            self._update_expert_bias(tokens_per_expert)
            # Stable sort keeps each expert's tokens in sequence order (deterministic accumulation).
            order = flat_experts.argsort(stable=True)
            if implementation == "auto":
                implementation = self._padded_or_grouped(x, tokens_per_expert)
            if implementation == "padded":
                routed = self._routed_padded(x, scores, flat_experts, order, tokens_per_expert)
                out = self.shared_expert(x) + routed
            else:
                token_of_slot = order // self.top_k
                routed_in = x.index_select(0, token_of_slot) * scores.reshape(-1, 1).index_select(0, order)
                routed_out = self.experts(routed_in, implementation, tokens_per_expert)
                out = self.shared_expert(x).index_add(0, token_of_slot, routed_out)
        return out.reshape(batch, seq_len, self.hidden_dim), router_logits

    @property
    def last_expert_load(self) -> torch.Tensor | None:
        """Tokens routed to each expert (E,) by the latest forward, padding included; None before any."""
        if self._last_selection is None:
            return None
        return torch.bincount(self._last_selection.reshape(-1), minlength=self.num_experts)

    def _implementation(self, x: torch.Tensor, pairs: int) -> str:
        """"dense", "grouped_mm", "loop", "padded", "direct" (the shortcut for decoding a few tokens), or
        "auto" when the choice between padded and grouped products depends on the routing."""
        grouped_mm_runs = _grouped_mm_runs(x, self._unwrapped_experts().gate_up_proj)
        if self.implementation == "grouped_mm" and not grouped_mm_runs:
            raise ValueError(
                "moe_implementation='grouped_mm' needs torch.nn.functional.grouped_mm (torch >= 2.9), inputs of "
                "the weights' dtype (float32/bfloat16/float16 on CPU, bfloat16 on CUDA sm80+), and hidden_size / "
                "intermediate_size whose rows are multiples of 16 bytes; use moe_implementation='loop' or 'auto'"
            )
        if self.implementation in ("dense", "grouped_mm", "padded"):
            return self.implementation
        # On CUDA, grouped_mm never waits for the host; the direct and loop paths read the routing
        # back to the host. Without gradients for the experts, a few pairs go straight through.
        if self.implementation == "auto" and x.is_cuda and grouped_mm_runs:
            return "grouped_mm"
        if 0 < pairs <= _DIRECT_PAIRS and not self._expert_weights_need_grad():
            return "direct"
        if self.implementation == "auto" and not x.is_cuda and torch.get_num_threads() > 1:
            return "auto"
        return "grouped_mm" if self.implementation == "auto" and grouped_mm_runs else "loop"

    def _padded_or_grouped(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> str:
        """CPU with several threads: one batched product over experts padded to the busiest one
        is a single parallel region, where per-expert products are one each (2 per expert and layer);
        each region waits for all threads, which costs a lot on busy cores (bench_moe.md). Padding
        costs FLOPs, so only while it at most doubles the work."""
        capacity = int(tokens_per_expert.max())
        if self.num_experts * capacity <= _MAX_PADDING * int(tokens_per_expert.sum()):
            return "padded"
        return "grouped_mm" if _grouped_mm_runs(x, self._unwrapped_experts().gate_up_proj) else "loop"

    def _unwrapped_experts(self) -> Llama4TextExperts:
        """The experts module itself, also when an adapter library has wrapped it (PEFT's ParamWrapper)."""
        return self.experts.get_base_layer() if hasattr(self.experts, "get_base_layer") else self.experts

    def _expert_weights_need_grad(self) -> bool:
        """Whether anything in the experts trains: their weights, or adapters wrapped around them."""
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.experts.parameters())

    def _routed_direct(self, x: torch.Tensor, scores: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Decoding a handful of tokens: each (token, expert) pair straight through that expert's
        weights, with no sort, gather or scatter (their fixed costs dominate at this size)."""
        scaled_in = (x.unsqueeze(1) * scores.unsqueeze(-1)).reshape(-1, self.hidden_dim)
        routed = self.experts(scaled_in, "direct", expert_index=experts.reshape(-1).tolist())
        return routed.view(x.shape[0], self.top_k, self.hidden_dim).sum(1)

    def _routed_padded(
        self,
        x: torch.Tensor,
        scores: torch.Tensor,
        flat_experts: torch.Tensor,
        order: torch.Tensor,
        tokens_per_expert: torch.Tensor,
    ) -> torch.Tensor:
        """Each (token, expert) pair gets a row in an (E, capacity, D) block, capacity being the
        busiest expert's count; two batched products run every expert on its rows (the padding rows
        are zeros and are never read back)."""
        pairs = flat_experts.numel()
        capacity = int(tokens_per_expert.max())
        first_of_expert = tokens_per_expert.cumsum(0) - tokens_per_expert
        rank_sorted = torch.arange(pairs, device=x.device) - first_of_expert.index_select(0, flat_experts[order])
        rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
        row = flat_experts * capacity + rank
        scaled_in = (x.unsqueeze(1) * scores.unsqueeze(-1)).reshape(pairs, self.hidden_dim)
        block = scaled_in.new_zeros(self.num_experts * capacity, self.hidden_dim).index_copy(0, row, scaled_in)
        routed = self.experts(block.view(self.num_experts, capacity, self.hidden_dim), "batched")
        routed = routed.reshape(-1, self.hidden_dim).index_select(0, row)
        return routed.view(x.shape[0], self.top_k, self.hidden_dim).sum(1)

    def _routed_dense(self, x: torch.Tensor, scores: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        dense_scores = torch.zeros(x.shape[0], self.num_experts, dtype=scores.dtype, device=x.device)
        dense_scores = dense_scores.scatter(1, experts, scores)
        scaled_in = x.unsqueeze(0) * dense_scores.t().unsqueeze(-1)
        return self.experts(scaled_in, "batched").sum(0)

    def _update_expert_bias(self, tokens_per_expert: torch.Tensor | None) -> None:
        """DeepSeek-V3 aux-loss-free balancing, once per training forward (not in no-grad evaluation,
        nor again when gradient checkpointing recomputes the forward): raise the bias of
        under-loaded experts, lower the others."""
        if self.expert_bias is None or not self.training or not torch.is_grad_enabled() or _in_backward_pass():
            return
        if tokens_per_expert is None:
            tokens_per_expert = self.last_expert_load
        with torch.no_grad():
            load = tokens_per_expert.to(self.expert_bias.dtype)
            self.expert_bias.add_(self.bias_update_rate * torch.sign(load.mean() - load))


def expert_load_metrics(model: nn.Module) -> dict[str, float]:
    """Per MoE layer, from the latest forward: `{name}/max_over_mean` (1.0 is perfectly balanced),
    `{name}/cv` (coefficient of variation of the load) and `{name}/unused_fraction` (experts that got
    no token). Keys are the module names, e.g. "model.layers.0.feed_forward/max_over_mean"."""
    metrics = {}
    for name, module in model.named_modules():
        if not isinstance(module, Llama4TextMoe):
            continue
        if module.last_expert_load is None:
            continue
        load = module.last_expert_load.float()
        mean = load.mean()
        metrics[f"{name}/max_over_mean"] = (load.max() / mean).item()
        metrics[f"{name}/cv"] = (load.std(unbiased=False) / mean).item()
        metrics[f"{name}/unused_fraction"] = (load == 0).float().mean().item()
    return metrics
