"""Arithmetic and unit-conversion word problems with worked chains of thought.

Every problem is generated from its numbers, so its answer is verified by construction. The numbers
come last in each question, at a fixed distance from the end of the prompt for a given phrasing, so
a small model learns to find them quickly (the demo trains one from scratch in minutes). The split a
problem belongs to is a hash of its question text: a held-out ("test") question can never appear in
"train", whatever seed or size either was generated with.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .splits import check_split, draw_distinct, split_of

_STEP = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")
# Undoing a step: its total, the inverse operation and the same operand give back the step's input.
_INVERSE = {"+": "-", "-": "+", "*": "/"}
CHECK_MARKER = "Check:"
NAMES = ("Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gia", "Hugo", "Ivy", "Jon", "Kim", "Leo")
ITEMS = ("apples", "books", "coins", "pens", "cards", "shells", "stamps", "marbles", "cookies", "stickers")


@dataclass(frozen=True)
class Problem:
    """A question, its worked reasoning and its integer answer."""

    question: str
    reasoning: str
    answer: int
    family: str

    @property
    def split(self) -> str:
        return split_of(self.question)

    @property
    def final(self) -> str:
        """The assistant's visible answer, in the words Llama's GSM8K chat prompt asks for."""
        return f"The final answer is {self.answer}"

    def gsm8k_row(self) -> dict:
        """The problem in GSM8K's layout (worked solution ending `#### N`), for the eval harness."""
        return {"question": self.question, "answer": f"{self.reasoning}\n#### {self.answer}"}

    @property
    def terse_reasoning(self) -> str:
        """The chain as a sketch: the start and each change, running totals left out (`15 - 4, * 2, + 6.`).
        It reads like a worked chain but leaves every total to be composed in one forward pass, as answering
        directly does: the kind of sketchy solution real SFT sets mix with careful ones."""
        steps = _STEP.findall(self.reasoning)
        if not steps:
            raise ValueError(f"no `a op b = c` step in the {self.family} chain {self.reasoning!r} to sketch")
        return f"{steps[0][0]} " + ", ".join(f"{op} {b}" for _, op, b, _ in steps) + "."

    @property
    def check(self) -> str:
        """A check of the chain's result by substituting it back: undo each step from the answer, in reverse
        order, and see that the start comes out (`Check: 16 - 7 = 9. 9 + 5 = 14. 14 / 2 = 7. 7 + 6 = 13.
        Back to 13, the start.`). Every check step is arithmetic a reward can verify without the gold answer
        (`recipes.rewards.self_check_reward`)."""
        steps = _STEP.findall(self.reasoning)
        if not steps:
            raise ValueError(f"no `a op b = c` step in the {self.family} chain {self.reasoning!r} to check")
        undo = " ".join(f"{c} {_INVERSE[op]} {b} = {a}." for a, op, b, c in reversed(steps))
        return f"{CHECK_MARKER} {undo} Back to {steps[0][0]}, the start."

    def prompt(self, template: str = "{question}") -> list[dict]:
        return [{"role": "user", "content": template.format(question=self.question)}]

    def messages(self, template: str = "{question}", chain_of_thought: bool = True, terse: bool = False,
                 self_check: bool = False) -> list[dict]:
        """The user turn (the question through `template`) and the assistant's reasoning and answer;
        without `chain_of_thought` the assistant answers directly (no thinking block); with `terse` the
        thinking block holds the sketch (`terse_reasoning`) instead of the worked chain; with `self_check`
        the worked chain is followed by its `check` before the answer."""
        if self_check and (terse or not chain_of_thought):
            raise ValueError("self_check checks a worked chain: it needs chain_of_thought and no sketch (terse)")
        reasoning = self.terse_reasoning if terse else self.reasoning
        if self_check:
            reasoning = f"{reasoning} {self.check}"
        reply = {"role": "assistant", "reasoning": reasoning, "content": self.final} if chain_of_thought else \
            {"role": "assistant", "content": self.final}
        return [*self.prompt(template), reply]


def _add(rng: random.Random, hi: int) -> Problem:
    name, item, a, b = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(1, hi), rng.randint(1, hi)
    return Problem(
        f"{name} collects {item}. How many {item} does {name} have after starting with {a} and getting {b} more?",
        f"{a} + {b} = {a + b}.", a + b, "add",
    )


def _sub(rng: random.Random, hi: int) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a = rng.randint(2, hi)
    b = rng.randint(1, a - 1)
    return Problem(
        f"{name} collects {item}. How many {item} are left after starting with {a} and giving away {b}?",
        f"{a} - {b} = {a - b}.", a - b, "sub",
    )


