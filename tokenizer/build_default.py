"""Rebuild (or verify) the shipped default tokenizer in ``tokenizer/default/``.

    python -m llama4_sparse.tokenizer.build_default            # rewrite tokenizer/default/
    python -m llama4_sparse.tokenizer.build_default --check    # rebuild in a temporary folder and compare

4096 BPE ranks learned from ``default_corpus`` (stdlib sources + generated word problems), then the
2048 special tokens at 4096..6143. The folder gets the HF files, ``tokenizer.model`` (the ranks in
tiktoken's format) and ``build_info.json`` (Python version and corpus hash: the stdlib, hence the
ranks, change between Python releases).
"""

import argparse
import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

from .byte_level_bpe import write_tiktoken_ranks
from .default_corpus import default_corpus
from .tokenization_llama4 import Llama4Tokenizer
from .train_bpe import train_ranks

NUM_RANKS = 4096
DEFAULT_DIR = Path(__file__).resolve().parent / "default"


def build(output: Path, show_progress: bool = False) -> dict:
    documents = list(default_corpus())
    digest = hashlib.sha256()
    for document in documents:
        digest.update(document.encode("utf-8"))
    ranks = train_ranks(documents, NUM_RANKS, show_progress=show_progress)
    tokenizer = Llama4Tokenizer.from_ranks(ranks)
    # The package supplies the class; copying its source into the shipped folder would duplicate it.
    tokenizer._auto_class = None
    output.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(output))
    write_tiktoken_ranks(ranks, output / "tokenizer.model")
    info = {"num_ranks": NUM_RANKS, "python": platform.python_version(), "corpus_documents": len(documents),
            "corpus_bytes": sum(len(d.encode("utf-8")) for d in documents), "corpus_sha256": digest.hexdigest()}
    (output / "build_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--check", action="store_true", help="rebuild elsewhere and compare with --output")
    args = parser.parse_args(argv)
    if not args.check:
        info = build(args.output, show_progress=True)
        print(f"wrote {args.output}: {json.dumps(info)}")
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        info = build(Path(scratch))
        same = (Path(scratch) / "tokenizer.model").read_bytes() == (args.output / "tokenizer.model").read_bytes()
    shipped = json.loads((args.output / "build_info.json").read_text(encoding="utf-8"))
    if same:
        print(f"{args.output} is reproduced exactly (corpus sha256 {info['corpus_sha256'][:16]}...)")
        return 0
    print(f"{args.output} differs from a fresh build: shipped from Python {shipped['python']} corpus "
          f"{shipped['corpus_sha256'][:16]}..., rebuilt from Python {info['python']} corpus "
          f"{info['corpus_sha256'][:16]}...", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
