"""Byte-level BPE, special-token layout, converter, trainer and the shipped default, checked against tiktoken."""

import json
import os
import platform
import sysconfig
from pathlib import Path
from unittest import mock

import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiktoken.load import load_tiktoken_bpe as _load_tiktoken_bpe
from transformers import AutoTokenizer

from llama4_sparse.tokenizer import DEFAULT_TOKENIZER_DIR, SPECIAL_TOKEN_NAMES, Llama4Tokenizer, load_tokenizer
from llama4_sparse.tokenizer.byte_level_bpe import O200K_PATTERN, build_backend, validate_ranks, write_tiktoken_ranks
from llama4_sparse.tokenizer.convert_tiktoken import main as convert_main
from llama4_sparse.tokenizer.special_tokens import special_token_ids
from llama4_sparse.tokenizer.train_bpe import main as train_main
from llama4_sparse.tokenizer.train_bpe import train_ranks

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def load_tiktoken_bpe(path: str) -> dict[bytes, int]:
    """tiktoken's own reader, with its cache off: it caches by path, so a rewritten file would read stale."""
    with mock.patch.dict(os.environ, {"TIKTOKEN_CACHE_DIR": ""}):
        return _load_tiktoken_bpe(path)

MIXED = [
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\nclass A(B):\n\tpass\n",
    "3.14159 2718281828 1,000,000 -42 +7e-3 0x1F 1/2 12:30 2026-11-25 $19.99 50%",
    "Ünïcödé naïve café — “quotes” 你好，世界 こんにちは 안녕하세요 Привет мир مرحبا שלום नमस्ते",
    "   leading\n\n\n   \t\t trailing   \r\n\r\n  \n \n      x    y\u00a0z\u2003w\u3000v  ",
    "emoji 😀😃🎉 👩‍👩‍👧‍👦 🏳️‍🌈 ✋🏽 🇫🇷 family: 👨‍👩‍👧",
    "DON'T we'll They've I'M it's CamelCaseWord snake_case_word ALLCAPS mixedCASEword",
    "<|eot|> looks special but is text for encode_ordinary; \x00\x01\x7f control bytes \ufffd",
    "",
]

