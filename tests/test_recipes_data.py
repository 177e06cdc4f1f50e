"""Synthetic reasoning data: verified answers, deterministic by seed, disjoint splits."""

import re

import pytest

from recipes.data.arithmetic import FAMILIES, generate_problems


def _evaluate_chain(reasoning: str) -> int:
    """Recompute every `x op y = z` step of a chain with Python and return the last result."""
    result = None
    for a, op, b, z in re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", reasoning):
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert value == int(z), reasoning
        result = value
    return result


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_chain_step_is_correct_and_ends_at_the_answer(family):
    for problem in generate_problems(100, seed=3, families=(family,)):
        assert _evaluate_chain(problem.reasoning) == problem.answer
        assert problem.gsm8k_row()["answer"].endswith(f"\n#### {problem.answer}")


def test_same_seed_same_problems_other_seed_other_problems():
    assert generate_problems(50, seed=7) == generate_problems(50, seed=7)
    assert generate_problems(50, seed=7) != generate_problems(50, seed=8)


def test_held_out_split_never_overlaps_training_across_seeds():
    train = {p.question for seed in range(3) for p in generate_problems(1000, seed=seed, split="train")}
    test = {p.question for seed in range(3) for p in generate_problems(100, seed=seed, split="test")}
    assert len(test) > 100 and not train & test


def test_questions_within_a_split_are_distinct():
    questions = [p.question for p in generate_problems(1000, seed=0)]
    assert len(set(questions)) == len(questions)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split"):
        generate_problems(1, split="validation")
    with pytest.raises(ValueError, match="families"):
        generate_problems(1, families=("calculus",))
    with pytest.raises(ValueError, match="distinct"):
        generate_problems(10_000, families=("add",), max_operand=2)
