"""A transformers `TrainerCallback` that runs the MoE load balancing at each optimizer step.

The forward only counts tokens per expert (`Llama4TextMoe.tokens_per_expert`); right after each optimizer
step this callback sums the counts over the data-parallel ranks (`sync_tokens_per_expert`) and applies
`update_expert_bias`, so the aux-loss-free `expert_bias` moves once per step from the global load of every
micro-batch of that step, identically on every rank, and the counts start again from zero. The load of
the last logged step is kept in `last_metrics` (`expert_load_metrics`).
"""

from __future__ import annotations

from transformers import TrainerCallback

from .moe import expert_load_metrics, sync_tokens_per_expert, update_expert_bias


class ExpertBiasCallback(TrainerCallback):
    """Add to any Trainer (`trainer.add_callback(ExpertBiasCallback())`); the recipes add it for you.
    Harmless on models without MoE layers or without `moe_load_balancing="aux_loss_free"` (their
    counts are only reset)."""

    def __init__(self):
        self.last_metrics: dict[str, float] = {}

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        sync_tokens_per_expert(model)
        # Reading the counts is a device sync: only on the steps the Trainer logs.
        if state.logging_steps and (state.global_step + 1) % state.logging_steps == 0:
            self.last_metrics = expert_load_metrics(model)
        update_expert_bias(model)
