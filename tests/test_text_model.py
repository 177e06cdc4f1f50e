"""The text model's forward pass: parity with transformers' Llama4ForCausalLM (same weights, fp32),
packing, checkpointing, router outputs and losses, input checks, the sequence-classification head."""

import pytest
import torch
from text_factory import our_model, reference_twin, tiny_config

from llama4_sparse.modeling_llama4 import Llama4ForCausalLM, Llama4ForSequenceClassification

TOLERANCE = 1e-4


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("pattern", ["scout", "maverick", "dense"])
def test_logits_match_transformers_over_many_chunks(pattern, attn):
    model = our_model(tiny_config(pattern, attn))
    reference = reference_twin(model)
    ids = torch.randint(3, 256, (2, 52), generator=torch.Generator().manual_seed(1))  # 6.5 chunks of 8
    with torch.no_grad():
        ours, theirs = model(ids, use_cache=False).logits, reference(ids, use_cache=False).logits
    assert max_diff(ours, theirs) <= TOLERANCE


def _prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_documents_never_attend_to_each_other(attn):
    model = our_model(tiny_config("maverick", attn))
    first, second = _prompt(13, seed=4), _prompt(19, seed=5)
    packed = torch.cat([first, second], dim=1)
    position_ids = torch.cat([torch.arange(13), torch.arange(19)])[None]
    with torch.no_grad():
        # Default use_cache (the config's True) must not turn packing off.
        together = model(packed, position_ids=position_ids).logits
        alone = torch.cat([model(first).logits, model(second).logits], dim=1)
    assert max_diff(together, alone) <= TOLERANCE


def test_gradient_checkpointing_gives_the_same_gradients():
    config = tiny_config("maverick", "sdpa")
    ids = _prompt(20, seed=6)

    def gradients(checkpointing: bool) -> dict:
        model = our_model(config).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        loss = model(ids, labels=ids, output_router_logits=True).loss
        loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    assert "model.layers.1.feed_forward.experts.gate_up_proj" in plain
    assert max(max_diff(plain[k], checkpointed[k]) for k in plain) <= 1e-6


