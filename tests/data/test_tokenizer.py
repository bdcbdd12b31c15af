import json

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import plait.data.fast_bpe as fast_bpe
from plait.data import EOT, Tokenizer, byte_tokenizer, default_corpus, train_bpe
from plait.errors import ConfigError, DataError

TRICKY = [
    "",
    "plain ascii text.",
    "héllo wörld, naïve café — “quotes” ½",
    "日本語のテキスト 中文 한국어",
    "emoji 🎉👍🏽 and a family 👨‍👩‍👧",
    "\ttabs\tinside\t\n\n  two leading spaces",
    "   ",
    " leading and trailing ",
    "line\r\nendings\r and a NUL \x00 byte",
    f"before{EOT}after",
    f" {EOT} {EOT}{EOT}",
    "<|endoftext",
]


@pytest.fixture(scope="module")
def texts():
    return default_corpus()[:12]


@pytest.fixture(scope="module")
def bpe(texts):
    return train_bpe(texts, 300)


@pytest.mark.parametrize("s", TRICKY)
def test_bpe_round_trip(bpe, s):
    assert bpe.decode(bpe.encode(s)) == s


@pytest.mark.parametrize("s", TRICKY)
def test_byte_round_trip(s):
    tok = byte_tokenizer()
    assert tok.decode(tok.encode(s)) == s


def test_byte_ids():
    tok = byte_tokenizer()
    assert (tok.kind, tok.vocab_size, tok.eot_id) == ("byte", 257, 256)
    assert tok.encode("aé") == [97, 0xC3, 0xA9]
    assert tok.encode(f"a{EOT}b") == [97, 256, 98]
    assert tok.decode([104, 105, 256]) == "hi" + EOT
    # A cut-off UTF-8 sequence, as a model may sample, decodes without raising.
    assert tok.decode([0xC3]) == "\ufffd"
    with pytest.raises(ValueError):
        tok.decode([257])


def test_bpe_eot_is_one_token(bpe):
    assert bpe.kind == "bpe"
    assert bpe.encode(EOT) == [bpe.eot_id]
    ids = bpe.encode(f"a{EOT}b")
    assert ids.count(bpe.eot_id) == 1


def test_bpe_vocab_size_honoured(bpe, texts):
    assert bpe.vocab_size == 300
    assert train_bpe(texts, 512).vocab_size == 512
    assert max(max(bpe.encode(t)) for t in texts) < 300


def test_bpe_compresses(bpe, texts):
    assert len(bpe.encode(texts[0])) < 0.8 * len(texts[0].encode("utf-8"))


def test_bpe_training_is_deterministic(bpe, texts):
    again = train_bpe(texts, 300)
    assert again._hf.get_vocab() == bpe._hf.get_vocab()
    assert again._hf.to_str() == bpe._hf.to_str()


def raw_text_bpe(texts: list[str], vocab_size: int) -> str:
    """The BPE that tokenizers trains on the raw texts with GPT-2's pre-tokenizer, as JSON."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(texts, trainer=trainer)
    return hf.to_str()


@pytest.mark.parametrize("vocab_size", [300, 1200])
def test_training_on_words_split_here_gives_the_bpe_of_the_raw_text(texts, vocab_size):
    # [Note: training on words split here]: the same counts, so the same merges, ids and file.
    rng = np.random.default_rng(2)
    pieces = TRICKY + [" it's", "'ll", " 1,000", "\t\t", "\n    ", "\xa0 ", " \u3000"]
    mixed = texts + TRICKY + ["".join(rng.choice(pieces, size=30)) for _ in range(50)]
    assert train_bpe(mixed, vocab_size)._hf.to_str() == raw_text_bpe(mixed, vocab_size)


def test_counting_in_worker_processes_trains_the_same_bpe(texts, monkeypatch):
    monkeypatch.setattr(fast_bpe, "COUNT_GROUP_CHARS", 20_000)  # several tasks for the two workers
    mixed = texts + TRICKY
    assert fast_bpe.pretoken_counts(mixed, workers=2) == fast_bpe.pretoken_counts(mixed)
    assert train_bpe(mixed, 300, workers=2)._hf.to_str() == train_bpe(mixed, 300)._hf.to_str()


def test_bpe_too_small_vocab(texts):
    with pytest.raises(ConfigError, match="at least 257"):
        train_bpe(texts, 200)


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_save_load_identical(tmp_path, bpe, texts, kind):
    tok = bpe if kind == "bpe" else byte_tokenizer()
    path = tmp_path / "tok.json"
    tok.save(path)
    back = Tokenizer.load(path)
    assert (back.kind, back.vocab_size, back.eot_id) == (tok.kind, tok.vocab_size, tok.eot_id)
    for s in TRICKY + texts[:3]:
        assert back.encode(s) == tok.encode(s)
    assert json.loads(path.read_text())["kind"] == kind


def test_load_rejects_foreign_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"hello": 1}')
    with pytest.raises(DataError, match="not a plait tokenizer file"):
        Tokenizer.load(path)
