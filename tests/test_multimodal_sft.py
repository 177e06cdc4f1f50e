"""One TRL SFTTrainer step on image chats (loss on the replies only) trains the vision tower too."""

import datasets
import torch
from PIL import Image
from trl import SFTConfig, SFTTrainer

from llama4_sparse.modeling_llama4 import Llama4Config, Llama4ForConditionalGeneration, Llama4ImageProcessor, Llama4Processor
from llama4_sparse.tokenizer import load_tokenizer

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def image_chats() -> datasets.Dataset:
    rows = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is this?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": f"It is {name}."}]},
            ],
            # different sizes, so the batch has images of different tile counts
            "images": [Image.new("RGB", (40 + 24 * i, 40), rgb)],
        }
        for i, (name, rgb) in enumerate(COLOURS.items())
    ]
    return datasets.Dataset.from_list(rows)


def test_sft_step_updates_the_vision_tower(tmp_path):
    torch.manual_seed(0)
    processor = Llama4Processor(Llama4ImageProcessor(size=32), load_tokenizer(), patch_size=4)
    model = Llama4ForConditionalGeneration(Llama4Config.from_preset("tiny"))
    tiles_seen = []
    model.vision_model.register_forward_hook(lambda module, args, out: tiles_seen.append(args[0].shape[0]))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, use_cpu=True, bf16=False,
        report_to="none", learning_rate=1e-3, save_strategy="no", max_length=None, activation_checkpointing=False,
        # the loss sees only the replies, so the tower learns through attention alone
        assistant_only_loss=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=image_chats(), processing_class=processor)
    trainer.train()

    # 40x40 -> 2x2 (+thumbnail), 64x40 -> 2x2 (+1), 88x40 -> 2x3 (+1), 112x40 -> 2x4 (+1): 26 tiles
    assert tiles_seen and tiles_seen[0] == 5 + 5 + 7 + 9
    unchanged = [name for name, p in model.named_parameters() if torch.equal(p.detach(), before[name])]
    vision = [name for name in before if name.startswith("vision_model.")]
    assert vision and not [name for name in vision if name in unchanged]
    assert "multi_modal_projector.linear_1.weight" not in unchanged
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))
