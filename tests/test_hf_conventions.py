"""Conventions transformers' common model tests check, on the text model: every rope_type transformers
implements (through its own ROPE_INIT_FUNCTIONS), the rotary embedding's `forward(x, position_ids)`, and output
capture (`output_attentions` / `output_hidden_states` / `output_router_logits` through the heads' kwargs)."""

import pytest
import torch
from text_factory import our_model, reference_twin, tiny_config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from llama4_sparse.modeling_llama4.rope import supported_rope_types

HEAD_PAIRS = 8  # tiny_config: head_dim 16
# Parameters for each type (tiny_config's max_position_embeddings is 512; the prompt below is 40 tokens, past the
# 16-token original context of the context-extending types, so their long-range branches are used).
ROPE_PARAMETERS = {
    "default": {},
    "linear": {"factor": 4.0},
    "dynamic": {"factor": 4.0},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 8.0, "beta_slow": 1.0},
    "longrope": {"short_factor": [1.0 + i / 8 for i in range(HEAD_PAIRS)],
                 "long_factor": [2.0 + i for i in range(HEAD_PAIRS)], "original_max_position_embeddings": 16},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "proportional": {"partial_rotary_factor": 0.5},
}
# dynamic NTK rescales only past max_position_embeddings.
CONFIG_FIELDS = {"dynamic": {"max_position_embeddings": 24}, "yarn": {"max_position_embeddings": 64},
                 "longrope": {"max_position_embeddings": 64}}
IDS = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(0))


def _config(rope_type: str, attn: str = "sdpa"):
    if rope_type not in ROPE_PARAMETERS:
        pytest.fail(f"transformers added rope_type {rope_type!r}: give it parameters in ROPE_PARAMETERS")
    return tiny_config("maverick", attn, rope_scaling=None, rope_parameters={
        "rope_type": rope_type, "rope_theta": 10000.0, **ROPE_PARAMETERS[rope_type]}, **CONFIG_FIELDS.get(rope_type, {}))


def test_supported_rope_types_are_transformers_own():
    assert set(supported_rope_types()) == {"default", *ROPE_INIT_FUNCTIONS}
    assert {"linear", "dynamic", "yarn", "longrope", "llama3"} <= set(supported_rope_types())


@pytest.mark.parametrize("rope_type", supported_rope_types())
def test_every_rope_type_gives_transformers_logits(rope_type):
    model = our_model(_config(rope_type))
    reference = reference_twin(model)
    with torch.no_grad():
        ours, theirs = model(IDS).logits, reference(IDS).logits
        assert (ours - theirs).abs().max() <= 1e-4
        if rope_type != "default":
            # The type is really applied: plain RoPE on the same weights computes something else.
            plain = our_model(_config("default"))
            plain.load_state_dict(model.state_dict())
            assert (plain(IDS).logits - ours).abs().max() > 1e-5


@pytest.mark.parametrize("rope_type", ["default", "yarn", "longrope", "dynamic"])
def test_rotary_embedding_takes_x_and_position_ids_as_transformers(rope_type):
    model = our_model(_config(rope_type))
    reference = reference_twin(model)
    x = torch.zeros(2, 40, model.config.hidden_size)
    positions = torch.arange(40)[None].expand(2, -1)
    ours = model.model.rotary_emb(x, positions)
    theirs = reference.model.rotary_emb(x, positions)
    assert ours.dtype == torch.complex64 and ours.shape == (2, 40, HEAD_PAIRS)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=0, atol=1e-6)
    with pytest.raises(TypeError):
        model.model.rotary_emb(positions)  # the position-only form is gone


@pytest.mark.parametrize("fields, message", [
    ({"rope_type": "ntk", "rope_theta": 1e4}, "rope_type 'ntk' is not supported; choose one of"),
    ({"rope_type": "yarn", "rope_theta": 1e4}, "are incomplete: .*factor"),
    ({"rope_type": "longrope", "rope_theta": 1e4}, "are incomplete: .*long_factor"),
    ({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}, "Llama 4 rotates every channel pair"),
])
def test_unusable_rope_parameters_raise_clear_errors(fields, message):
    from llama4_sparse.modeling_llama4 import Llama4TextConfig

    with pytest.raises(ValueError, match=message):
        Llama4TextConfig.from_preset("tiny", rope_parameters=fields)


def test_outputs_are_captured_as_transformers_captures_them():
    from transformers.utils.output_capturing import OutputRecorder

    from llama4_sparse.modeling_llama4 import Llama4ForCausalLM

    assert set(Llama4ForCausalLM._can_record_outputs) == {"hidden_states", "attentions", "router_logits"}
    assert all(isinstance(spec, OutputRecorder) for spec in Llama4ForCausalLM._can_record_outputs.values())
    model = our_model(tiny_config("scout", "eager"))
    reference = reference_twin(model)
    flags = dict(output_attentions=True, output_hidden_states=True, output_router_logits=True)
    with torch.no_grad():
        ours, theirs = model(IDS, **flags), reference(IDS, **flags)
    layers = model.config.num_hidden_layers
    assert len(ours.hidden_states) == layers + 1 and len(ours.attentions) == layers
    assert len(ours.router_logits) == layers  # scout: every layer MoE
    assert ours.attentions[0].shape == (2, 4, 40, 40)
    for name in ("hidden_states", "attentions", "router_logits"):
        assert len(getattr(ours, name)) == len(getattr(theirs, name))
        for mine, reference_value in zip(getattr(ours, name), getattr(theirs, name)):
            assert (mine - reference_value).abs().max() <= 1e-5, name
    # The last hidden state is the normed one the LM head reads.
    assert torch.equal(ours.hidden_states[-1], model.model(IDS).last_hidden_state)


def test_hidden_states_selected_by_index_and_config_defaults():
    model = our_model(tiny_config("maverick", "eager"))
    with torch.no_grad():
        everything = model(IDS, output_hidden_states=True).hidden_states
        selected = model(IDS, output_hidden_states=[0, -1]).hidden_states
        model.config.output_attentions = True  # the config default applies when the kwarg is absent
        by_config = model(IDS)
    assert [h is None for h in selected] == [False, True, True, True, False]
    assert torch.equal(selected[0], everything[0]) and torch.equal(selected[-1], everything[-1])
    assert len(by_config.attentions) == model.config.num_hidden_layers and by_config.hidden_states is None
    assert model(IDS, return_dict=False)[0].shape == (2, 40, 256)
