"""pass@k against the closed form, GSM8K extraction and normalisation against lm-eval's filters."""

import itertools
from math import comb

import pytest

from llama4_sparse.eval import metrics

TRICKY = [
    "Natalia sold 48 clips.\n#### 72",
    "...$18.\n#### 18",
    "#### 1,234",
    "The answer is 18.",
    "The answer is 18",
    "The answer is $18.",
    "The final answer is $18",
    "The answer is 7 apples.",
    "Total: 2.50 dollars",
    "-3 degrees then 12",
    "The answer is -5. Then The answer is 6.",
    "The final answer is 1,000. The final answer is 2,000",
    "no numbers at all",
    "",
    "#### -42.",
    "costs $1,200.50 in total.",
]


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (5, 2, 1), (5, 2, 3), (10, 9, 5), (200, 10, 1), (200, 10, 10), (20, 0, 7)])
def test_pass_at_k_is_the_closed_form(n, c, k):
    assert metrics.pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_values_from_the_human_eval_paper_setup():
    assert metrics.pass_at_k(200, 10, 1) == pytest.approx(0.05)
    assert metrics.pass_at_k(200, 10, 10) == pytest.approx(0.40855, abs=1e-5)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        metrics.pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        metrics.pass_at_k(3, 1, 4)


# (output, gold, gsm8k strict, gsm8k_cot strict, cot_llama strict, flexible) as lm-eval 0.4.13 extracts them
# (eval-notes §1.3, produced with lm-eval's RegexFilter); the quirks are intentional.
TABLE = [
    ("...$18.\n#### 18", "18", "18", "[invalid]", "[invalid]", "18"),
    ("#### 1,234", "1234", "1,234", "[invalid]", "[invalid]", "1,234"),
    ("The answer is 18.", "18", "[invalid]", "18", "[invalid]", "18."),
    ("The answer is 18", "18", "[invalid]", "1", "[invalid]", "18"),
    ("The answer is $18.", "18", "[invalid]", "[invalid]", "[invalid]", "$18."),
    ("The final answer is $18", "18", "[invalid]", "[invalid]", "$18", "$18"),
    ("The answer is 7 apples.", "7", "[invalid]", "7", "[invalid]", "7"),
    ("Total: 2.50 dollars", "2.5", "[invalid]", "[invalid]", "[invalid]", "2.50"),
    ("-3 degrees then 12", "12", "[invalid]", "[invalid]", "[invalid]", "12"),
]


@pytest.mark.parametrize("output,gold,strict,cot,llama,flexible", TABLE)
def test_extraction_matches_lm_eval_table(output, gold, strict, cot, llama, flexible):
    assert metrics.STRICT_GSM8K(output) == strict
    assert metrics.STRICT_GSM8K_COT(output) == cot
    assert metrics.STRICT_FINAL_ANSWER(output) == llama
    assert metrics.FLEXIBLE(output) == flexible


def test_normalisation_quirks():
    assert metrics.exact_match("$18.", "18")
    assert metrics.exact_match("1,234", "1234")
    assert metrics.exact_match("5600", "Janet ... so 5,600 in total.\n#### 5,600")
    assert not metrics.exact_match("18.00", "18")
    assert not metrics.exact_match("2.50", "2.5")
    assert not metrics.exact_match("[invalid]", "18")
    assert metrics.exact_match("-3", metrics.gsm8k_reference("x\n#### -3"))


def test_extraction_and_scoring_agree_with_lm_eval_filters():
    lm_filters = pytest.importorskip("lm_eval.filters.extraction")
    from lm_eval.api.metrics import exact_match_hf_evaluate

    ours = [metrics.STRICT_GSM8K, metrics.STRICT_GSM8K_COT, metrics.STRICT_FINAL_ANSWER, metrics.FLEXIBLE]
    theirs = [lm_filters.RegexFilter(regex_pattern=e.pattern, group_select=e.group_select) for e in ours]
    golds = ["18", "1234", "72", "-5", "6", "2000", "1200.50", "-42"]
    for mine, ref in zip(ours, theirs):
        extracted = [x[0] for x in ref.apply([[t] for t in TRICKY], [None] * len(TRICKY))]
        assert [mine(t) for t in TRICKY] == extracted
        for pred, gold in itertools.product(extracted, golds):
            expected = exact_match_hf_evaluate(
                [pred], [gold], regexes_to_ignore=list(metrics.GSM8K_IGNORE), ignore_case=True, ignore_punctuation=False
            )["exact_match"]
            assert metrics.exact_match(pred, gold) == bool(expected)
