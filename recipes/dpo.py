"""Direct preference optimisation on verified vs corrupted chains (TRL DPOTrainer).

    [accelerate launch --config_file recipes/accelerate_configs/X.yaml] recipes/dpo.py \
        --config recipes/configs/tiny/dpo.yaml [--model_name_or_path SFT_DIR --max_steps N ...]

Without LoRA the reference is a frozen copy of the starting model; with LoRA it is the same model
with its adapters switched off.
"""

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from recipes.common import (
    PROMPT_TEMPLATES,
    build_model,
    build_tokenizer,
    local_dataset,
    lora_config,
    parse_recipe,
    reference_model,
    synthetic_problems,
    train_and_save,
)
from recipes.data.preferences import preference_rows
from recipes.dry_run import dry_run


def preference_dataset(recipe_args) -> Dataset:
    if recipe_args.dataset_name == "arithmetic":
        template = PROMPT_TEMPLATES[recipe_args.prompt_style]
        return Dataset.from_list(preference_rows(synthetic_problems(recipe_args), template, seed=recipe_args.problem_seed))
    return local_dataset(recipe_args)


def make_trainer(recipe_args, training_args, model_args):
    """The configured TRL trainer, ready to train (tests inspect it before training)."""
    tokenizer = build_tokenizer(recipe_args, model_args)
    model = build_model(recipe_args, model_args, training_args, tokenizer)
    return DPOTrainer(
        model=model,
        ref_model=reference_model(model, model_args),
        args=training_args,
        train_dataset=preference_dataset(recipe_args),
        processing_class=tokenizer,
        peft_config=lora_config(recipe_args, model_args),
    )


def main(args=None) -> dict:
    recipe_args, training_args, model_args = parse_recipe(DPOConfig, args=args)
    if recipe_args.dry_run:
        return dry_run(recipe_args, training_args, model_args, "dpo")
    return train_and_save(make_trainer(recipe_args, training_args, model_args), training_args)


if __name__ == "__main__":
    main()
