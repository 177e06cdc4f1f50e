"""The training text of the shipped default tokenizer: nothing downloaded, everything rebuilt on demand.

Two parts:

* **Code and English docstrings**: the Python standard library's ``.py`` sources (tests, ``site-packages``
  and ``pydoc_data`` excluded), minus a held-out tenth chosen by a hash of the relative path, which
  ``bench/bench_tokenizer.py`` measures on. ``pydoc_data/topics.py`` (the language reference as English
  prose) is held out whole for the same reason.
* **Generated word problems**: arithmetic, multi-step, percentage and unit-conversion problems with a
  step-by-step solution and a GSM8K-style ``#### <answer>`` line, from fixed templates and a seeded
  ``random.Random``, so the tiny models of the recipes and demo get short tokens for that domain.

The stdlib differs between Python releases, so the corpus (and the learned ranks) is reproducible for a
given Python version; ``build_default`` records the version and the corpus hash next to the files.
"""

import random
import sysconfig
import zlib
from collections.abc import Iterator
from pathlib import Path

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "pydoc_data", "__pycache__"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_held_out(relative: str) -> bool:
    return zlib.crc32(relative.encode("utf-8")) % 10 == 0


def stdlib_sources(held_out: bool = False) -> list[Path]:
    """The stdlib's non-test ``.py`` files in a fixed order: the training nine tenths, or the held-out tenth."""
    root = stdlib_dir()
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if _EXCLUDED_DIRS.intersection(relative.split("/")[:-1]):
            continue
        if _is_held_out(relative) == held_out:
            files.append(path)
    return files


def english_prose_file() -> Path:
    """The Python language reference as prose (``pydoc_data/topics.py``), never used for training."""
    return stdlib_dir() / "pydoc_data" / "topics.py"


_NAMES = ["Ava", "Ben", "Carla", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kira", "Leo",
          "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wes", "Yuki", "Zoe"]
_ITEMS = [("apple", "apples"), ("book", "books"), ("marble", "marbles"), ("cookie", "cookies"),
          ("pencil", "pencils"), ("sticker", "stickers"), ("egg", "eggs"), ("card", "cards"), ("shell", "shells"),
          ("flower", "flowers"), ("toy car", "toy cars"), ("ticket", "tickets"), ("cupcake", "cupcakes"),
          ("bottle", "bottles"), ("stamp", "stamps"), ("orange", "oranges")]
_CONTAINERS = [("box", "boxes"), ("bag", "bags"), ("basket", "baskets"), ("crate", "crates"), ("jar", "jars"),
               ("shelf", "shelves"), ("tray", "trays"), ("pack", "packs")]
# (unit, its singular, smaller unit, how many smaller units make one unit)
_CONVERSIONS = [("kilometers", "kilometer", "meters", 1000), ("meters", "meter", "centimeters", 100),
                ("hours", "hour", "minutes", 60), ("minutes", "minute", "seconds", 60),
                ("kilograms", "kilogram", "grams", 1000), ("liters", "liter", "milliliters", 1000),
                ("feet", "foot", "inches", 12), ("yards", "yard", "feet", 3), ("days", "day", "hours", 24),
                ("weeks", "week", "days", 7), ("dollars", "dollar", "cents", 100), ("gallons", "gallon", "quarts", 4),
                ("pounds", "pound", "ounces", 16)]


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}".rstrip("0").rstrip(".")


