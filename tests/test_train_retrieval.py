"""recipes/train_retrieval.py: a run saves a loadable model that trained on the answers, and a later run continues
from it (`--init_from`) with the RoPE chunk it asks for."""

import json

import torch

from llama4_sparse.modeling_llama4 import Llama4ForCausalLM
from llama4_sparse.recipes import train_retrieval

SHORT = ["--batch_size", "2", "--min_length", "140", "--max_length", "150", "--digits", "2", "--max_keys", "1",
         "--warmup", "1"]


def _weights(path):
    return Llama4ForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def test_a_run_continues_from_a_saved_model_with_a_new_chunk(tmp_path):
    first = tmp_path / "first"
    train_retrieval.main(["--output_dir", str(first), "--steps", "3", *SHORT])
    losses = [json.loads(line)["loss"] for line in open(first / "train_log.jsonl")]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)  # steps 0 and 2 logged, finite
    saved = _weights(first / "model")

    # No steps: the weights come through unchanged, under the new chunk.
    same = tmp_path / "same"
    summary = train_retrieval.main(["--output_dir", str(same), "--init_from", str(first / "model"),
                                    "--attention_chunk_size", "64", "--steps", "0", *SHORT])
    assert summary["attention_chunk_size"] == 64 and summary["init_from"] == str(first / "model")
    assert Llama4ForCausalLM.from_pretrained(same / "model").config.attention_chunk_size == 64
    assert Llama4ForCausalLM.from_pretrained(first / "model").config.attention_chunk_size == 256
    reloaded = _weights(same / "model")
    assert saved.keys() == reloaded.keys() and all(torch.equal(saved[k], reloaded[k]) for k in saved)

    # Steps: training moves them.
    moved = tmp_path / "moved"
    train_retrieval.main(["--output_dir", str(moved), "--init_from", str(first / "model"), "--steps", "2", *SHORT])
    after = _weights(moved / "model")
    assert any(not torch.equal(saved[k], after[k]) for k in saved)
