"""Train a byte-level BPE with Llama 4's pre-tokenizer and special-token layout.

    python -m tokenizer.train_bpe --num-ranks 8192 --files corpus/*.txt --output my_tokenizer/
    python -m tokenizer.train_bpe --num-ranks 8192 --dataset path/or/name --split train --text-column text \\
        --output my_tokenizer/

``--num-ranks`` counts the BPE tokens (the 256 bytes included); the 2048 special tokens follow at
``num_ranks + offset``, so the vocabulary is ``num_ranks + 2048``. The output folder holds the HF files
(loadable with ``AutoTokenizer.from_pretrained`` once ``tokenizer`` is imported) and ``tokenizer.model``,
the ranks in tiktoken's format, which ``tokenizer.convert_tiktoken`` turns back into the same HF files.
"""

import argparse
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from .byte_level_bpe import O200K_PATTERN, build_backend, pre_tokenizer, str_to_token, write_tiktoken_ranks

logger = logging.getLogger(__name__)


def train_ranks(texts: Iterable[str], num_ranks: int, pattern: str = O200K_PATTERN, *,
                min_frequency: int = 2, length: int | None = None, show_progress: bool = True) -> dict[bytes, int]:
    """BPE ranks learned from ``texts``: the 256 bytes, then one token per merge in the order learned.

    The merge order is a valid tiktoken rank order (every token ranks above its two halves), so the
    result encodes with tiktoken and with ``build_backend`` identically.
    """
    if num_ranks < 257:
        raise ValueError(f"num_ranks={num_ranks}: a byte-level BPE has 256 byte tokens, so ask for at least 257")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizer(pattern)
    trainer = trainers.BpeTrainer(vocab_size=num_ranks, min_frequency=min_frequency, show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    backend.train_from_iterator(texts, trainer=trainer, length=length)
    vocab = backend.get_vocab()
    ranks = {str_to_token(token): rank for token, rank in vocab.items()}
    if len(ranks) < num_ranks:
        logger.warning("the corpus supports only %d ranks (asked for %d): it has too few repeated pairs",
                       len(ranks), num_ranks)
    return ranks

