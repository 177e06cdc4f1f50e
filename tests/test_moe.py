"""The sparse mixture-of-experts block: routing semantics, every kernel == the dense formula (values and
gradients), parity with transformers' Llama4TextMoe, the kernel choice, aux-loss-free balancing at the
optimizer step and load statistics."""

import pytest
import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from transformers.models.llama4.configuration_llama4 import Llama4TextConfig as HFTextConfig
from transformers.models.llama4.modeling_llama4 import Llama4TextMoe as HFTextMoe

from llama4_sparse.modeling_llama4.configuration_llama4 import Llama4TextConfig
from llama4_sparse.modeling_llama4.experts import _LoopGroupedMatmul, count_tokens, select_kernel
from llama4_sparse.modeling_llama4.moe import Llama4TextMoe, expert_load_metrics, route, update_expert_bias

IMPLEMENTATIONS = ["auto", "loop", "grouped_mm", "padded", "batched", "dense"]


def make_config(**overrides) -> Llama4TextConfig:
    fields = dict(hidden_size=16, intermediate_size=32, num_local_experts=8, num_experts_per_tok=1)
    return Llama4TextConfig.from_preset("tiny", **{**fields, **overrides})


def make_moe(seed: int = 0, **overrides) -> Llama4TextMoe:
    torch.manual_seed(seed)
    moe = Llama4TextMoe(make_config(**overrides))
    with torch.no_grad():
        for param in moe.parameters():
            param.normal_(0.0, 0.3)
    return moe


def dense_reference(moe: Llama4TextMoe, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The published formula computed the slow way: every expert on every token, unselected
    experts scored 0, the score scaling the expert's input, plus the shared expert."""
    flat = x.reshape(-1, x.shape[-1])
    logits = flat @ moe.router.weight.t()
    selection_logits = logits if moe.expert_bias is None else logits + moe.expert_bias
    chosen = torch.topk(selection_logits, moe.top_k, dim=-1).indices
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter(1, chosen, True)
    scores = torch.where(mask, torch.sigmoid(logits), torch.zeros_like(logits))
    width = moe.experts.expert_dim
    out = torch.zeros_like(flat)
    for e in range(moe.num_experts):
        scaled = flat * scores[:, e : e + 1]
        gate = scaled @ moe.experts.gate_up_proj[e, :, :width]
        up = scaled @ moe.experts.gate_up_proj[e, :, width:]
        out = out + (F.silu(gate) * up) @ moe.experts.down_proj[e]
    shared = moe.shared_expert
    hidden = F.silu(flat @ shared.gate_proj.weight.t()) * (flat @ shared.up_proj.weight.t())
    out = out + hidden @ shared.down_proj.weight.t()
    return out.reshape(x.shape), logits


def values_and_grads(fn, moe: Llama4TextMoe, x: torch.Tensor, upstream: torch.Tensor):
    moe.zero_grad()
    x = x.clone().requires_grad_(True)
    out, logits = fn(moe, x)
    (out * upstream).sum().backward()
    grads = {name: p.grad.clone() for name, p in moe.named_parameters() if p.grad is not None}
    return out.detach(), logits.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("shape", [(2, 9), (1, 3), (3, 1), (1, 1)])
def test_sparse_dispatch_matches_dense_formula_values_and_gradients(implementation, top_k, shape):
    moe = make_moe(moe_implementation=implementation, num_experts_per_tok=top_k)
    torch.manual_seed(1)
    x = torch.randn(*shape, moe.hidden_dim)
    upstream = torch.randn(*shape, moe.hidden_dim)
    out, logits, grad_x, grads = values_and_grads(lambda m, h: m(h), moe, x, upstream)
    ref_out, ref_logits, ref_grad_x, ref_grads = values_and_grads(dense_reference, moe, x, upstream)
    if shape[0] * shape[1] * top_k < moe.num_experts:
        load = count_tokens(route(ref_logits.reshape(-1, moe.num_experts), top_k)[1], moe.num_experts)
        assert (load == 0).any(), "the shape was meant to leave some experts without tokens"
    torch.testing.assert_close(logits, ref_logits.reshape(logits.shape), rtol=0, atol=1e-6)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_x, ref_grad_x, rtol=1e-5, atol=1e-5)
    assert set(grads) == set(ref_grads) == {name for name, _ in moe.named_parameters()}
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("implementation", ["auto", "loop"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("tokens", [1, 2])
def test_decode_path_matches_dense_formula(implementation, top_k, tokens):
    """A handful of tokens without gradients takes the per-pair path (no sort/scatter)."""
    moe = make_moe(moe_implementation=implementation, num_experts_per_tok=top_k)
    x = torch.randn(tokens, 1, moe.hidden_dim)
    with torch.no_grad():
        out, _ = moe(x)
        ref, _ = dense_reference(moe, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["auto", "loop"])
def test_float64_and_unaligned_shapes_fall_back_to_the_loop(implementation):
    """grouped_mm takes neither float64 nor rows that are not multiples of 16 bytes."""
    for moe in (make_moe(moe_implementation=implementation).double(),
                make_moe(moe_implementation=implementation, hidden_size=6, intermediate_size=10)):
        dtype = moe.router.weight.dtype
        x = torch.randn(2, 5, moe.hidden_dim, dtype=dtype)
        upstream = torch.randn(2, 5, moe.hidden_dim, dtype=dtype)
        out, _, grad_x, grads = values_and_grads(lambda m, h: m(h), moe, x, upstream)
        ref_out, _, ref_grad_x, ref_grads = values_and_grads(dense_reference, moe, x, upstream)
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(grad_x, ref_grad_x)
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], msg=name)


