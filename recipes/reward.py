"""A learned reward: Llama4ForSequenceClassification trained on preference pairs (TRL RewardTrainer).

    [accelerate launch --config_file recipes/accelerate_configs/X.yaml] recipes/reward.py \
        --config recipes/configs/tiny/reward.yaml [--model_name_or_path SFT_DIR --max_steps N ...]
    ... --policy_name_or_path SFT_DIR --on_policy_samples 4     # also the policy's own failures

The backbone loads from a causal-LM folder (its `model.*` weights) or from the text model of a multimodal
(`Llama4ForConditionalGeneration`) folder; the one-output `score` head is new.
Pairs are verified chains against corrupted ones, plus, with `policy_name_or_path` and
`on_policy_samples`, the policy's own failed samples against its verified ones (or the gold chain), so
the reward model has seen the errors the policy it will judge actually makes. The saved model is GRPO's
`reward_model` reward (`recipes/grpo.py --rewards reward_model --reward_model_path DIR`).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, concatenate_datasets
from safetensors.torch import load_file
from trl import RewardConfig, RewardTrainer

from llama4_sparse.modeling_llama4 import Llama4Config, Llama4ForSequenceClassification

from llama4_sparse.recipes.common import MODEL_CLASSES, build_model, build_tokenizer, logger, lora_config, run_recipe
from llama4_sparse.recipes.dpo import DPOArguments, preference_dataset


@dataclass
class RewardArguments(DPOArguments):
    policy_name_or_path: str | None = field(default=None, metadata={
        "help": "Policy (causal LM or conditional generation folder) whose samples add on-policy pairs; "
                "needs on_policy_samples > 0."})


def reward_dataset(recipe_args: RewardArguments, tokenizer) -> Dataset:
    """Corrupted-chain pairs, plus on-policy pairs of `policy_name_or_path` when asked."""
    samples = recipe_args.on_policy_samples
    recipe_args.on_policy_samples = 0
    try:
        offline = preference_dataset(recipe_args)
    finally:
        recipe_args.on_policy_samples = samples
    if not samples:
        return offline
    if not recipe_args.policy_name_or_path:
        raise ValueError("on_policy_samples > 0 in reward.py needs policy_name_or_path: the model whose samples to pair")
    architecture = json.loads((Path(recipe_args.policy_name_or_path) / "config.json").read_text())["architectures"][0]
    policy_class = next(c for c in MODEL_CLASSES.values() if c.__name__ == architecture)
    policy = policy_class.from_pretrained(recipe_args.policy_name_or_path, dtype=torch.float32).eval()
    on_policy = preference_dataset(recipe_args, policy, tokenizer)
    logger.info("reward model: %d corrupted-chain pairs + %d on-policy pairs", len(offline), len(on_policy))
    return concatenate_datasets([offline, on_policy.cast(offline.features)]).shuffle(seed=recipe_args.problem_seed)


def classifier_from_multimodal(path: str | Path, tokenizer) -> Llama4ForSequenceClassification:
    """A one-output classifier whose backbone is the text model of a saved `Llama4ForConditionalGeneration`
    (its `language_model.model.*` weights; the `score` head is new), so a reward model starts from what the
    policy it will judge has learnt."""
    config = Llama4Config.from_pretrained(path).text_config
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    model = Llama4ForSequenceClassification(config)
    prefix = "language_model.model."
    state = load_file(Path(path) / "model.safetensors")
    model.model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return model


def make_trainer(recipe_args, training_args, model_args):
    """The configured TRL trainer, ready to train (tests inspect it before training)."""
    if recipe_args.model_class != "sequence_classification":
        raise ValueError("a reward model is a sequence classifier: set model_class: sequence_classification")
    tokenizer = build_tokenizer(recipe_args, model_args)
    source = model_args.model_name_or_path
    multimodal = source and (Path(source) / "config.json").is_file() and \
        json.loads((Path(source) / "config.json").read_text()).get("architectures") == ["Llama4ForConditionalGeneration"]
    return RewardTrainer(
        model=classifier_from_multimodal(source, tokenizer) if multimodal else
        build_model(recipe_args, model_args, training_args, tokenizer),
        args=training_args,
        train_dataset=reward_dataset(recipe_args, tokenizer),
        processing_class=tokenizer,
        peft_config=lora_config(recipe_args, model_args, task_type="SEQ_CLS"),
    )


def main(args=None) -> dict:
    return run_recipe("reward", RewardConfig, make_trainer, args, RewardArguments)


if __name__ == "__main__":
    main()
