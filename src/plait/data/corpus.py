"""A corpus, prepared once into a folder of token shards, and found again cheaply.

`prepare` keys the folder by a fingerprint of the corpus's files and the
preparation options ([Note: the corpus fingerprint]) and builds it only when
it is missing (plait/data/preparation.py streams the text); `load_prepared` opens
a prepared folder memory-mapped and reads no text.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plait.data.fingerprint import fingerprint
from plait.data.preparation import MANIFEST, PrepareOptions, build, make_tokenizer
from plait.data.shards import Tokens, open_range
from plait.data.sources import default_corpus, open_source, read_documents  # noqa: F401 - public here too
from plait.data.tokenizer import Tokenizer
from plait.errors import ConfigError, DataError
from plait.fsync import _umask

# Part of the cache key: bump it whenever what `prepare` writes changes.
FORMAT_VERSION = 2


@dataclass(frozen=True)
class PreparedData:
    """A prepared corpus: its folder, tokenizer, token splits (memory-mapped) and manifest.

    `train` and `val` are `np.memmap` views, or `Tokens` where a split spans
    several shards; both index like one array. `built`: this call made the folder.
    """

    dir: Path
    tokenizer: Tokenizer
    train: np.ndarray | Tokens
    val: np.ndarray | Tokens
    meta: dict
    built: bool = False


def check_length(tokens, seq_len: int, split: str) -> None:
    """Raise DataError when `tokens` cannot fill one sequence of `seq_len` + 1."""
    n = len(tokens)
    if n < seq_len + 1:
        raise DataError(
            f"the {split} split has {n} tokens, fewer than one sequence of --seq-len {seq_len} + 1; "
            "give more text with --data or lower --seq-len"
        )


def is_prepared(path: str | Path | None) -> bool:
    """Whether `path` is a complete prepared folder (it has a manifest)."""
    return path is not None and (Path(path) / MANIFEST).is_file()


def load_prepared(folder: str | Path, built: bool = False) -> PreparedData:
    """Open a prepared folder: its manifest, tokenizer and memory-mapped splits. Reads no text."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format {meta.get('format_version')}, this plait reads {FORMAT_VERSION}")
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        n_train = meta["train_tokens"]
        train = open_range(folder, meta["shards"], dtype, 0, n_train)
        val = open_range(folder, meta["shards"], dtype, n_train, n_train + meta["val_tokens"])
        tok = Tokenizer.load(folder / "tokenizer.json")
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"the prepared data in {folder} is damaged ({e}); delete that folder and run again") from None
    return PreparedData(folder, tok, train, val, meta, built)


def _options(tokenizer, vocab_size, val_fraction, **more) -> PrepareOptions:
    if tokenizer == "byte":
        vocab_size = 257
    opts = PrepareOptions(tokenizer=tokenizer, vocab_size=vocab_size, val_fraction=val_fraction, **more)
    opts.check()
    return opts


def cache_key(fingerprint_hex: str, opts: PrepareOptions, tok: Tokenizer | None) -> str:
    """The prepared folder's name: the source's fingerprint and every option that changes the tokens."""
    spec: list = [opts.tokenizer]
    if opts.tokenizer == "bpe":
        spec = ["bpe", opts.vocab_size, repr(float(opts.bpe_sample_mb))]
    elif tok is not None and tok.kind != "byte":  # a tokenizer file: by what it says, not its name
        spec = ["file", hashlib.sha256(tok._hf.to_str().encode()).hexdigest(), tok.eot]
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, fingerprint_hex, spec, repr(float(opts.val_fraction)),
                                   opts.text_field, opts.bin_dtype, opts.shard_tokens]).encode())
    return h.hexdigest()[:16]


def _plan(data: str | None, opts: PrepareOptions):
    """(source, tokenizer file or None, fingerprint, key): what rank 0 checks on every start."""
    source = open_source(data)
    tok = make_tokenizer(source, opts) if opts.tokenizer not in ("bpe", "byte") else None
    root = Path(data) if data is not None else None
    fp = fingerprint(source.files, root)
    return source, tok, fp, cache_key(fp, opts, tok)


def _build_into(folder: Path, source, tok, opts: PrepareOptions, fp: str, key: str, progress: bool,
                what: str) -> None:
    """Build in a temporary folder beside `folder`, then rename it into place."""
    parent = folder.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the folder is data for the group too
    except OSError as e:
        raise ConfigError(f"{what} {parent}: cannot write there ({e.strerror}); pick a writable folder") from None
    try:
        t0 = time.perf_counter()
        if tok is None:
            tok = make_tokenizer(source, opts, progress)
        header = {"format_version": FORMAT_VERSION, "key": key, "source": source.describe(),
                  "source_kind": source.kind, "fingerprint": fp, "files": len(source.files),
                  "tokenizer_seconds": round(time.perf_counter() - t0, 3)}
        build(tmp, source, opts, tok, header, progress)
        _move_into_place(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare(data: str | None, data_dir: str | Path, tokenizer: str = "bpe", vocab_size: int = 2048,
            val_fraction: float = 0.1, *, progress: bool = False, **options) -> PreparedData:
    """The prepared tokens of `data`, from the cache folder `data_dir/<key>`, built when missing.

    `data` is None (the default corpus), a text, JSON Lines or .bin file, a
    folder of them (plait/data/sources.py), or an already prepared folder,
    which is loaded as it is. The key is the corpus's fingerprint and the
    options (`PrepareOptions`; `options` takes its other fields). The folder
    holds the shards, `tokenizer.json` and `manifest.json` (written last): the
    last `val_fraction` of the stream (EOT after every document) is the
    validation split. Safe against crashes and against several processes
    preparing the same data at once.
    """
    if is_prepared(data):
        return load_prepared(data)
    opts = _options(tokenizer, vocab_size, val_fraction, **options)
    source, tok, fp, key = _plan(data, opts)
    folder = Path(data_dir) / key
    if (folder / MANIFEST).exists():
        return load_prepared(folder)
    _build_into(folder, source, tok, opts, fp, key, progress, "--data-dir")
    return load_prepared(folder, built=True)


def prepare_to(out: str | Path, data: str | None, tokenizer: str = "bpe", vocab_size: int = 2048,
               val_fraction: float = 0.1, *, progress: bool = False, **options) -> PreparedData:
    """Prepare `data` into the new folder `out` (`plait prepare --out`); as `prepare` otherwise.

    An `out` that already holds this corpus prepared with these options is
    kept as it is; any other existing `out` is refused.
    """
    out = Path(out)
    if is_prepared(data):
        raise ConfigError(f"--data {data} is a prepared folder already; train from it: plait train --data {data}")
    opts = _options(tokenizer, vocab_size, val_fraction, **options)
    source, tok, fp, key = _plan(data, opts)
    if out.exists():
        if is_prepared(out) and json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("key") == key:
            return load_prepared(out)
        raise ConfigError(f"--out {out} exists; give a new folder (an existing one is never written over)")
    _build_into(out, source, tok, opts, fp, key, progress, "--out")
    return load_prepared(out, built=True)


def _move_into_place(tmp: Path, folder: Path) -> None:
    # A directory rename is atomic: others see no folder or a complete one.
    for _ in range(3):
        try:
            os.rename(tmp, folder)
            return
        except OSError:
            if (folder / MANIFEST).exists():
                return  # another process won the race; its folder is as good as ours
            # A leftover incomplete folder: move it aside atomically, then retry.
            trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            try:
                os.rename(folder, trash / "x")
            except OSError:
                pass
            shutil.rmtree(trash, ignore_errors=True)
    raise DataError(f"could not move prepared data into {folder}; delete that folder and run again")
