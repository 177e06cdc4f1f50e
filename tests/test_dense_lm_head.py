"""recipes/dense_lm_head.py: the LM-head statistics TRL's trainers use, from full logits on CPU, equal TRL's own
tiled function in value and gradient, and fall back to it where the logits would not fit."""

import pytest
import torch
from trl.kernels import ChunkedLogProbFunction

from llama4_sparse.recipes import dense_lm_head

ALL = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@pytest.mark.parametrize("temperature, softcap, scale, bias", [(1.0, None, 1.0, False), (0.7, 30.0, 0.5, True)])
def test_dense_statistics_equal_trls_tiled_function_with_gradients(temperature, softcap, scale, bias):
    torch.manual_seed(0)
    tokens, width, vocab = 37, 16, 3000  # vocab spans several of TRL's 1024-wide blocks
    hidden = torch.randn(tokens, width, dtype=torch.float64).float().requires_grad_()
    weight = (torch.randn(vocab, width) / 2).requires_grad_()
    b = torch.randn(vocab).requires_grad_() if bias else None
    targets = torch.randint(0, vocab, (tokens,))
    targets[0] = 0  # the first token of the vocabulary (an edge for the top-1 test)

    def run(function):
        for tensor in (hidden, weight, b):
            if tensor is not None:
                tensor.grad = None
        out = function(hidden, weight, b, targets, temperature, 1024, softcap, scale, ALL)
        (out[0].sum() + 0.3 * out[1].sum()).backward()
        return [o.detach() for o in out], [t.grad.clone() for t in (hidden, weight, b) if t is not None]

    tiled, tiled_grads = run(ChunkedLogProbFunction.apply)
    dense, dense_grads = run(dense_lm_head.dense_token_statistics)
    for name, a, d in zip(ALL, tiled, dense):
        if name == "is_top1":
            assert torch.equal(a, d)
        else:
            torch.testing.assert_close(d, a, atol=1e-5, rtol=1e-5, msg=name)
    for a, d in zip(tiled_grads, dense_grads):
        torch.testing.assert_close(d, a, atol=1e-5, rtol=1e-5)
    # The targets made the argmax in some rows, so is_top1 is not trivially all False.
    top = hidden.detach() @ weight.detach().T + (b.detach() if b is not None else 0)
    targets[:5] = top[:5].argmax(-1)
    assert dense_lm_head.dense_token_statistics(hidden, weight, b, targets, temperature, 1024, softcap, scale,
                                                ALL)[4][:5].all()


def test_install_routes_trl_through_the_dense_path_only_where_the_logits_fit(monkeypatch):
    import trl.trainer.utils as trl_utils

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", ChunkedLogProbFunction)
    monkeypatch.setattr(trl_utils, "_use_triton", trl_utils._use_triton)
    dense_lm_head.install()
    assert trl_utils._ChunkedLogProbFunction is dense_lm_head.token_statistics
    calls = []
    monkeypatch.setattr(ChunkedLogProbFunction, "apply", lambda *args: calls.append("tiled") or args)
    hidden, weight, targets = torch.randn(8, 4), torch.randn(16, 4), torch.zeros(8, dtype=torch.long)
    dense_lm_head.token_statistics.apply(hidden, weight, None, targets, 1.0, 1024)
    assert calls == []
    monkeypatch.setattr(dense_lm_head, "MAX_DENSE_LOGITS", 8 * 16 - 1)
    dense_lm_head.token_statistics.apply(hidden, weight, None, targets, 1.0, 1024)
    assert calls == ["tiled"]


def test_install_fails_loudly_when_trl_moves_its_hook(monkeypatch):
    import trl.trainer.utils as trl_utils

    monkeypatch.delattr(trl_utils, "_ChunkedLogProbFunction")
    with pytest.raises(RuntimeError, match="_ChunkedLogProbFunction is gone"):
        dense_lm_head.install()


def test_scoring_only_labelled_positions_on_cpu_leaves_trls_fused_forward_unchanged(monkeypatch):
    """TRL's fused LM-head forward on the tiny model: the loss, per-token statistics and gradients with only the
    labelled positions scored (what install() turns on for CPU) equal those with every position scored (TRL's CPU
    default), on a batch with a prompt and padding masked out."""
    import trl.trainer.utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    from llama4_sparse.modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", ChunkedLogProbFunction)
    monkeypatch.setattr(trl_utils, "_use_triton", trl_utils._use_triton)
    torch.manual_seed(0)
    model = Llama4ForCausalLM(Llama4TextConfig.from_preset("tiny"))
    add_fused_lm_head(model, outputs=ALL)
    ids = torch.randint(0, 4000, (3, 24))
    labels = ids.clone()
    labels[:, :10] = -100  # the prompt
    labels[1, 18:] = -100  # padding
    attention_mask = (labels != -100) | (torch.arange(24) < 10)

    def run():
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        (out.loss + 0.1 * out.entropy.sum()).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    dense_lm_head.install()
    compact, compact_grads = run()
    assert trl_utils._use_triton(torch.device("cpu"))
    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: False)
    full, full_grads = run()
    torch.testing.assert_close(compact.loss, full.loss)
    for field in ALL:
        torch.testing.assert_close(getattr(compact, field), getattr(full, field))
    assert compact_grads.keys() == full_grads.keys() and "lm_head.weight" in compact_grads
    for name in full_grads:
        torch.testing.assert_close(compact_grads[name], full_grads[name], msg=name)
