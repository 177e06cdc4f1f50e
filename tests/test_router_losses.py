"""Router losses: the load-balancing loss equals transformers' Mixtral loss (what TRL computes), punishes
skew, ignores padding; the z-loss is the mean squared log-sum-exp and shrinks the logits."""

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as mixtral_loss

from llama4_sparse.modeling_llama4.configuration_llama4 import Llama4TextConfig
from llama4_sparse.modeling_llama4.router_losses import load_balancing_loss, router_z_loss


def make_config(num_experts: int = 8, top_k: int = 1) -> Llama4TextConfig:
    return Llama4TextConfig.from_preset("tiny", num_local_experts=num_experts, num_experts_per_tok=top_k)


def random_layers(layers: int = 3, tokens: int = 24, experts: int = 8, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, experts, generator=generator) * 2 for _ in range(layers)]


@pytest.mark.parametrize("top_k", [1, 2])
def test_load_balancing_loss_equals_mixtral_loss(top_k):
    layers = random_layers()
    mask = torch.ones(4, 6)
    mask[0, :3] = 0
    mask[3, 5] = 0
    config = make_config(top_k=top_k)
    torch.testing.assert_close(load_balancing_loss(layers, config), mixtral_loss(tuple(layers), 8, top_k))
    torch.testing.assert_close(
        load_balancing_loss(layers, config, mask), mixtral_loss(tuple(layers), 8, top_k, mask)
    )


@pytest.mark.parametrize("top_k", [1, 2])
def test_skewed_router_costs_more_than_a_uniform_one(top_k):
    experts, tokens = 8, 64
    config = make_config(top_k=top_k)
    uniform = torch.zeros(tokens, experts)
    # Every token prefers the same experts, with confidence.
    skewed = torch.zeros(tokens, experts)
    skewed[:, :top_k] = 5.0
    # Balanced hard routing: token t prefers expert t mod E.
    balanced = torch.full((tokens, experts), -5.0)
    for k in range(top_k):
        balanced[torch.arange(tokens), (torch.arange(tokens) + k) % experts] = 5.0
    loss_uniform = load_balancing_loss([uniform], config)
    loss_skewed = load_balancing_loss([skewed], config)
    loss_balanced = load_balancing_loss([balanced], config)
    assert loss_balanced.item() == pytest.approx(top_k, rel=1e-5)
    assert loss_skewed > 3 * loss_balanced
    # Uniform probabilities are balanced in expectation: P_e = 1/E makes the loss top_k whatever f is.
    assert loss_uniform.item() == pytest.approx(top_k, rel=1e-5)


def test_load_balancing_gradient_moves_probability_away_from_the_overloaded_expert():
    logits = torch.zeros(32, 4)
    logits[:, 0] = 1.0
    logits.requires_grad_(True)
    load_balancing_loss([logits], make_config(num_experts=4)).backward()
    assert (logits.grad[:, 0] > 0).all() and (logits.grad[:, 1:] < 0).all()


def test_padding_is_ignored():
    config = make_config(top_k=2)
    real = random_layers(layers=2, tokens=12)
    mask = torch.ones(2, 8)
    mask[0, :3] = 0  # left padding
    mask[1, 7:] = 0  # right padding
    padded = []
    for layer in real:
        rows = torch.full((16, 8), 0.0)
        rows[:, 0] = 100.0  # padding rows all pile onto expert 0
        rows[mask.reshape(-1).bool()] = layer
        padded.append(rows)
    expected = load_balancing_loss(real, config)
    torch.testing.assert_close(load_balancing_loss(padded, config, mask), expected)
    torch.testing.assert_close(router_z_loss(padded, config, mask), router_z_loss(real, config))
    assert load_balancing_loss(padded, config) > expected


def test_decoding_mask_uses_the_latest_positions():
    """During cached decoding the mask spans past positions; the router rows are the last ones."""
    config = make_config()
    layers = random_layers(layers=2, tokens=2)
    past_and_now = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])
    now = past_and_now[:, -1:]
    torch.testing.assert_close(
        load_balancing_loss(layers, config, past_and_now), load_balancing_loss(layers, config, now)
    )
    first_sequence_only = [layer[:1] for layer in layers]
    torch.testing.assert_close(
        load_balancing_loss(layers, config, now), load_balancing_loss(first_sequence_only, config)
    )


def test_z_loss_is_mean_squared_logsumexp_and_shrinks_logits():
    layers = random_layers(layers=2)
    config = make_config()
    expected = torch.stack([torch.logsumexp(l, dim=-1).square().mean() for l in layers]).mean()
    torch.testing.assert_close(router_z_loss(layers, config), expected)
    assert router_z_loss([3 * l for l in layers], config) > router_z_loss(layers, config)
    logits = layers[0].clone().requires_grad_(True)
    router_z_loss([logits], config).backward()
    with torch.no_grad():
        stepped = logits - 0.01 * logits.grad
    assert torch.logsumexp(stepped, -1).abs().mean() < torch.logsumexp(logits, -1).abs().mean()


def test_losses_accept_bfloat16_logits_and_compute_in_fp32():
    layers = random_layers()
    config = make_config()
    low = [l.bfloat16() for l in layers]
    assert load_balancing_loss(low, config).dtype == torch.float32
    torch.testing.assert_close(
        router_z_loss(low, config), router_z_loss([l.float() for l in low], config)
    )


def test_bad_inputs_raise_clear_errors():
    config = make_config()
    with pytest.raises(ValueError, match="no router logits"):
        load_balancing_loss([], config)
    with pytest.raises(ValueError, match="num_local_experts=8"):
        load_balancing_loss([torch.randn(4, 5)], config)
    with pytest.raises(ValueError, match="same shape"):
        router_z_loss([torch.randn(4, 8), torch.randn(3, 8)], config)
    with pytest.raises(ValueError, match="does not cover"):
        load_balancing_loss([torch.randn(6, 8)], config, torch.ones(4, 2))
    with pytest.raises(ValueError, match=r"\(batch, seq_len\)"):
        load_balancing_loss([torch.randn(6, 8)], config, torch.ones(6))
