"""generate() and the key/value cache: parity with transformers, incremental decoding across chunk
boundaries, left-padded batches."""

import pytest
import torch
from text_factory import our_model, reference_twin, tiny_config

TOLERANCE = 1e-4


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
    # A static cache (fixed-size sliding layers) and no cache at all decode the same tokens.
    assert torch.equal(model.generate(prompt, **settings, cache_implementation="static"), ours)
    assert torch.equal(model.generate(prompt, **settings, use_cache=False), ours)


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
    assert (torch.cat(steps, dim=1) - full).abs().max() <= TOLERANCE
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


def test_left_padded_batch_matches_transformers_while_temperature_tuning_is_flat():
    # transformers takes the NoPE temperature position from the cache length (pads included) while
    # this package takes it from position_ids; below floor_scale both scales are 1, and the chunk
    # boundaries (counted from the first real token by transformers' mask) must then agree exactly.
    model = our_model(tiny_config("scout", "sdpa", floor_scale=8192))
    reference = reference_twin(model)
    prompts = [_prompt(length, seed=30 + length)[0] for length in (5, 13)]
    batch = torch.stack([torch.cat([torch.zeros(8, dtype=torch.long), prompts[0]]), prompts[1]])
    mask = (torch.arange(13)[None] >= torch.tensor([[8], [0]])).long()
    settings = dict(attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(model.generate(batch, **settings), reference.generate(batch, **settings))
