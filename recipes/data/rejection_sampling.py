"""Rejection sampling: sample chains from a model, keep those whose answer verifies, save a dataset.

The kept rows are SFT-ready conversations (`messages` with the chain in `reasoning`), so a model's
own verified chains can be trained on (expert iteration / STaR) or paired against its failures.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import torch

from ..rewards import accuracy_reward, format_reward, split_completion
from .arithmetic import Problem


def verified_rows(problems: list[Problem], completions: list[list[str]], template: str = "{question}") -> list[dict]:
    """One row per distinct completion that is well formed and answers its problem correctly."""
    rows = []
    for problem, samples in zip(problems, completions, strict=True):
        gold = [problem.gsm8k_row()["answer"]] * len(samples)
        keep = {text for text, ok, fmt in zip(samples, accuracy_reward(samples, answer=gold), format_reward(samples))
                if ok == 1.0 and fmt == 1.0}
        for text in sorted(keep):
            reasoning, answer = split_completion(text)
            rows.append({"messages": [*problem.prompt(template),
                                      {"role": "assistant", "reasoning": reasoning, "content": answer}]})
    return rows


@torch.no_grad()
def sample_completions(model, tokenizer, problems: list[Problem], num_samples: int, template: str = "{question}",
                       temperature: float = 1.0, max_new_tokens: int = 64, seed: int = 0) -> list[list[str]]:
    """`num_samples` sampled completions per problem, special tokens kept (the thinking markers)."""
    torch.manual_seed(seed)
    prompts = [tokenizer.apply_chat_template(p.prompt(template), tokenize=False, add_generation_prompt=True)
               for p in problems]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    finally:
        tokenizer.padding_side = side
    out = model.generate(**batch, do_sample=True, temperature=temperature, top_k=0, max_new_tokens=max_new_tokens,
                         num_return_sequences=num_samples, pad_token_id=tokenizer.pad_token_id)
    stop = {tokenizer.pad_token_id, tokenizer.eos_token_id}
    texts = [tokenizer.decode([t for t in seq.tolist() if t not in stop], skip_special_tokens=False)
             for seq in out[:, batch.input_ids.shape[1]:]]
    return [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(problems))]


def rejection_sample(model, tokenizer, problems: list[Problem], output_dir: str | Path, num_samples: int = 8,
                     template: str = "{question}", **sampling) -> datasets.Dataset:
    """Sample, verify, and save the kept chains with `save_to_disk` (loadable as `dataset_name`)."""
    model.eval()
    rows = verified_rows(problems, sample_completions(model, tokenizer, problems, num_samples, template, **sampling),
                         template)
    dataset = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({"messages": []})
    dataset.save_to_disk(str(output_dir))
    return dataset
