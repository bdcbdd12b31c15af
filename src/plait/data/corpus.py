"""Reading text and turning it, once, into cached token arrays on disk."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plait.data.tokenizer import Tokenizer, byte_tokenizer, train_bpe
from plait.errors import ConfigError, DataError
from plait.fsync import fsync

# Part of the cache key: bump it whenever what `prepare` writes changes.
FORMAT_VERSION = 1
TEXT_SUFFIXES = (".txt", ".md", ".rst")


def default_corpus() -> list[str]:
    """CPython's documentation topics (`pydoc_data.topics`), in sorted key order.

    About 465 K characters that ship with every CPython, so the default run
    needs no download and sees the same text wherever the install is the same.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DataError(
            "this Python has no pydoc_data module for the default corpus; give text with --data"
        ) from None
    return [topics[k] for k in sorted(topics)]


def _read_text(path: Path) -> str:
    # Bytes then decode, so line endings are kept exactly as in the file.
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"--data {path}: not UTF-8 text (byte {e.start}); convert it to UTF-8 or remove it") from None
    except OSError as e:
        raise DataError(f"--data {path}: cannot read it ({e.strerror}); check its permissions") from None


def read_documents(path: str | None) -> list[str]:
    """The documents under `path`: None gives `default_corpus()`, a file is one
    document, a folder gives each `*.txt`, `*.md`, `*.rst` file under it
    (recursively, sorted by relative path) as one document."""
    if path is None:
        return default_corpus()
    root = Path(path)
    if root.is_file():
        docs = [_read_text(root)]
        if not docs[0]:
            raise DataError(f"--data {path}: the file is empty; give a file with text in it")
        return docs
    if not root.is_dir():
        raise DataError(f"--data {path}: no such file or folder")
    files = sorted(
        (p for p in root.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise DataError(f"--data {path}: the folder has no .txt, .md or .rst files; put text files in it")
    docs = [_read_text(p) for p in files]
    if not any(docs):
        raise DataError(f"--data {path}: all {len(files)} text files in the folder are empty; give some text")
    return docs


@dataclass(frozen=True)
class PreparedData:
    """A prepared corpus: its cache folder, tokenizer and token arrays."""

    dir: Path
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    meta: dict


def check_length(tokens: np.ndarray, seq_len: int, split: str) -> None:
    """Raise DataError when `tokens` cannot fill one sequence of `seq_len` + 1."""
    n = len(tokens)
    if n < seq_len + 1:
        raise DataError(
            f"the {split} split has {n} tokens, fewer than one sequence of --seq-len {seq_len} + 1; "
            "give more text with --data or lower --seq-len"
        )


def _cache_key(docs: list[str], kind: str, vocab_size: int, val_fraction: float) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, kind, vocab_size, repr(float(val_fraction)), len(docs)]).encode())
    for doc in docs:
        b = doc.encode("utf-8")
        # Length prefix: moving text across a document boundary changes the key.
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:16]


def _build(tmp: Path, docs: list[str], source: str, kind: str, vocab_size: int,
           val_fraction: float, key: str) -> None:
    tok = train_bpe(docs, vocab_size) if kind == "bpe" else byte_tokenizer()
    dtype = np.dtype("<u2") if tok.vocab_size <= 65536 else np.dtype("<u4")
    stream = np.concatenate([np.asarray(tok.encode(d) + [tok.eot_id], dtype=dtype) for d in docs])
    n = len(stream)  # at least 2: read_documents guarantees some text, then EOT
    n_val = min(max(int(n * val_fraction), 1), n - 1)
    tok.save(tmp / "tokenizer.json")
    stream[: n - n_val].tofile(tmp / "train.bin")
    stream[n - n_val:].tofile(tmp / "val.bin")
    meta = {
        "format_version": FORMAT_VERSION, "key": key, "source": source,
        "documents": len(docs), "characters": sum(len(d) for d in docs),
        "tokenizer": kind, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
        "dtype": dtype.name, "val_fraction": val_fraction,
        "train_tokens": n - n_val, "val_tokens": n_val,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    # On disk before the rename, so after a power cut a folder that looks
    # complete (meta.json present) really is.
    for name in ("tokenizer.json", "train.bin", "val.bin", "meta.json"):
        fsync(tmp / name)


def _load(folder: Path) -> PreparedData:
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        arrays = {}
        for split in ("train", "val"):
            path = folder / f"{split}.bin"
            if path.stat().st_size != meta[f"{split}_tokens"] * dtype.itemsize:
                raise ValueError(f"{path.name} has the wrong size")
            arrays[split] = np.memmap(path, dtype=dtype, mode="r")
        tok = Tokenizer.load(folder / "tokenizer.json")
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"the prepared data in {folder} is damaged ({e}); delete that folder and run again") from None
    return PreparedData(folder, tok, arrays["train"], arrays["val"], meta)


def prepare(data: str | None, data_dir: str | Path, tokenizer: str = "bpe",
            vocab_size: int = 2048, val_fraction: float = 0.1) -> PreparedData:
    """Tokenize the documents of `data` (see `read_documents`) into a cached folder.

    The folder `data_dir/<key>` is keyed by the text and the settings; when it
    is already complete it is loaded as is. It holds `tokenizer.json`,
    `train.bin`, `val.bin` (the last `val_fraction` of the stream, EOT after
    every document) and `meta.json`. Safe against crashes and against several
    processes preparing the same data at once.
    """
    if tokenizer not in ("bpe", "byte"):
        raise ConfigError(f"--tokenizer {tokenizer}: unknown tokenizer; use bpe or byte")
    if not 0 < val_fraction <= 0.5:
        raise ConfigError(f"--val-fraction {val_fraction}: must be in (0, 0.5]; e.g. 0.1")
    if tokenizer == "byte":
        vocab_size = 257
    docs = read_documents(data)
    if data is None:
        source = "pydoc_data.topics (CPython %d.%d.%d)" % sys.version_info[:3]
    else:
        source = str(Path(data).resolve())
    key = _cache_key(docs, tokenizer, vocab_size, val_fraction)
    data_dir = Path(data_dir)
    folder = data_dir / key
    if (folder / "meta.json").exists():
        return _load(folder)

    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=data_dir))
    except OSError as e:
        raise ConfigError(f"--data-dir {data_dir}: cannot write there ({e.strerror}); pick a writable folder") from None
    try:
        _build(tmp, docs, source, tokenizer, vocab_size, val_fraction, key)
        _move_into_place(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _load(folder)


def _move_into_place(tmp: Path, folder: Path) -> None:
    # A directory rename is atomic: others see no folder or a complete one.
    for _ in range(3):
        try:
            os.rename(tmp, folder)
            return
        except OSError:
            if (folder / "meta.json").exists():
                return  # another process won the race; its folder is as good as ours
            # A leftover incomplete folder: move it aside atomically, then retry.
            trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            try:
                os.rename(folder, trash / "x")
            except OSError:
                pass
            shutil.rmtree(trash, ignore_errors=True)
    raise DataError(f"could not move prepared data into {folder}; delete that folder and run again")