def test_auto_picks_one_kernel_by_device_threads_and_routing():
    moe = make_moe()
    x = torch.randn(64, moe.hidden_dim)
    weight = moe.experts.gate_up_proj
    balanced = torch.arange(64).remainder(8)[:, None]
    collapsed = torch.zeros(64, 1, dtype=torch.long)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert select_kernel("auto", x, balanced, weight) == "padded"
        assert select_kernel("auto", x, collapsed, weight) == "loop", "padding would multiply the work by 8"
        skewed = torch.cat([torch.zeros(4, dtype=torch.long), balanced[4:, 0]])[:, None]  # expert 0: 11 of 64
        assert select_kernel("auto", x, skewed, weight) == "loop", "padding would add 3/8 of the work"
        assert select_kernel("auto", x[:1], balanced[:1], weight) == "loop", "one decoded token"
        torch.set_num_threads(1)
        assert select_kernel("auto", x, balanced, weight) == "loop"
        assert select_kernel("auto", x.double(), balanced, weight.double()) == "loop"
    finally:
        torch.set_num_threads(threads)
    for name in ("grouped_mm", "loop", "padded", "batched", "dense"):
        assert select_kernel(name, x, balanced, weight) == name


def test_frozen_experts_still_give_input_gradients_on_the_decode_path():
    moe = make_moe(moe_implementation="loop")
    moe.experts.requires_grad_(False)
    x = torch.randn(1, 1, moe.hidden_dim, requires_grad=True)
    moe(x)[0].sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    dense_reference(moe, ref_x)[0].sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-5)


