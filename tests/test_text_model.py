"""The text model against transformers' Llama4ForCausalLM (same weights, fp32) and against itself
(cache, padding, packing, checkpointing)."""

import pytest
import torch
from text_factory import our_model, reference_twin, tiny_config

from modeling_llama4 import Llama4ForCausalLM

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


@pytest.mark.parametrize("pattern, attn", [("scout", "sdpa"), ("maverick", "eager")])
def test_greedy_generation_matches_transformers_token_for_token(pattern, attn):
    model = our_model(tiny_config(pattern, attn))
    reference = reference_twin(model)
    prompt = _prompt(10, seed=2)
    settings = dict(max_new_tokens=30, do_sample=False, min_new_tokens=30, attention_mask=torch.ones_like(prompt))
    ours = model.generate(prompt, **settings)
    theirs = reference.generate(prompt, **settings)
    assert ours.shape == (1, 40)  # past four chunk boundaries
    assert torch.equal(ours, theirs)
    # Sampling runs through the same cache path: top-1 sampling must reproduce greedy decoding.
    sampled = model.generate(prompt, **{**settings, "do_sample": True, "top_k": 1})
    assert torch.equal(sampled, ours)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_incremental_decoding_equals_full_forward_across_chunks(attn):
    model = our_model(tiny_config("scout", attn))
    ids = _prompt(29, seed=3)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :5], use_cache=True)  # a prefill that stops mid-chunk
        steps, cache = [out.logits], out.cache
        for start, stop in [(5, 6), (6, 7), (7, 11), *[(i, i + 1) for i in range(11, 29)]]:
            out = model(ids[:, start:stop], cache=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.cache
    assert max_diff(torch.cat(steps, dim=1), full) <= TOLERANCE
    # Chunked layers keep at most one chunk of keys (chunk_size - 1 past tokens), NoPE layers all.
    chunked = [i for i, kind in enumerate(model.config.layer_types) if kind == "chunked_attention"]
    assert all(cache.layers[i].keys.shape[-2] == 7 for i in chunked)
    assert cache.layers[3].keys.shape[-2] == 29


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padded_batch_generates_what_each_prompt_generates_alone(attn):
    model = our_model(tiny_config("scout", attn))
    prompts = [_prompt(length, seed=10 + length)[0] for length in (4, 11, 19)]
    width = max(len(p) for p in prompts)
    pad = model.config.pad_token_id
    batch = torch.stack([torch.cat([torch.full((width - len(p),), pad), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - len(p)), torch.ones(len(p))]) for p in prompts]).long()
    settings = dict(max_new_tokens=14, min_new_tokens=14, do_sample=False)
    together = model.generate(batch, attention_mask=mask, **settings)[:, width:]
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **settings)
        assert torch.equal(together[row], alone[0, len(prompt):]), f"prompt {row} (length {len(prompt)})"


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
    from modeling_llama4.router_losses import load_balancing_loss, router_z_loss

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


def test_hidden_states_and_attentions_are_returned_on_request():
    model = our_model(tiny_config("dense", "eager"))
    ids = _prompt(9, seed=8)
    with torch.no_grad():
        out = model.model(ids, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 5 and torch.equal(out.hidden_states[-1], out.last_hidden_state)
    assert len(out.attentions) == 4 and out.attentions[0].shape == (1, 4, 9, 9)
    # Chunk size 8: the 9th token of a RoPE layer sees only itself, the NoPE layer 3 sees all 9.
    assert torch.count_nonzero(out.attentions[0][0, :, 8]) == 4
    assert torch.count_nonzero(out.attentions[3][0, :, 8]) == 4 * 9


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


def test_inputs_embeds_give_the_same_logits_as_input_ids():
    model = our_model(tiny_config("scout", "sdpa"))
    ids = _prompt(11, seed=12)
    with torch.no_grad():
        by_ids = model(ids).logits
        by_embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    assert torch.equal(by_ids, by_embeds)
