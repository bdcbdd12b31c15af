"""The ASCII fast path encodes exactly as `tokenizers` does ([Note: the ASCII fast path])."""

import itertools

import numpy as np
import pytest
from tokenizers import pre_tokenizers

import plait.data.fast_bpe as fast_bpe
from plait.data import EOT, default_corpus, train_bpe
from plait.data.fast_bpe import ascii_segments, is_plain_byte_level

PIECES = ["word", " ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", "\x0b", "\x0c", "\x1c", "\x85", "\xa0", "\u2028",
          "it's", "'ll", "'", "''s", "123", "4.5", "x", ".", "...", "—", "é", "日本", "🎉", "½", "²", EOT, "<|",
          "A", "Z_z", "__init__", "#", "\\", '"', "0x1F", "   \n  ", " ."]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(default_corpus()[:20] + ["".join(PIECES) * 3], 400)


def random_texts(seed: int, n: int, size: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(PIECES, size=rng.integers(0, size))) for _ in range(n)]


def slow(tok, texts):
    return [e.ids for e in tok._hf.encode_batch_fast(texts, add_special_tokens=False)]


def test_the_trained_bpe_takes_the_fast_path(bpe):
    assert is_plain_byte_level(bpe._hf)
    bpe.encode_batch(["x"])
    assert isinstance(bpe._ascii, fast_bpe.AsciiEncoder)


@pytest.mark.parametrize("seed", range(4))
def test_random_mixes_of_tricky_pieces(bpe, seed):
    texts = random_texts(seed, 60, 300) + ["", " ", EOT, EOT + EOT, "a" * 5000, " " * 100 + "x"]
    got = bpe.encode_batch(texts)
    assert [g.tolist() for g in got] == slow(bpe, texts)
    assert all(g.dtype == np.uint32 for g in got)


def test_the_default_corpus(bpe):
    docs = default_corpus()
    assert [g.tolist() for g in bpe.encode_batch(docs)] == slow(bpe, docs)


def test_a_full_cache_is_emptied_and_refilled(bpe, monkeypatch):
    monkeypatch.setattr(fast_bpe, "CACHE_WORDS", 5)
    texts = random_texts(9, 20, 200)
    assert [g.tolist() for g in bpe.encode_batch(texts)] == slow(bpe, texts)
    assert len(bpe._ascii._cache) <= 200


def test_segments_cover_the_text_and_cut_only_before_ascii_white_space():
    for text in random_texts(3, 100, 200):
        segments = list(ascii_segments(text))
        assert "".join(s for s, _ in segments) == text
        for (a, _), (b, _) in zip(segments, segments[1:]):
            assert not a[-1].isspace() and b[0] in " \t\n\r"
        assert all(s.isascii() for s, ascii_only in segments if ascii_only)
    assert list(ascii_segments("pure ascii")) == [("pure ascii", True)]
    assert list(ascii_segments("one é two")) == [("one", True), (" é", False), (" two", True)]


# [Note: the ASCII fast path] rests on `_ASCII_PATTERN` splitting ASCII text exactly as
# tokenizers' GPT-2 pre-tokenizer does; these compare the two splits directly.
GPT2_SPLIT = pre_tokenizers.ByteLevel(add_prefix_space=False)
# Each kind of ASCII character the pattern tells apart: the white space of \s (and the
# controls Python calls white space but the GPT-2 pattern does not), letters (the
# contractions' among them), digits, punctuation, the apostrophe.
ALPHABET = [" ", "\t", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x1f", "\x00", "\x7f", "a", "Z", "s", "t", "d", "0",
            "'", ".", "_"]
ASCII_PIECES = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'RE", "'LL", "''", "'''", "n't", "don't",
                "O'Neil", "it's'", " 's", "123", "1,000.50", "3rd", "x2y", "0x1F", "  ", "   ", "\t\t", "\r\n",
                "\n\n\n", " \n ", "\n    ", "\t \n", "#!", "==", "->", "...", '"""', "  return", "\n    def f(x):",
                "a", "Word", " word", "\x0b\x0c", "\x00", "\x7f", "~", "`", "\\"]


def gpt2_split(text: str) -> list[str]:
    """tokenizers' own pre-tokens of `text`, as pieces of it (the offsets are into `text`)."""
    return [text[a:b] for _, (a, b) in GPT2_SPLIT.pre_tokenize_str(text)]


def test_the_ascii_split_is_gpt2s_on_every_short_string():
    for n in (1, 2, 3):
        for chars in itertools.product(ALPHABET, repeat=n):
            text = "".join(chars)
            assert fast_bpe._ASCII_PATTERN.findall(text) == gpt2_split(text), repr(text)


def test_the_ascii_split_is_gpt2s_on_random_ascii():
    rng = np.random.default_rng(5)
    every_char = [chr(c) for c in range(128)]
    texts = ["".join(rng.choice(ASCII_PIECES, size=rng.integers(1, 40))) for _ in range(1500)]
    texts += ["".join(rng.choice(every_char, size=rng.integers(1, 60))) for _ in range(1500)]
    for text in texts:
        assert fast_bpe._ASCII_PATTERN.findall(text) == gpt2_split(text), repr(text)


def test_cutting_at_the_segments_keeps_gpt2s_split():
    # White space that is not ASCII (which \s matches) beside the cuts' spaces.
    pieces = PIECES + ["\xa0 ", " \u3000", "\u2029\n", "\x85 ", "x\u200b "]
    rng = np.random.default_rng(6)
    for _ in range(400):
        text = "".join(rng.choice(pieces, size=rng.integers(1, 80)))
        split = [w for segment, _ in ascii_segments(text) for w in gpt2_split(segment)]
        assert split == gpt2_split(text), repr(text)
