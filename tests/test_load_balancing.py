"""Aux-loss-free balancing inside a real transformers Trainer: the forward only counts, the expert bias
moves once per optimizer step (from the load of all its micro-batches) through `ExpertBiasCallback`."""

import copy

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from llama4_sparse.modeling_llama4.load_balancing import ExpertBiasCallback
from llama4_sparse.modeling_llama4.moe import Llama4TextMoe
from text_factory import our_model, tiny_config


def _trainer(model, tmp_path, callbacks, steps: int, accumulation: int) -> Trainer:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (2 * accumulation * steps, 12), generator=generator)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=accumulation,
        max_steps=steps, learning_rate=0.0, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, dataloader_drop_last=True, disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)


def _moe_layers(model):
    return [m for m in model.modules() if isinstance(m, Llama4TextMoe)]


def test_the_bias_moves_once_per_optimizer_step_from_all_micro_batches(tmp_path):
    config = tiny_config("scout", "sdpa", moe_load_balancing="aux_loss_free", moe_bias_update_rate=0.01)
    model = our_model(config)
    untouched = copy.deepcopy(model)
    # learning rate 0: the weights, hence the routing, stay those of `untouched`.
    callback = ExpertBiasCallback()
    trainer = _trainer(model, tmp_path, [callback], steps=1, accumulation=2)
    batch = torch.tensor(trainer.train_dataset["input_ids"])
    untouched.train()(batch)
    trainer.train()
    for moe, reference in zip(_moe_layers(model), _moe_layers(untouched)):
        load = reference.tokens_per_expert.float()
        assert load.sum() == batch.numel()
        torch.testing.assert_close(moe.expert_bias, 0.01 * torch.sign(load.mean() - load), rtol=0, atol=0)
        assert torch.count_nonzero(moe.tokens_per_expert) == 0, "counts restart after the step"
    assert set(callback.last_metrics) == {
        f"model.layers.{i}.feed_forward/{key}" for i in range(4) for key in ("max_over_mean", "cv", "unused_fraction")
    }


def test_without_the_callback_training_never_touches_the_bias(tmp_path):
    config = tiny_config("scout", "sdpa", moe_load_balancing="aux_loss_free", moe_bias_update_rate=0.01)
    model = our_model(config)
    _trainer(model, tmp_path, [], steps=2, accumulation=1).train()
    for moe in _moe_layers(model):
        assert torch.count_nonzero(moe.expert_bias) == 0
        assert moe.tokens_per_expert.sum() == 2 * 2 * 12  # every routed token of both steps (top-1)
