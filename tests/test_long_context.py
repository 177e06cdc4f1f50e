"""Linear-memory attention (sdpa path) and chunked prefill: the same numbers as the dense-mask path
(eager, transformers) at and across chunk boundaries, with padding, packing and a cache, and memory
that grows linearly with the length."""

import json
import subprocess
import sys

import pytest
import torch
from text_factory import our_model, reference_twin, tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from llama4_sparse.modeling_llama4 import chunked_attention
from llama4_sparse.modeling_llama4.chunked_attention import AttentionLayout, build_layouts, linear_memory_attention

TOLERANCE = 1e-5


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _twins(pattern: str, **overrides):
    """The same weights with linear-memory attention (sdpa) and with dense masks (eager)."""
    fast = our_model(tiny_config(pattern, "sdpa", **overrides))
    reference = our_model(tiny_config(pattern, "eager", **overrides))
    reference.load_state_dict(fast.state_dict())
    return fast, reference


@pytest.mark.parametrize("pattern", ["scout", "maverick"])
@pytest.mark.parametrize("prefill_chunk_size", [None, 16, 13])
def test_logits_equal_the_dense_mask_path_plain_padded_and_packed(pattern, prefill_chunk_size):
    fast, reference = _twins(pattern, prefill_chunk_size=prefill_chunk_size)
    ids = _ids(3, 53, seed=1)  # 6.6 chunks of 8
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    mask[2, :16] = 0  # left padding of exactly two chunks
    positions = torch.cat([torch.arange(20), torch.arange(9), torch.arange(24)])[None]
    with torch.no_grad():
        for kwargs, keep in [
            ({}, torch.ones_like(ids, dtype=torch.bool)),
            ({"attention_mask": mask}, mask.bool()),
            ({"position_ids": positions}, torch.ones_like(ids, dtype=torch.bool)),
        ]:
            ours = fast(ids, **kwargs).logits
            dense = reference(ids, **kwargs).logits
            assert (ours - dense)[keep].abs().max() <= TOLERANCE, kwargs.keys()
            assert torch.isfinite(ours).all()
        transformers_logits = reference_twin(reference)(ids).logits
        assert (fast(ids).logits - transformers_logits).abs().max() <= TOLERANCE


def test_chunked_prefill_runs_in_slices_and_fills_the_cache_like_one_pass():
    fast, reference = _twins("scout", prefill_chunk_size=12)
    ids = _ids(1, 45, seed=2)
    calls = []
    fast.model.layers[0].register_forward_hook(lambda module, args, out: calls.append(args[0].shape[1]))
    with torch.no_grad():
        sliced = fast(ids, use_cache=True)
        one_pass = reference(ids, use_cache=True)
    assert calls == [12, 12, 12, 9]
    assert (sliced.logits - one_pass.logits).abs().max() <= TOLERANCE
    for layer, kind in enumerate(fast.config.layer_types):
        ours, theirs = sliced.cache.layers[layer], one_pass.cache.layers[layer]
        expected = 7 if kind == "chunked_attention" else 45  # chunk - 1 past tokens on chunked layers
        assert ours.keys.shape[-2] == theirs.keys.shape[-2] == expected
        assert (ours.keys - theirs.keys).abs().max() <= TOLERANCE
        assert (ours.values - theirs.values).abs().max() <= TOLERANCE
    # With gradients on, the prompt goes through in one pass (activations are needed anyway).
    calls.clear()
    fast(ids)
    assert calls == [45]


@pytest.mark.parametrize("prefill_chunk_size", [None, 8, 11])
def test_decoding_across_chunk_boundaries_with_padding_equals_the_full_forward(prefill_chunk_size):
    fast, reference = _twins("scout", prefill_chunk_size=prefill_chunk_size)
    ids = _ids(2, 37, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        full = reference(ids, attention_mask=mask, use_cache=False).logits
        out = fast(ids[:, :23], attention_mask=mask[:, :23], use_cache=True)  # ends mid-chunk
        steps, cache = [out.logits], out.cache
        for start, stop in [(23, 24), (24, 27), *[(i, i + 1) for i in range(27, 37)]]:
            out = fast(ids[:, start:stop], attention_mask=mask[:, :stop], cache=cache, use_cache=True)
            steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - full)[mask.bool()].abs().max() <= TOLERANCE


