"""Evaluation harness: MMLU, GSM8K and HumanEval for any causal LM, agreeing with lm-evaluation-harness 0.4.13."""

from .evaluator import evaluate

__all__ = ["evaluate"]
