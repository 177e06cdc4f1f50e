"""Held-out accuracy while a recipe trains: every N optimizer steps, the model's own greedy generations on
held-out synthetic problems are scored by the eval harness (`gsm8k_chat`), and the result goes into the
trainer's log history (`heldout_strict`, `heldout_flexible`), next to the reward and completion length
TRL logs, so a run that learns, stalls or collapses shows it as it happens.

    python recipes/grpo.py --config recipes/configs/tiny/grpo.yaml --heldout_eval_steps 10 --heldout_problems 50
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

from .data.arithmetic import generate_problems

logger = logging.getLogger("recipes")
TASK = "gsm8k_chat"


@dataclass
class HeldOutEvalArguments:
    """Recipe arguments of the held-out eval callback (mixed into a recipe's argument class)."""

    heldout_eval_steps: int = field(default=0, metadata={
        "help": "Every this many optimizer steps (and before the first), score greedy generations on held-out "
                "synthetic problems through the eval harness; 0 turns it off."})
    heldout_problems: int = field(default=100, metadata={"help": "Held-out problems in each of those evaluations."})
    heldout_max_new_tokens: int = field(default=96, metadata={"help": "Longest generation in those evaluations."})
    heldout_at_start: bool = field(default=True, metadata={
        "help": "Also score before the first step (off when the starting model was scored already)."})
    heldout_keep_best: bool = field(default=False, metadata={
        "help": "Save the model whenever its held-out score is the best so far (the start included) to "
                "OUTPUT_DIR/best_heldout, with the step in best_heldout/heldout_best.json: a stopping rule on the "
                "held-out curve, for runs that peak and then fall (a hacked learned reward)."})


def write_heldout(data_dir: str | Path, num_problems: int, families, max_operand: int, steps=(4, 4),
                  seed: int = 1) -> Path:
    """`num_problems` problems of the held-out ("test") split as `gsm8k/test.jsonl` under `data_dir`. The
    callback draws them with seed 1; the demo's stage scores use seed 0, so monitoring is a separate draw."""
    problems = generate_problems(num_problems, seed=seed, split="test", families=tuple(families),
                                 max_operand=max_operand, steps=tuple(steps))
    path = Path(data_dir) / "gsm8k" / "test.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for problem in problems:
            f.write(json.dumps(problem.gsm8k_row()) + "\n")
    return Path(data_dir)


def score_heldout(model, tokenizer, data_dir: str | Path, max_new_tokens: int = 96, output_dir=None,
                  batch_size: int = 64) -> dict:
    """The harness's `gsm8k_chat` metrics of an in-memory model on `data_dir` (greedy, its own generations)."""
    import llama4_sparse.eval as harness

    was_training = model.training
    model.eval()
    try:
        result = harness.evaluate(model, tokenizer, tasks=[TASK], data_dir=data_dir, num_fewshot=0,
                                  batch_size=batch_size, max_new_tokens=max_new_tokens, output_dir=output_dir,
                                  progress=False)[TASK]
    finally:
        model.train(was_training)
    return result


class HeldOutEvalCallback(TrainerCallback):
    """Scores the model being trained on held-out problems before training (unless `at_start` is off) and every `every` steps
    (and after the last step), appending `{"step", "heldout_strict", "heldout_flexible"}` to
    `state.log_history`; each evaluation's generations go to `samples_dir/step-N` when given. With `best_dir`,
    the model at the best strict score so far (the earliest on ties) is saved there with the tokenizer."""

    def __init__(self, tokenizer, data_dir: str | Path, every: int, max_new_tokens: int = 96,
                 samples_dir: str | Path | None = None, at_start: bool = True, best_dir: str | Path | None = None):
        if every < 1:
            raise ValueError(f"heldout_eval_steps must be >= 1 to evaluate during training, got {every}")
        if not (Path(data_dir) / "gsm8k" / "test.jsonl").is_file():
            raise ValueError(f"no held-out problems at {data_dir}/gsm8k/test.jsonl; write them with write_heldout")
        self.tokenizer, self.data_dir, self.every, self.max_new_tokens = tokenizer, Path(data_dir), every, max_new_tokens
        self.samples_dir = Path(samples_dir) if samples_dir else None
        self.at_start = at_start
        self.best_dir = Path(best_dir) if best_dir else None
        self._best = None
        self._last_step = None

    def _evaluate(self, state, model) -> None:
        if self._last_step == state.global_step or not state.is_world_process_zero:
            return
        self._last_step = state.global_step
        start = time.time()
        with torch.no_grad():
            samples = self.samples_dir / f"step-{state.global_step}" if self.samples_dir else None
            if samples is not None:
                shutil.rmtree(samples, ignore_errors=True)  # another run's samples belong to other weights
            result = score_heldout(model, self.tokenizer, self.data_dir, self.max_new_tokens, output_dir=samples)
        entry = {"step": state.global_step, "heldout_strict": result["exact_match_strict"],
                 "heldout_flexible": result["exact_match_flexible"], "heldout_n": result["n"]}
        state.log_history.append(entry)
        logger.info("held-out %s at step %d: strict %.1f%%, flexible %.1f%% (%d problems, %.0fs)", TASK,
                    state.global_step, 100 * entry["heldout_strict"], 100 * entry["heldout_flexible"], result["n"],
                    time.time() - start)
        if self.best_dir is not None and (self._best is None or entry["heldout_strict"] > self._best):
            self._best = entry["heldout_strict"]
            shutil.rmtree(self.best_dir, ignore_errors=True)
            model.save_pretrained(self.best_dir)
            self.tokenizer.save_pretrained(self.best_dir)
            (self.best_dir / "heldout_best.json").write_text(json.dumps(entry, indent=2))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.at_start:
            self._evaluate(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step >= state.max_steps:
            self._evaluate(state, model)


def add_heldout_eval(trainer, recipe_args, tokenizer) -> None:
    """Attach the callback to `trainer` when `heldout_eval_steps` > 0 and the data are synthetic arithmetic."""
    every = getattr(recipe_args, "heldout_eval_steps", 0)
    if every <= 0:
        return
    if recipe_args.dataset_name != "arithmetic":
        raise ValueError("heldout_eval_steps needs dataset_name: arithmetic (the held-out split of the same "
                         "generator); set heldout_eval_steps: 0 for other data")
    data_dir = write_heldout(tempfile.mkdtemp(prefix="heldout-"), recipe_args.heldout_problems,
                             recipe_args.problem_families, recipe_args.max_operand, recipe_args.problem_steps)
    trainer.add_callback(HeldOutEvalCallback(tokenizer, data_dir, every, recipe_args.heldout_max_new_tokens,
                                             Path(trainer.args.output_dir) / "heldout_samples",
                                             getattr(recipe_args, "heldout_at_start", True),
                                             Path(trainer.args.output_dir) / "best_heldout"
                                             if getattr(recipe_args, "heldout_keep_best", False) else None))


def sampled_pass_at_k(model, tokenizer, data_dir: str | Path, k: int = 8, temperature: float = 1.0,
                      max_new_tokens: int = 96, seed: int = 0) -> dict:
    """pass@1 and pass@k from `k` samples per held-out problem (the unbiased estimator with n = k): the room
    RL has is the gap between what the model samples right at least once and what it gets right greedily."""
    from llama4_sparse.eval.metrics import pass_at_k
    from llama4_sparse.eval.tasks.gsm8k import CHAT_INSTRUCTION

    from .data.arithmetic import Problem
    from .data.rejection_sampling import sample_completions
    from .rewards import accuracy_reward, format_reward

    rows = [json.loads(line) for line in open(Path(data_dir) / "gsm8k" / "test.jsonl")]
    problems = [Problem(r["question"], "", int(r["answer"].rsplit("####", 1)[1]), "heldout") for r in rows]
    was_training = model.training
    model.eval()
    try:
        samples = sample_completions(model, tokenizer, problems, k, CHAT_INSTRUCTION, temperature=temperature,
                                     max_new_tokens=max_new_tokens, seed=seed)
    finally:
        model.train(was_training)
    correct = []
    for row, texts in zip(rows, samples):
        ok = accuracy_reward(texts, answer=[row["answer"]] * k)
        correct.append(sum(1 for r in ok if r == 1.0))
    formatted = sum(sum(format_reward(texts)) for texts in samples) / (k * len(rows))
    return {"pass@1_sampled": sum(pass_at_k(k, c, 1) for c in correct) / len(rows),
            f"pass@{k}": sum(pass_at_k(k, c, k) for c in correct) / len(rows),
            "sample_format": formatted, "k": k, "temperature": temperature, "n": len(rows)}
