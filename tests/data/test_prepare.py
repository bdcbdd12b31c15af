"""Preparation into shards: crashes, races, the fingerprint, batches over shards, the commands."""

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import plait.data.corpus as corpus
import plait.data.preparation as preparation
import plait.data.shards as shards
from plait.cli import main
from plait.data import EOT, Tokens, fingerprint, get_batch, load_prepared, prepare, prepare_to

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def text_dir(tmp_path):
    root = tmp_path / "text"
    root.mkdir()
    rng = np.random.default_rng(1)
    words = np.array(["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "\n", "."])
    for i in range(6):
        (root / f"{i}.txt").write_text(" ".join(rng.choice(words, size=400)))
    return root


def stream(p) -> np.ndarray:
    return np.concatenate([np.asarray(p.train), np.asarray(p.val)])


@pytest.mark.parametrize("tokenizer,pool", [("byte", False), ("bpe", True)], ids=["byte", "bpe-workers"])
def test_a_crash_mid_stream_leaves_nothing_and_the_next_run_prepares(tmp_path, text_dir, monkeypatch, tokenizer,
                                                                      pool):
    if pool:
        monkeypatch.setattr(preparation, "POOL_MIN_BYTES", 0)  # the forked workers too
    real_append, calls = shards.ShardWriter.append, []

    def crash_on_third_batch(self, ids):
        calls.append(len(ids))
        if len(calls) % 3 == 0:
            raise KeyboardInterrupt  # as a ^C or a killed worker would, between two appends
        real_append(self, ids)

    monkeypatch.setattr(preparation, "BATCH_CHARS", 2000)  # several batches
    monkeypatch.setattr(shards.ShardWriter, "append", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(text_dir), tmp_path / "cache", tokenizer=tokenizer, vocab_size=300, shard_tokens=1500)
    with pytest.raises(KeyboardInterrupt):
        prepare_to(tmp_path / "out", str(text_dir), tokenizer=tokenizer, vocab_size=300, shard_tokens=1500)
    assert len(calls) == 6 and os.listdir(tmp_path / "cache") == [] and not (tmp_path / "out").exists()
    assert sorted(os.listdir(tmp_path)) == ["cache", "text"]
    monkeypatch.setattr(shards.ShardWriter, "append", real_append)
    p = prepare(str(text_dir), tmp_path / "cache", tokenizer=tokenizer, vocab_size=300, shard_tokens=1500)
    assert p.built and len(p.meta["shards"]) > 1
    assert multiprocessing.active_children() == []  # the workers went with the crash


def test_worker_processes_give_the_tokens_of_one_process(tmp_path, text_dir, monkeypatch):
    (text_dir / "uni.txt").write_text("naïve café — 日本語 and ascii around it " * 50)
    (text_dir / "eot.txt").write_text(f"before {EOT} after " * 50)
    monkeypatch.setattr(preparation, "BATCH_CHARS", 3000)
    one = prepare(str(text_dir), tmp_path / "one", vocab_size=300)
    monkeypatch.setattr(preparation, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    many = prepare(str(text_dir), tmp_path / "many", vocab_size=300)
    assert np.array_equal(stream(one), stream(many))
    expected = []
    for path in sorted(text_dir.iterdir()):
        expected += one.tokenizer.encode(path.read_text()) + [one.tokenizer.eot_id]
    assert stream(many).tolist() == expected


def test_two_processes_preparing_at_once_make_one_folder(tmp_path, text_dir):
    go = tmp_path / "go"
    code = ("import os, sys, time; from plait.data import prepare\n"
            f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
            f"p = prepare({str(text_dir)!r}, {str(tmp_path / 'cache')!r}, vocab_size=300)\n"
            "print(p.dir, p.built, len(p.train) + len(p.val))")
    procs = [subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(SRC)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(0.5)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    lines = [out.split() for out, _ in outs]
    assert lines[0][0] == lines[1][0] and lines[0][2] == lines[1][2]
    key = Path(lines[0][0]).name
    assert os.listdir(tmp_path / "cache") == [key]  # one folder, no temporary ones left
    p = load_prepared(tmp_path / "cache" / key)
    assert len(p.train) + len(p.val) == int(lines[0][2])


def test_the_fingerprint_follows_the_files(tmp_path, text_dir):
    files = sorted(text_dir.iterdir())
    first = fingerprint(files, text_dir)
    assert fingerprint(files, text_dir) == first
    target = files[2]
    before = target.stat()
    data = bytearray(target.read_bytes())
    data[0] ^= 1  # the same size; the first byte is sampled
    target.write_bytes(bytes(data))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the old mtime
    assert fingerprint(files, text_dir) != first
    data[0] ^= 1
    target.write_bytes(bytes(data))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert fingerprint(files, text_dir) == first
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns + 1))  # touched: a new key, by design
    assert fingerprint(files, text_dir) != first
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    with open(target, "ab") as f:
        f.write(b"!")
    assert fingerprint(files, text_dir) != first


def test_a_changed_file_is_prepared_again_and_an_unchanged_one_is_not_read(tmp_path, text_dir, monkeypatch):
    a = prepare(str(text_dir), tmp_path / "cache", tokenizer="byte")
    with open(text_dir / "3.txt", "a") as f:
        f.write(" more")
    b = prepare(str(text_dir), tmp_path / "cache", tokenizer="byte")
    assert b.built and b.dir != a.dir and len(stream(b)) == len(stream(a)) + 5

    def no_reading(*args, **kwargs):
        raise AssertionError("read the corpus's text")

    monkeypatch.setattr(corpus, "build", no_reading)
    monkeypatch.setattr(preparation.DocumentReader, "__iter__", no_reading)
    again = prepare(str(text_dir), tmp_path / "cache", tokenizer="byte")
    assert again.dir == b.dir and not again.built


def test_batches_over_many_shards_are_the_batches_of_one_array(tmp_path, text_dir):
    one = prepare(str(text_dir), tmp_path / "one", tokenizer="byte")
    many = prepare(str(text_dir), tmp_path / "many", tokenizer="byte", shard_tokens=997)
    assert len(one.meta["shards"]) == 1 and len(many.meta["shards"]) > 5
    assert isinstance(many.train, Tokens) and isinstance(many.val, Tokens)  # the split falls inside a shard
    assert np.array_equal(stream(one), stream(many))
    for split in ("train", "val"):
        for step in range(4):
            for shares in (1, 2, 4):
                for share in range(shares):
                    x1, y1 = get_batch(getattr(one, split), 7, step, 8, 64, share, shares)
                    x2, y2 = get_batch(getattr(many, split), 7, step, 8, 64, share, shares)
                    assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_tokens_index_as_one_array():
    parts = [np.arange(0, 5), np.arange(5, 6), np.arange(6, 13)]
    t, whole = Tokens(parts), np.arange(13)
    assert len(t) == 13 and t.dtype == whole.dtype
    for s in (slice(None), slice(3, 9), slice(4, 5), slice(-4, None), slice(10, 3), slice(0, 13, 3)):
        assert np.array_equal(t[s], whole[s])
    assert [t[i] for i in (0, 5, 6, -1)] == [0, 5, 6, 12]
    idx = np.array([[0, 4, 5, 6], [12, 11, 5, 1]])
    assert np.array_equal(t[idx], whole[idx])
    with pytest.raises(IndexError):
        t[13]
    with pytest.raises(IndexError):
        t[np.array([3, 13])]


def test_plait_prepare_then_train_from_the_folder(tmp_path, text_dir, capsys, monkeypatch):
    out = tmp_path / "prepared"
    assert main(["prepare", "--data", str(text_dir), "--out", str(out), "--vocab-size", "300", "--no-progress"]) == 0
    line = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert line.startswith(f"{text_dir.resolve()}: 6 documents, ")
    assert (f"{manifest['train_tokens']:,} train / {manifest['val_tokens']:,} val tokens (bpe, vocab "
            f"{manifest['vocab_size']}, uint16, 1 shard) in {out}; prepared in ") in line
    assert sorted(os.listdir(out)) == ["manifest.json", "shard-00000.bin", "tokenizer.json"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    # Again: the folder is kept. Into the cache instead: the key of `plait train --data PATH`.
    assert main(["prepare", "--data", str(text_dir), "--out", str(out), "--vocab-size", "300"]) == 0
    assert capsys.readouterr().out.endswith("; already prepared\n")
    assert main(["prepare", "--data", str(text_dir), "--data-dir", str(tmp_path / "c"), "--vocab-size", "300"]) == 0
    assert os.listdir(tmp_path / "c") == [manifest["key"]]
    capsys.readouterr()
    assert main(["prepare", "--data", str(out), "--out", str(tmp_path / "again")]) == 2
    assert capsys.readouterr().err == (f"plait: error: --data {out} is a prepared folder already; train from it: "
                                       f"plait train --data {out}\n")

    def no_reading(*args, **kwargs):
        raise AssertionError("read the corpus")

    monkeypatch.setattr(corpus, "open_source", no_reading)  # a prepared folder needs no source at all
    small = ["--dp", "1", "--pp", "1", "--microbatches", "1", "--no-progress", "--n-layer", "1", "--n-embd", "16",
             "--n-head", "2", "--seq-len", "16", "--global-batch", "2", "--steps", "1", "--eval-batches", "1",
             "--sample-tokens", "0"]
    assert main(["train", *small, "--data", str(out), "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert f"-> {manifest['train_tokens']:,} train / {manifest['val_tokens']:,} val tokens (bpe)" in printed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
