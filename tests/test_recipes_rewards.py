"""Rewards: answer correctness through math-verify, the thinking-block format, the length penalty and
the TRL adapter that recovers the thinking markers from token ids."""

import pytest

from llama4_sparse.recipes.rewards import (
    THINK_END,
    THINK_START,
    accuracy_reward,
    final_answer,
    for_trl,
    format_reward,
    length_penalty,
    self_check_reward,
)
from llama4_sparse.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _completion(reasoning: str, answer: str) -> str:
    return f"{THINK_START}{reasoning}{THINK_END}{answer}"


def test_accuracy_compares_values_not_strings():
    completions = [_completion("3 + 4 = 7.", "#### 7"), _completion("", "#### 7.0"), _completion("x", "#### 1,234"),
                   _completion("x", "#### 8"), _completion("x", "no number")]
    gold = ["3 + 4 = 7.\n#### 7", "#### 7", "#### 1234", "#### 7", "#### 7"]
    assert accuracy_reward(completions, answer=gold) == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_accuracy_is_none_when_the_gold_answer_cannot_be_parsed():
    assert accuracy_reward([_completion("r", "#### 5")], answer=["#### five"]) == [None]


def test_accuracy_reads_the_answer_after_the_thinking_block_only():
    # The chain mentions the right number, but the committed answer is wrong.
    assert accuracy_reward([_completion("7 is tempting", "#### 6")], answer=["#### 7"]) == [0.0]


def test_symbolic_equality():
    assert accuracy_reward([_completion("r", "#### 3/4")], answer=["#### 0.75"]) == [1.0]


def test_format_wants_one_non_empty_block_then_an_answer():
    assert format_reward([
        _completion("3 + 4 = 7.", "#### 7"),
        _completion("", "#### 7"),
        _completion("3 + 4 = 7.", ""),
        "#### 7",
        _completion("a", "b") + THINK_END,
        "x" + _completion("a", "b"),
        _completion("a", _completion("b", "c")),
    ]) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_length_penalty_is_flat_then_linear():
    assert length_penalty([10, 20, 25, 30, 99], soft_limit=20, hard_limit=30) == [0.0, 0.0, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="soft_limit"):
        length_penalty([1], soft_limit=30, hard_limit=20)


def test_final_answer_takes_the_last_marker():
    assert final_answer("#### 3\n#### 4") == "4"
    assert final_answer(" 12 ") == "12"


def test_trl_adapter_recovers_markers_from_token_ids(tokenizer):
    ids = tokenizer(_completion("3 + 4 = 7.", "#### 7") + "<|eot|>", add_special_tokens=False).input_ids
    pad = [tokenizer.pad_token_id] * 3
    accuracy, fmt = for_trl("accuracy", tokenizer), for_trl("format", tokenizer)
    kwargs = dict(prompts=["p"], completions=["3 + 4 = 7.#### 7"], completion_ids=[ids + pad], answer=["#### 7"])
    assert accuracy(**kwargs) == [1.0] and fmt(**kwargs) == [1.0]
    assert fmt.__name__ == "format_reward"
    with pytest.raises(ValueError, match="unknown reward"):
        for_trl("helpfulness", tokenizer)


def test_code_reward_runs_answers_in_the_sandbox_and_refuses_without_isolation(monkeypatch, tmp_path):
    from llama4_sparse.eval.sandbox import SandboxUnavailable
    from llama4_sparse.recipes.rewards import code_reward

    answer = THINK_START + "plan" + THINK_END + "```python\ndef double(x):\n    return 2 * x\n```"
    wrong = THINK_START + "plan" + THINK_END + "```python\ndef double(x):\n    return x\n```"
    tests = "assert double(3) == 6\n"
    assert code_reward([answer, wrong, answer], [tests, tests, ""]) == [1.0, 0.0, None]
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap: nothing may run
    with pytest.raises(SandboxUnavailable, match="allow-unsandboxed"):
        code_reward([answer], [tests])
    with pytest.warns(UserWarning, match="WITHOUT isolation"):
        assert code_reward([answer], [tests], allow_unsandboxed=True) == [1.0]


def test_self_check_reward_holds_only_for_a_right_check_of_the_stated_answer():
    from llama4_sparse.recipes.data.arithmetic import generate_problems

    problem = generate_problems(1, seed=0, families=("chain",), max_operand=20)[0]
    chain, check = problem.reasoning, problem.check  # 13 - 6 = 7. ... 9 + 7 = 16. / Check: 16 - 7 = 9. ...
    good = _completion(f"{chain} {check}", problem.final)
    wrong_answer = _completion(f"{chain} {check}", "The final answer is 17")  # the check starts from 16, not 17
    bad_step = _completion(f"{chain} {check.replace('14 / 2 = 7', '14 / 2 = 6')}", problem.final)
    wrong_start = _completion(f"{chain} {check.replace('Back to 13', 'Back to 12')}", problem.final)
    no_check = _completion(chain, problem.final)
    no_answer = _completion(f"{chain} {check}", "I am not sure")
    # The harness's samples drop the thinking markers; the check reads the same without them.
    plain = f"{chain} {check}{problem.final}"
    # A check that holds needs no gold answer: it compares the completion with itself.
    assert self_check_reward([good, wrong_answer, bad_step, wrong_start, no_check, no_answer, plain]) == [1, 0, 0, 0, 0, 0, 1]