def _mul(rng: random.Random, hi: int) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, max(2, hi // 2)), rng.randint(2, 9)
    return Problem(
        f"{name} packs {item} in boxes. How many {item} are in {a} boxes of {b}?",
        f"{a} * {b} = {a * b}.", a * b, "mul",
    )


def _add_sub(rng: random.Random, hi: int) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(1, hi), rng.randint(1, hi)
    c = rng.randint(1, a + b - 1)
    return Problem(
        f"{name} collects {item}. How many {item} does {name} have after starting with {a}, getting {b} more and giving away {c}?",
        f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}.", a + b - c, "add_sub",
    )


_UNITS = (("meters", "centimeters", 100), ("kilograms", "grams", 1000), ("hours", "minutes", 60),
          ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7))


def _unit(rng: random.Random, hi: int) -> Problem:
    big, small, factor = rng.choice(_UNITS)
    a, b = rng.randint(1, max(1, hi // 2)), rng.randint(1, factor - 1)
    return Problem(
        f"How many {small} are in {a} {big} and {b} {small}?",
        f"1 {big[:-1]} is {factor} {small}. {a} * {factor} = {a * factor}. {a * factor} + {b} = {a * factor + b}.",
        a * factor + b, "unit",
    )


# Items that are one token in the shipped tokenizer: a chain question then has the same token layout
# for every draw of a given number of steps (see _chain).
CHAIN_ITEMS = ("apples", "books", "cards", "shells", "stamps", "marbles", "cookies", "stickers")


def _chain(rng: random.Random, hi: int, steps: tuple[int, int] = (4, 4), distractor: bool = True) -> Problem:
    """A multi-step story: a start amount, then `steps` changes in order (gets d more, gives away d,
    times m), and, with `distractor`, the other friend's count, which the answer must ignore. Every
    number in the story and the chain (start, running totals) stays within 0..`hi`; a change is at most
    9, a factor 2 or 3. The worked chain does one operation per step, carrying the running total;
    answering directly means composing every step in one forward pass.

    Every phrase after the item name has a fixed token count and every number up to 99 is one token, so
    all questions with the same number of steps share one token layout: a tiny model learns where to
    read each number quickly, and what it still has to learn is the arithmetic."""
    item = rng.choice(CHAIN_ITEMS)
    value = rng.randint(2, hi)
    intro = f"Two friends collect {item}. The first has {value} and the second has {rng.randint(2, hi)}." if distractor \
        else f"A friend collects {item}. The first count is {value} and no other count matters."
    changes, chain = [], []
    for _ in range(rng.randint(*steps)):
        # Room for a whole change of up to 9 (or a small one near the ends), so totals do not pile up at hi.
        options = ["add"] * (value + 3 <= hi) + ["sub"] * (value >= 4) + ["mul"] * (2 <= value and value * 2 <= hi)
        op = rng.choice(options)
        if op == "add":
            d = rng.randint(1, min(9, hi - value))
            changes.append(f"gets {d} more")
            chain.append(f"{value} + {d} = {value + d}.")
            value += d
        elif op == "sub":
            d = rng.randint(1, min(9, value - 1))
            changes.append(f"gives away {d}")
            chain.append(f"{value} - {d} = {value - d}.")
            value -= d
        else:
            m = rng.randint(2, 3 if value * 3 <= hi else 2)
            changes.append(f"times {m}")
            chain.append(f"{value} * {m} = {value * m}.")
            value *= m
    question = f"{intro} The first then {', '.join(changes)}. How many {item} does the first have now?"
    return Problem(question, " ".join(chain), value, "chain")


FAMILIES = {"add": _add, "sub": _sub, "mul": _mul, "add_sub": _add_sub, "unit": _unit, "chain": _chain}


def generate_problems(
    n: int, seed: int = 0, split: str = "train", families: tuple[str, ...] = ("add", "sub", "add_sub"),
    max_operand: int = 20, steps: tuple[int, int] = (4, 4),
) -> list[Problem]:
    """`n` distinct problems of `split`, drawn round-robin from `families`; the same arguments always
    give the same list. `steps` (fewest, most) sets how many operations a `chain` problem has."""
    check_split(split)
    unknown = set(families) - set(FAMILIES)
    if unknown or not families:
        raise ValueError(f"unknown problem families {sorted(unknown)}; choose from {sorted(FAMILIES)}")
    if max_operand < 2:
        raise ValueError(f"max_operand must be >= 2, got {max_operand}")
    if len(steps) != 2 or not 1 <= steps[0] <= steps[1]:
        raise ValueError(f"steps must be (fewest, most) with 1 <= fewest <= most, got {tuple(steps)}")
    makers = {f: (lambda r, hi: _chain(r, hi, tuple(steps))) if f == "chain" else FAMILIES[f] for f in families}
    rng = random.Random(f"{seed}:{split}")
    return draw_distinct(
        n, split, lambda k: makers[families[k % len(families)]](rng, max_operand), lambda p: p.question,
        f"problems exist for families={families} and max_operand={max_operand}; ask for fewer or widen max_operand",
    )
