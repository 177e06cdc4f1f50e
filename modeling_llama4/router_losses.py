"""Auxiliary router losses for training the mixture of experts.

The official Llama 4 checkpoints were released without these in their modeling code; they are
training aids, off unless asked for:

* `load_balancing_loss`: the Switch-Transformer loss, E * sum_e f_e * P_e, where f_e is the fraction
  of top-k assignments that went to expert e and P_e the mean softmax probability of e, both over
  the non-padding tokens of every MoE layer. It is the same quantity as transformers' Mixtral
  `load_balancing_loss_func`, which TRL's fused-loss path computes on its own, so the loss does not
  change with the trainer code path. Perfectly uniform routing gives `top_k`; collapse onto one
  expert approaches `top_k * E`. Softmax is monotone in the logits, so its top-k is the router's
  top-k even though Llama 4 weighs the selected experts by a sigmoid.
* `router_z_loss`: ST-MoE's z-loss, the mean squared log-sum-exp of the router logits, which keeps
  the logits small (the sigmoid saturates otherwise).

When the causal LM adds them (the convention transformers' Mixtral and TRL rely on):
`loss += router_aux_loss_coef * load_balancing_loss` only when labels are given and router logits
are requested (`output_router_logits=True`, in the call or the config) — so the official config's
`router_aux_loss_coef=0.001` changes nothing unless router logits are asked for, as in transformers.
`loss += router_z_loss_coef * router_z_loss` whenever labels are given and the coefficient is > 0
(it defaults to 0 and has no official counterpart, so the coefficient alone switches it on).
`aux_loss` in the output is the unweighted load-balancing loss (TRL multiplies it by its own coefficient).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F


def _layers(router_logits_per_layer, num_experts: int) -> list[torch.Tensor]:
    if isinstance(router_logits_per_layer, torch.Tensor):
        router_logits_per_layer = [router_logits_per_layer]
    layers = [logits for logits in router_logits_per_layer if logits is not None]
    if not layers:
        raise ValueError("no router logits given: the model has no MoE layer, or it was not asked for them")
    for logits in layers:
        if logits.dim() != 2 or logits.shape != layers[0].shape or logits.shape[-1] != num_experts:
            raise ValueError(
                f"router logits must be one (tokens, num_local_experts={num_experts}) tensor per MoE layer, "
                f"all of the same shape; got shapes {[tuple(t.shape) for t in layers]}"
            )
    return layers


def _token_mask(attention_mask: torch.Tensor | None, num_rows: int, device) -> torch.Tensor | None:
    """A (num_rows,) float mask over the router rows, 1 for real tokens, 0 for padding.

    The rows are the (batch * seq_len) tokens of the last forward; during cached decoding the
    attention mask also covers earlier positions, so its last seq_len columns are the ones routed.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, seq_len), got shape {tuple(attention_mask.shape)}")
    batch, total = attention_mask.shape
    if num_rows % batch or num_rows // batch > total:
        raise ValueError(
            f"attention_mask of shape {tuple(attention_mask.shape)} does not cover the {num_rows} routed tokens; "
            "pass the mask of the same forward call"
        )
    seq_len = num_rows // batch
    return attention_mask[:, total - seq_len :].reshape(-1).to(device=device, dtype=torch.float32)


def load_balancing_loss(
    router_logits_per_layer: Sequence[torch.Tensor] | torch.Tensor,
    config,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss over all MoE layers (see the module docstring).

    `router_logits_per_layer`: one raw (batch * seq_len, E) logit tensor per MoE layer; `config` gives
    `num_local_experts` and `num_experts_per_tok`; padding positions (attention_mask == 0) are ignored.
    """
    num_experts, top_k = config.num_local_experts, config.num_experts_per_tok
    layers = _layers(router_logits_per_layer, num_experts)
    device = layers[0].device
    mask = _token_mask(attention_mask, layers[0].shape[0], device)
    assignments = torch.zeros(num_experts, device=device)
    probability = torch.zeros(num_experts, device=device)
    tokens = torch.zeros((), device=device)
    for logits in layers:
        probs = F.softmax(logits.float(), dim=-1)
        selected = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(1).float()
        if mask is not None:
            selected = selected * mask[:, None]
            probs = probs * mask[:, None]
            tokens = tokens + mask.sum()
        else:
            tokens = tokens + logits.shape[0]
        assignments = assignments + selected.sum(0)
        probability = probability + probs.sum(0)
    tokens = tokens.clamp(min=1)
    return num_experts * torch.sum((assignments / tokens) * (probability / tokens))


def router_z_loss(
    router_logits_per_layer: Sequence[torch.Tensor] | torch.Tensor,
    config,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over non-padding tokens and MoE layers of logsumexp(router logits)^2 (ST-MoE).

    Same arguments as `load_balancing_loss`."""
    layers = _layers(router_logits_per_layer, config.num_local_experts)
    mask = _token_mask(attention_mask, layers[0].shape[0], layers[0].device)
    total = torch.zeros((), device=layers[0].device)
    for logits in layers:
        z = torch.logsumexp(logits.float(), dim=-1).square()
        total = total + (z.mean() if mask is None else (z * mask).sum() / mask.sum().clamp(min=1))
    return total / len(layers)
