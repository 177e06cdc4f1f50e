"""Tokenizer density (bytes/token, tokens/word) by vocabulary size, and encode speed against tiktoken.

    python bench/bench_tokenizer.py [--sizes 1024 2048 4096 8192 16384] [--data ../shared/data]

Every vocabulary is trained on the shipped default's corpus (``tokenizer.default_corpus``: the stdlib
sources minus a held-out tenth, plus generated word problems), with the o200k pre-tokenizer. Held-out
sets, all offline:

* code: the held-out tenth of the stdlib ``.py`` files;
* GSM8K test: question + worked answer, from the shared data folder (skipped when absent);
* synthetic problems: 2,000 generated with another seed (the demo's domain; same templates, new numbers);
* English prose: the Python language reference text (``pydoc_data.topics``);
* non-English: gettext catalogues of this machine (``/usr/share/locale/<lang>/LC_MESSAGES/*.mo``,
  translated UI messages, the first 0.5 MB per language), split into de/fr/es/ru and ja/zh_CN.

Throughput compares, in this process, the ``tokenizers`` backend of ``Llama4Tokenizer`` with a
``tiktoken.Encoding`` built from the same ranks, on the held-out code + prose, after checking that
both produce the same ids.
"""

import argparse
import gettext
import json
import os
import platform
import sys
import time
from pathlib import Path

import tiktoken
import tiktoken.load

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llama4_sparse.tokenizer import load_tokenizer  # noqa: E402
from llama4_sparse.tokenizer.byte_level_bpe import O200K_PATTERN, build_backend  # noqa: E402
from llama4_sparse.tokenizer.default_corpus import default_corpus, english_prose_file, stdlib_sources, word_problems  # noqa: E402
from llama4_sparse.tokenizer.train_bpe import train_ranks  # noqa: E402


def _catalogue_text(languages: list[str], limit_bytes: int = 500_000) -> str:
    """Translated messages of the catalogues in a fixed order, up to ``limit_bytes`` per language."""
    texts = []
    for language in languages:
        messages, size = [], 0
        for message in _language_messages(language):
            if size >= limit_bytes:
                break
            messages.append(message)
            size += len(message.encode("utf-8"))
        texts.append("\n\n".join(messages))
    return "\n\n".join(text for text in texts if text)


def _language_messages(language: str) -> list[str]:
    messages = []
    for path in sorted(Path("/usr/share/locale", language, "LC_MESSAGES").glob("*.mo")):
        try:
            with path.open("rb") as handle:
                catalogue = gettext.GNUTranslations(handle)._catalog
        except (OSError, UnicodeDecodeError, ValueError):  # not a catalogue this gettext can read
            continue
        messages += [value for key, value in sorted(catalogue.items(), key=str) if key and isinstance(value, str)]
    return messages


def held_out_sets(data_dir: Path) -> dict[str, str]:
    sets = {"code (stdlib held-out .py)": "\n".join(p.read_text(encoding="utf-8") for p in stdlib_sources(True))}
    gsm8k = data_dir / "gsm8k" / "test.jsonl"
    if gsm8k.exists():
        rows = [json.loads(line) for line in gsm8k.read_text(encoding="utf-8").splitlines() if line.strip()]
        sets["GSM8K test (question + answer)"] = "\n\n".join(f"{r['question']}\n{r['answer']}" for r in rows)
    sets["synthetic word problems (seed 12345)"] = "\n".join(word_problems(2000, seed=12345))
    import pydoc_data.topics

    assert Path(pydoc_data.topics.__file__).resolve() == english_prose_file().resolve()
    sets["English prose (language reference)"] = "\n\n".join(pydoc_data.topics.topics.values())
    for name, languages in (("de/fr/es/ru UI messages", ["de", "fr", "es", "ru"]), ("ja/zh_CN UI messages", ["ja", "zh_CN"])):
        text = _catalogue_text(languages)
        if text:
            sets[name] = text
    return sets


