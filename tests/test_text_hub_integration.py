"""The text model inside transformers: Auto classes, save/load, remote code, transformers' checkpoints."""

import json
import os
import subprocess
import sys
import textwrap

import torch
import transformers
from text_factory import our_model, reference_twin, tiny_config
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from llama4_sparse.modeling_llama4 import (
    Llama4ForCausalLM,
    Llama4ForSequenceClassification,
    Llama4TextConfig,
    Llama4TextModel,
)

IDS = torch.randint(3, 256, (2, 27), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_auto_classes_resolve_to_this_package():
    config = tiny_config("maverick")
    assert isinstance(AutoConfig.for_model("llama4_sparse_text"), Llama4TextConfig)
    assert type(AutoModel.from_config(config)) is Llama4TextModel
    assert type(AutoModelForCausalLM.from_config(config)) is Llama4ForCausalLM
    assert type(AutoModelForSequenceClassification.from_config(config)) is Llama4ForSequenceClassification


def test_base_model_is_the_backbone_returning_last_hidden_state():
    # TRL's fused LM head calls `model.base_model(...)` and reads `.last_hidden_state`.
    model = our_model(tiny_config("scout"))
    assert model.base_model is model.model
    with torch.no_grad():
        hidden = model.base_model(input_ids=IDS, use_cache=False).last_hidden_state
        assert torch.allclose(model.get_output_embeddings()(hidden), logits(model), atol=1e-6)
    assert model.get_output_embeddings() is model.lm_head


def test_save_and_reload_in_safetensors_through_the_auto_classes(tmp_path):
    model = our_model(tiny_config("scout"))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "pytorch_model.bin").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded) is Llama4ForCausalLM
    assert torch.equal(logits(reloaded), logits(model))
    # The backbone alone and a reward head load from the same folder.
    backbone = AutoModel.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(backbone(IDS).last_hidden_state, model.model(IDS).last_hidden_state)
    scorer = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1)
    assert torch.equal(scorer.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_saved_folder_loads_with_trust_remote_code_in_a_fresh_process(tmp_path):
    model = our_model(tiny_config("maverick"))
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_llama4.Llama4TextConfig",
        "AutoModelForCausalLM": "modeling_text.Llama4ForCausalLM",
    }
    torch.save(IDS, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert "modeling_llama4" not in sys.modules, "the package itself was imported"
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / "ids.pt")!r})).logits, {str(tmp_path / "out.pt")!r})
        """
    )
    # Run outside the repository so that the package cannot be found on the path.
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), logits(model))


def test_transformers_checkpoint_loads_into_ours_and_ours_into_transformers(tmp_path):
    model = our_model(tiny_config("scout"))
    reference = reference_twin(model)
    reference.save_pretrained(tmp_path / "theirs")
    model.save_pretrained(tmp_path / "ours")

    ours_from_theirs = Llama4ForCausalLM.from_pretrained(tmp_path / "theirs")
    theirs_from_ours = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "ours")
    assert set(ours_from_theirs.state_dict()) == set(theirs_from_ours.state_dict())
    expected = logits(reference)
    assert (logits(ours_from_theirs) - expected).abs().max() <= 1e-4
    assert (logits(theirs_from_ours) - expected).abs().max() <= 1e-4


def test_trl_fused_lm_head_gives_the_model_loss():
    # TRL's SFT/DPO/GRPO replace the forward by backbone + chunked LM head (recipes-notes §0.1).
    from trl.trainer.utils import add_fused_lm_head

    model = our_model(tiny_config("scout"))
    with torch.no_grad():
        expected = model(IDS, labels=IDS, use_cache=False).loss
        add_fused_lm_head(model)
        fused = model(input_ids=IDS, labels=IDS, fused_lm_head=True)
    assert torch.allclose(fused.loss, expected, atol=1e-5)
