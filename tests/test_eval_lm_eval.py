"""Agreement with lm-evaluation-harness 0.4.13 on small slices (the full comparison is bench/compare_lm_eval.py).

Skipped when lm-eval is not installed (it is a dev extra)."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.model import LM  # noqa: E402

from llama4_sparse.eval import evaluate  # noqa: E402
from llama4_sparse.eval.tasks import GSM8K, GSM8KCoT, MMLU  # noqa: E402
from llama4_sparse.eval.tiny_model import cached_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = ["abstract_algebra", "high_school_european_history"]


def _compare_module():
    spec = importlib.util.spec_from_file_location("compare_lm_eval", REPO / "bench" / "compare_lm_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def compare():
    return _compare_module()


@pytest.fixture(scope="module")
def lm_tasks(tmp_path_factory, shared_data, compare):
    os.environ.update(compare.OFFLINE)
    work = tmp_path_factory.mktemp("lm_eval_tasks")
    return compare.write_lm_eval_tasks(work, shared_data, SUBJECTS)


class RecordingLM(LM):
    """Records the requests lm-eval builds; answers without a model."""

    def __init__(self):
        super().__init__()
        self.contexts = []

    def loglikelihood(self, requests):
        self.contexts += [r.args for r in requests]
        return [(0.0, False)] * len(requests)

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    def generate_until(self, requests):
        self.contexts += [r.args for r in requests]
        return [""] * len(requests)


def lm_eval_requests(lm_tasks, tasks, limit, num_fewshot=None):
    from lm_eval.tasks import TaskManager

    lm = RecordingLM()
    lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(lm_tasks), include_defaults=False),
                            limit=limit, num_fewshot=num_fewshot)
    return lm.contexts


def test_mmlu_prompts_are_byte_identical(lm_tasks, shared_data):
    theirs = lm_eval_requests(lm_tasks, [f"local_mmlu_{s}" for s in SUBJECTS], limit=3, num_fewshot=5)
    ours = MMLU(shared_data, subjects=SUBJECTS, limit=3).docs()
    expected = {(d["prompt"], f" {letter}") for d in ours for letter in "ABCD"}
    assert {tuple(a) for a in theirs} == expected and len(theirs) == 4 * 3 * len(SUBJECTS)


def test_gsm8k_prompts_are_byte_identical(lm_tasks, shared_data, tmp_path):
    # gsm8k's random shots come from lm-eval's own sampler (seed 1234), so the stock task is used with local files.
    stock = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    (lm_tasks / "local_gsm8k_plain.yaml").write_text(
        f"include: {stock}\ntask: local_gsm8k_plain\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    train: {shared_data / 'gsm8k' / 'train.jsonl'}\n"
        f"    test: {shared_data / 'gsm8k' / 'test.jsonl'}\n"
    )
    theirs = lm_eval_requests(lm_tasks, ["local_gsm8k_plain", "local_gsm8k_cot"], limit=3)
    ours = [d["prompt"] for d in GSM8K(shared_data, limit=3).docs()] + [d["prompt"] for d in GSM8KCoT(shared_data, limit=3).docs()]
    assert sorted(a[0] for a in theirs) == sorted(ours)
    assert {tuple(a[1]["until"]) for a in theirs} == {GSM8K.until, GSM8KCoT.until}


def test_tiny_model_agrees_with_lm_eval(lm_tasks, shared_data, tmp_path, compare):
    model = cached_tiny_model(shared_data)
    subjects = SUBJECTS[:1] + ["anatomy"]
    lm_tasks_dir = compare.write_lm_eval_tasks(tmp_path / "lm", shared_data, subjects)
    theirs = compare.run_lm_eval(model, lm_tasks_dir, [f"local_mmlu_{s}" for s in subjects], 2, 5, 8)
    evaluate(str(model), tasks=["mmlu"], data_dir=shared_data, limit=2, mmlu_subjects=subjects,
             output_dir=tmp_path / "ours", dtype="float32", progress=False)
    ours = [json.loads(x) for x in (tmp_path / "ours" / "samples_mmlu.jsonl").read_text().splitlines()]
    mmlu = compare.compare_mmlu(theirs, ours, subjects)
    assert mmlu["ok"], mmlu

    from lm_eval.tasks import TaskManager

    theirs = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model},dtype=float32", device="cpu", tasks=["local_gsm8k_cot"],
        task_manager=TaskManager(include_path=str(lm_tasks_dir), include_defaults=False), limit=2, batch_size=1, log_samples=True,
        gen_kwargs="max_gen_toks=48",
    )
    evaluate(str(model), tasks=["gsm8k_cot"], data_dir=shared_data, limit=2, batch_size=2, max_new_tokens=48,
             output_dir=tmp_path / "ours", dtype="float32", progress=False)
    ours = [json.loads(x) for x in (tmp_path / "ours" / "samples_gsm8k_cot.jsonl").read_text().splitlines()]
    gsm = compare.compare_gsm8k(theirs, ours)
    assert gsm["ok"], gsm