def test_loop_grouped_matmul_gradcheck_with_empty_groups():
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    counts = [2, 0, 3, 0]
    out = _LoopGroupedMatmul.apply(x, weight, counts)
    torch.testing.assert_close(out, torch.cat([x[:2] @ weight[0], x[2:] @ weight[2]]))
    assert torch.autograd.gradcheck(lambda a, w: _LoopGroupedMatmul.apply(a, w, counts), (x, weight))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_matches_transformers_llama4_moe_on_copied_weights(implementation, top_k):
    moe = make_moe(moe_implementation=implementation, num_experts_per_tok=top_k)
    reference = HFTextMoe(
        HFTextConfig(hidden_size=16, intermediate_size=32, num_local_experts=8, num_experts_per_tok=top_k)
    )
    reference.load_state_dict(moe.state_dict(), strict=True)
    x = torch.randn(3, 7, moe.hidden_dim)
    with torch.no_grad():
        out, logits = moe(x)
        ref_out, ref_logits = reference(x)
        decode_out, _ = moe(x[:1, :1])
        ref_decode, _ = reference(x[:1, :1])
    torch.testing.assert_close(out, ref_out.reshape(out.shape), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(decode_out, ref_decode.reshape(decode_out.shape), rtol=0, atol=1e-5)


def test_state_dict_keys_are_the_official_ones():
    official = {
        "router.weight": (8, 16),
        "experts.gate_up_proj": (8, 16, 64),
        "experts.down_proj": (8, 32, 16),
        "shared_expert.gate_proj.weight": (32, 16),
        "shared_expert.up_proj.weight": (32, 16),
        "shared_expert.down_proj.weight": (16, 32),
    }
    shapes = {k: tuple(v.shape) for k, v in make_moe().state_dict().items()}
    assert shapes == official
    balanced = make_moe(moe_load_balancing="aux_loss_free").state_dict()
    assert set(balanced) == set(official) | {"expert_bias"}


def test_bfloat16_runs_every_implementation_close_to_fp32():
    moe = make_moe()
    x = torch.randn(2, 5, moe.hidden_dim)
    with torch.no_grad():
        ref, _ = dense_reference(moe, x)
        for implementation in IMPLEMENTATIONS:
            moe.implementation = implementation
            out, _ = moe.to(torch.bfloat16)(x.bfloat16())
            moe.float()
            assert out.dtype == torch.bfloat16
            torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_autocast_bfloat16_trains_fp32_weights(implementation):
    """Under CPU autocast the experts run in bfloat16 like the linear layers, and gradients reach
    the float32 parameters."""
    moe = make_moe(moe_implementation=implementation)
    x = torch.randn(2, 5, moe.hidden_dim)
    with torch.no_grad():
        ref, _ = dense_reference(moe, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = moe(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    out.float().sum().backward()
    for name, param in moe.named_parameters():
        assert param.grad is not None and param.grad.dtype == torch.float32, name


def skewed_stream(moe: Llama4TextMoe, steps: int, tokens: int = 64):
    """Tokens whose router logits favour expert 0 by a wide margin, the other experts' logits random."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        moe.router.weight.normal_(0.0, 0.1, generator=generator)
        moe.router.weight[0, 0] = 2.0
    for _ in range(steps):
        x = torch.randn(1, tokens, moe.hidden_dim, generator=generator)
        x[..., 0] = x[..., 0].abs() + 1.0
        yield x


def max_over_mean(load: torch.Tensor) -> float:
    load = load.float()
    return (load.max() / load.mean()).item()


def train_forwards(moe: Llama4TextMoe, stream) -> list[torch.Tensor]:
    """A training forward and backward per batch, each followed by `update_expert_bias` (what the
    optimizer-step callback does); returns the load each update saw."""
    loads = []
    moe.train()
    for x in stream:
        moe(x)[0].sum().backward()
        loads.append(moe.tokens_per_expert.clone())
        update_expert_bias(moe)
    return loads


def test_aux_loss_free_bias_reduces_load_imbalance():
    moe = make_moe(moe_load_balancing="aux_loss_free", moe_bias_update_rate=0.05)
    loads = train_forwards(moe, skewed_stream(moe, steps=200))
    before, after = max_over_mean(sum(loads[:20])), max_over_mean(sum(loads[-20:]))
    assert before > 7.0, "the synthetic stream should start collapsed on one expert"
    assert after < 1.3
    # The bias decides the selection only: the scores are still sigmoid(raw logit).
    x = torch.randn(2, 5, moe.hidden_dim)
    with torch.no_grad():
        out, logits = moe.eval()(x)
        ref, ref_logits = dense_reference(moe, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6)


def test_the_forward_only_counts_and_the_bias_moves_once_per_optimizer_step():
    moe = make_moe(moe_load_balancing="aux_loss_free", moe_bias_update_rate=0.01)
    stream = list(skewed_stream(moe, steps=3, tokens=16))
    with torch.no_grad():
        moe.train()(stream[0])
    moe.eval()(stream[0])
    assert moe.tokens_per_expert is None, "no counting in eval mode or without gradients"
    loads = [count_tokens(route(moe.router(x.reshape(-1, moe.hidden_dim)), 1)[1], 8) for x in stream]
    moe.train()
    for x in stream:  # 3 micro-batches of one optimizer step
        moe(x)[0].sum().backward()
    assert torch.count_nonzero(moe.expert_bias) == 0, "the forward must not touch the bias"
    assert torch.equal(moe.tokens_per_expert, sum(loads))
    update_expert_bias(moe)
    load = sum(loads).float()
    torch.testing.assert_close(moe.expert_bias, 0.01 * torch.sign(load.mean() - load))
    assert torch.count_nonzero(moe.tokens_per_expert) == 0, "counts start again after the step"
    update_expert_bias(moe)
    torch.testing.assert_close(moe.expert_bias, 0.01 * torch.sign(load.mean() - load)), "nothing counted, no move"


def test_gradient_checkpointing_recomputation_gives_the_same_update():
    plain = make_moe(moe_load_balancing="aux_loss_free", moe_bias_update_rate=0.01).train()
    checkpointed = make_moe(moe_load_balancing="aux_loss_free", moe_bias_update_rate=0.01).train()
    x = next(skewed_stream(plain, steps=1))
    next(skewed_stream(checkpointed, steps=1))
    plain(x)[0].sum().backward()
    checkpoint(lambda h: checkpointed(h)[0], x.clone().requires_grad_(True), use_reentrant=False).sum().backward()
    assert torch.equal(checkpointed.tokens_per_expert, 2 * plain.tokens_per_expert), "recomputation counts again"
    assert expert_load_metrics(checkpointed) == expert_load_metrics(plain)
    update_expert_bias(plain)
    update_expert_bias(checkpointed)
    assert torch.count_nonzero(plain.expert_bias) > 0
    torch.testing.assert_close(checkpointed.expert_bias, plain.expert_bias, rtol=0, atol=0)


def test_load_statistics_count_every_assignment():
    moe = make_moe(num_experts_per_tok=2)
    model = torch.nn.ModuleDict({"layer0": moe, "layer1": make_moe(seed=1)})
    assert expert_load_metrics(model) == {}
    moe(torch.randn(3, 5, moe.hidden_dim))
    load = moe.tokens_per_expert
    assert load.shape == (8,) and load.dtype == torch.int64 and load.sum().item() == 3 * 5 * 2
    metrics = expert_load_metrics(model)
    assert set(metrics) == {"layer0/max_over_mean", "layer0/cv", "layer0/unused_fraction"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["layer0/max_over_mean"] == pytest.approx(load.max().item() / load.float().mean().item())
    assert metrics["layer0/cv"] == pytest.approx((load.float().std(unbiased=False) / load.float().mean()).item())
    assert metrics["layer0/unused_fraction"] == pytest.approx((load == 0).float().mean().item())
    update_expert_bias(model)
    assert expert_load_metrics(model) == {}, "a layer that counted nothing since the step is left out"


def test_router_jitter_only_in_training():
    moe = make_moe(router_jitter_noise=0.5)
    x = torch.randn(2, 6, moe.hidden_dim)
    with torch.no_grad():
        out, logits = moe.eval()(x)
        ref, ref_logits = dense_reference(moe, x)
        _, train_logits = moe.train()(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(train_logits, ref_logits)


def test_bad_inputs_raise_clear_errors():
    moe = make_moe()
    with pytest.raises(ValueError, match=r"\(batch, seq_len, 16\)"):
        moe(torch.randn(4, 16))
    with pytest.raises(ValueError, match=r"\(batch, seq_len, 16\)"):
        moe(torch.randn(1, 4, 15))
    unaligned = make_moe(hidden_size=6, intermediate_size=10, moe_implementation="grouped_mm")
    with pytest.raises(ValueError, match="16 bytes"):
        unaligned(torch.randn(1, 2, 6))
    with pytest.raises(ValueError, match="moe_implementation"):
        make_config(moe_implementation="fast")
    with pytest.raises(ValueError, match="moe_bias_update_rate"):
        make_config(moe_bias_update_rate=-1.0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", [(1, 1), (2, 9)], ids=["decode", "prefill"])
def test_lora_on_the_fused_experts_reaches_every_path(implementation, shape):
    """PEFT's `target_parameters` LoRA applies its delta only inside the wrapped experts' forward; every
    implementation (the decode shortcut included) must go through it, so the adapted block equals the
    block with the delta merged into the weights."""
    from peft import LoraConfig, get_peft_model

    moe = make_moe(moe_implementation=implementation).eval()
    adapted = get_peft_model(
        moe,
        LoraConfig(r=2, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                   init_lora_weights=False),
    )
    x = torch.randn(*shape, moe.hidden_dim)
    with torch.no_grad():
        with adapted.disable_adapter():
            base, _ = adapted(x)
        out, _ = adapted(x)
        merged, _ = adapted.merge_and_unload()(x)
    assert (out - base).abs().max() > 1e-3
    torch.testing.assert_close(out, merged, atol=1e-5, rtol=1e-5)
