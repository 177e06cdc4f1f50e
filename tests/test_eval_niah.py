"""The niah task: documents of the requested token lengths with needles at the requested depths, an
oracle scoring 100% and random answers or a random model ~0%, through eval.evaluate and the CLI."""

import json
import random

import pytest
import torch

import llama4_sparse.eval as harness
from llama4_sparse.eval.cli import main as cli_main
from llama4_sparse.eval.tasks.niah import INSTRUCTION, NEEDLE, NIAH
from llama4_sparse.modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
from llama4_sparse.recipes.data.retrieval import retrieval_batch
from llama4_sparse.tokenizer import DEFAULT_TOKENIZER_DIR, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _predictions(path, docs, answer):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"doc_id": d["doc_id"], "completion": answer(d)}) + "\n")
    return path


def test_documents_have_the_requested_lengths_depths_and_needles(tokenizer):
    task = NIAH(tokenizer=tokenizer, lengths=[300, 2000], depths=[0.0, 0.5, 1.0], keys=[1, 3], samples=2)
    docs = task.docs()
    assert len(docs) == 2 * 2 * 3 * 2
    assert docs == task.docs()  # reproducible
    for d in docs:
        tokens = len(tokenizer(d["prompt"])["input_ids"])
        assert tokens == d["prompt_tokens"] and 0.9 * d["length"] <= tokens <= d["length"]
        haystack_start, haystack_end = len(INSTRUCTION), d["prompt"].rindex("\nQuestion:")
        haystack = d["prompt"][haystack_start:haystack_end]
        assert haystack.count(NEEDLE.split("{key}")[0].strip()) == d["keys"]
        asked = NEEDLE.format(key=d["key"], value=d["gold"]).strip()
        assert haystack.count(asked) == 1 and d["prompt"].count(d["gold"]) == 1
        start, end = haystack.index(asked) / len(haystack), (haystack.index(asked) + len(asked)) / len(haystack)
        assert start - 0.1 <= d["depth"] <= end + 0.1, (d["depth"], start, end)
    assert len({d["gold"] for d in docs}) == len(docs)


def test_oracle_scores_100_and_random_answers_0_with_a_heatmap(tokenizer, tmp_path):
    options = {"lengths": [256, 1024], "depths": [0.0, 0.5, 1.0], "keys": [1, 4], "samples": 2}
    docs = NIAH(tokenizer=tokenizer, **options).docs()
    oracle = _predictions(tmp_path / "oracle.jsonl", docs, lambda d: f" {d['gold']}.")
    results = harness.evaluate(tasks="niah", tokenizer=tokenizer, predictions=oracle, output_dir=tmp_path / "o",
                               niah=options)["niah"]
    assert results["accuracy"] == 1.0 and results["n"] == 24
    assert results["grid"]["keys=4"]["1024"]["0.5"] == 1.0
    assert (tmp_path / "o" / "niah_heatmap.png").stat().st_size > 1000
    rng = random.Random(0)
    guess = _predictions(tmp_path / "guess.jsonl", docs, lambda d: f" {rng.randrange(10**6, 10**7)}.")
    assert harness.evaluate(tasks="niah", tokenizer=tokenizer, predictions=guess, niah=options)["niah"]["accuracy"] == 0.0
    # A distractor's number is wrong.
    distractor = _predictions(tmp_path / "d.jsonl", [d for d in docs if d["keys"] > 1],
                              lambda d: " ".join(v for v in d["prompt"].split() if v.rstrip(".").isdigit() and d["gold"] not in v))
    rows = [json.loads(line) for line in open(distractor)]
    assert all(rows) and harness.evaluate(tasks="niah", tokenizer=tokenizer, predictions=distractor, niah=options)[
        "niah"]["grid"]["keys=4"]["256"]["0.0"] == 0.0


def test_a_random_model_scores_about_zero_through_the_cli(tmp_path):
    config = Llama4TextConfig.from_preset("tiny", max_position_embeddings=2048)
    torch.manual_seed(0)
    model = Llama4ForCausalLM(config)
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    code = cli_main(["--model", str(tmp_path / "model"), "--tokenizer", str(DEFAULT_TOKENIZER_DIR), "--tasks", "niah",
                     "--niah-lengths", "256,1024", "--niah-depths", "0,1", "--niah-keys", "1", "--niah-samples", "2",
                     "--output-dir", str(out), "--no-progress"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())["results"]["niah"]
    assert results["n"] == 8 and results["accuracy"] <= 0.125
    assert (out / "niah_heatmap.png").exists()
    samples = [json.loads(line) for line in open(out / "samples_niah.jsonl")]
    assert {s["length"] for s in samples} == {256, 1024} and all(len(s["output"]) > 0 for s in samples)


def test_bad_options_name_the_problem(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="pass the tokenizer"):
        NIAH(lengths=[512])
    with pytest.raises(ValueError, match="depths are fractions"):
        NIAH(tokenizer=tokenizer, depths=[1.5])
    with pytest.raises(ValueError, match="leaves no room for filler"):
        NIAH(tokenizer=tokenizer, lengths=[64], keys=[4]).docs()
    model = Llama4ForCausalLM(Llama4TextConfig.from_preset("tiny", max_position_embeddings=512))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        harness.evaluate(model, tokenizer, tasks="niah", niah={"lengths": [1024], "depths": [0.5], "keys": [1],
                                                               "samples": 1}, progress=False)


def test_training_documents_supervise_every_needle_in_the_niah_format(tokenizer):
    batch = retrieval_batch(tokenizer, seed=0, step=3, batch_size=3, min_length=400, max_length=800, max_keys=4)
    assert batch == retrieval_batch(tokenizer, seed=0, step=3, batch_size=3, min_length=400, max_length=800, max_keys=4)
    for example in batch:
        answers = tokenizer.decode([t for t, m in zip(example["ids"], example["answer_mask"]) if m])
        values = [v.rstrip(".") for v in example["prompt"].split() if v.rstrip(".").isdigit()]
        assert sorted(answers.split()) == sorted(f"{v}." for v in values)
        first = tokenizer.decode(example["ids"][: len(tokenizer(example["prompt"])["input_ids"])], skip_special_tokens=True)
        assert first == example["prompt"]  # the document starts with exactly the niah prompt
