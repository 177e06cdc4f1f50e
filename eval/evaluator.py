"""`evaluate`: run tasks on a model (or score prediction files) and write the output directory.

Under `accelerate launch` every process takes every world_size-th document of each chunk, results are gathered
after each chunk, and the first process writes them; the numbers are those of a single process.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from .report import SampleStore, write_report
from .runner import ModelRunner, load_model
from .tasks import TASKS

PREDICTION_TASKS = ("humaneval", "gsm8k", "gsm8k_cot", "gsm8k_chat", "niah")


class _Processes:
    """Rank, world size and gathering; a single process needs no torch.distributed at all."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.state = None
        self.rank = 0
        if self.world > 1:
            import torch
            from accelerate import PartialState

            # Without cpu=True accelerate ignores the launcher's processes on a machine without accelerators.
            self.state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
            self.rank, self.world = self.state.process_index, self.state.num_processes

    def gather(self, records: list[dict]) -> list[dict]:
        if self.state is None:
            return records
        from accelerate.utils import gather_object

        return gather_object(records)

    @property
    def device(self):
        return self.state.device if self.state is not None else None


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise ValueError(f"no tasks given; choose from {sorted(TASKS)}")
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; choose from {sorted(TASKS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"task list {names} repeats a task")
    return names


def _model_fingerprint(model, dtype: str) -> dict:
    if isinstance(model, (str, Path)):
        return {"model": str(model), "dtype": dtype}
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return {"model": type(model).__name__, "weights_sha256_sample": h.hexdigest(), "dtype": str(model.dtype)}


def _build_task(name: str, opts: dict, tokenizer):
    cls = TASKS[name]
    common = {"data_dir": opts["data_dir"], "num_fewshot": opts["num_fewshot"], "limit": opts["limit"]}
    if name == "mmlu":
        return cls(**common, subjects=opts["mmlu_subjects"])
    if name == "niah":
        return cls(**common, max_gen_toks=opts["max_new_tokens"], tokenizer=tokenizer, **(opts["niah"] or {}))
    if name == "humaneval":
        return cls(
            **common,
            max_gen_toks=opts["max_new_tokens"],
            num_samples=opts["num_samples"],
            temperature=opts["temperature"],
            top_p=opts["top_p"],
            seed=opts["seed"],
            timeout=opts["timeout"],
            workers=opts["workers"],
            allow_unsandboxed=opts["allow_unsandboxed"],
        )
    return cls(**common, max_gen_toks=opts["max_new_tokens"], tokenizer=tokenizer)


def _read_predictions(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"predictions file {path} not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
    if not rows:
        raise ValueError(f"predictions file {path} is empty")
    return rows


def _score_predictions(task, rows: list[dict]) -> list[dict]:
    if task.name == "humaneval":
        docs, completions = task.predictions_docs(rows)
        return task.execute(docs, completions)
    docs = task.docs()
    records, seen = [], set()
    for i, row in enumerate(rows):
        doc_id, completion = row.get("doc_id"), row.get("completion")
        if not isinstance(doc_id, int) or not 0 <= doc_id < len(docs) or not isinstance(completion, str):
            raise ValueError(
                f"prediction line {i + 1}: need {{\"doc_id\": 0-based test index < {len(docs)}, \"completion\": str}}, "
                f"got doc_id={doc_id!r}"
            )
        if doc_id in seen:
            raise ValueError(f"prediction line {i + 1}: doc_id {doc_id} appears twice")
        seen.add(doc_id)
        records.append(task.score(docs[doc_id], completion))
    return records


def evaluate(
    model=None,
    tokenizer=None,
    tasks: str | Sequence[str] = ("mmlu",),
    data_dir: str | Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    output_dir: str | Path | None = None,
    max_new_tokens: int | None = None,
    *,
    predictions: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 1234,
    mmlu_subjects: Sequence[str] | None = None,
    prefix_cache: bool = True,
    timeout: float = 3.0,
    workers: int | None = None,
    allow_unsandboxed: bool = False,
    progress: bool = True,
    niah: dict | None = None,
) -> dict[str, dict]:
    """Evaluate `model` (a path/hub id or an in-memory causal LM) on `tasks`; returns {task: metrics}.

    `num_fewshot` None keeps each task's default (mmlu 5, gsm8k 5, gsm8k_cot 8, gsm8k_chat 0, humaneval 0); a number
    overrides it for every task given. `limit` caps test documents (per subject for MMLU). With `predictions`
    (a JSONL file) the single task given is scored without a model.

    HumanEval executes generated code only fully isolated (eval.sandbox): when isolation is unavailable it raises
    eval.sandbox.SandboxUnavailable before anything is generated or run, unless `allow_unsandboxed` opts out.

    `niah` holds the needle-in-a-haystack grid options (`lengths`, `depths`, `keys`, `samples`, `seed`, `digits`).
    """
    names = parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    opts = dict(
        data_dir=data_dir, num_fewshot=num_fewshot, limit=limit, max_new_tokens=max_new_tokens, num_samples=num_samples,
        temperature=temperature, top_p=top_p, seed=seed, mmlu_subjects=mmlu_subjects, timeout=timeout, workers=workers,
        allow_unsandboxed=allow_unsandboxed, niah=niah,
    )
    procs = _Processes(device)
    config = {"tasks": names, "limit": limit, "num_fewshot": num_fewshot, "data_dir": str(data_dir) if data_dir else None}
    if "humaneval" in names:
        from .sandbox import isolation_level

        # Checked first: a refusal must come before hours of generation, and before any program runs.
        isolation = isolation_level(allow_unsandboxed=allow_unsandboxed)
        config["sandbox"] = {"isolation": isolation, "isolated": isolation != "none",
                             "allow_unsandboxed": allow_unsandboxed}

    if predictions is not None:
        if model is not None:
            raise ValueError("give either a model or --predictions, not both")
        if len(names) != 1 or names[0] not in PREDICTION_TASKS:
            raise ValueError(f"--predictions scores exactly one of {PREDICTION_TASKS}, got {names}")
        task = _build_task(names[0], opts, tokenizer)
        records = _score_predictions(task, _read_predictions(predictions))
        results = {task.name: task.aggregate(records)}
        config.update(predictions=str(predictions), task_config={task.name: task.config()})
        if output_dir and procs.rank == 0:
            SampleStore(output_dir, task.name, {"predictions": str(predictions), **task.config()}, fresh=True).add(records)
            write_report(output_dir, results, config)
            _write_task_plots([task], results, output_dir)
        return results

    if model is None:
        raise ValueError("evaluate needs a model (path, hub id or model object) or predictions")
    fingerprint = _model_fingerprint(model, dtype)
    if isinstance(model, (str, Path)):
        model, loaded_tok = load_model(
            str(model), tokenizer=str(tokenizer) if isinstance(tokenizer, (str, Path)) else None, dtype=dtype,
            device=str(procs.device or device), trust_remote_code=trust_remote_code,
        )
        tokenizer = loaded_tok if tokenizer is None or isinstance(tokenizer, (str, Path)) else tokenizer
    else:
        if tokenizer is None:
            raise ValueError("an in-memory model needs its tokenizer: evaluate(model, tokenizer, ...)")
        if isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), trust_remote_code=trust_remote_code)
        if procs.device is not None:
            model = model.to(procs.device)
    runner = ModelRunner(model, tokenizer, batch_size=batch_size, prefix_cache=prefix_cache,
                         progress=progress and procs.rank == 0)

    results, task_configs, built = {}, {}, []
    for name in names:
        task = _build_task(name, opts, tokenizer)
        built.append(task)
        task_configs[name] = task.config()
        store = SampleStore(output_dir, name, {**fingerprint, **task.config(), "max_length": runner.max_length},
                            writer=procs.rank == 0)
        docs = task.docs()
        pending = [d for d in docs if not store.done(d["doc_id"])]
        for chunk in task.chunks(pending):
            mine = chunk[procs.rank::procs.world]
            store.add(procs.gather(task.run(runner, mine) if mine else []))
        results[name] = task.aggregate([store.records[str(d["doc_id"])] for d in docs])
    config.update(model=fingerprint, batch_size=batch_size, max_length=runner.max_length, prefix_cache=prefix_cache,
                  task_config=task_configs, world_size=procs.world)
    if output_dir and procs.rank == 0:
        write_report(output_dir, results, config)
        _write_task_plots(built, results, output_dir)
    return results


def _write_task_plots(tasks, results: dict, output_dir) -> None:
    """Task-specific figures (the niah heatmap) next to results.png."""
    for task in tasks:
        if hasattr(task, "write_plots"):
            task.write_plots(results[task.name], output_dir)
