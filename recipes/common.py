"""What every recipe script shares: arguments, tokenizer, model, LoRA, data, training and saving.

A script is `parse_recipe` -> `build_*` -> its TRL trainer -> `train_and_save`; the method-specific
part (trainer class, dataset format, rewards) stays in the script.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from peft import LoraConfig
from transformers import set_seed
from transformers.trainer_utils import get_last_checkpoint
from trl import ModelConfig, TrlParser

# Importing the package registers the model types, also in processes accelerate launches.
from llama4_sparse.modeling_llama4 import (
    Llama4Config,
    Llama4ForCausalLM,
    Llama4ForConditionalGeneration,
    Llama4ForSequenceClassification,
    Llama4TextConfig,
)
from llama4_sparse.modeling_llama4.load_balancing import ExpertBiasCallback
from llama4_sparse.eval.tasks.gsm8k import CHAT_INSTRUCTION
from llama4_sparse.tokenizer import load_tokenizer

from . import dense_lm_head
from .data.arithmetic import FAMILIES, generate_problems
from .qat import QATStartCallback, apply_qat, check_qat_arguments, qat_scheme, save_low_bit

logger = logging.getLogger("recipes")

MODEL_CLASSES = {
    "causal_lm": Llama4ForCausalLM,
    "conditional_generation": Llama4ForConditionalGeneration,
    "sequence_classification": Llama4ForSequenceClassification,
}
# Attention and the shared expert/dense MLP as modules; the fused routed experts as parameters.
# Never the router (its top-k needs the raw module) nor lm_head (TRL reads its weight directly).
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_EXPERT_PARAMETERS = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]
PROMPT_TEMPLATES = {"plain": "{question}", "gsm8k_chat": CHAT_INSTRUCTION}
LORA_EXCLUDED = r".*(router|lm_head|vision_model|multi_modal_projector|score).*"
# Subfolders of a LoRA run's output_dir: the initial weights of a run from a preset, and the merged model.
BASE_SUBFOLDER = "base"
MERGED_SUBFOLDER = "merged"


@dataclass
class RecipeArguments:
    """Arguments every recipe takes besides TRL's trainer config and model config."""

    model_preset: str = field(default="tiny", metadata={
        "help": "Preset to build a freshly initialised model from when model_name_or_path is not set: tiny, scout, maverick."})
    model_class: str = field(default="causal_lm", metadata={
        "help": f"Model head: one of {sorted(MODEL_CLASSES)}."})
    model_overrides: dict = field(default_factory=dict, metadata={
        "help": "Text-config fields overriding the preset, e.g. {num_hidden_layers: 2}."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Tokenizer folder; default: the model folder if it has one, else the shipped tokenizer."})
    dataset_name: str = field(default="arithmetic", metadata={
        "help": "'arithmetic' (synthetic word problems) or a local .jsonl/.json/.parquet file or save_to_disk folder."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split of a local dataset to train on."})
    num_train_examples: int = field(default=2000, metadata={"help": "Synthetic training problems to generate."})
    problem_families: list[str] = field(default_factory=lambda: ["add", "sub", "add_sub"], metadata={
        "help": f"Synthetic problem families, from {sorted(FAMILIES)}."})
    max_operand: int = field(default=20, metadata={"help": "Largest number in a synthetic question."})
    problem_steps: list[int] = field(default_factory=lambda: [4, 4], metadata={
        "help": "Fewest and most operations of a synthetic 'chain' problem."})
    problem_seed: int = field(default=0, metadata={"help": "Seed of the synthetic data generator."})
    prompt_style: str = field(default="gsm8k_chat", metadata={
        "help": "User turn of a synthetic problem: 'plain' (the question) or 'gsm8k_chat' (the eval harness's "
                "gsm8k_chat instruction around it, so training and scoring prompts agree)."})
    freeze_router: bool = field(default=False, metadata={
        "help": "Keep the MoE routers' weights fixed (full fine-tuning; LoRA never adapts them): a small router update "
                "moves tokens near a routing tie to another expert, a discrete change in the layer's output."})
    lora_experts: bool = field(default=True, metadata={
        "help": "With use_peft: also adapt the fused routed experts through PEFT target_parameters."})
    dry_run: bool = field(default=False, metadata={
        "help": "Build the model on the meta device, apply the method and LoRA, print parameter counts and a "
                "per-GPU memory estimate, and exit without training."})
    accelerate_config: str | None = field(default=None, metadata={
        "help": "Accelerate config the dry run estimates memory for (default: one process, no sharding)."})
    expert_parallel_size: int = field(default=1, metadata={
        "help": "Split the routed experts over this many ranks (all-to-all token exchange) under an FSDP2 launch, "
                "the rest of the model FSDP2-sharded over all ranks (recipes/expert_parallel.py)."})
    qat: str | None = field(default=None, metadata={
        "help": "Quantization-aware training: '8da4w' (int8 dynamic activations, int4 weights) or 'int4' (weight-only); "
                "int2..int8 / 8da2w..8da8w also. Linear layers and routed experts; router, embeddings, lm_head and "
                "vision stay full precision."})
    qat_group_size: int = field(default=32, metadata={"help": "QAT weight group size along each reduction dimension."})
    qat_start_step: int = field(default=0, metadata={"help": "With qat: train in full precision for this many steps first."})
    save_low_bit: bool = field(default=False, metadata={
        "help": "With qat: also save the model converted to packed low-bit weights to OUTPUT_DIR/low_bit."})
    save_merged: bool = field(default=False, metadata={
        "help": "With use_peft: also save the model with the trained adapters merged into its weights, with the "
                "tokenizer, to OUTPUT_DIR/merged (loads with from_pretrained; PEFT not needed)."})

    def __post_init__(self):
        if self.model_class not in MODEL_CLASSES:
            raise ValueError(f"model_class must be one of {sorted(MODEL_CLASSES)}, got {self.model_class!r}")
        if self.prompt_style not in PROMPT_TEMPLATES:
            raise ValueError(f"prompt_style must be one of {sorted(PROMPT_TEMPLATES)}, got {self.prompt_style!r}")
        unknown = set(self.problem_families) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown problem_families {sorted(unknown)}; choose from {sorted(FAMILIES)}")
        check_qat_arguments(self)


def parse_recipe(training_config_class, arguments_class=RecipeArguments, args=None):
    """(recipe arguments, TRL training config, model config) from `--config YAML` plus CLI overrides;
    an unknown key in either is an error, so a stale or misspelt setting never goes unnoticed."""
    args = list(sys.argv[1:] if args is None else args)
    if "--dry_run" in args and not torch.cuda.is_available():
        # The dry run only builds on the meta device: parse a GPU config (bf16) as a CPU run.
        args += ["--use_cpu", "true"]
    parser = TrlParser((arguments_class, training_config_class, ModelConfig))
    recipe_args, training_args, model_args = parser.parse_args_and_config(args=args)
    if model_args.use_peft and recipe_args.lora_experts and model_args.lora_dropout != 0:
        raise ValueError("LoRA on the fused experts (lora_experts: true) needs lora_dropout: 0; PEFT's parameter "
                         f"adapters do not support dropout (got {model_args.lora_dropout})")
    if recipe_args.save_merged and not model_args.use_peft:
        raise ValueError("save_merged merges LoRA adapters into the base weights, so it needs use_peft: true; "
                         "a full fine-tune already saves plain weights")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return recipe_args, training_args, model_args


def build_tokenizer(recipe_args: RecipeArguments, model_args: ModelConfig):
    path = recipe_args.tokenizer_name_or_path
    if path is None and model_args.model_name_or_path and (Path(model_args.model_name_or_path) / "tokenizer.json").is_file():
        path = model_args.model_name_or_path
    return load_tokenizer(path)


def model_config(recipe_args: RecipeArguments, model_args: ModelConfig):
    """The config of the model a recipe trains: the saved one, or the preset with overrides."""
    if model_args.model_name_or_path:
        return MODEL_CLASSES[recipe_args.model_class].config_class.from_pretrained(model_args.model_name_or_path)
    if recipe_args.model_class == "conditional_generation":
        text = Llama4TextConfig.from_preset(recipe_args.model_preset, **recipe_args.model_overrides)
        return Llama4Config.from_preset(recipe_args.model_preset, text_config=text)
    extra = {"num_labels": 1} if recipe_args.model_class == "sequence_classification" else {}
    return Llama4TextConfig.from_preset(recipe_args.model_preset, **recipe_args.model_overrides, **extra)


def _dtype(model_args: ModelConfig):
    if model_args.dtype in (None, "auto"):
        return torch.float32
    return getattr(torch, model_args.dtype)


def build_model(recipe_args: RecipeArguments, model_args: ModelConfig, training_args, tokenizer):
    """The model to train: loaded from `model_name_or_path`, else freshly initialised (seeded) from the preset."""
    model_class = MODEL_CLASSES[recipe_args.model_class]
    if model_args.model_name_or_path:
        kwargs = {"num_labels": 1} if recipe_args.model_class == "sequence_classification" else {}
        model = model_class.from_pretrained(model_args.model_name_or_path, dtype=_dtype(model_args), **kwargs)
        if Path(model_args.model_name_or_path).is_dir():
            # Adapter configs (and TRL's reference model) record this path; absolute, it resolves from any directory.
            model.name_or_path = model.config._name_or_path = str(Path(model_args.model_name_or_path).resolve())
    else:
        set_seed(training_args.seed)
        model = model_class(model_config(recipe_args, model_args)).to(_dtype(model_args))
    text_config = model.config.get_text_config()
    if text_config.vocab_size < len(tokenizer):
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{text_config.vocab_size}; use a matching tokenizer or preset")
    text_config.pad_token_id = tokenizer.pad_token_id
    if training_args.ddp_find_unused_parameters is None:
        # DDP must look for parameters without gradients only when some can have none: the vision tower of the
        # multimodal model on text-only data. Anywhere else the search costs a graph walk per step and torch warns
        # that it found nothing (transformers turns it on whenever activation checkpointing is off).
        training_args.ddp_find_unused_parameters = (recipe_args.model_class == "conditional_generation"
                                                    and recipe_args.dataset_name != "shapes")
    if model_args.use_peft and not model_args.model_name_or_path:
        save_base_model(model, tokenizer, training_args)
    if recipe_args.freeze_router:
        routers = [p for name, p in model.named_parameters() if name.endswith("router.weight")]
        if not routers:
            raise ValueError("freeze_router: this model has no MoE router (no parameter named '*router.weight')")
        for parameter in routers:
            parameter.requires_grad_(False)
    return apply_qat(model, recipe_args)


def save_base_model(model, tokenizer, training_args) -> Path:
    """LoRA on a freshly initialised model: the adapters mean nothing without these exact base weights, so they
    are saved (with the tokenizer) to OUTPUT_DIR/base before training, and the model's `name_or_path` points
    there, which is what every adapter folder of the run (checkpoints included) records as its base."""
    base = Path(training_args.output_dir).resolve() / BASE_SUBFOLDER
    if training_args.process_index == 0:
        model.save_pretrained(base)
        tokenizer.save_pretrained(base)
        logger.info("LoRA from a preset: saved the initial base model to %s", base)
    # PEFT reads the instance attribute, TRL the config's.
    model.name_or_path = model.config._name_or_path = str(base)
    return base


def reference_model(model, model_args: ModelConfig):
    """A frozen copy of the starting policy for DPO; None with LoRA (the base with adapters off is the reference)."""
    if model_args.use_peft:
        return None
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


def lora_config(recipe_args: RecipeArguments, model_args: ModelConfig, task_type: str = "CAUSAL_LM") -> LoraConfig | None:
    if not model_args.use_peft:
        return None
    experts = list(model_args.lora_target_parameters or (LORA_EXPERT_PARAMETERS if recipe_args.lora_experts else []))
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=list(model_args.lora_target_modules or LORA_TARGET_MODULES),
        target_parameters=experts or None,
        exclude_modules=LORA_EXCLUDED,
        modules_to_save=model_args.lora_modules_to_save,
        use_rslora=model_args.use_rslora,
        task_type=task_type,
    )


def local_dataset(recipe_args: RecipeArguments) -> datasets.Dataset:
    path = Path(recipe_args.dataset_name)
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
    elif path.suffix in (".jsonl", ".json", ".parquet"):
        kind = "parquet" if path.suffix == ".parquet" else "json"
        loaded = datasets.load_dataset(kind, data_files={recipe_args.dataset_train_split: str(path)})
    else:
        raise ValueError(f"dataset_name {recipe_args.dataset_name!r} is neither 'arithmetic' nor a local "
                         ".jsonl/.json/.parquet file or save_to_disk folder")
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded[recipe_args.dataset_train_split]
    return loaded


def synthetic_problems(recipe_args: RecipeArguments):
    return generate_problems(recipe_args.num_train_examples, seed=recipe_args.problem_seed, split="train",
                             families=tuple(recipe_args.problem_families), max_operand=recipe_args.max_operand,
                             steps=tuple(recipe_args.problem_steps))


def resume_checkpoint(training_args) -> str | None:
    """`resume_from_checkpoint`: a path, or `last`/`true` for the newest checkpoint in output_dir."""
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() not in ("last", "true"):
        return value
    last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
    if last is None:
        logger.info("no checkpoint in %s: starting from scratch", training_args.output_dir)
    return last


def run_recipe(method: str, training_config_class, make_trainer, args=None, arguments_class=RecipeArguments) -> dict:
    """A recipe script's whole run: parse its arguments, then either the dry run or train and save."""
    # Imported here: the dry run builds on this module's model and LoRA helpers.
    from .dry_run import dry_run

    from .distributed import ShardingReport, check_parallelism, enable_fsdp_on_cpu

    recipe_args, training_args, model_args = parse_recipe(training_config_class, arguments_class, args=args)
    if recipe_args.dry_run:
        return dry_run(recipe_args, training_args, model_args, method)
    enable_fsdp_on_cpu()
    dense_lm_head.install()
    trainer = make_trainer(recipe_args, training_args, model_args)
    check_parallelism(trainer)
    if recipe_args.expert_parallel_size != 1:
        from .expert_parallel import shard_with_expert_parallel

        shard_with_expert_parallel(trainer, recipe_args.expert_parallel_size)
    trainer.add_callback(ShardingReport())
    metrics = train_and_save(trainer, training_args, recipe_args, model_args, method)
    if torch.distributed.is_initialized():
        # A launched run ends here: leaving the process group to interpreter exit let a gloo/DeepSpeed rank
        # abort ("terminate called without an active exception") after the save, failing the launch.
        trainer.accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()
    return metrics


def train_and_save(trainer, training_args, recipe_args: RecipeArguments | None = None,
                   model_args: ModelConfig | None = None, method: str = "sft") -> dict:
    """Train (resuming when asked), then save the model as safetensors with its tokenizer and chat template,
    the merged model when `save_merged` asks for it, and a model card saying what was trained on what."""
    save_merged = bool(recipe_args and recipe_args.save_merged)
    if save_merged and (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        raise ValueError("save_merged merges in the training process, which needs the whole model on one rank; "
                         "under FSDP/DeepSpeed save the adapters, then merge them offline with PEFT's "
                         "merge_and_unload on the base model")
    # MoE load balancing (aux-loss-free expert bias) steps with the optimizer, outside the forward.
    trainer.add_callback(ExpertBiasCallback())
    if recipe_args is not None and qat_scheme(recipe_args) is not None:
        trainer.add_callback(QATStartCallback(recipe_args.qat_start_step))
    result = trainer.train(resume_from_checkpoint=resume_checkpoint(training_args))
    if trainer.is_fsdp_enabled:
        # Checkpoints may stay sharded (fast to write, resumable); the final folder is a normal one.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        out = Path(training_args.output_dir)
        if save_merged:
            merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            merged.save_pretrained(out / MERGED_SUBFOLDER)
            trainer.processing_class.save_pretrained(out / MERGED_SUBFOLDER)
            logger.info("saved the merged model to %s", out / MERGED_SUBFOLDER)
        if recipe_args is not None and recipe_args.save_low_bit:
            save_low_bit(trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class, out)
        if recipe_args is not None and model_args is not None:
            (out / "README.md").write_text(model_card(recipe_args, model_args, training_args, method,
                                                      trainer.state.global_step), encoding="utf-8")
        logger.info("saved to %s after %d steps", training_args.output_dir, trainer.state.global_step)
    return result.metrics


def training_data_description(recipe_args: RecipeArguments) -> str:
    if recipe_args.dataset_name == "arithmetic":
        return (f"synthetic arithmetic word problems with worked chains (`recipes/data`): "
                f"{recipe_args.num_train_examples} problems, families {', '.join(recipe_args.problem_families)}, "
                f"operands up to {recipe_args.max_operand}, generator seed {recipe_args.problem_seed}, "
                f"prompt style `{recipe_args.prompt_style}`")
    if recipe_args.dataset_name == "shapes":
        return (f"synthetic shape-counting images (`recipes/data/shapes.py`): {recipe_args.num_train_examples} "
                f"scenes, generator seed {recipe_args.problem_seed}")
    return f"`{recipe_args.dataset_name}` (split `{recipe_args.dataset_train_split}`)"


def model_card(recipe_args: RecipeArguments, model_args: ModelConfig, training_args, method: str, steps: int) -> str:
    """README.md of a recipe's output folder: base model, method, data, what the folder holds and how to load it."""
    import trl

    lora = bool(model_args.use_peft)
    source = model_args.model_name_or_path
    hub_id = source and not Path(source).exists()
    if source:
        base = f"`{Path(source).resolve() if not hub_id else source}`"
    else:
        base = (f"the `{recipe_args.model_preset}` preset ({recipe_args.model_class}), freshly initialised with seed "
                f"{training_args.seed}" + (f"; those initial weights are saved in `{BASE_SUBFOLDER}/`" if lora else ""))
    front = ["---", f"library_name: {'peft' if lora else 'transformers'}",
             f"pipeline_tag: {'text-classification' if method == 'reward' else 'text-generation'}",
             "tags: [llama4-sparse, trl, " + method + (", lora]" if lora else "]")]
    if hub_id:
        front.append(f"base_model: {source}")
    front.append("---")
    lines = [*front, "", f"# {Path(training_args.output_dir).name}", "",
             f"{method.upper()} with TRL {trl.__version__}, {steps} optimiser steps, learning rate "
             f"{training_args.learning_rate}, seed {training_args.seed}.", "",
             f"* **Base model:** {base}.",
             f"* **Training data:** {training_data_description(recipe_args)}."]
    if lora:
        modules = list(model_args.lora_target_modules or LORA_TARGET_MODULES)
        experts = list(model_args.lora_target_parameters or (LORA_EXPERT_PARAMETERS if recipe_args.lora_experts else []))
        lines.append(f"* **This folder holds LoRA adapters** (r={model_args.lora_r}, alpha={model_args.lora_alpha}) on "
                     f"{', '.join(modules)}" + (f" and the routed-expert parameters {', '.join(experts)}" if experts else "")
                     + "; the base weights are not in it.")
        if recipe_args.save_merged:
            lines.append(f"* **`{MERGED_SUBFOLDER}/`** holds the base with the adapters merged into its weights.")
    else:
        lines.append("* **This folder holds the full fine-tuned weights** (safetensors) with the tokenizer.")
    if recipe_args.qat:
        lines.append(f"* **Quantization-aware training:** `{recipe_args.qat}`, group size {recipe_args.qat_group_size}"
                     + (f", fake-quantized from step {recipe_args.qat_start_step}" if recipe_args.qat_start_step else "")
                     + "; the weights here are full precision"
                     + ("; `low_bit/` holds them converted to packed low-bit weights." if recipe_args.save_low_bit
                        else " (convert with `python -m llama4_sparse.modeling_llama4.quantize`)."))
    head = {"causal_lm": "AutoModelForCausalLM", "conditional_generation": "AutoModelForCausalLM",
            "sequence_classification": "AutoModelForSequenceClassification"}[recipe_args.model_class]
    lines += ["", "## Loading", "", "```python", "import modeling_llama4  # or pass trust_remote_code=True"]
    if lora:
        peft_class = "AutoPeftModelForSequenceClassification" if method == "reward" else "AutoPeftModelForCausalLM"
        lines += [f"from peft import {peft_class}", f"model = {peft_class}.from_pretrained(FOLDER)  # base + adapters"]
        if recipe_args.save_merged:
            lines += [f"from transformers import {head}", f"merged = {head}.from_pretrained(FOLDER + '/{MERGED_SUBFOLDER}')"]
    else:
        lines += [f"from transformers import {head}", f"model = {head}.from_pretrained(FOLDER)"]
    lines += ["```", ""]
    return "\n".join(lines)
