"""Train a byte-level BPE with Llama 4's pre-tokenizer and special-token layout.

    python -m llama4_sparse.tokenizer.train_bpe --num-ranks 8192 --files corpus/*.txt --output my_tokenizer/
    python -m llama4_sparse.tokenizer.train_bpe --num-ranks 8192 --dataset data.jsonl --text-column text --output my_tokenizer/

``--num-ranks`` counts the BPE tokens (the 256 bytes included); the 2048 special tokens follow at
``num_ranks + offset``, so the vocabulary is ``num_ranks + 2048``. The output folder holds the HF files
(loadable with ``AutoTokenizer.from_pretrained`` once ``tokenizer`` is imported) and ``tokenizer.model``,
the ranks in tiktoken's format, which ``tokenizer.convert_tiktoken`` turns back into the same HF files.
"""

import argparse
import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from .byte_level_bpe import O200K_PATTERN, pre_tokenizer, str_to_token, write_tiktoken_ranks
from .tokenization_llama4 import Llama4Tokenizer

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



def _file_texts(paths: list[Path]) -> Iterator[str]:
    for number, path in enumerate(paths, start=1):
        logger.info("reading %s (%d/%d)", path, number, len(paths))
        yield path.read_text(encoding="utf-8")


def _dataset_texts(name: str, split: str, column: str, config: str | None) -> tuple[Iterable[str], int]:
    import datasets

    location = Path(name)
    builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
    if location.is_dir() and any((location / marker).exists() for marker in ("dataset_info.json", "dataset_dict.json")):
        dataset = datasets.load_from_disk(str(location))
        dataset = dataset[split] if isinstance(dataset, datasets.DatasetDict) else dataset
    elif location.is_file() and location.suffix in builders:
        dataset = datasets.load_dataset(builders[location.suffix], data_files=str(location), split="train")
    else:
        dataset = datasets.load_dataset(name, config, split=split)
    if column not in dataset.column_names:
        raise ValueError(f"dataset {name} has no column {column!r}; its columns are {dataset.column_names}")
    return (row[column] for row in dataset), len(dataset)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-ranks", type=int, required=True, help="BPE tokens, the 256 bytes included")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--files", type=Path, nargs="+", help="UTF-8 text files")
    source.add_argument("--dataset", help="a datasets name or folder, a save_to_disk folder, or a .jsonl/.json/"
                        ".parquet/.csv/.txt file")
    parser.add_argument("--dataset-config", default=None)
    parser.add_argument("--split", default="train")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--pattern", default=O200K_PATTERN, help="pre-tokenizer regex (default: o200k)")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.files:
        missing = [str(path) for path in args.files if not path.is_file()]
        if missing:
            parser.error(f"these --files do not exist: {', '.join(missing)}")
        texts, length = _file_texts(args.files), len(args.files)
    else:
        texts, length = _dataset_texts(args.dataset, args.split, args.text_column, args.dataset_config)
    ranks = train_ranks(texts, args.num_ranks, args.pattern, min_frequency=args.min_frequency, length=length)
    tokenizer = Llama4Tokenizer.from_ranks(ranks, args.pattern)
    args.output.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(args.output))
    write_tiktoken_ranks(ranks, args.output / "tokenizer.model")
    logger.info("wrote %s: %d BPE ranks + 2048 special tokens", args.output, len(ranks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
