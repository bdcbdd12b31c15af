"""Every input format prepares to the tokens its documents give encoded one by one."""

import gzip
import json

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

import plait.data.preparation as preparation
import plait.data.sources as sources
from plait.data import EOT, byte_tokenizer, prepare, tokenizer_file, train_bpe

DOCS = [
    "The first document: plain text, numbers 12345 and it's contractions.\n",
    "héllo wörld — “quotes” ½ 日本語 🎉👍🏽\n\n\tindented   and  spaced\r\nlines\n",
    "",  # an empty document is one EOT
    f"a literal {EOT} inside a document\n",
    "  leading spaces, trailing spaces   \n\n\n",
]


def stream(p) -> list[int]:
    return np.concatenate([np.asarray(p.train), np.asarray(p.val)]).tolist()


def one_by_one(tok, docs) -> list[int]:
    ids = []
    for doc in docs:
        ids += tok.encode(doc) + [tok.eot_id]
    return ids


def write_jsonl(path, docs, field="text"):
    lines = "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs))
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i, doc in enumerate(DOCS):
        (root / ("sub" if i % 2 else ".") / f"d{i}.txt").write_bytes(doc.encode())
    return root


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_text_folder(tmp_path, folder, kind):
    p = prepare(str(folder), tmp_path / "cache", tokenizer=kind, vocab_size=300)
    # Sorted by relative path: d0, d2, d4 at the top, then sub/d1, sub/d3.
    order = [DOCS[i] for i in (0, 2, 4, 1, 3)]
    assert stream(p) == one_by_one(p.tokenizer, order)
    assert p.meta["documents"] == 5 and p.meta["source_kind"] == "files"


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.gz"])
def test_jsonl(tmp_path, name):
    path = tmp_path / name
    write_jsonl(path, DOCS, field="body")
    p = prepare(str(path), tmp_path / "cache", tokenizer="bpe", vocab_size=300, text_field="body")
    assert stream(p) == one_by_one(p.tokenizer, DOCS)
    assert (p.meta["documents"], p.meta["characters"]) == (len(DOCS), sum(map(len, DOCS)))


def test_folder_mixes_text_and_jsonl(tmp_path, folder):
    write_jsonl(folder / "m.jsonl", ["from json one", "from json two"])
    p = prepare(str(folder), tmp_path / "cache", tokenizer="byte")
    order = [DOCS[0], DOCS[2], DOCS[4], "from json one", "from json two", DOCS[1], DOCS[3]]
    assert stream(p) == one_by_one(p.tokenizer, order)


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_a_long_file_read_in_small_pieces_gives_the_tokens_of_the_whole(tmp_path, monkeypatch, kind):
    # [Note: cutting text without changing its tokens]: with tiny blocks the file is cut at
    # every chance, and the trained BPE (and the sample it trains on) must not notice.
    rng = np.random.default_rng(0)
    words = ["word", " ", "  ", "\n", "\n\n", "\t", "\r\n", "it's", "123", "4.5", "—", "é", "🎉", EOT, "x", ".", "'s"]
    text = "".join(rng.choice(words, size=4000))
    path = tmp_path / "long.txt"
    path.write_bytes(text.encode())
    whole = prepare(str(path), tmp_path / "whole", tokenizer=kind, vocab_size=300)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 16)
    monkeypatch.setattr(preparation, "BATCH_CHARS", 50)
    cut = prepare(str(path), tmp_path / "cut", tokenizer=kind, vocab_size=300)
    pieces = list(sources.DocumentReader(sources.open_source(str(path))))
    assert len(pieces) > 100 and "".join(t for t, _ in pieces) == text  # it was really cut, and losslessly
    expected = one_by_one(whole.tokenizer, [text])
    assert stream(whole) == expected and stream(cut) == expected
    assert cut.tokenizer.encode(text) == whole.tokenizer.encode(text)  # the same BPE was trained
    assert cut.meta["documents"] == 1


