import json
import os

import numpy as np
import pytest

import plait.data.corpus as corpus
import plait.data.preparation as preparing
from plait.data import EOT, check_length, default_corpus, prepare, read_documents
from plait.data.sources import file_kind, folder_files
from plait.errors import ConfigError, DataError

DOCS = {
    "b.txt": "The second document, with unicode: café 🎉.\n" * 20,
    "a.md": "# First\n\n\tIndented  text and <tags>.\n" * 20,
    "sub/c.rst": "Third document\n==============\n\nline\r\nending\n" * 20,
}
ORDER = ["a.md", "b.txt", "sub/c.rst"]


@pytest.fixture
def text_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text.encode("utf-8"))
    (root / "ignored.py").write_text("print('not text')\n")
    return root


def test_default_corpus():
    docs = default_corpus()
    assert len(docs) > 50
    assert sum(map(len, docs)) > 400_000
    assert default_corpus() == docs
    from pydoc_data.topics import topics
    assert docs[0] == topics[min(topics)]


def test_read_file(text_dir):
    assert read_documents(str(text_dir / "sub" / "c.rst")) == [DOCS["sub/c.rst"]]


def test_read_folder_sorted(text_dir):
    assert read_documents(str(text_dir)) == [DOCS[n] for n in ORDER]


