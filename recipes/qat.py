"""Quantization-aware training in the recipes: `--qat 8da4w|int4` on sft.py, dpo.py, grpo.py (and reward.py).

`build_model` prepares the model (`modeling_llama4.fake_quant.prepare_qat`) before the trainer wraps it, so
LoRA adapters go on top of the fake-quantized layers and DPO's reference copy computes like the policy.
`--qat_start_step N` trains in full precision for N optimizer steps first (fake-quant switched off, then
on). The saved folder holds ordinary full-precision weights (fake-quantization adds no state) and loads as
usual; `--save_low_bit` also writes OUTPUT_DIR/low_bit, converted to packed low-bit weights (adapters merged
first under LoRA), which loads with `from_pretrained` too.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from transformers import TrainerCallback

from llama4_sparse.modeling_llama4.fake_quant import prepare_qat, set_fake_quant
from llama4_sparse.modeling_llama4.low_bit import convert_to_low_bit
from llama4_sparse.modeling_llama4.quantization_scheme import QuantizationScheme

logger = logging.getLogger("recipes")
LOW_BIT_SUBFOLDER = "low_bit"


def qat_scheme(recipe_args) -> QuantizationScheme | None:
    if not getattr(recipe_args, "qat", None):
        return None
    return QuantizationScheme(recipe_args.qat, group_size=recipe_args.qat_group_size)


def check_qat_arguments(recipe_args) -> None:
    """Clear errors at parse time, before anything is built."""
    if recipe_args.qat_start_step < 0:
        raise ValueError(f"qat_start_step must be >= 0, got {recipe_args.qat_start_step}")
    if recipe_args.save_low_bit and not recipe_args.qat:
        raise ValueError("save_low_bit converts a QAT-trained model; set --qat 8da4w|int4 (for post-training "
                         "quantization of any checkpoint use python -m llama4_sparse.modeling_llama4.quantize)")
    qat_scheme(recipe_args)


def apply_qat(model, recipe_args):
    scheme = qat_scheme(recipe_args)
    if scheme is None:
        return model
    prepare_qat(model, scheme)
    logger.info("QAT %s, group size %d: fake-quantized linear layers and routed experts%s", scheme.scheme,
                scheme.group_size, f" from step {recipe_args.qat_start_step}" if recipe_args.qat_start_step else "")
    return model


class QATStartCallback(TrainerCallback):
    """Full precision until `start` optimizer steps are done, fake-quantized from then on (resumes included)."""

    def __init__(self, start: int):
        self.start = start

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        set_fake_quant(model, state.global_step >= self.start)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.start:
            set_fake_quant(model, True)
            logger.info("QAT: fake quantization on from step %d", state.global_step)


def save_low_bit(model, processing_class, output_dir) -> Path:
    """The trained model converted to real low-bit weights, in OUTPUT_DIR/low_bit (the training model is untouched)."""
    converted = copy.deepcopy(model)
    if hasattr(converted, "merge_and_unload"):
        converted = converted.merge_and_unload()
    convert_to_low_bit(converted)
    path = Path(output_dir) / LOW_BIT_SUBFOLDER
    converted.save_pretrained(path)
    processing_class.save_pretrained(path)
    logger.info("saved the low-bit model to %s", path)
    return path