def _problem(rng: random.Random) -> tuple[str, list[str], str]:
    """(question, solution steps, answer) for one randomly chosen template."""
    name, other = rng.sample(_NAMES, 2)
    single, plural = rng.choice(_ITEMS)
    container, containers = rng.choice(_CONTAINERS)
    kind = rng.randrange(9)
    if kind == 0:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return (f"{name} has {a} {plural}. {other} gives {name} {b} more {plural}. "
                f"How many {plural} does {name} have now?",
                [f"{name} starts with {a} {plural}.",
                 f"After getting {b} more, {name} has {a} + {b} = {a + b} {plural}."],
                str(a + b))
    if kind == 1:
        a = rng.randint(20, 500)
        b = rng.randint(1, a - 1)
        return (f"A store had {a} {plural}. It sold {b} of them. How many {plural} are left?",
                [f"The store started with {a} {plural}.", f"It sold {b}, so {a} - {b} = {a - b} {plural} are left."],
                str(a - b))
    if kind == 2:
        a, b = rng.randint(2, 30), rng.randint(2, 48)
        return (f"{name} fills {a} {containers} with {b} {plural} each. How many {plural} is that in total?",
                [f"Each {container} holds {b} {plural}.", f"{a} {containers} hold {a} * {b} = {a * b} {plural}."],
                str(a * b))
    if kind == 3:
        b, q = rng.randint(2, 12), rng.randint(2, 40)
        a = b * q
        return (f"{name} shares {a} {plural} equally among {b} friends. How many {plural} does each friend get?",
                [f"There are {a} {plural} and {b} friends.", f"Each friend gets {a} / {b} = {q} {plural}."],
                str(q))
    if kind == 4:
        price, count = rng.randint(2, 25), rng.randint(2, 9)
        cost = price * count
        paid = cost + rng.randint(1, 50)
        return (f"{name} buys {count} {plural} at ${price} each and pays with ${paid}. "
                f"How much change does {name} get?",
                [f"The {plural} cost {count} * {price} = ${cost}.", f"The change is {paid} - {cost} = ${paid - cost}."],
                str(paid - cost))
    if kind == 5:
        whole = rng.randint(2, 40) * 20
        percent = rng.choice([5, 10, 15, 20, 25, 30, 40, 50, 75])
        part = whole * percent // 100
        return (f"There are {whole} {plural} in a {container}. {percent}% of them are red. "
                f"How many {plural} are not red?",
                [f"{percent}% of {whole} is {whole} * {percent} / 100 = {part}.",
                 f"So {whole} - {part} = {whole - part} {plural} are not red."],
                str(whole - part))
    if kind == 6:
        a, b, c = rng.randint(10, 90), rng.randint(1, 30), rng.randint(1, 9)
        return (f"{name} has {a} {plural}, gets {b} more and then gives away {c}. How many {plural} are left?",
                [f"{a} + {b} = {a + b}.", f"{a + b} - {c} = {a + b - c}."], str(a + b - c))
    source, source_singular, target, factor = rng.choice(_CONVERSIONS)
    if kind == 7:
        whole, extra = rng.randint(1, 12), rng.randint(1, min(factor, 100) - 1)
        return (f"How many {target} are in {whole} {source} and {extra} {target}?",
                [f"1 {source_singular} is {factor} {target}.", f"{whole} * {factor} = {whole * factor}.",
                 f"{whole * factor} + {extra} = {whole * factor + extra}."],
                str(whole * factor + extra))
    amount = rng.choice([rng.randint(1, 60), rng.randint(1, 40) / 2, rng.randint(1, 20) / 4])
    result = amount * factor
    return (f"Convert {_format_number(amount)} {source} to {target}.",
            [f"There are {factor} {target} in one {source_singular}.",
             f"{_format_number(amount)} * {factor} = {_format_number(result)} {target}."],
            _format_number(result))


def word_problems(count: int, seed: int = 0) -> Iterator[str]:
    """``count`` generated problems, each a question, numbered steps, a final sentence and ``#### answer``."""
    rng = random.Random(seed)
    for _ in range(count):
        question, steps, answer = _problem(rng)
        lines = [f"Question: {question}", "Let's think step by step."]
        lines += [f"Step {i}: {step}" for i, step in enumerate(steps, start=1)]
        closing = "The final answer is" if rng.random() < 0.5 else "The answer is"
        lines += [f"{closing} {answer}.", f"#### {answer}"]
        yield "\n".join(lines) + "\n"


def default_corpus(num_word_problems: int = 20_000, seed: int = 0) -> Iterator[str]:
    """The default tokenizer's training documents: the stdlib sources, then the generated problems."""
    for path in stdlib_sources():
        yield path.read_text(encoding="utf-8")
    yield from word_problems(num_word_problems, seed)
