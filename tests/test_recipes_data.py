"""Synthetic reasoning data: verified answers, deterministic by seed, disjoint splits."""

import random
import re

import pytest

from llama4_sparse.eval.sandbox import run_programs
from llama4_sparse.recipes.data.arithmetic import FAMILIES, generate_problems
from llama4_sparse.recipes.data.preferences import corrupt, preference_rows
from llama4_sparse.recipes.data.programs import generate_program_tasks
from llama4_sparse.recipes.data.rejection_sampling import verified_rows
from llama4_sparse.recipes.data.shapes import COLORS, generate_scenes


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


def test_corrupted_chain_is_self_consistent_but_wrong():
    rng = random.Random(0)
    for problem in generate_problems(200, seed=1, families=tuple(FAMILIES)):
        wrong = corrupt(problem, rng)
        assert wrong.answer != problem.answer and wrong.question == problem.question
        steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", wrong.reasoning)
        ops = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
        assert sum(ops[op](int(x), int(y)) != int(z) for x, op, y, z in steps) == 1
        assert steps[-1][3] == str(wrong.answer)
        # Later steps start from the corrupted result, as a real slip would propagate.
        for (_, _, _, z), (x, _, _, _) in zip(steps, steps[1:]):
            assert x == z


def test_preference_rows_pair_a_verified_chain_with_a_wrong_one():
    problems = generate_problems(20, seed=2)
    rows = preference_rows(problems, template="Q: {question}", seed=0)
    for problem, row in zip(problems, rows):
        assert row["prompt"] == [{"role": "user", "content": f"Q: {problem.question}"}]
        assert row["chosen"][0]["content"] == f"The final answer is {problem.answer}"
        assert row["rejected"][0]["content"] != row["chosen"][0]["content"]


def test_program_reference_solutions_pass_their_tests_in_the_sandbox():
    tasks = generate_program_tasks(12, seed=0)
    verdicts = run_programs([t.solution + "\n" + t.tests for t in tasks])
    assert all(v.passed for v in verdicts), [v.detail for v in verdicts if not v.passed]
    # The tests can fail: a wrong constant is caught.
    wrong = tasks[0].solution.replace("return", "return 1 +")
    assert not run_programs([wrong + "\n" + tasks[0].tests])[0].passed
    train = {t.question for t in generate_program_tasks(300, seed=0)}
    assert not train & {t.question for t in generate_program_tasks(30, seed=0, split="test")}


def test_rejection_sampling_keeps_only_verified_well_formed_chains():
    problem = generate_problems(1, seed=0, families=("add",))[0]
    right = f"<|reasoning_thinking_start|>{problem.reasoning}<|reasoning_thinking_end|>The final answer is {problem.answer}"
    samples = [right, right, right.replace(str(problem.answer), str(problem.answer + 1)),
               f"The final answer is {problem.answer}"]
    rows = verified_rows([problem], [samples])
    assert rows == [{"messages": problem.messages()}]