@pytest.mark.parametrize("pattern", ["scout", "maverick"])
def test_generation_with_chunked_prefill_is_identical_to_the_dense_path_and_transformers(pattern):
    fast, reference = _twins(pattern, prefill_chunk_size=8)
    prompts = [_ids(1, n, seed=20 + n)[0] for n in (30, 19)]
    batch = torch.stack([prompts[0], torch.cat([torch.zeros(11, dtype=torch.long), prompts[1]])])
    mask = (torch.arange(30)[None] >= torch.tensor([[0], [11]])).long()
    settings = dict(attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(fast.generate(batch, **settings), reference.generate(batch, **settings))
    single = dict(settings, attention_mask=torch.ones_like(batch[:1]))
    assert torch.equal(fast.generate(batch[:1], **single), reference_twin(reference).generate(batch[:1], **single))


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any operator produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("padded", [False, True])
def test_no_operator_materialises_a_length_squared_tensor(padded, monkeypatch):
    length = 2048
    # A masked block may hold MASK_BUDGET entries; shrink it so that blocking is visible at this length.
    monkeypatch.setattr(chunked_attention, "MASK_BUDGET", 1 << 16)
    fast = our_model(tiny_config("scout", "sdpa", attention_chunk_size=64, max_position_embeddings=4096))
    ids = _ids(1, length, seed=4)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :100] = 0
    recorder = _LargestTensor()
    with torch.no_grad(), recorder:
        fast(ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    # A dense mask alone would hold length**2 = 4.2 M entries.
    assert recorder.largest < length**2 // 8, recorder.largest


def test_building_blocks_agree_with_a_dense_softmax():
    torch.manual_seed(5)
    chunk, past, length = 8, 13, 21
    query = torch.randn(2, 4, length, 16)
    key, value = torch.randn(2, 2, past + length, 16), torch.randn(2, 2, past + length, 16)
    valid = torch.ones(2, past + length, dtype=torch.bool)
    valid[1, :6] = False
    positions = torch.arange(past, past + length)[None]
    layouts = build_layouts(["chunked_attention", "full_attention"], chunk, valid.long(), positions, past, length, 2)
    for kind, layout in layouts.items():
        out = linear_memory_attention(query, key, value, layout, 0.25)
        q_index = torch.arange(past, past + length)[:, None]
        k_index = torch.arange(past + length)[None]
        keep = (k_index <= q_index)[None] & valid[:, None]
        if kind == "chunked_attention":
            start = (k_index - 6 * torch.tensor([[0], [1]])[:, :, None]) // chunk
            q_chunk = (q_index - 6 * torch.tensor([[0], [1]])[:, :, None]) // chunk
            keep = keep & (start == q_chunk)
        scores = torch.einsum("bhqd,bhkd->bhqk", query, key.repeat_interleave(2, 1)) * 0.25
        scores = scores.masked_fill(~keep[:, None], float("-inf"))
        dense = torch.einsum("bhqk,bhkd->bqhd", scores.softmax(-1), value.repeat_interleave(2, 1))
        assert (out - dense).abs().max() <= TOLERANCE, kind


def test_bad_inputs_name_the_problem():
    fast = our_model(tiny_config("scout", "sdpa"))
    ids = _ids(1, 10, seed=6)
    with torch.no_grad():
        cache = fast(ids, use_cache=True).cache
        with pytest.raises(ValueError, match="mask over the cached tokens and the new ones"):
            fast(ids[:, :1], attention_mask=torch.ones(1, 1, dtype=torch.long), cache=cache, use_cache=True)
        fast.config.prefill_chunk_size = -4
        with pytest.raises(ValueError, match="prefill_chunk_size must be a positive integer"):
            fast(_ids(1, 20, seed=7))
    layout = AttentionLayout(query_start=3, query_end=5)
    with pytest.raises(ValueError, match="layout describes queries from 3"):
        linear_memory_attention(torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 5, 4), torch.zeros(1, 1, 5, 4), layout, 1.0)


_MEMORY_PROBE = """
import json, resource, sys, torch
from llama4_sparse.modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
torch.set_num_threads(1)
length, attn = int(sys.argv[1]), sys.argv[2]
config = Llama4TextConfig.from_preset("tiny", max_position_embeddings=length, prefill_chunk_size=2048)
config._attn_implementation = attn
torch.manual_seed(0)
model = Llama4ForCausalLM(config).eval()
ids = torch.randint(0, 4096, (1, length))
with torch.no_grad():
    model(ids[:, :64], use_cache=False)  # warm up the kernels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model(ids, use_cache=False, logits_to_keep=1)
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024))
"""


def _peak_mb(length: int, attn: str) -> float:
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(length), attn], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_prefill_memory_grows_linearly_with_the_prompt():
    # Fresh process per length, tiny preset (chunk 256), 2048-token prefill slices: 4x the tokens must
    # cost < 5x the memory (the dense-mask path costs ~9x from 4k to 16k, see bench/README.md).
    short, long = _peak_mb(4096, "sdpa"), _peak_mb(16384, "sdpa")
    assert long <= 5 * short, (short, long)


def test_kv_cache_bytes_formula_matches_a_real_cache():
    from llama4_sparse.modeling_llama4.chunked_attention import kv_cache_bytes

    fast = our_model(tiny_config("scout", "sdpa", prefill_chunk_size=16))
    for length in (5, 8, 37):
        with torch.no_grad():
            cache = fast(_ids(2, length, seed=8), use_cache=True).cache
        held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        assert held == kv_cache_bytes(fast.config, length, bytes_per_value=4, batch=2)


def test_per_layer_outputs_are_whole_when_the_prompt_would_be_sliced():
    fast, _ = _twins("scout", prefill_chunk_size=8)
    ids = _ids(1, 20, seed=9)
    with torch.no_grad():
        out = fast(ids, output_hidden_states=True, output_router_logits=True)
        fast.config.prefill_chunk_size = None
        whole = fast(ids, output_hidden_states=True, output_router_logits=True)
    assert [h.shape for h in out.hidden_states] == [(1, 20, 64)] * 5
    assert all((a - b).abs().max() <= TOLERANCE for a, b in zip(out.hidden_states, whole.hidden_states))
    assert [r.shape for r in out.router_logits] == [(20, 4)] * 4
