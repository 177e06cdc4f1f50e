"""Reinforcement learning with verifiable rewards (TRL GRPOTrainer).

    [accelerate launch --config_file recipes/accelerate_configs/X.yaml] recipes/grpo.py \
        --config recipes/configs/tiny/grpo.yaml [--model_name_or_path SFT_DIR --max_steps N ...]

Prompts carry their gold `answer` (GSM8K layout), which the rewards in `recipes.rewards` read.
`rewards: [reward_model]` with `reward_model_path: DIR` trains against a learned reward instead
(RLHF; `recipes/reward.py` makes one), logging the true verified accuracy next to its score.
`heldout_eval_steps: N` scores held-out problems through the eval harness every N steps.
"""

from dataclasses import dataclass, field

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from llama4_sparse.recipes.callbacks import HeldOutEvalArguments, add_heldout_eval
from llama4_sparse.recipes.common import (
    PROMPT_TEMPLATES,
    RecipeArguments,
    build_model,
    build_tokenizer,
    local_dataset,
    lora_config,
    run_recipe,
    synthetic_problems,
)
from llama4_sparse.recipes import step_rewards
from llama4_sparse.recipes.learned_reward import RewardModelScorer, reward_model_reward
from llama4_sparse.recipes.rewards import REWARDS, for_trl

# Rewards that need more than the completion and the dataset row: built here, not in recipes.rewards.
LEARNED_REWARDS = ("reward_model", "steps")


@dataclass
class GRPOArguments(RecipeArguments, HeldOutEvalArguments):
    rewards: list[str] = field(default_factory=lambda: ["accuracy", "format"], metadata={
        "help": f"Reward functions, from {sorted([*REWARDS, *LEARNED_REWARDS])}; weigh them with GRPOConfig's "
                "reward_weights. 'reward_model' is the learned reward of reward_model_path; 'steps' the share of the gold "
                "chain's steps the completion got right (recipes/step_rewards.py)."})
    reward_model_path: str | None = field(default=None, metadata={
        "help": "Folder of a reward model trained by recipes/reward.py, for the 'reward_model' reward."})
    length_soft_limit: int = field(default=128, metadata={"help": "Tokens before the length penalty starts."})
    length_hard_limit: int = field(default=256, metadata={"help": "Tokens at which the length penalty reaches -1."})
    code_timeout: float = field(default=3.0, metadata={"help": "Seconds per program for the code reward."})
    allow_unsandboxed_code: bool = field(default=False, metadata={
        "help": "Let the code reward execute completions even when full isolation (bubblewrap) is unavailable; "
                "they can then read and write your files and use the network."})

    def __post_init__(self):
        super().__post_init__()
        unknown = set(self.rewards) - set(REWARDS) - set(LEARNED_REWARDS)
        if unknown or not self.rewards:
            raise ValueError(f"unknown rewards {sorted(unknown)}; choose from {sorted([*REWARDS, *LEARNED_REWARDS])}")
        if "reward_model" in self.rewards and not self.reward_model_path:
            raise ValueError("the 'reward_model' reward needs reward_model_path: a folder saved by recipes/reward.py")
        if "code" in self.rewards:  # refuse before training starts, not at the first reward call
            from llama4_sparse.eval.sandbox import isolation_level

            isolation_level(allow_unsandboxed=self.allow_unsandboxed_code)


def grpo_dataset(recipe_args: GRPOArguments) -> Dataset:
    if recipe_args.dataset_name == "arithmetic":
        template = PROMPT_TEMPLATES[recipe_args.prompt_style]
        return Dataset.from_list([{"prompt": p.prompt(template), "answer": p.gsm8k_row()["answer"]}
                                  for p in synthetic_problems(recipe_args)])
    return local_dataset(recipe_args)


def reward_functions(recipe_args: GRPOArguments, tokenizer) -> list:
    options = {
        "length": {"soft_limit": recipe_args.length_soft_limit, "hard_limit": recipe_args.length_hard_limit},
        "code": {"timeout": recipe_args.code_timeout, "allow_unsandboxed": recipe_args.allow_unsandboxed_code},
    }
    functions = []
    for name in recipe_args.rewards:
        if name == "steps":
            functions.append(step_rewards.for_trl(tokenizer))
        elif name == "reward_model":
            functions.append(reward_model_reward(RewardModelScorer(recipe_args.reward_model_path, tokenizer), tokenizer))
        else:
            functions.append(for_trl(name, tokenizer, **options.get(name, {})))
    return functions


def make_trainer(recipe_args, training_args, model_args):
    """The configured TRL trainer, ready to train (tests inspect it before training)."""
    if training_args.beta > 0 and not (model_args.model_name_or_path or model_args.use_peft):
        raise ValueError("beta > 0 needs a reference model: start from a saved model (--model_name_or_path) "
                         "or train LoRA adapters (--use_peft), or set beta: 0")
    tokenizer = build_tokenizer(recipe_args, model_args)
    model = build_model(recipe_args, model_args, training_args, tokenizer)
    if training_args.beta > 0 and not model_args.use_peft:
        # TRL loads the KL reference from the checkpoint by the class its config names, looked up in transformers:
        # that is transformers' own Llama4 class, whose outputs its fused LM head cannot read. Name this package's.
        training_args.model_init_kwargs = {**(training_args.model_init_kwargs or {}), "architecture": type(model)}
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_functions(recipe_args, tokenizer),
        args=training_args,
        train_dataset=grpo_dataset(recipe_args),
        processing_class=tokenizer,
        peft_config=lora_config(recipe_args, model_args),
    )
    add_heldout_eval(trainer, recipe_args, tokenizer)
    return trainer


def main(args=None) -> dict:
    return run_recipe("grpo", GRPOConfig, make_trainer, args, GRPOArguments)


if __name__ == "__main__":
    main()
