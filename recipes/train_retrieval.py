"""Train the tiny preset on synthetic retrieval (niah-format documents of <= 2k tokens), then score the niah
grid far past the training length.

From scratch on long documents the tiny preset does not learn to retrieve; it does in three stages, each continuing
the last (README, "Long context": 93.8% at 420 tokens, 95% at 8x, 96.2% at 128x):

    R="python -m llama4_sparse.recipes.train_retrieval --batch_size 16 --digits 2 --max_keys 1"
    # 1. copy the needle's number in the shortest documents, inside one 256-token RoPE chunk
    $R --output_dir runs/ret/copy --steps 1200 --warmup 50 --min_length 140 --max_length 170 --lr 2e-3
    # 2. a 64-token chunk: a needle more than a chunk away is reachable through the NoPE layer only
    $R --output_dir runs/ret/nope --init_from runs/ret/copy/model --attention_chunk_size 64 \
        --steps 600 --warmup 20 --min_length 140 --max_length 170 --lr 1e-3
    # 3. longer documents (training length 420); add --no_temperature_tuning for the ablation
    $R --output_dir runs/ret/long --init_from runs/ret/nope/model --attention_chunk_size 64 \
        --steps 800 --warmup 20 --min_length 140 --max_length 420 --lr 1e-3

A plain loop (AdamW, warm-up then cosine decay, loss on the answer tokens only; each document asks
for every key it hides): the documents come from recipes/data/retrieval.py, right-padded (causal
attention never looks right, so no mask is needed). The saved folder loads with `Llama4ForCausalLM.from_pretrained` and runs through
`llama4-eval --tasks niah`; `--eval_lengths` scores it here at the end through `eval.evaluate`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from llama4_sparse.modeling_llama4 import Llama4ForCausalLM, Llama4TextConfig
from llama4_sparse.recipes.data.retrieval import retrieval_batch
from llama4_sparse.tokenizer import load_tokenizer


def collate(examples: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels that are -100 everywhere but on the answers."""
    width = max(len(e["ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    for i, e in enumerate(examples):
        row = torch.tensor(e["ids"])
        ids[i, : len(row)] = row
        labels[i, : len(row)] = torch.where(torch.tensor(e["answer_mask"]), row, -100)
    return ids, labels


def answer_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the answer tokens, with the LM head applied only where it is scored."""
    hidden = model.model(ids, use_cache=False).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    scored = targets != -100
    return torch.nn.functional.cross_entropy(model.lm_head(hidden[scored]), targets[scored])


def keys_at(step: int, max_keys: int, curriculum_steps: int) -> int:
    """The most needles a training document hides at `step`: 1 rising linearly to `max_keys` over the curriculum."""
    if step >= curriculum_steps:
        return max_keys
    return 1 + (max_keys - 1) * step // curriculum_steps


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--init_from", type=Path, default=None,
                        help="continue from this saved model (e.g. one trained on shorter documents or fewer needles) "
                             "instead of a fresh tiny preset; --attention_chunk_size and --no_temperature_tuning "
                             "still apply to it")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--min_length", type=int, default=512)
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--max_keys", type=int, default=4)
    parser.add_argument("--curriculum_steps", type=int, default=0,
                        help="raise the most needles a document hides from 1 to --max_keys over these first steps: "
                             "one needle is learnt as 'copy the number', the key matching after it")
    parser.add_argument("--digits", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_temperature_tuning", action="store_true")
    parser.add_argument("--max_position_embeddings", type=int, default=1 << 17)
    parser.add_argument("--attention_chunk_size", type=int, default=None,
                        help="the RoPE layers' chunk; default: the tiny preset's (256). A smaller chunk makes short "
                             "training documents need the NoPE layers, as long ones do at the preset's chunk")
    parser.add_argument("--eval_lengths", default="", help="comma-separated niah lengths to score at the end")
    parser.add_argument("--eval_samples", type=int, default=4)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer()
    overrides = {"attn_temperature_tuning": not args.no_temperature_tuning,
                 **({"attention_chunk_size": args.attention_chunk_size} if args.attention_chunk_size else {})}
    if args.init_from:
        model = Llama4ForCausalLM.from_pretrained(args.init_from, dtype=torch.float32, attn_implementation="sdpa",
                                                  **overrides).train()
        config = model.config
    else:
        config = Llama4TextConfig.from_preset("tiny", max_position_embeddings=args.max_position_embeddings, **overrides)
        config._attn_implementation = "sdpa"
        model = Llama4ForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, args.steps)))),
    )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    log = open(args.output_dir / "train_log.jsonl", "w")
    started = time.time()
    for step in range(args.steps):
        batch = retrieval_batch(tokenizer, args.seed, step, args.batch_size, args.min_length, args.max_length,
                                keys_at(step, args.max_keys, args.curriculum_steps), args.digits)
        ids, labels = collate(batch, config.pad_token_id)
        loss = answer_loss(model, ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps - 1:
            row = {"step": step, "loss": round(loss.item(), 4), "tokens": ids.shape[1],
                   "lr": schedule.get_last_lr()[0], "elapsed_s": round(time.time() - started, 1)}
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(json.dumps(row), flush=True)
    model.eval()
    model.save_pretrained(args.output_dir / "model")
    tokenizer.save_pretrained(args.output_dir / "model")
    summary = {"train_s": round(time.time() - started, 1), "steps": args.steps,
               "temperature_tuning": not args.no_temperature_tuning, "attention_chunk_size": config.attention_chunk_size,
               "init_from": str(args.init_from) if args.init_from else None}
    if args.eval_lengths:
        import llama4_sparse.eval as harness

        lengths = [int(n) for n in args.eval_lengths.split(",")]
        summary["niah"] = harness.evaluate(
            model, tokenizer, tasks=["niah"], batch_size=4, output_dir=args.output_dir / "niah",
            niah={"lengths": lengths, "samples": args.eval_samples, "digits": args.digits}, progress=False,
        )["niah"]
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
