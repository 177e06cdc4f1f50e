"""Supervised fine-tuning on worked chains of thought (TRL SFTTrainer).

    [accelerate launch --config_file recipes/accelerate_configs/X.yaml] recipes/sft.py \
        --config recipes/configs/tiny/sft.yaml [--max_steps N --output_dir DIR ...]

Conversational `messages` rows; assistant turns carry their chain in `reasoning`, which the chat
template renders inside the thinking block, so `assistant_only_loss` trains chain and answer only.
"""

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from recipes.common import (
    PROMPT_TEMPLATES,
    build_model,
    build_tokenizer,
    local_dataset,
    lora_config,
    parse_recipe,
    synthetic_problems,
    train_and_save,
)
from recipes.dry_run import dry_run


def sft_dataset(recipe_args) -> Dataset:
    if recipe_args.dataset_name == "arithmetic":
        template = PROMPT_TEMPLATES[recipe_args.prompt_style]
        return Dataset.from_list([{"messages": p.messages(template)} for p in synthetic_problems(recipe_args)])
    return local_dataset(recipe_args)


def make_trainer(recipe_args, training_args, model_args):
    """The configured TRL trainer, ready to train (tests inspect it before training)."""
    tokenizer = build_tokenizer(recipe_args, model_args)
    return SFTTrainer(
        model=build_model(recipe_args, model_args, training_args, tokenizer),
        args=training_args,
        train_dataset=sft_dataset(recipe_args),
        processing_class=tokenizer,
        peft_config=lora_config(recipe_args, model_args),
    )


def main(args=None) -> dict:
    recipe_args, training_args, model_args = parse_recipe(SFTConfig, args=args)
    if recipe_args.dry_run:
        return dry_run(recipe_args, training_args, model_args, "sft")
    return train_and_save(make_trainer(recipe_args, training_args, model_args), training_args)


if __name__ == "__main__":
    main()
