"""Scoring rules shared with lm-evaluation-harness 0.4.13 and openai/human-eval.

The regular expressions and the ignore-list are lm-eval's, character for character: published GSM8K numbers
depend on their quirks (the unescaped final `.` of the CoT pattern, the `$` and `,` handling), so they are kept
verbatim rather than "fixed".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

INVALID = "[invalid]"

# Applied with re.sub to both the extracted prediction and the reference before a case-insensitive comparison.
GSM8K_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")
FLEXIBLE_PATTERN = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"


@dataclass(frozen=True)
class Extractor:
    """A regex filter: `findall`, pick match `group_select`, first non-empty group of a tuple, strip."""

    pattern: str
    group_select: int = 0

    def __call__(self, text: str) -> str:
        matches = re.findall(self.pattern, text)
        if not matches:
            return INVALID
        match = matches[self.group_select]
        if isinstance(match, tuple):
            groups = [g for g in match if g]
            match = groups[0] if groups else INVALID
        return match.strip()


STRICT_GSM8K = Extractor(r"#### (\-?[0-9\.\,]+)")
STRICT_GSM8K_COT = Extractor(r"The answer is (\-?[0-9\.\,]+).")
STRICT_FINAL_ANSWER = Extractor(r"The final answer is ((-?[$0-9.,]{2,})|(-?[0-9]+))", group_select=-1)
FLEXIBLE = Extractor(FLEXIBLE_PATTERN, group_select=-1)


def normalize_answer(text: str) -> str:
    for pattern in GSM8K_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def exact_match(prediction: str, reference: str) -> bool:
    """lm-eval's `exact_match` with GSM8K's options (ignore_case, the ignore-list on both sides)."""
    return normalize_answer(prediction) == normalize_answer(reference)


def gsm8k_reference(answer: str) -> str:
    """The number after the last `####` of a GSM8K solution, as lm-eval's gsm8k_cot target."""
    return answer.split("####")[-1].strip()


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator 1 - C(n-c, k) / C(n, k) of the chance that one of k samples (out of n, c correct) passes."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of samples n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
