"""The model runner: log-likelihoods and generations equal a plain transformers computation, with or without the
shared-prefix cache, at any batch size."""

import pytest
import torch

from llama4_sparse.eval.runner import ModelRunner, common_prefix_length
from llama4_sparse.eval.tiny_model import cached_tiny_model

HEADER = "The following are multiple choice questions (with answers) about algebra.\n\n"
SHOT = "Find x if 2x = 6.\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: C\n\n"


@pytest.fixture(scope="module")
def tiny(shared_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cached_tiny_model(shared_data)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def reference_loglikelihood(model, tok, context, continuation, max_length=None):
    """sum log p(continuation) from one unbatched forward, lm-eval's encode-whole-then-split rule."""
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    full = ctx + whole[len(ctx):]
    if max_length is not None:
        full = full[-(max_length + 1):]
    n_cont = len(whole) - len(ctx)
    with torch.no_grad():
        logits = model(torch.tensor([full[:-1]])).logits[0].float()
    logp = torch.log_softmax(logits, -1)[-n_cont:]
    return logp.gather(1, torch.tensor(full[-n_cont:])[:, None]).sum().item()


def reference_generate(model, tok, prompt, until, max_new):
    ids = torch.tensor([tok.encode(prompt)])
    out = model.generate(ids, max_new_tokens=max_new, do_sample=False, attention_mask=torch.ones_like(ids))
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    for s in [*until, tok.eos_token]:
        text = text.split(s)[0]
    return text


def mmlu_like_requests():
    questions = ["What is 3+3?", "Which is prime?", "Solve y - 1 = 0 for y, then add one to the result."]
    prompt = [HEADER + SHOT * 3 + q + "\nA. 6\nB. 2\nC. 1\nD. 0\nAnswer:" for q in questions]
    return [(p, f" {letter}") for p in prompt for letter in "ABCD"]


@pytest.mark.parametrize("batch_size", [1, 5])
def test_loglikelihood_matches_unbatched_forward_with_prefix_cache(tiny, batch_size):
    model, tok = tiny
    reqs = mmlu_like_requests()
    runner = ModelRunner(model, tok, batch_size=batch_size, progress=False)
    ours = runner.loglikelihood(reqs, groups=[0] * len(reqs))
    ref = [reference_loglikelihood(model, tok, c, x) for c, x in reqs]
    assert max(abs(a - b) for (a, _), b in zip(ours, ref)) < 1e-4
    for q in range(0, len(reqs), 4):
        assert max(range(4), key=lambda j: ours[q + j][0]) == max(range(4), key=lambda j: ref[q + j])


def test_prefix_cache_equals_full_recompute_across_a_bpe_merge(tiny):
    model, tok = tiny
    # The shared text ends inside a word: "Wh" + "at"/"ich" merge differently, so the cacheable prefix must stop
    # before the last shared characters.
    shared = HEADER + SHOT * 4 + "Wh"
    reqs = [(shared + tail + "\nAnswer:", " B") for tail in ("at is 2+2?", "ich number is even?", "at now?")]
    ids = [tok.encode(c) for c, _ in reqs]
    assert common_prefix_length(ids) < len(tok.encode(shared))
    cached = ModelRunner(model, tok, batch_size=2, progress=False).loglikelihood(reqs, groups=[1, 1, 1])
    full = ModelRunner(model, tok, batch_size=2, prefix_cache=False, progress=False).loglikelihood(reqs)
    assert max(abs(a[0] - b[0]) for a, b in zip(cached, full)) < 1e-4
    assert [a[1] for a in cached] == [b[1] for b in full]


def test_left_truncation_matches_lm_eval_rule(tiny):
    model, tok = tiny
    context, cont = HEADER + SHOT * 6 + "Answer:", " C"
    runner = ModelRunner(model, tok, max_length=40, progress=False)
    (ll, _), = runner.loglikelihood([(context, cont)])
    assert abs(ll - reference_loglikelihood(model, tok, context, cont, max_length=40)) < 1e-4


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_greedy_generation_matches_transformers_generate(tiny, prefix_cache):
    model, tok = tiny
    prompts = [HEADER + SHOT * 3 + f"Question {i}: " + "more words " * i for i in range(4)]
    until = ["\n\n", "Answer"]
    runner = ModelRunner(model, tok, batch_size=3, prefix_cache=prefix_cache, progress=False)
    ours = runner.generate(prompts, until=until, max_gen_toks=24)
    ref = [reference_generate(model, tok, p, until, 24) for p in prompts]
    assert ours == ref


def test_sampling_depends_on_seeds_not_on_batching(tiny):
    model, tok = tiny
    prompts = [HEADER + SHOT + "Question: "] * 4
    seeds = [11, 12, 11, 13]
    one = ModelRunner(model, tok, batch_size=1, progress=False).generate(
        prompts, max_gen_toks=12, temperature=1.0, top_p=0.95, seeds=seeds
    )
    four = ModelRunner(model, tok, batch_size=4, progress=False).generate(
        prompts, max_gen_toks=12, temperature=1.0, top_p=0.95, seeds=seeds
    )
    assert one == four
    assert one[0] == one[2] and len({one[0], one[1], one[3]}) > 1


def test_bad_arguments_are_clear_errors(tiny):
    model, tok = tiny
    runner = ModelRunner(model, tok, progress=False)
    with pytest.raises(ValueError, match="max length"):
        runner.generate(["x"], max_gen_toks=runner.max_length)
    with pytest.raises(ValueError, match="seed"):
        runner.generate(["x"], max_gen_toks=4, temperature=0.7)
    with pytest.raises(ValueError, match="group keys"):
        runner.loglikelihood([("a", " b")], groups=[1, 2])
    with pytest.raises(ValueError, match="batch_size"):
        ModelRunner(model, tok, batch_size=0)
