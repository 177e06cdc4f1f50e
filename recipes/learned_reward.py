"""A learned reward for GRPO (RLHF): a reward model trained by `recipes/reward.py` scores each completion.

The completion is rendered the way the reward model was trained on it: prompt + assistant turn through
the chat template, its chain in the thinking block. TRL hands reward functions completions decoded
without special tokens, so the thinking markers are recovered from `completion_ids` here.

Alongside, the true verified accuracy of the same completions is logged (never used as reward) when the
rows carry a gold `answer`, so the reward model's score and the truth can be compared step by step:
a score that rises while accuracy falls is reward hacking.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llama4_sparse.modeling_llama4 import Llama4ForSequenceClassification

from .rewards import accuracy_reward, split_completion


def assistant_turn(text: str) -> dict:
    """A completion (thinking markers kept) as the assistant message the chat template renders."""
    reasoning, answer = split_completion(text)
    turn = {"role": "assistant", "content": answer}
    if reasoning is not None:
        turn["reasoning"] = reasoning
    return turn


class RewardModelScorer:
    """Scores (prompt messages, completion text) pairs with a sequence-classification reward model."""

    def __init__(self, model_or_path, tokenizer, batch_size: int = 64):
        if isinstance(model_or_path, (str, bytes)) or hasattr(model_or_path, "__fspath__"):
            model_or_path = Llama4ForSequenceClassification.from_pretrained(model_or_path, dtype=torch.float32)
        if getattr(model_or_path.config, "num_labels", None) != 1:
            raise ValueError("a reward model has one output (num_labels=1); train one with recipes/reward.py")
        self.model = model_or_path.eval().requires_grad_(False)
        self.tokenizer, self.batch_size = tokenizer, batch_size

    @torch.no_grad()
    def score(self, prompts: Sequence[list[dict]], completions: Sequence[str]) -> list[float]:
        rows = [self.tokenizer.apply_chat_template([*p, assistant_turn(c)], tokenize=True)
                for p, c in zip(prompts, completions, strict=True)]
        rows = [r["input_ids"] if isinstance(r, dict) or hasattr(r, "keys") else r for r in rows]
        pad = self.tokenizer.pad_token_id
        scores: list[float] = []
        for i in range(0, len(rows), self.batch_size):
            chunk = rows[i:i + self.batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, r in enumerate(chunk):  # right padding: the head reads the last non-pad token
                ids[j, :len(r)] = torch.tensor(r)
                mask[j, :len(r)] = 1
            logits = self.model(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device)).logits
            scores.extend(logits[:, 0].float().cpu().tolist())
        return scores


def reward_model_reward(scorer: RewardModelScorer, tokenizer):
    """`scorer` as a TRL reward function; logs `rm_true_accuracy` (verified, not rewarded) when `answer` is given."""
    stop_ids = {tokenizer.pad_token_id, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])}

    def learned_reward(prompts, completion_ids, answer=None, log_metric=None, **_):
        texts = tokenizer.batch_decode([[t for t in seq if t not in stop_ids] for seq in completion_ids],
                                       skip_special_tokens=False)
        scores = scorer.score(prompts, texts)
        if answer is not None and log_metric is not None:
            truth = [r for r in accuracy_reward(texts, answer=answer) if r is not None]
            if truth:
                log_metric("rm_true_accuracy", sum(truth) / len(truth))
        return scores

    return learned_reward
