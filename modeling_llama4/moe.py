"""The Llama 4 mixture-of-experts block: router -> routed experts, plus an always-on shared expert.

    router_logits = router(x)                                  # (N, E), raw
    scores, top_k_index = route(router_logits, k, expert_bias) # top-k of the raw logits, sigmoid score
    out = shared_expert(x) + experts(x, top_k_index, scores)   # the score scales each expert's input

as in the official models, except that only the (token, expert) pairs the router picked are computed:
`experts.py` sorts the pairs by expert and runs grouped matrix products over the fused weights;
`config.moe_implementation` names the kernel and `experts.select_kernel` is the one place that picks.

Load balancing keeps no training state in the forward. A training forward (training mode, gradients
on) only adds its per-expert token counts to `tokens_per_expert`; `update_expert_bias(model)`, called
once per optimizer step (`load_balancing.ExpertBiasCallback` does it inside a transformers Trainer),
applies the aux-loss-free update to `expert_bias` from those counts and zeroes them, and
`expert_load_metrics(model)` reads them. Counts are only ever compared to their own mean, so a layer
recomputed under gradient checkpointing (which counts twice) gets the same update and metrics.
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration_llama4 import Llama4TextConfig
from .experts import Llama4TextExperts, count_tokens
from .mlp import Llama4TextMLP

__all__ = ["Llama4Router", "Llama4TextExperts", "Llama4TextMoe", "route", "update_expert_bias", "expert_load_metrics"]


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


class Llama4TextMoe(nn.Module):
    """Routed experts plus an always-on shared expert; `forward` returns (output, raw router logits)."""

    def __init__(self, config: Llama4TextConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.hidden_dim = config.hidden_size
        self.num_experts = config.num_local_experts
        self.implementation = config.moe_implementation
        self.jitter_noise = config.router_jitter_noise
        self.bias_update_rate = config.moe_bias_update_rate
        self.router = Llama4Router(config.hidden_size, config.num_local_experts)
        self.experts = Llama4TextExperts(config)
        self.shared_expert = Llama4TextMLP(config.hidden_size, config.intermediate_size)
        if config.moe_load_balancing == "aux_loss_free":
            self.register_buffer("expert_bias", torch.zeros(config.num_local_experts))
        else:
            self.expert_bias = None
        # (E,) int64 tokens routed to each expert by training forwards since the last optimizer step
        # (padding included: the block does not see the attention mask); None before the first. A plain
        # attribute rather than a buffer: it stays out of the state dict, dtype casts leave it exact,
        # and DDP does not overwrite each rank's counts with rank 0's.
        self.tokens_per_expert: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_dim:
            raise ValueError(
                f"Llama4TextMoe expects hidden_states of shape (batch, seq_len, {self.hidden_dim}), "
                f"got {tuple(hidden_states.shape)}"
            )
        x = hidden_states.reshape(-1, self.hidden_dim)
        router_in = x
        if self.training and self.jitter_noise > 0:
            # Switch-Transformer jitter: perturbs only the routing decision, not the experts' input.
            router_in = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        router_logits = self.router(router_in)
        scores, top_k_index = route(router_logits, self.top_k, self.expert_bias)
        if self.training and torch.is_grad_enabled():
            self._count(top_k_index)
        out = self.shared_expert(x) + self.experts(x, top_k_index, scores, self.implementation)
        return out.reshape(hidden_states.shape[:-1] + (self.hidden_dim,)), router_logits

    @torch.no_grad()
    def _count(self, top_k_index: torch.Tensor) -> None:
        counts = count_tokens(top_k_index, self.num_experts)
        if self.tokens_per_expert is None or self.tokens_per_expert.device != counts.device:
            self.tokens_per_expert = counts
        else:
            self.tokens_per_expert.add_(counts)


def _moe_layers(model: nn.Module):
    return [(name, module) for name, module in model.named_modules() if isinstance(module, Llama4TextMoe)]


@torch.no_grad()
def sync_tokens_per_expert(model: nn.Module, group=None) -> None:
    """Sum every MoE layer's `tokens_per_expert` over the ranks of `group` (default: all): one all-reduce of
    an (E,) int64 tensor per layer, so the bias update and the load metrics see the global load. A rank
    that counted nothing in a layer contributes zeros (every rank must enter every collective)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size(group) == 1:
        return
    for _, module in _moe_layers(model):
        if module.tokens_per_expert is None:
            device = module.router.weight.device
            module.tokens_per_expert = torch.zeros(module.num_experts, dtype=torch.int64, device=device)
        torch.distributed.all_reduce(module.tokens_per_expert, group=group)


@torch.no_grad()
def update_expert_bias(model: nn.Module) -> None:
    """Once per optimizer step: DeepSeek-V3's aux-loss-free balancing on every MoE layer with an
    `expert_bias` (raise the bias of experts that got fewer tokens than the mean since the last step,
    lower the others, by `moe_bias_update_rate`), then zero every layer's `tokens_per_expert`.

    Under data parallelism call `sync_tokens_per_expert` first (the recipes' `ExpertBiasCallback` does), so
    that every rank applies the same update from the global load."""
    for _, module in _moe_layers(model):
        counts = module.tokens_per_expert
        if counts is None:
            continue
        if module.expert_bias is not None:
            load = counts.to(module.expert_bias.dtype)
            module.expert_bias.add_(module.bias_update_rate * torch.sign(load.mean() - load))
        counts.zero_()


def expert_load_metrics(model: nn.Module) -> dict[str, float]:
    """Per MoE layer, from the tokens counted since the last `update_expert_bias`:
    `{name}/max_over_mean` (1.0 is perfectly balanced), `{name}/cv` (coefficient of variation of the
    load) and `{name}/unused_fraction` (experts that got no token). Keys are the module names, e.g.
    "model.layers.0.feed_forward/max_over_mean"; layers that counted nothing are left out."""
    names, loads = [], []
    for name, module in _moe_layers(model):
        if module.tokens_per_expert is not None:
            names.append(name)
            loads.append(module.tokens_per_expert.to("cpu", torch.float64))
    metrics = {}
    for name, load in zip(names, loads):
        mean = load.mean()
        if mean == 0:
            continue
        metrics[f"{name}/max_over_mean"] = (load.max() / mean).item()
        metrics[f"{name}/cv"] = (load.std(unbiased=False) / mean).item()
        metrics[f"{name}/unused_fraction"] = (load == 0).double().mean().item()
    return metrics
