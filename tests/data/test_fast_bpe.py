"""The ASCII fast path encodes exactly as `tokenizers` does ([Note: the ASCII fast path])."""

import numpy as np
import pytest

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
