"""Preference pairs for DPO and reward modelling: a verified chain (chosen) against the same chain
with one arithmetic step corrupted and the error carried to the final answer (rejected)."""

from __future__ import annotations

import random
import re

from ..rewards import accuracy_reward, format_reward, split_completion
from .arithmetic import Problem

_STEP = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def corrupt(problem: Problem, rng: random.Random) -> Problem:
    """The problem with a wrong chain: one step's result is off by 1-3, and every later step that
    starts from that result is recomputed from it, so the chain stays self-consistent but ends wrong."""
    steps = [list(m.groups()) for m in _STEP.finditer(problem.reasoning)]
    if not steps:
        raise ValueError(f"no 'a op b = c' step to corrupt in {problem.reasoning!r}")
    bad = rng.randrange(len(steps))
    carried: dict[str, str] = {}
    for i, (a, op, b, c) in enumerate(steps):
        a = carried.get(a, a)  # the generators' chains carry a result as the next step's left operand
        value = _OPS[op](int(a), int(b))
        if i == bad:
            # Never the true value, never below zero; an intermediate result only grows, so the
            # later steps (which subtract from it) stay non-negative too.
            deltas = (-3, -2, -1, 1, 2, 3) if i == len(steps) - 1 else (1, 2, 3)
            value += rng.choice([d for d in deltas if value + d >= 0])
        if str(value) != c:
            carried[c] = str(value)
        steps[i] = [a, op, b, str(value)]
    pieces = iter(steps)
    reasoning = _STEP.sub(lambda _: "{} {} {} = {}".format(*next(pieces)), problem.reasoning)
    return Problem(problem.question, reasoning, int(steps[-1][3]), problem.family)


def preference_rows(problems: list[Problem], template: str = "{question}", seed: int = 0) -> list[dict]:
    """Conversational `prompt`/`chosen`/`rejected` rows (TRL's preference format); `template` wraps the question."""
    rng = random.Random(seed)
    rows = []
    for problem in problems:
        wrong = corrupt(problem, rng)
        rows.append({
            "prompt": problem.prompt(template),
            "chosen": problem.messages()[1:],
            "rejected": wrong.messages()[1:],
        })
    return rows


def on_policy_rows(problems: list[Problem], completions: list[list[str]], template: str = "{question}") -> list[dict]:
    """Preference pairs from a model's own samples: each sample that fails verification (wrong answer or
    malformed) is rejected against a verified one of the same problem, or the gold chain when none verified.
    Problems the model always solves give no pair, so training pushes only where the policy errs."""
    rows = []
    for problem, samples in zip(problems, completions, strict=True):
        gold = [problem.gsm8k_row()["answer"]] * len(samples)
        verdicts = [ok == 1.0 and fmt == 1.0 for ok, fmt in zip(accuracy_reward(samples, answer=gold),
                                                               format_reward(samples))]
        right = sorted({text for text, ok in zip(samples, verdicts) if ok})
        wrong = sorted({text for text, ok in zip(samples, verdicts) if not ok})
        for i, text in enumerate(wrong):
            if right:
                reasoning, answer = split_completion(right[i % len(right)])
                chosen = [{"role": "assistant", "reasoning": reasoning, "content": answer}]
            else:
                chosen = problem.messages()[1:]
            reasoning, answer = split_completion(text)
            rejected = {"role": "assistant", "content": answer}
            if reasoning is not None:
                rejected["reasoning"] = reasoning
            rows.append({"prompt": problem.prompt(template), "chosen": chosen, "rejected": [rejected]})
    return rows