def test_router_logits_and_router_losses_enter_the_loss():
    from llama4_sparse.modeling_llama4.router_losses import load_balancing_loss, router_z_loss

    config = tiny_config("maverick", "sdpa", router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
    model = our_model(config)
    reference = reference_twin(model)
    ids = _prompt(12, seed=7)
    with torch.no_grad():
        plain = model(ids, labels=ids)
        routed = model(ids, labels=ids, output_router_logits=True)
        theirs = reference(ids, output_router_logits=True)
    # One (tokens, experts) tensor per MoE layer (layers 1 and 3), equal to transformers' router logits.
    assert [tuple(t.shape) for t in routed.router_logits] == [(12, 4), (12, 4)]
    assert max(max_diff(a, b) for a, b in zip(routed.router_logits, theirs.router_logits)) <= TOLERANCE
    assert plain.router_logits is None and plain.aux_loss is None
    lb = load_balancing_loss(routed.router_logits, config)
    z = router_z_loss(routed.router_logits, config)
    cross_entropy = torch.nn.functional.cross_entropy(routed.logits[0, :-1], ids[0, 1:])
    assert torch.allclose(routed.aux_loss, lb)
    assert torch.allclose(plain.loss, cross_entropy + 0.001 * z, atol=1e-6)
    assert torch.allclose(routed.loss, cross_entropy + 0.01 * lb + 0.001 * z, atol=1e-6)


def test_hidden_states_and_attention_patterns():
    model = our_model(tiny_config("dense", "eager"))
    ids = _prompt(20, seed=8)
    with torch.no_grad():
        out = model.model(ids, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 5 and torch.equal(out.hidden_states[-1], out.last_hidden_state)
    assert len(out.attentions) == 4
    i, j = torch.arange(20)[:, None], torch.arange(20)[None]
    # RoPE layers: absolute blocks of 8 tokens (not a sliding window); the NoPE layer 3: full causal.
    chunked = (j <= i) & (j // 8 == i // 8)
    for layer, allowed in [(0, chunked), (1, chunked), (2, chunked), (3, j <= i)]:
        assert torch.equal(out.attentions[layer][0] > 0, allowed.expand(4, 20, 20)), f"layer {layer}"


def test_bad_inputs_raise_clear_errors():
    model = our_model(tiny_config("dense", "sdpa"))
    ids = _prompt(5, seed=9)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(ids, inputs_embeds=model.model.embed_tokens(ids))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=256\)"):
        model(torch.tensor([[5, 256]]))
    with pytest.raises(ValueError, match="input_ids must be"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        model(inputs_embeds=torch.zeros(1, 3, 7))
    with pytest.raises(ValueError, match="attention_mask has batch size 2"):
        model(ids, attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"position_ids must be \(batch or 1, 5\)"):
        model(ids, position_ids=torch.arange(4)[None])


def test_inputs_embeds_give_the_same_logits_as_input_ids():
    model = our_model(tiny_config("scout", "sdpa"))
    ids = _prompt(11, seed=12)
    with torch.no_grad():
        by_ids = model(ids).logits
        by_embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    assert torch.equal(by_ids, by_embeds)


def test_sequence_classification_scores_the_last_real_token():
    config = tiny_config("scout", "sdpa", num_labels=3)
    torch.manual_seed(0)
    model = Llama4ForSequenceClassification(config).eval()
    short, long = _prompt(6, seed=20)[0], _prompt(17, seed=21)[0]
    pad = config.pad_token_id
    batch = torch.stack([torch.cat([short, torch.full((11,), pad)]), long])  # right padding, as TRL pads
    mask = (batch != pad).long()
    with torch.no_grad():
        alone = [model.model(seq[None]).last_hidden_state[0, -1] for seq in (short, long)]
        expected = model.score(torch.stack(alone))
        by_mask = model(batch, attention_mask=mask).logits
        by_pad_id = model(batch).logits
    assert by_mask.shape == (2, 3)
    assert max_diff(by_mask, expected) <= TOLERANCE and max_diff(by_pad_id, expected) <= TOLERANCE
    labels = torch.tensor([2, 0])
    loss = model(batch, attention_mask=mask, labels=labels).loss
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(by_mask, labels), atol=1e-6)


def test_sequence_classification_needs_a_way_to_find_padding():
    model = Llama4ForSequenceClassification(tiny_config("dense", "sdpa", pad_token_id=None)).eval()
    embeds = model.model.embed_tokens(_prompt(8, seed=22).repeat(2, 1))
    with pytest.raises(ValueError, match="pass an attention_mask"):
        model(inputs_embeds=embeds)


def test_a_meta_device_model_is_fully_initialised_by_init_weights():
    # The path of FSDP / accelerate empty-weight loading: nothing may stay uninitialised memory,
    # including the bare 3-D expert tensors and the balancing bias.
    config = tiny_config("scout", "sdpa", moe_load_balancing="aux_loss_free", initializer_range=0.1)
    with torch.device("meta"):
        model = Llama4ForCausalLM(config)
    model.to_empty(device="cpu")
    model.init_weights()
    moe = model.model.layers[0].feed_forward
    for weight in (moe.experts.gate_up_proj, moe.experts.down_proj, model.lm_head.weight):
        assert abs(weight.std().item() - 0.1) < 0.01
    assert torch.equal(moe.expert_bias, torch.zeros(4))
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    # The only buffers are the biases; RoPE frequencies are recomputed from the config.
    assert all(name.endswith("feed_forward.expert_bias") for name, _ in model.named_buffers())


def test_rope_stays_exact_after_casting_the_model_to_bfloat16():
    model = our_model(tiny_config("scout", "sdpa"))
    positions = torch.tensor([[0, 1, 3000, 60000]])
    x = torch.zeros(1, 4, model.config.hidden_size)
    before = model.model.rotary_emb(x, positions)
    model.to(torch.bfloat16)
    assert torch.equal(model.model.rotary_emb(x.bfloat16(), positions), before)


def test_the_configured_attention_backend_is_used():
    ids = _prompt(9, seed=13)
    weights = {}
    for attn in ("eager", "sdpa"):
        model = our_model(tiny_config("dense", attn))
        with torch.no_grad():
            weights[attn] = model.model(ids, output_attentions=True).attentions
    assert weights["eager"][0].shape == (1, 4, 9, 9)
    assert weights["sdpa"] == ()  # the sdpa kernel does not expose its weights (transformers' models give () too)


def test_a_bfloat16_model_runs_and_stays_close_to_fp32():
    model = our_model(tiny_config("scout", "sdpa"))
    ids = _prompt(40, seed=14)
    with torch.no_grad():
        full = model(ids).logits
        half = model.to(torch.bfloat16)(ids).logits
    assert half.dtype == torch.bfloat16
    assert max_diff(half.float(), full) <= 0.05 * full.abs().max().item()


def test_attention_temperature_follows_the_published_formula():
    from llama4_sparse.modeling_llama4.attention import attention_temperature

    positions = torch.tensor([[0, 8190, 8191, 65535, 1_048_575, 10_485_759]])
    scale = attention_temperature(positions, floor_scale=8192, attn_scale=0.1)[0].tolist()
    # 1 below the first floor, then 1.069 at 8191, ~1.22 at 64K, ~1.49 at 1M, ~1.72 at 10M.
    assert scale[:2] == [1.0, 1.0]
    assert [round(s, 2) for s in scale[2:]] == [1.07, 1.22, 1.49, 1.72]
