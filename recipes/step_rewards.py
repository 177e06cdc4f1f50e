"""A dense verifiable reward for worked chains: the share of the gold chain's steps the completion got right.

The answer reward is 1 only when every step of a multi-step chain is right, so for a weak policy most
GRPO groups are all-zero and teach nothing. Each `a op b = c` step of the completion's thinking block is
compared, in order, with the gold chain's step at the same place (the gold chain is the worked solution
before `####` in the row's `answer`, GSM8K layout): reading the right number from the question and
computing the step both count, so almost every group has some spread and a gradient.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .rewards import split_completion

_STEP = re.compile(r"(\d+)\s*([-+*])\s*(\d+)\s*=\s*(\d+)")


def chain_steps(text: str) -> list[tuple[str, str, str, str]]:
    return _STEP.findall(text)


def step_reward(completions: Sequence[str], answer: Sequence[str], **_) -> list[float | None]:
    """Per completion: matching steps / gold steps (extra steps beyond the gold chain count against it);
    None when the gold solution has no `a op b = c` step."""
    rewards: list[float | None] = []
    for completion, gold_text in zip(completions, answer, strict=True):
        gold = chain_steps(gold_text.split("####")[0])
        if not gold:
            rewards.append(None)
            continue
        reasoning, _ = split_completion(completion)
        steps = chain_steps(reasoning or "")
        right = sum(1 for mine, ref in zip(steps, gold) if mine == ref)
        rewards.append(right / max(len(gold), len(steps)))
    return rewards


def for_trl(tokenizer):
    """`step_reward` as a TRL reward function (thinking markers recovered from `completion_ids`)."""
    stop_ids = {tokenizer.pad_token_id, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])}

    def steps_reward(completion_ids, answer, **_):
        texts = tokenizer.batch_decode([[t for t in seq if t not in stop_ids] for seq in completion_ids],
                                       skip_special_tokens=False)
        return step_reward(texts, answer)

    return steps_reward
