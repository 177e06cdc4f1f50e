"""Small programming tasks with hidden tests, for the code-execution reward.

Each task asks for one Python function; its reference solution passes its tests (checked by the
tests through the eval sandbox), and the prompt never shows the tests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .splits import check_split, draw_distinct, split_of


@dataclass(frozen=True)
class ProgramTask:
    question: str
    reasoning: str
    solution: str
    tests: str

    @property
    def split(self) -> str:
        return split_of(self.question)

    def prompt(self) -> list[dict]:
        return [{"role": "user", "content": self.question}]

    def messages(self) -> list[dict]:
        answer = f"```python\n{self.solution}```"
        return [*self.prompt(), {"role": "assistant", "reasoning": self.reasoning, "content": answer}]


def _tests(name: str, cases: list[tuple]) -> str:
    return "".join(f"assert {name}({', '.join(map(repr, args))}) == {expected!r}\n" for args, expected in cases)


def _offset(rng: random.Random) -> ProgramTask:
    k, name = rng.randint(1, 500), rng.choice(["shift", "bump", "raise_by"])
    cases = [((x,), x + k) for x in rng.sample(range(-20, 100), 3)]
    return ProgramTask(f"Write a Python function `{name}(x)` that returns x plus {k}.",
                       f"Add {k} to the argument and return it.",
                       f"def {name}(x):\n    return x + {k}\n", _tests(name, cases))


def _scale(rng: random.Random) -> ProgramTask:
    k, name = rng.randint(2, 99), rng.choice(["scale", "times", "multiply"])
    cases = [((x,), x * k) for x in rng.sample(range(-20, 100), 3)]
    return ProgramTask(f"Write a Python function `{name}(x)` that returns x multiplied by {k}.",
                       f"Multiply the argument by {k} and return the product.",
                       f"def {name}(x):\n    return x * {k}\n", _tests(name, cases))


def _count_char(rng: random.Random) -> ProgramTask:
    char, name = rng.choice("aeiou"), rng.choice(["count_letter", "occurrences", "tally"])
    words = ["banana", "education", "queue", "rhythm", "aeiou", "onomatopoeia", "cooperate"]
    cases = [((w,), w.count(char)) for w in rng.sample(words, 3)]
    return ProgramTask(f"Write a Python function `{name}(s)` that returns how many times the letter '{char}' "
                       "appears in the string s.",
                       f"Count the occurrences of '{char}' in s with str.count.",
                       f"def {name}(s):\n    return s.count({char!r})\n", _tests(name, cases))


def _sum_above(rng: random.Random) -> ProgramTask:
    k, name = rng.randint(0, 9), rng.choice(["sum_above", "total_over", "big_sum"])
    cases = []
    for _ in range(3):
        xs = [rng.randint(-5, 15) for _ in range(rng.randint(0, 6))]
        cases.append(((xs,), sum(x for x in xs if x > k)))
    return ProgramTask(f"Write a Python function `{name}(xs)` that returns the sum of the numbers in the list xs "
                       f"that are greater than {k}.",
                       f"Keep the numbers greater than {k} and add them up; an empty selection sums to 0.",
                       f"def {name}(xs):\n    return sum(x for x in xs if x > {k})\n", _tests(name, cases))


FAMILIES = {"offset": _offset, "scale": _scale, "count_char": _count_char, "sum_above": _sum_above}


def generate_program_tasks(n: int, seed: int = 0, split: str = "train") -> list[ProgramTask]:
    """`n` distinct tasks of `split`, families drawn at random; deterministic in the arguments."""
    check_split(split)
    rng = random.Random(f"programs:{seed}:{split}")
    families = sorted(FAMILIES)
    return draw_distinct(n, split, lambda _: FAMILIES[rng.choice(families)](rng), lambda t: t.question,
                         "program tasks exist; ask for fewer")