def test_a_folder_lists_the_files_rglob_finds(tmp_path):
    # folder_files walks with os.scandir (a start on a raw corpus lists it every time);
    # it gives what sorting rglob's text and JSON Lines files by relative path gives.
    root = tmp_path / "corpus"
    for name in ("b.txt", "A.TXT", "a.md", "x.Rst", ".hidden.txt", ".txt", "d.jsonl", "e.JSONL.GZ", "f.py",
                 "g.txt.bak", "sub/z.txt", "sub/deeper/y.md", "sub-a/c.txt", "sub.txt/inner.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "o.txt").write_text("o")
    os.symlink(tmp_path / "outside", root / "linked")  # a symlinked folder is not entered
    os.symlink(root / "b.txt", root / "link.txt")  # a symlinked file is read
    expected = sorted((p for p in root.rglob("*") if file_kind(p) and p.is_file()),
                      key=lambda p: p.relative_to(root).as_posix())
    found = folder_files(root)
    assert [p for _, p, _ in found] == expected
    assert [rel for rel, _, _ in found] == [".hidden.txt", "A.TXT", "a.md", "b.txt", "d.jsonl", "e.JSONL.GZ",
                                            "link.txt", "sub-a/c.txt", "sub.txt/inner.txt", "sub/deeper/y.md",
                                            "sub/z.txt", "x.Rst"]
    assert [size for _, _, size in found] == [p.stat().st_size for p in expected]


def test_read_none_is_default():
    assert read_documents(None) == default_corpus()


def test_missing_path(tmp_path):
    path = str(tmp_path / "nope")
    with pytest.raises(DataError) as e:
        read_documents(path)
    assert str(e.value) == f"--data {path}: no such file or folder"


def test_folder_without_text(tmp_path):
    (tmp_path / "x.py").write_text("x = 1\n")
    with pytest.raises(DataError, match=r"no .txt, .md, .rst, .jsonl or .jsonl.gz files"):
        read_documents(str(tmp_path))


def test_folder_all_empty(tmp_path):
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        read_documents(str(tmp_path))


def test_not_utf8(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"ok \xff bad")
    with pytest.raises(DataError, match="not UTF-8"):
        read_documents(str(tmp_path))


@pytest.mark.parametrize("kind,vocab", [("byte", 257), ("bpe", 300)])
def test_prepare(tmp_path, text_dir, kind, vocab):
    p = prepare(str(text_dir), tmp_path / "cache", tokenizer=kind, vocab_size=vocab)
    names = sorted(os.listdir(p.dir))
    assert names == ["manifest.json", "shard-00000.bin", "tokenizer.json"]
    assert os.listdir(tmp_path / "cache") == [p.dir.name]
    assert p.dir.name == p.meta["key"] and len(p.meta["key"]) == 16
    assert (p.tokenizer.kind, p.tokenizer.vocab_size, p.meta["vocab_size"]) == (kind, vocab, vocab)
    assert p.train.dtype == np.uint16 and p.meta["dtype"] == "uint16"
    assert isinstance(p.train, np.memmap) and isinstance(p.val, np.memmap)
    assert (p.meta["documents"], p.meta["characters"]) == (3, sum(map(len, DOCS.values())))
    assert json.loads((p.dir / "manifest.json").read_text()) == p.meta
    assert p.meta["shards"] == [{"file": "shard-00000.bin", "tokens": len(p.train) + len(p.val)}]
    n = len(p.train) + len(p.val)
    assert (len(p.train), len(p.val)) == (p.meta["train_tokens"], p.meta["val_tokens"])
    assert len(p.val) == int(n * 0.1)
    stream = np.concatenate([p.train, p.val]).tolist()
    assert stream.count(p.tokenizer.eot_id) == 3 and stream[-1] == p.tokenizer.eot_id
    text = p.tokenizer.decode(stream)
    assert text.split(EOT) == [DOCS[n] for n in ORDER] + [""]


def test_prepare_reuses_cache(tmp_path, text_dir, monkeypatch):
    first = prepare(str(text_dir), tmp_path, vocab_size=300)
    assert first.built
    inode = os.stat(first.dir / "shard-00000.bin").st_ino

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenized a cached corpus")

    monkeypatch.setattr(preparing, "train_bpe", fail)
    monkeypatch.setattr(corpus, "build", fail)
    again = prepare(str(text_dir), tmp_path, vocab_size=300)
    assert again.dir == first.dir and not again.built
    assert os.stat(again.dir / "shard-00000.bin").st_ino == inode
    assert np.array_equal(again.train, first.train) and np.array_equal(again.val, first.val)
    assert again.tokenizer.encode(DOCS["b.txt"]) == first.tokenizer.encode(DOCS["b.txt"])


def test_settings_change_the_folder(tmp_path, text_dir):
    a = prepare(str(text_dir), tmp_path, vocab_size=300)
    b = prepare(str(text_dir), tmp_path, vocab_size=320)
    c = prepare(str(text_dir), tmp_path, vocab_size=300, val_fraction=0.2)
    d = prepare(str(text_dir), tmp_path, tokenizer="byte", vocab_size=300)
    e = prepare(str(text_dir), tmp_path, tokenizer="byte", vocab_size=999)
    assert len({a.dir, b.dir, c.dir, d.dir}) == 4
    assert e.dir == d.dir
    assert b.tokenizer.vocab_size == 320


def test_lost_race_loads_the_winner(tmp_path, text_dir, monkeypatch):
    real_build = corpus.build

    def build_while_another_process_finishes(tmp, source, opts, tok, header, *args):
        # The other process renames its complete folder into place first.
        other = tmp.parent / "other"
        other.mkdir()
        real_build(other, source, opts, tok, header, *args)
        os.rename(other, tmp.parent / header["key"])
        return real_build(tmp, source, opts, tok, header, *args)

    monkeypatch.setattr(corpus, "build", build_while_another_process_finishes)
    p = prepare(str(text_dir), tmp_path, tokenizer="byte")
    assert os.listdir(tmp_path) == [p.dir.name]
    assert len(p.train) + len(p.val) == p.meta["train_tokens"] + p.meta["val_tokens"]


def test_incomplete_folder_is_replaced(tmp_path, text_dir):
    key = prepare(str(text_dir), tmp_path / "x", tokenizer="byte").meta["key"]
    (tmp_path / key).mkdir()
    (tmp_path / key / "shard-00000.bin").write_bytes(b"half")
    p = prepare(str(text_dir), tmp_path, tokenizer="byte")
    assert sorted(os.listdir(tmp_path)) == sorted([key, "x"])
    assert (p.dir / "manifest.json").exists()


def test_crash_leaves_nothing(tmp_path, text_dir, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(preparing, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(text_dir), tmp_path, tokenizer="byte")
    assert os.listdir(tmp_path) == []


def test_bad_settings(tmp_path, text_dir):
    with pytest.raises(ConfigError, match="--val-fraction 0.6"):
        prepare(str(text_dir), tmp_path, val_fraction=0.6)
    with pytest.raises(ConfigError, match="--val-fraction 0"):
        prepare(str(text_dir), tmp_path, val_fraction=0)
    with pytest.raises(ConfigError, match="--tokenizer word"):
        prepare(str(text_dir), tmp_path, tokenizer="word")


def test_tiny_text_keeps_a_token_each_side(tmp_path):
    (tmp_path / "t.txt").write_text("a")
    p = prepare(str(tmp_path / "t.txt"), tmp_path / "cache", tokenizer="byte")
    assert p.train.tolist() == [97] and p.val.tolist() == [256]


def test_check_length():
    check_length(np.zeros(9, np.uint16), 8, "train")
    with pytest.raises(DataError) as e:
        check_length(np.zeros(8, np.uint16), 8, "val")
    assert str(e.value) == (
        "the val split has 8 tokens, fewer than one sequence of --seq-len 8 + 1; "
        "give more text with --data or lower --seq-len"
    )
