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