def test_bpe_trains_on_a_bounded_sample(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta gamma " * 2000)
    (tmp_path / "b.txt").write_text("zulu yankee xray " * 2000)
    small = prepare(str(tmp_path), tmp_path / "c1", vocab_size=300, bpe_sample_mb=0.01)
    big = prepare(str(tmp_path), tmp_path / "c2", vocab_size=300)
    sample = (tmp_path / "a.txt").read_text()[:10_000]
    assert small.tokenizer._hf.to_str() == train_bpe([sample], 300)._hf.to_str()
    assert len(small.tokenizer.encode("zulu yankee")) > len(big.tokenizer.encode("zulu yankee"))
    assert small.meta["bpe_sample_mb"] == 0.01 and small.dir.name != big.dir.name


def make_hf_file(path, vocab_size=None):
    """A tokenizer.json made here: a trained byte-level BPE saved as plain Hugging Face,
    or (vocab_size) a word-level one with that many entries."""
    if vocab_size is None:
        train_bpe(DOCS * 3, 300)._hf.save(str(path))
        return
    vocab = {f"w{i}": i for i in range(vocab_size - 2)}
    vocab.update({"[UNK]": vocab_size - 2, "</s>": vocab_size - 1})
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["</s>"])
    hf.save(str(path))


def test_tokenizer_file(tmp_path, folder):
    make_hf_file(tmp_path / "tokenizer.json")
    p = prepare(str(folder), tmp_path / "cache", tokenizer=str(tmp_path / "tokenizer.json"))
    tok = tokenizer_file(tmp_path / "tokenizer.json")
    assert (p.tokenizer.kind, p.tokenizer.eot, p.tokenizer.vocab_size) == ("file", EOT, tok.vocab_size)
    assert stream(p) == one_by_one(tok, [DOCS[i] for i in (0, 2, 4, 1, 3)])
    assert p.train.dtype == np.uint16


def test_a_vocabulary_over_65535_is_stored_as_uint32(tmp_path):
    make_hf_file(tmp_path / "big.json", vocab_size=70_000)
    write_jsonl(tmp_path / "d.jsonl", ["w1 w69997 w65536", "w0 nothing", "w69000"])
    p = prepare(str(tmp_path / "d.jsonl"), tmp_path / "cache", tokenizer=str(tmp_path / "big.json"))
    assert p.meta["dtype"] == "uint32" and p.train.dtype == np.uint32 and p.tokenizer.vocab_size == 70_000
    assert stream(p) == [1, 69997, 65536, 69999, 0, 69998, 69999, 69000, 69999]


@pytest.mark.parametrize("layout", ["nanogpt-uint16", "nanogpt-uint32", "llmc-uint16", "llmc-uint32"])
def test_pretokenized_bin(tmp_path, layout):
    make_hf_file(tmp_path / "tokenizer.json")
    tok = tokenizer_file(tmp_path / "tokenizer.json")
    ids = np.array(one_by_one(tok, DOCS * 4))
    style, dtype = layout.split("-")
    with open(tmp_path / "t.bin", "wb") as f:
        if style == "llmc":
            header = np.zeros(256, dtype="<i4")
            header[:3] = [20240520, 1 if dtype == "uint16" else 2, len(ids)]
            f.write(header.tobytes())
        f.write(ids.astype("<u2" if dtype == "uint16" else "<u4").tobytes())
    p = prepare(str(tmp_path / "t.bin"), tmp_path / "cache", tokenizer=str(tmp_path / "tokenizer.json"),
                bin_dtype=dtype if style == "nanogpt" else "uint16")
    assert stream(p) == ids.tolist()
    # In a .bin an EOT is a boundary: the literal one inside DOCS[3] counts as well.
    assert p.meta["source_kind"] == "bin" and p.meta["documents"] == (len(DOCS) + 1) * 4
    assert p.meta["dtype"] == "uint16"  # the vocabulary's size decides, not the file's type


def test_bin_with_the_byte_tokenizer(tmp_path):
    ids = one_by_one(byte_tokenizer(), DOCS)
    np.array(ids, dtype="<u2").tofile(tmp_path / "t.bin")
    p = prepare(str(tmp_path / "t.bin"), tmp_path / "cache", tokenizer="byte")
    assert stream(p) == ids