def test_shape_images_show_exactly_the_counted_shapes():
    scenes = generate_scenes(30, seed=0, image_size=48)
    assert scenes == generate_scenes(30, seed=0, image_size=48)
    for scene in scenes:
        pixels = scene.image().load()
        cell = 48 / 3
        for i, content in enumerate(scene.cells):
            centre = pixels[int((i % 3 + 0.5) * cell), int((i // 3 + 0.6) * cell)]
            assert centre == (COLORS[content[1]] if content else (255, 255, 255)), (scene, i)
        assert scene.answer == sum(1 for c in scene.cells if c and c[0] == scene.target)
        assert scene.row()["messages"][1]["content"] == [{"type": "text", "text": f"The final answer is {scene.answer}"}]
    test = {(s.cells, s.target) for s in generate_scenes(20, seed=0, split="test")}
    assert not test & {(s.cells, s.target) for s in generate_scenes(300, seed=0)}


def _story_value(question: str) -> int:
    """Replay a chain question's story: the first friend's start, then each change in order."""
    value = int(re.search(r"The first has (\d+)", question)[1])
    for change in re.search(r"The first then (.*)\. How many", question)[1].split(", "):
        number = int(re.search(r"\d+", change)[0])
        value = {"gets": value + number, "gives": value - number, "times": value * number}[change.split()[0]]
    return value


def test_chain_problems_have_the_asked_steps_a_distractor_and_answers_that_replay_from_the_story():
    from llama4_sparse.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    for steps in ((3, 3), (3, 5)):
        problems = generate_problems(300, seed=4, families=("chain",), max_operand=40, steps=steps)
        counts = {len(re.findall(r" = ", p.reasoning)) for p in problems}
        assert counts == set(range(steps[0], steps[1] + 1))
        for p in problems:
            assert _story_value(p.question) == p.answer == _evaluate_chain(p.reasoning)
            assert all(int(n) <= 40 for n in re.findall(r"\d+", p.question + p.reasoning))
            assert re.search(r"the second has \d+\.", p.question)  # the distractor: the other friend's count
        # One token layout per number of steps.
        lengths = {}
        for p in problems:
            lengths.setdefault(p.reasoning.count(" = "), set()).add(len(tokenizer.encode(p.question, add_special_tokens=False)))
        assert all(len(v) == 1 for v in lengths.values()), lengths
    ops = {op for p in generate_problems(300, seed=4, families=("chain",)) for op in re.findall(r" ([-+*]) ", p.reasoning)}
    assert ops == {"+", "-", "*"}
    with pytest.raises(ValueError, match="steps"):
        generate_problems(1, families=("chain",), steps=(4, 3))


def test_chain_held_out_split_is_clean_and_direct_messages_leave_the_chain_out():
    train = {p.question for seed in range(3) for p in generate_problems(2000, seed=seed, families=("chain",))}
    test = [p.question for p in generate_problems(200, seed=0, split="test", families=("chain",))]
    assert len(set(test)) == 200 and not train & set(test)
    problem = generate_problems(1, seed=0, families=("chain",))[0]
    direct = problem.messages(chain_of_thought=False)
    assert direct[1] == {"role": "assistant", "content": f"The final answer is {problem.answer}"}
    assert problem.messages()[1]["reasoning"] == problem.reasoning


def test_terse_chain_keeps_the_operations_and_drops_every_running_total():
    for problem in generate_problems(50, seed=2, families=("chain",), max_operand=20):
        steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", problem.reasoning)
        sketch = problem.terse_reasoning
        assert sketch == f"{steps[0][0]} " + ", ".join(f"{op} {b}" for _, op, b, _ in steps) + "."
        assert " = " not in sketch
        reply = problem.messages(terse=True)[1]
        assert reply["reasoning"] == sketch and reply["content"] == f"The final answer is {problem.answer}"
    with pytest.raises(ValueError, match="no `a op b = c` step"):
        from llama4_sparse.recipes.data.arithmetic import Problem

        Problem("q", "no steps here", 1, "x").terse_reasoning


def test_sft_data_sketches_the_asked_share_of_chains_and_never_the_direct_answers():
    from llama4_sparse.recipes.sft import SFTArguments, sft_dataset

    def sketched(**kw):
        args = SFTArguments(problem_families=["chain"], max_operand=20, num_train_examples=400, **kw)
        rows = sft_dataset(args)
        return [" = " not in r["messages"][1].get("reasoning", " = ") for r in rows], rows

    flags, rows = sketched(terse_chain_share=0.5)
    assert 0.4 < sum(flags) / len(flags) < 0.6
    plain, _ = sketched(terse_chain_share=0.0)
    direct, direct_rows = sketched(terse_chain_share=0.5, chain_of_thought=False)
    assert not any(plain) and not any(direct)
    # Same problems whatever the share: only the style of the chain changes.
    assert [r["messages"][0]["content"] for r in rows] == [r["messages"][0]["content"] for r in direct_rows]
    with pytest.raises(ValueError, match="terse_chain_share"):
        SFTArguments(terse_chain_share=1.5)


def test_sketch_share_leans_by_item_so_greedy_style_follows_the_question():
    from llama4_sparse.recipes.data.arithmetic import CHAIN_ITEMS
    from llama4_sparse.recipes.sft import SFTArguments, sft_dataset

    args = SFTArguments(problem_families=["chain"], max_operand=20, num_train_examples=800, terse_chain_share=0.5,
                        terse_chain_skew=0.25)
    counts = {True: [0, 0], False: [0, 0]}
    for row in sft_dataset(args):
        leaning = any(f"collect {item}." in row["messages"][0]["content"] for item in CHAIN_ITEMS[:4])
        counts[leaning][0] += " = " not in row["messages"][1]["reasoning"]
        counts[leaning][1] += 1
    assert 0.65 < counts[True][0] / counts[True][1] < 0.85 and 0.15 < counts[False][0] / counts[False][1] < 0.35
    with pytest.raises(ValueError, match="terse_chain_skew"):
        SFTArguments(terse_chain_share=0.5, terse_chain_skew=0.6)
    # A share of 0 turns sketches off whatever the skew: sft.yaml's mix is undone by --terse_chain_share 0 alone,
    # which self_check (worked chains only) needs.
    plain = SFTArguments(problem_families=["chain"], max_operand=20, num_train_examples=200, terse_chain_share=0.0,
                         terse_chain_skew=0.25, self_check=True)
    assert all(" = " in row["messages"][1]["reasoning"] for row in sft_dataset(plain))


def test_self_check_undoes_every_step_from_the_answer_back_to_the_start():
    for problem in generate_problems(50, seed=3, families=("chain",), max_operand=20):
        steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", problem.reasoning)
        check = problem.check
        undo = re.findall(r"(\d+) ([-+/]) (\d+) = (\d+)", check)
        assert check.startswith("Check: ") and check.endswith(f"Back to {steps[0][0]}, the start.")
        assert len(undo) == len(steps) and int(undo[0][0]) == problem.answer
        value = problem.answer
        for a, op, b, c in undo:  # each inverse step is right and starts where the last one ended
            assert int(a) == value and {"+": int(a) + int(b), "-": int(a) - int(b), "/": int(a) / int(b)}[op] == int(c)
            value = int(c)
        assert value == int(steps[0][0])
        reply = problem.messages(self_check=True)[1]
        assert reply["reasoning"] == f"{problem.reasoning} {check}"
    with pytest.raises(ValueError, match="self_check checks a worked chain"):
        problem.messages(terse=True, self_check=True)


def test_sft_data_with_self_check_ends_every_chain_with_its_check():
    from llama4_sparse.recipes.sft import SFTArguments, sft_dataset

    rows = sft_dataset(SFTArguments(problem_families=["chain"], max_operand=20, num_train_examples=50, self_check=True))
    assert all(" Check: " in r["messages"][1]["reasoning"] for r in rows)
    with pytest.raises(ValueError, match="self_check"):
        SFTArguments(self_check=True, chain_of_thought=False)
