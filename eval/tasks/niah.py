"""Needle in a haystack, RULER-style, generated offline: key -> magic-number needles hidden in filler text.

A document is an instruction, a haystack of filler sentences sized in the model's tokens, one or more
needles "The special magic number for <key> is <7-digit number>." (the asked one at a chosen depth, the
other keys' needles at random places as distractors), and a question about one key whose answer the
model completes:

    ...Question: What is the special magic number for amber-falcon?
    Answer: The special magic number for amber-falcon is

Scored by string match (the number appears in the generation, as RULER's string_match_all does for one
value). The grid is lengths x depths x key counts x samples; each document is reproducible from
(seed, keys, length, depth, sample). `results["niah"]` holds the overall `accuracy`, per-length and
per-cell accuracies, and the output directory gets `niah_heatmap.png` (depth x length, one panel per
key count).
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_KEYS = (1, 4)

INSTRUCTION = (
    "A long text follows. Special magic numbers are hidden in it, each for a key. "
    "Remember them: you will be asked for one of them at the end.\n"
)
# Bland sentences cycled in order: a haystack that never mentions numbers or keys.
FILLER = (
    "The river runs slowly past the old mill.",
    "A gull circles above the quiet harbour.",
    "The baker opens the shop before sunrise.",
    "Rain falls softly on the tin roof.",
    "The path climbs through the pine forest.",
    "A lamp glows in the window of the inn.",
    "The market fills with voices at noon.",
    "Snow settles on the distant hills.",
)
NEEDLE = " The special magic number for {key} is {value}."
QUESTION = "\nQuestion: What is the special magic number for {key}?\nAnswer: The special magic number for {key} is"
_ADJECTIVES = (
    "amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen", "lucky",
    "mellow", "noble", "odd", "proud", "quiet", "rapid", "silent", "tidy", "urban", "vivid", "wild", "young",
)
_NOUNS = (
    "falcon", "harbor", "meadow", "lantern", "canyon", "violin", "orchard", "glacier", "compass", "thimble",
    "beacon", "walrus", "pepper", "marble", "saddle", "kettle", "ribbon", "anchor", "tunnel", "quarry",
)


def draw_keys(rng: random.Random, count: int) -> list[str]:
    """`count` distinct keys such as 'amber-falcon'."""
    pairs = rng.sample([(a, n) for a in _ADJECTIVES for n in _NOUNS], count)
    return [f"{a}-{n}" for a, n in pairs]


def draw_value(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def haystack_document(tokenizer, length: int, depth: float, keys: int, rng: random.Random, digits: int = 7) -> dict:
    """A prompt of at most `length` tokens (with the tokenizer's special tokens) hiding `keys` needles;
    the asked needle sits after `depth` of the filler. Returns prompt, asked key, gold value, token count."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"niah depths are fractions of the haystack in [0, 1], got {depth}")
    names = draw_keys(rng, keys)
    values = [draw_value(rng, digits) for _ in names]
    asked = 0
    needles = [NEEDLE.format(key=k, value=v) for k, v in zip(names, values)]
    question = QUESTION.format(key=names[asked])
    fixed = _count(tokenizer, INSTRUCTION + "".join(needles) + question)
    per_sentence = _count(tokenizer, " " + " ".join(FILLER), special=False) / len(FILLER)
    budget = length - fixed
    if budget < per_sentence:
        raise ValueError(
            f"niah length {length} leaves no room for filler ({fixed} tokens of instruction, needles and question); "
            "use longer --niah-lengths"
        )
    sentences = int(budget / per_sentence)
    distractor_slots = [rng.random() for _ in names[1:]]
    for _ in range(20):
        prompt = _assemble(sentences, depth, needles, distractor_slots, question)
        tokens = _count(tokenizer, prompt)
        if tokens <= length:
            break
        sentences -= max(1, int((tokens - length) / per_sentence) + 1)
    else:
        raise ValueError(f"could not fit a niah document into {length} tokens")
    return {"prompt": prompt, "key": names[asked], "gold": values[asked], "prompt_tokens": tokens}


def _count(tokenizer, text: str, special: bool = True) -> int:
    return len(tokenizer(text, add_special_tokens=special)["input_ids"])


def _assemble(sentences: int, depth: float, needles: list[str], distractor_slots: list[float], question: str) -> str:
    before = defaultdict(list)  # filler index -> needles placed just before that sentence
    for slot, needle in zip(distractor_slots, needles[1:]):
        before[round(slot * sentences)].append(needle)
    before[round(depth * sentences)].append(needles[0])
    pieces = []
    for i in range(sentences + 1):
        pieces.extend(before.get(i, ()))
        if i < sentences:
            pieces.append(" " + FILLER[i % len(FILLER)])
    return INSTRUCTION + "".join(pieces).lstrip(" ") + question


class NIAH:
    """Needle in a haystack over a grid of context lengths x depths x key counts."""

    name = "niah"
    default_fewshot = 0
    default_max_gen_toks = 16
    until = ("\n",)

    def __init__(
        self,
        data_dir=None,
        num_fewshot=None,
        limit=None,
        max_gen_toks=None,
        tokenizer=None,
        lengths=None,
        depths=None,
        keys=None,
        samples: int = 2,
        seed: int = 0,
        digits: int = 7,
    ):
        if num_fewshot:
            raise ValueError("niah is zero-shot; do not pass num_fewshot")
        if tokenizer is None:
            raise ValueError("niah sizes its haystacks in the model's tokens: pass the tokenizer (or --tokenizer)")
        self.tokenizer, self.limit = tokenizer, limit
        self.lengths = tuple(int(n) for n in (lengths or DEFAULT_LENGTHS))
        self.depths = tuple(float(d) for d in (DEFAULT_DEPTHS if depths is None else depths))
        self.keys = tuple(int(k) for k in (keys or DEFAULT_KEYS))
        self.samples, self.seed, self.digits = int(samples), int(seed), int(digits)
        self.max_gen_toks = max_gen_toks or self.default_max_gen_toks
        if min(self.lengths) < 64 or min(self.keys) < 1 or self.samples < 1 or not 1 <= self.digits <= 12:
            raise ValueError(
                f"niah needs lengths >= 64, keys >= 1, samples >= 1 and 1..12 digits; got lengths={self.lengths}, "
                f"keys={self.keys}, samples={self.samples}, digits={self.digits}"
            )
        if not self.depths or any(not 0 <= d <= 1 for d in self.depths):
            raise ValueError(f"niah depths are fractions in [0, 1], got {self.depths}")

    def config(self) -> dict:
        return {"lengths": list(self.lengths), "depths": list(self.depths), "keys": list(self.keys),
                "samples": self.samples, "seed": self.seed, "digits": self.digits, "max_gen_toks": self.max_gen_toks}

    def docs(self) -> list[dict]:
        docs = []
        for keys in self.keys:
            for length in self.lengths:
                for depth in self.depths:
                    for sample in range(self.samples):
                        rng = random.Random(f"niah/{self.seed}/{keys}/{length}/{depth}/{sample}")
                        doc = haystack_document(self.tokenizer, length, depth, keys, rng, self.digits)
                        docs.append({"doc_id": len(docs), "keys": keys, "length": length, "depth": depth,
                                     "sample": sample, **doc})
        return docs[: self.limit] if self.limit else docs

    def chunks(self, docs: list[dict]) -> list[list[dict]]:
        # One length per chunk, so batches pad little.
        by_length = defaultdict(list)
        for doc in docs:
            by_length[doc["length"]].append(doc)
        return [group[i : i + 16] for _, group in sorted(by_length.items()) for i in range(0, len(group), 16)]

    def run(self, runner, docs: list[dict]) -> list[dict]:
        longest = max(d["prompt_tokens"] for d in docs)
        if longest + self.max_gen_toks > runner.max_length:
            raise ValueError(
                f"niah length {longest} + {self.max_gen_toks} generated tokens exceeds the model's max length "
                f"{runner.max_length} (config.max_position_embeddings); raise it or pick shorter --niah-lengths"
            )
        outputs = runner.generate([d["prompt"] for d in docs], until=self.until, max_gen_toks=self.max_gen_toks,
                                  desc=self.name)
        return [self.score(d, out) for d, out in zip(docs, outputs)]

    def score(self, doc: dict, output: str) -> dict:
        record = {k: doc[k] for k in ("doc_id", "keys", "length", "depth", "sample", "key", "gold", "prompt_tokens")}
        return {**record, "output": output, "correct": doc["gold"] in output}

    def aggregate(self, records: list[dict]) -> dict:
        if not records:
            raise ValueError("no niah samples to aggregate")
        cells, lengths = defaultdict(list), defaultdict(list)
        for r in records:
            cells[(r["keys"], r["length"], r["depth"])].append(r["correct"])
            lengths[r["length"]].append(r["correct"])
        grid = defaultdict(lambda: defaultdict(dict))
        for (keys, length, depth), hits in sorted(cells.items()):
            grid[f"keys={keys}"][str(length)][str(depth)] = sum(hits) / len(hits)
        return {
            "accuracy": sum(r["correct"] for r in records) / len(records),
            "n": len(records),
            "by_length": {str(k): sum(v) / len(v) for k, v in sorted(lengths.items())},
            "grid": {k: {length: dict(d) for length, d in v.items()} for k, v in grid.items()},
        }

    def write_plots(self, results: dict, output_dir: str | Path) -> Path:
        """niah_heatmap.png: accuracy per depth (rows) and length (columns), one panel per key count."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        grid = results["grid"]
        fig, axes = plt.subplots(1, len(grid), figsize=(1.2 + 1.1 * len(self.lengths) * len(grid), 3.6), squeeze=False)
        image = None
        for ax, (panel, by_length) in zip(axes[0], sorted(grid.items())):
            lengths = sorted(by_length, key=int)
            depths = sorted({d for v in by_length.values() for d in v}, key=float)
            table = [[by_length[n].get(d, float("nan")) for n in lengths] for d in depths]
            image = ax.imshow(table, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for i, row in enumerate(table):
                for j, value in enumerate(row):
                    ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(lengths)), [f"{int(n) // 1024}k" if int(n) >= 1024 else n for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{float(d):.0%}" for d in depths])
            ax.set_xlabel("context tokens")
            ax.set_ylabel("needle depth")
            ax.set_title(panel.replace("keys=", "needles: "))
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
        path = Path(output_dir) / "niah_heatmap.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return path
