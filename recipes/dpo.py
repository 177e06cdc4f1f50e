"""Direct preference optimisation on verified vs corrupted chains (TRL DPOTrainer).

    [accelerate launch --config_file recipes/accelerate_configs/X.yaml] recipes/dpo.py \
        --config recipes/configs/tiny/dpo.yaml [--model_name_or_path SFT_DIR --max_steps N ...]

Without LoRA the reference is a frozen copy of the starting model; with LoRA it is the same model
with its adapters switched off.
"""

from dataclasses import dataclass, field

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from llama4_sparse.recipes.common import (
    PROMPT_TEMPLATES,
    RecipeArguments,
    build_model,
    build_tokenizer,
    local_dataset,
    logger,
    lora_config,
    run_recipe,
    reference_model,
    synthetic_problems,
)
from llama4_sparse.recipes.data.preferences import on_policy_rows, preference_rows
from llama4_sparse.recipes.data.rejection_sampling import sample_completions


@dataclass
class DPOArguments(RecipeArguments):
    on_policy_samples: int = field(default=0, metadata={
        "help": "With the arithmetic dataset: sample this many completions per training problem from the starting "
                "model and pair each failed one (rejected) with a verified one or the gold chain (chosen); "
                "0 pairs gold chains with corrupted copies instead."})
    on_policy_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of on-policy pairs."})
    on_policy_max_new_tokens: int = field(default=64, metadata={"help": "Longest sampled completion."})

    def __post_init__(self):
        super().__post_init__()
        if self.on_policy_samples < 0:
            raise ValueError(f"on_policy_samples must be >= 0, got {self.on_policy_samples}")


def preference_dataset(recipe_args, model=None, tokenizer=None) -> Dataset:
    if recipe_args.dataset_name != "arithmetic":
        return local_dataset(recipe_args)
    template = PROMPT_TEMPLATES[recipe_args.prompt_style]
    problems = synthetic_problems(recipe_args)
    if not getattr(recipe_args, "on_policy_samples", 0):
        return Dataset.from_list(preference_rows(problems, template, seed=recipe_args.problem_seed))
    completions = sample_completions(model, tokenizer, problems, recipe_args.on_policy_samples, template,
                                     temperature=recipe_args.on_policy_temperature,
                                     max_new_tokens=recipe_args.on_policy_max_new_tokens, seed=recipe_args.problem_seed)
    rows = on_policy_rows(problems, completions, template)
    if not rows:
        raise ValueError(f"every on-policy sample of the {len(problems)} problems verified, so there is no pair to "
                         "learn from; raise num_train_examples or on_policy_temperature")
    logger.info("on-policy DPO: %d pairs from %d problems x %d samples", len(rows), len(problems),
                recipe_args.on_policy_samples)
    return Dataset.from_list(rows)


def make_trainer(recipe_args, training_args, model_args):
    """The configured TRL trainer, ready to train (tests inspect it before training)."""
    tokenizer = build_tokenizer(recipe_args, model_args)
    model = build_model(recipe_args, model_args, training_args, tokenizer)
    return DPOTrainer(
        model=model,
        ref_model=reference_model(model, model_args),
        args=training_args,
        train_dataset=preference_dataset(recipe_args, model, tokenizer),
        processing_class=tokenizer,
        peft_config=lora_config(recipe_args, model_args),
    )


def main(args=None) -> dict:
    return run_recipe("dpo", DPOConfig, make_trainer, args, DPOArguments)


if __name__ == "__main__":
    main()
