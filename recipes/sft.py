"""Supervised fine-tuning on worked chains of thought (TRL SFTTrainer).

    [accelerate launch --config_file recipes/accelerate_configs/X.yaml] recipes/sft.py \
        --config recipes/configs/tiny/sft.yaml [--max_steps N --output_dir DIR ...]

Conversational `messages` rows; assistant turns carry their chain in `reasoning`, which the chat
template renders inside the thinking block, so `assistant_only_loss` trains chain and answer only.
`dataset_name: shapes` trains the multimodal model (`model_class: conditional_generation`) on
shape-counting images through `Llama4Processor`.
"""

import random
import re
from dataclasses import dataclass, field

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from llama4_sparse.modeling_llama4 import Llama4ImageProcessor, Llama4Processor
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
from llama4_sparse.recipes.callbacks import HeldOutEvalArguments, add_heldout_eval
from llama4_sparse.recipes.data.arithmetic import CHAIN_ITEMS
from llama4_sparse.recipes.data.shapes import generate_scenes

_CHAIN_ITEM = re.compile(r"collects? (\w+)\.")


@dataclass
class SFTArguments(RecipeArguments, HeldOutEvalArguments):
    chain_of_thought: bool = field(default=True, metadata={
        "help": "Synthetic arithmetic: train on the worked chain and the answer (true), or on the answer alone "
                "with the chain left out (false: the 'direct' baseline that shows what the chain is worth)."})
    self_check: bool = field(default=False, metadata={
        "help": "Synthetic arithmetic with chain_of_thought: end every worked chain with a check of its result "
                "(the steps undone from the answer back to the start) before the final answer, so the model "
                "learns to verify its own logic; GRPO's `self_check` reward scores whether that check holds."})
    terse_chain_share: float = field(default=0.0, metadata={
        "help": "Synthetic arithmetic with chain_of_thought: the share of training problems whose chain is a sketch "
                "(start and changes, running totals left out) instead of the worked chain. SFT then imitates both "
                "styles, and RL with a verified reward can measure which one pays."})
    terse_chain_skew: float = field(default=0.0, metadata={
        "help": "How far the sketch share leans by item: problems about the first half of the chain items are "
                "sketched at terse_chain_share + skew, the others at terse_chain_share - skew. Greedy decoding "
                "takes the likelier style, so without a lean a model trained on a 50/50 mix sketches all or none "
                "of its answers, as the seed happens to tilt it; with one it sketches about the items it saw "
                "sketched most, and samples both styles everywhere."})

    def __post_init__(self):
        super().__post_init__()
        if self.self_check and (not self.chain_of_thought or self.terse_chain_share > 0):
            raise ValueError("self_check checks worked chains: it needs chain_of_thought true and terse_chain_share 0 "
                             "(configs/tiny/sft.yaml mixes in sketches: add --terse_chain_share 0)")
        if not 0.0 <= self.terse_chain_share <= 1.0:
            raise ValueError(f"terse_chain_share is a share of the training problems, in [0, 1]; got {self.terse_chain_share}")
        low, high = self.terse_chain_share - self.terse_chain_skew, self.terse_chain_share + self.terse_chain_skew
        # A share of 0 means no sketches at all, whatever the skew (so `--terse_chain_share 0` alone turns sft.yaml's off).
        if self.terse_chain_skew < 0 or (self.terse_chain_share > 0 and (low < 0 or high > 1)):
            raise ValueError(f"terse_chain_skew must be >= 0 and keep both shares in [0, 1]; got share "
                             f"{self.terse_chain_share} +/- skew {self.terse_chain_skew}")


def processor_for(model, tokenizer) -> Llama4Processor:
    vision = model.config.vision_config
    image_processor = Llama4ImageProcessor(size={"height": vision.image_size, "width": vision.image_size})
    return Llama4Processor(image_processor, tokenizer, patch_size=vision.patch_size,
                           pixel_shuffle_ratio=vision.pixel_shuffle_ratio)


def sft_dataset(recipe_args, image_size: int | None = None) -> Dataset:
    if recipe_args.dataset_name == "shapes":
        if image_size is None:
            raise ValueError("dataset_name 'shapes' is multimodal: use model_class conditional_generation")
        scenes = generate_scenes(recipe_args.num_train_examples, seed=recipe_args.problem_seed, image_size=image_size)
        return Dataset.from_list([scene.row() for scene in scenes])
    if recipe_args.dataset_name == "arithmetic":
        template = PROMPT_TEMPLATES[recipe_args.prompt_style]
        cot = getattr(recipe_args, "chain_of_thought", True)
        share = getattr(recipe_args, "terse_chain_share", 0.0)
        skew = getattr(recipe_args, "terse_chain_skew", 0.0)
        leaning = set(CHAIN_ITEMS[:len(CHAIN_ITEMS) // 2])
        # Its own stream, so the problems (and sft_direct's, which never sketches) do not depend on the share.
        rng = random.Random(f"terse:{recipe_args.problem_seed}")

        def terse(p) -> bool:
            if not cot or share == 0 or p.family != "chain":  # a one-step problem has no running total to leave out
                return False
            item = _CHAIN_ITEM.search(p.question)
            lean = skew if item and item[1] in leaning else -skew
            return rng.random() < share + lean

        check = getattr(recipe_args, "self_check", False)
        return Dataset.from_list([{"messages": p.messages(template, cot, terse=terse(p), self_check=check and p.family == "chain")}
                                  for p in synthetic_problems(recipe_args)])
    return local_dataset(recipe_args)


def make_trainer(recipe_args, training_args, model_args):
    """The configured TRL trainer, ready to train (tests inspect it before training)."""
    tokenizer = build_tokenizer(recipe_args, model_args)
    model = build_model(recipe_args, model_args, training_args, tokenizer)
    vision = getattr(model.config, "vision_config", None)
    multimodal = recipe_args.dataset_name == "shapes" and vision is not None
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=sft_dataset(recipe_args, vision.image_size if multimodal else None),
        processing_class=processor_for(model, tokenizer) if multimodal else tokenizer,
        peft_config=lora_config(recipe_args, model_args),
    )
    add_heldout_eval(trainer, recipe_args, tokenizer)
    return trainer


def main(args=None) -> dict:
    return run_recipe("sft", SFTConfig, make_trainer, args, SFTArguments)


if __name__ == "__main__":
    main()