def density(backend, text: str) -> tuple[float, float, int]:
    documents = [d for d in text.split("\n\n") if d]
    tokens = sum(len(e.ids) for e in backend.encode_batch(documents, add_special_tokens=False))
    total_bytes = sum(len(d.encode("utf-8")) for d in documents)
    words = sum(len(d.split()) for d in documents)
    return total_bytes / tokens, tokens / words, tokens


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("LLAMA4_SHARED_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    sets = held_out_sets(args.data)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, tiktoken {tiktoken.__version__}")
    print("held-out sets: " + ", ".join(f"{name} {len(text.encode('utf-8')) / 1e6:.2f} MB" for name, text in sets.items()))

    corpus = list(default_corpus())
    results = {}
    trained = {}
    for size in args.sizes:
        start = time.perf_counter()
        ranks = train_ranks(corpus, size, show_progress=False)
        trained[size] = ranks
        backend = build_backend(ranks)
        results[size] = {name: density(backend, text) for name, text in sets.items()}
        print(f"trained {size} ranks in {time.perf_counter() - start:.1f}s", file=sys.stderr)

    print("\n### Bytes per token (higher = denser) / tokens per whitespace word (lower = denser)\n")
    print("| held-out set | " + " | ".join(f"{size} ranks" for size in args.sizes) + " |")
    print("|---|" + "---|" * len(args.sizes))
    for name in sets:
        cells = [f"{results[s][name][0]:.2f} / {results[s][name][1]:.2f}" for s in args.sizes]
        print(f"| {name} | " + " | ".join(cells) + " |")

    shipped = load_tokenizer()
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # tiktoken caches local files by path; a rebuilt file would read stale
    shipped_ranks = tiktoken.load.load_tiktoken_bpe(str(Path(shipped.name_or_path) / "tokenizer.model"))
    print("\n### Encode throughput, same ranks, same process (MB/s; ratio = ours / tiktoken)\n")
    print("| vocabulary | mode | tokenizers backend | Llama4Tokenizer.__call__ | tiktoken | backend / tiktoken |")
    print("|---|---|---|---|---|---|")
    text_docs = [d for name in sets if name.startswith(("code", "English")) for d in sets[name].split("\n\n") if d]
    megabytes = sum(len(d.encode("utf-8")) for d in text_docs) / 1e6
    for label, ranks in (("shipped default (4096)", shipped_ranks), (f"trained {max(args.sizes)}", trained[max(args.sizes)])):
        backend = build_backend(ranks)
        wrapper = shipped if ranks is shipped_ranks else None
        reference = tiktoken.Encoding("bench", pat_str=O200K_PATTERN, mergeable_ranks=ranks, special_tokens={})
        ours = [e.ids for e in backend.encode_batch(text_docs, add_special_tokens=False)]
        if ours != reference.encode_ordinary_batch(text_docs):
            raise SystemExit(f"{label}: ids differ from tiktoken; the throughput comparison would be meaningless")
        sequential_ours = best_of(args.repeats, lambda: [backend.encode(d, add_special_tokens=False) for d in text_docs])
        sequential_ref = best_of(args.repeats, lambda: [reference.encode_ordinary(d) for d in text_docs])
        batch_ours = best_of(args.repeats, lambda: backend.encode_batch(text_docs, add_special_tokens=False))
        batch_ref = best_of(args.repeats, lambda: reference.encode_ordinary_batch(text_docs, num_threads=os.cpu_count()))
        call = "n/a"
        if wrapper is not None:
            call_time = best_of(args.repeats, lambda: wrapper(text_docs, add_special_tokens=False))
            call = f"{megabytes / call_time:.1f}"
        pre_tokenize = backend.pre_tokenizer.pre_tokenize_str
        sequential_split = best_of(args.repeats, lambda: [pre_tokenize(d) for d in text_docs])
        print(f"| {label} | one document at a time | {megabytes / sequential_ours:.1f} | n/a | "
              f"{megabytes / sequential_ref:.1f} | {sequential_ref / sequential_ours:.2f} |")
        print(f"| {label} | pre-tokenization only, one at a time | {megabytes / sequential_split:.1f} | n/a | "
              f"{megabytes / sequential_ref:.1f} (full encode) | {sequential_ref / sequential_split:.2f} |")
        print(f"| {label} | batch ({os.cpu_count()} threads) | {megabytes / batch_ours:.1f} | {call} | "
              f"{megabytes / batch_ref:.1f} | {batch_ref / batch_ours:.2f} |")
    print(f"\n({megabytes:.2f} MB of held-out code + prose, {len(text_docs)} documents, best of {args.repeats})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
