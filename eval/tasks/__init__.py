"""Evaluation tasks by name."""

from .gsm8k import GSM8K, GSM8KChat, GSM8KCoT
from .humaneval import HumanEval
from .mmlu import MMLU
from .niah import NIAH

TASKS = {t.name: t for t in (MMLU, GSM8K, GSM8KCoT, GSM8KChat, HumanEval, NIAH)}

__all__ = ["TASKS", "MMLU", "GSM8K", "GSM8KCoT", "GSM8KChat", "HumanEval", "NIAH"]
