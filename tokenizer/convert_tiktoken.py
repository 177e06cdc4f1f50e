"""Convert Meta's tiktoken-format ``tokenizer.model`` into HF files that encode exactly like tiktoken.

    python -m llama4_sparse.tokenizer.convert_tiktoken path/to/tokenizer.model --output llama4_tokenizer/

The input is one ``<base64 token> <rank>`` line per BPE token (200,000 for Llama 4). The output uses
the o200k pre-tokenizer (``--pattern`` to override), puts the 2048 Llama 4 special tokens at
``len(ranks) + offset`` (200000..202047 for the official file) and carries the chat template and
bos/eos/pad settings of ``Llama4Tokenizer``; the ranks file is copied beside the HF files.
"""

import argparse
import shutil
import sys
from pathlib import Path

from .byte_level_bpe import O200K_PATTERN, read_tiktoken_ranks
from .tokenization_llama4 import Llama4Tokenizer


def convert(model_file: str | Path, output: str | Path, pattern: str = O200K_PATTERN) -> Llama4Tokenizer:
    ranks = read_tiktoken_ranks(model_file)
    tokenizer = Llama4Tokenizer.from_ranks(ranks, pattern)
    output = Path(output)
    tokenizer.save_pretrained(str(output))
    if Path(model_file).resolve() != (output / "tokenizer.model").resolve():
        shutil.copyfile(model_file, output / "tokenizer.model")
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_file", type=Path, help="tiktoken-format ranks (Meta's tokenizer.model)")
    parser.add_argument("--output", type=Path, required=True, help="folder for the HF tokenizer files")
    parser.add_argument("--pattern", default=O200K_PATTERN, help="pre-tokenizer regex (default: o200k)")
    args = parser.parse_args(argv)
    if not args.model_file.is_file():
        parser.error(f"{args.model_file} does not exist")
    tokenizer = convert(args.model_file, args.output, args.pattern)
    print(f"wrote {args.output}: {len(tokenizer)} tokens ({len(tokenizer) - 2048} BPE ranks + 2048 special), "
          f"bos {tokenizer.bos_token_id}, eot {tokenizer.eos_token_id}, pad {tokenizer.pad_token_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
