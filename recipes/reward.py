"""A learned reward: Llama4ForSequenceClassification trained on preference pairs (TRL RewardTrainer).

    [accelerate launch --config_file recipes/accelerate_configs/X.yaml] recipes/reward.py \
        --config recipes/configs/tiny/reward.yaml [--model_name_or_path SFT_DIR --max_steps N ...]

The backbone loads from a causal-LM folder (its `model.*` weights); the one-output `score` head is new.
The saved model scores completions for GRPO through `reward_funcs` as a sequence classifier.
"""

from trl import RewardConfig, RewardTrainer

from recipes.common import build_model, build_tokenizer, lora_config, run_recipe
from recipes.dpo import preference_dataset


def make_trainer(recipe_args, training_args, model_args):
    """The configured TRL trainer, ready to train (tests inspect it before training)."""
    if recipe_args.model_class != "sequence_classification":
        raise ValueError("a reward model is a sequence classifier: set model_class: sequence_classification")
    tokenizer = build_tokenizer(recipe_args, model_args)
    return RewardTrainer(
        model=build_model(recipe_args, model_args, training_args, tokenizer),
        args=training_args,
        train_dataset=preference_dataset(recipe_args),
        processing_class=tokenizer,
        peft_config=lora_config(recipe_args, model_args, task_type="SEQ_CLS"),
    )


def main(args=None) -> dict:
    return run_recipe("reward", RewardConfig, make_trainer, args)


if __name__ == "__main__":
    main()