# The official ids (architecture brief §4): special tokens sit at 200000 + offset above 200,000 ranks.
OFFICIAL_IDS = {
    "<|begin_of_text|>": 200000, "<|end_of_text|>": 200001, "<|fim_prefix|>": 200002, "<|fim_suffix|>": 200004,
    "<|header_start|>": 200005, "<|header_end|>": 200006, "<|eom|>": 200007, "<|eot|>": 200008,
    "<|step|>": 200009, "<|text_post_train_reserved_special_token_0|>": 200010, "<|python_start|>": 200016,
    "<|python_end|>": 200017, "<|finetune_right_pad|>": 200018,
    "<|text_post_train_reserved_special_token_8|>": 200019, "<|text_post_train_reserved_special_token_68|>": 200079,
    "<|image_start|>": 200080, "<|image_end|>": 200081, "<|vision_reserved_special_token_0|>": 200082,
    "<|tile_x_separator|>": 200084, "<|tile_y_separator|>": 200085, "<|vision_reserved_special_token_2|>": 200086,
    "<|vision_reserved_special_token_5|>": 200089, "<|image|>": 200090, "<|vision_reserved_special_token_6|>": 200091,
    "<|patch|>": 200092, "<|vision_reserved_special_token_7|>": 200093,
    "<|vision_reserved_special_token_1047|>": 201133, "<|reasoning_reserved_special_token_0|>": 201134,
    "<|reasoning_reserved_special_token_7|>": 201141, "<|reasoning_thinking_start|>": 201142,
    "<|reasoning_thinking_end|>": 201143, "<|reserved_special_token_0|>": 201144,
    "<|reserved_special_token_903|>": 202047,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1500-rank vocabulary trained in the test, its tiktoken file, and the HF folder converted from it."""
    folder = tmp_path_factory.mktemp("bpe")
    texts = [path.read_text(encoding="utf-8") for path in sorted(STDLIB.glob("[a-c]*.py"))] + MIXED * 3
    ranks = train_ranks(texts, 1500, show_progress=False)
    write_tiktoken_ranks(ranks, folder / "tokenizer.model")
    assert convert_main([str(folder / "tokenizer.model"), "--output", str(folder / "hf")]) == 0
    reference = tiktoken.Encoding(
        "trained", pat_str=O200K_PATTERN, mergeable_ranks=load_tiktoken_bpe(str(folder / "tokenizer.model")),
        special_tokens=special_token_ids(len(ranks)))
    return AutoTokenizer.from_pretrained(str(folder / "hf")), reference


@pytest.fixture(scope="module")
def default_pair():
    tokenizer = load_tokenizer()
    ranks = load_tiktoken_bpe(str(Path(DEFAULT_TOKENIZER_DIR) / "tokenizer.model"))
    return tokenizer, tiktoken.Encoding("default", pat_str=O200K_PATTERN, mergeable_ranks=ranks,
                                        special_tokens=special_token_ids(len(ranks)))


def test_special_table_has_official_layout():
    assert len(SPECIAL_TOKEN_NAMES) == len(set(SPECIAL_TOKEN_NAMES)) == 2048
    ids = special_token_ids(200_000)
    assert {name: ids[name] for name in OFFICIAL_IDS} == OFFICIAL_IDS
    assert max(ids.values()) == 202047


def test_converted_ids_equal_tiktoken_on_mixed_corpus(trained):
    tokenizer, reference = trained
    assert isinstance(tokenizer, Llama4Tokenizer)
    corpus = MIXED + [path.read_text(encoding="utf-8") for path in sorted(STDLIB.glob("[x-z]*.py"))]
    for text in corpus:
        ids = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert ids == reference.encode_ordinary(text), text[:60]


def test_converted_specials_sit_after_the_ranks(trained):
    tokenizer, reference = trained
    assert len(tokenizer) == reference.n_vocab == 1500 + 2048
    for name in ["<|begin_of_text|>", "<|eot|>", "<|patch|>", "<|reasoning_thinking_end|>"]:
        assert tokenizer.convert_tokens_to_ids(name) == 1500 + OFFICIAL_IDS[name] - 200_000
    text = "<|begin_of_text|><|header_start|>user<|header_end|>\n\nhi 😀<|eot|>"
    assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text, allowed_special="all")
    # Plain encoding prepends bos, like Meta's encode(bos=True).
    assert tokenizer.encode("hi") == [1500] + reference.encode_ordinary("hi")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=80))
def test_round_trip_and_tiktoken_parity_on_any_unicode(default_pair, text):
    tokenizer, reference = default_pair
    ids = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert ids == reference.encode_ordinary(text)
    assert tokenizer.decode(ids) == text


def test_shipped_default_loads_offline_with_autotokenizer(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_TOKENIZER_DIR)
    assert isinstance(tokenizer, Llama4Tokenizer)
    assert len(tokenizer) == 6144
    expected = {"<|begin_of_text|>": 4096, "<|end_of_text|>": 4097, "<|eom|>": 4103, "<|eot|>": 4104,
                "<|finetune_right_pad|>": 4114, "<|image_start|>": 4176, "<|image_end|>": 4177,
                "<|tile_x_separator|>": 4180, "<|tile_y_separator|>": 4181, "<|image|>": 4186, "<|patch|>": 4188,
                "<|reasoning_thinking_start|>": 5238, "<|reasoning_thinking_end|>": 5239}
    assert {name: tokenizer.convert_tokens_to_ids(name) for name in expected} == expected
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (4096, 4104, 4114)
    shipped = (Path(DEFAULT_TOKENIZER_DIR) / "chat_template.jinja").read_text(encoding="utf-8")
    source = (Path(DEFAULT_TOKENIZER_DIR).parent / "chat_template.jinja").read_text(encoding="utf-8")
    assert tokenizer.chat_template == shipped == source


def test_default_matches_tiny_model_preset(default_pair):
    from llama4_sparse.modeling_llama4 import Llama4TextConfig

    config = Llama4TextConfig.from_preset("tiny")
    tokenizer, _ = default_pair
    assert config.vocab_size == len(tokenizer)
    assert config.bos_token_id == tokenizer.bos_token_id and config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.eos_token_id in config.eos_token_id


def test_trainer_cli_writes_a_loadable_tokenizer(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in MIXED * 20), encoding="utf-8")
    assert train_main(["--num-ranks", "300", "--dataset", str(corpus), "--output", str(tmp_path / "out")]) == 0
    ranks = load_tiktoken_bpe(str(tmp_path / "out" / "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert len(ranks) == 300 and len(tokenizer) == 300 + 2048
    reference = tiktoken.Encoding("t", pat_str=O200K_PATTERN, mergeable_ranks=ranks, special_tokens={})
    for text in MIXED:
        ids = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert ids == reference.encode_ordinary(text)


def test_bad_ranks_are_rejected_with_the_reason():
    ranks = {bytes([b]): b for b in range(256)}
    with pytest.raises(ValueError, match="not the merge of two lower-ranked tokens"):
        build_backend({**ranks, b"abc": 256})
    with pytest.raises(ValueError, match="missing bytes"):
        validate_ranks({bytes([b]): b for b in range(255)})
    with pytest.raises(ValueError, match="at least 257"):
        train_ranks(["abc"], 100)


def test_build_default_reproduces_the_shipped_files():
    from llama4_sparse.tokenizer.build_default import main as build_main

    shipped = json.loads((Path(DEFAULT_TOKENIZER_DIR) / "build_info.json").read_text(encoding="utf-8"))
    if shipped["python"] != platform.python_version():
        pytest.skip(f"the default was built from Python {shipped['python']}'s stdlib, which differs from "
                    f"{platform.python_version()}'s")
    assert build_main(["--check"]) == 0


def test_tokens_with_two_overlapping_splits_merge_like_tiktoken(default_pair):
    """A token T = p1+p2 = p2+p3 can be reached from [p1, p2, p3] by two different merges of equal rank;
    tiktoken takes the leftmost, the merge list must not make the other one win."""
    tokenizer, reference = default_pair
    ranks = load_tiktoken_bpe(str(Path(DEFAULT_TOKENIZER_DIR) / "tokenizer.model"))
    cases = []
    for token in ranks:
        for k in range(1, len(token)):
            p1, p2, p3 = token[: len(token) - k], token[:k], token[k:]
            if token.endswith(p2) and p1 in ranks and p3 in ranks and not p1 == p2 == p3:
                for raw in (p1 + p2 + p3, p2 + p1 + p2 + p3, (p1 + p2 + p3) * 2, b" " + p1 + p2 + p3):
                    try:
                        cases.append(raw.decode("utf-8"))
                    except UnicodeDecodeError:
                        continue
    assert len(cases) > 100
    for text in cases:
        ids = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert ids == reference.encode_ordinary(text)
