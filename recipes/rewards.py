"""Reward functions for reasoning completions, and the adapter that hands them to TRL.

A completion is the assistant text with its special tokens kept:
`<|reasoning_thinking_start|>chain<|reasoning_thinking_end|>answer`. Each reward maps a list of
completions (and dataset columns such as `answer` or `tests`) to one float per completion, or `None`
where the reward does not apply (TRL then leaves it out of the mean).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from math_verify import parse, verify

from llama4_sparse.eval.sandbox import run_programs
from llama4_sparse.recipes.data.arithmetic import CHECK_MARKER

THINK_START = "<|reasoning_thinking_start|>"
THINK_END = "<|reasoning_thinking_end|>"
_FORMAT = re.compile(re.escape(THINK_START) + r"(?P<reasoning>.*?\S.*?)" + re.escape(THINK_END) + r"(?P<answer>.*?\S.*)",
                     re.DOTALL)
_CODE_BLOCK = re.compile(r"```(?:python)?\n(.*?)```", re.DOTALL)


def split_completion(text: str) -> tuple[str | None, str]:
    """(reasoning, visible answer); reasoning is None when the completion has no closed thinking block."""
    if THINK_END not in text:
        return None, text.replace(THINK_START, "").strip()
    reasoning, answer = text.split(THINK_END, 1)
    return reasoning.replace(THINK_START, "").strip(), answer.strip()


_FINAL_MARKERS = ("####", "The final answer is")


def final_answer(text: str) -> str:
    """The answer a solution commits to: what follows the last GSM8K `####` or Llama's "The final
    answer is", else all of it."""
    start = max((text.rfind(m) + len(m) for m in _FINAL_MARKERS if m in text), default=0)
    return text[start:].strip().rstrip(".").strip()


def accuracy_reward(completions: Sequence[str], answer: Sequence[str], **_) -> list[float | None]:
    """1.0 when the visible answer equals the gold answer numerically or symbolically (math-verify),
    0.0 when it does not, None when the gold answer itself cannot be parsed."""
    rewards: list[float | None] = []
    for completion, gold_text in zip(completions, answer, strict=True):
        gold = parse(final_answer(gold_text))
        if not gold:
            rewards.append(None)
            continue
        predicted = parse(final_answer(split_completion(completion)[1]))
        rewards.append(float(bool(predicted) and verify(gold, predicted)))
    return rewards


_CHAIN_STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
_BACK_TO = re.compile(r"Back to (\d+)")
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
          "/": lambda a, b: a / b if b else None}


def self_check_passes(completion: str) -> bool:
    """Whether the completion checks its own result and the check holds: after the worked chain, a
    `Check:` that starts from the stated final answer, undoes the steps with right arithmetic (each step
    starting where the last ended) and comes back to the chain's own start, which it names (`Back to N`).
    Needs no gold answer: it verifies the completion against itself (`recipes.data.arithmetic.Problem.check`).
    The thinking markers may be there or not (the eval harness's samples drop them); `format_reward`
    scores them."""
    text = completion.replace(THINK_START, " ").replace(THINK_END, " ")
    if CHECK_MARKER not in text:
        return False
    chain, check = text.split(CHECK_MARKER, 1)
    forward, undo = _CHAIN_STEP.findall(chain), _CHAIN_STEP.findall(check)
    back, stated = _BACK_TO.search(check), final_answer(check)
    if not forward or not undo or back is None or not stated.isdigit():
        return False
    value = int(stated)
    for a, op, b, c in undo:
        if int(a) != value or _APPLY[op](int(a), int(b)) != int(c):
            return False
        value = int(c)
    return value == int(forward[0][0]) == int(back[1])


def self_check_reward(completions: Sequence[str], **_) -> list[float]:
    """1.0 when the completion's own check of its result holds (`self_check_passes`), else 0.0."""
    return [float(self_check_passes(c)) for c in completions]


def format_reward(completions: Sequence[str], **_) -> list[float]:
    """1.0 for exactly one non-empty thinking block opening the completion, followed by a non-empty
    answer; 0.0 otherwise (a second block or a stray marker is a format error)."""
    rewards = []
    for completion in completions:
        text = completion.strip()
        ok = (_FORMAT.fullmatch(text) is not None and text.count(THINK_START) == 1
              and text.count(THINK_END) == 1 and text.startswith(THINK_START))
        rewards.append(float(ok))
    return rewards


def extract_code(answer: str) -> str:
    """The last fenced code block of an answer, or the whole answer when it has none."""
    blocks = _CODE_BLOCK.findall(answer)
    return blocks[-1] if blocks else answer


def code_reward(completions: Sequence[str], tests: Sequence[str], timeout: float = 3.0,
                allow_unsandboxed: bool = False, **_) -> list[float | None]:
    """1.0 when the answer's code passes its tests in the eval sandbox, 0.0 when it fails, crashes or
    times out, None for a row without tests. Raises eval.sandbox.SandboxUnavailable when isolation is
    unavailable, unless `allow_unsandboxed`."""
    rows = [(i, extract_code(split_completion(c)[1]) + "\n\n" + t) for i, (c, t) in enumerate(zip(completions, tests, strict=True)) if t and t.strip()]
    rewards: list[float | None] = [None] * len(completions)
    verdicts = run_programs([source for _, source in rows], timeout=timeout, allow_unsandboxed=allow_unsandboxed)
    for (i, _), verdict in zip(rows, verdicts):
        rewards[i] = float(verdict.passed)
    return rewards


def length_penalty(completion_lengths: Sequence[int], soft_limit: int, hard_limit: int, **_) -> list[float]:
    """0 up to `soft_limit` tokens, falling linearly to -1 at `hard_limit` and beyond: discourages
    rambling chains without rewarding terse wrong ones."""
    if not 0 < soft_limit < hard_limit:
        raise ValueError(f"need 0 < soft_limit < hard_limit, got {soft_limit} and {hard_limit}")
    return [-min(1.0, max(0, n - soft_limit) / (hard_limit - soft_limit)) for n in completion_lengths]


REWARDS: dict[str, Callable] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "code": code_reward,
    "length": length_penalty,
    "self_check": self_check_reward,
}


def for_trl(name: str, tokenizer, **options) -> Callable:
    """The reward `name` as a TRL reward function. TRL decodes completions without their special
    tokens, so the thinking markers are recovered here from `completion_ids`."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose from {sorted(REWARDS)}")
    reward = REWARDS[name]
    stop_ids = {tokenizer.pad_token_id, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])}

    def trl_reward(completion_ids, **columns):
        ids = [[t for t in seq if t not in stop_ids] for seq in completion_ids]
        texts = tokenizer.batch_decode(ids, skip_special_tokens=False)
        columns = {k: v for k, v in columns.items() if k not in ("completions", "prompts")}
        return reward(completions=texts, completion_lengths=[len(seq) for seq in ids], **columns, **options)

    trl_reward.__name__ = f"{name}_reward"
    return trl_reward
