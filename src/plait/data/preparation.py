"""Streaming a corpus into token shards: the work behind `plait prepare`.

Text goes file by file, document by document, through the tokenizer in
batches (`Tokenizer.encode_batch`, on every core) and its ids are appended to
shards on disk; the BPE is trained on a bounded sample from the start of the
corpus. Memory stays flat whatever the corpus's size: one batch of text and
its ids, plus the BPE trainer's counts of the sample's words.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from plait.data.shards import SHARD_TOKENS, ShardWriter
from plait.data.sources import DocumentReader, Source
from plait.data.token_files import bin_chunks
from plait.data.tokenizer import Tokenizer, byte_tokenizer, tokenizer_file, train_bpe
from plait.data.workers import fork_pool
from plait.errors import ConfigError, DataError
from plait.fsync import fsync

BATCH_CHARS = 1 << 21  # text per encode_batch call: enough to keep every core busy, bounded
BATCH_PIECES = 4096
DEFAULT_BPE_SAMPLE_MB = 8.0
MANIFEST = "manifest.json"
# The trained BPE's fast path and the counting of its sample's pre-tokens are Python
# (GIL-bound), so they run in forked worker processes, one per core, for any corpus bigger
# than this; a small one is not worth the forks.
POOL_MIN_BYTES = 8 << 20


@dataclass(frozen=True)
class PrepareOptions:
    """How a corpus becomes tokens; every field is part of the cache key."""

    tokenizer: str = "bpe"          # "bpe", "byte", or the path of a tokenizer file
    vocab_size: int = 2048          # for "bpe"
    val_fraction: float = 0.1       # the last share of the stream is the validation split
    text_field: str = "text"        # JSON Lines: the field that holds the text
    bin_dtype: str = "uint16"       # a .bin without an llm.c header: its token type
    bpe_sample_mb: float = DEFAULT_BPE_SAMPLE_MB  # MB of text from the start the BPE is trained on
    shard_tokens: int = SHARD_TOKENS

    def check(self) -> None:
        if self.tokenizer not in ("bpe", "byte") and not self.tokenizer.endswith(".json"):
            raise ConfigError(f"--tokenizer {self.tokenizer}: unknown tokenizer; use bpe, byte or the path of "
                              "a tokenizer.json file")
        if not 0 < self.val_fraction <= 0.5:
            raise ConfigError(f"--val-fraction {self.val_fraction}: must be in (0, 0.5]; e.g. 0.1")
        if not self.bpe_sample_mb > 0:
            raise ConfigError(f"--bpe-sample-mb {self.bpe_sample_mb}: must be > 0; e.g. {DEFAULT_BPE_SAMPLE_MB:g}")


def sample_pieces(source: Source, text_field: str, limit_bytes: int) -> Iterator[str]:
    """The first `limit_bytes` bytes of the source's text (UTF-8), in pieces."""
    left = limit_bytes
    for text, _ in DocumentReader(source, text_field, cut=True):
        size = len(text.encode("utf-8"))
        if size >= left:
            # Cut by characters: close enough to the byte budget, and never mid-character.
            yield text[:left]
            return
        left -= size
        yield text


def make_tokenizer(source: Source, opts: PrepareOptions, progress: bool = False) -> Tokenizer:
    """The tokenizer of `opts`: trained on the sample (bpe), bytes, or read from its file."""
    if opts.tokenizer == "byte":
        return byte_tokenizer()
    if opts.tokenizer == "bpe":
        if source.kind == "bin":
            raise DataError(f"--data {source.path} holds token ids already; give the tokenizer they were made "
                            "with: --tokenizer PATH/tokenizer.json, or --tokenizer byte")
        limit = int(opts.bpe_sample_mb * 1e6)
        with tqdm(total=min(limit, source.total_bytes), unit="B", unit_scale=True, desc="BPE sample",
                  file=sys.stderr, dynamic_ncols=True, disable=None if progress else True) as bar:
            def counted(pieces):
                for text in pieces:
                    bar.update(len(text))  # characters: close enough to bytes for a bar
                    yield text

            return train_bpe(counted(sample_pieces(source, opts.text_field, limit)), opts.vocab_size,
                             workers_for(source))
    return tokenizer_file(opts.tokenizer)


def _with_eot(ids: list[np.ndarray], ends: list[bool], eot_id: int, dtype: np.dtype) -> np.ndarray:
    """The pieces' ids in order, EOT after each piece that ends a document."""
    out = np.empty(sum(map(len, ids)) + sum(ends), dtype=dtype)
    pos = 0
    for piece, end in zip(ids, ends):
        out[pos:pos + len(piece)] = piece
        pos += len(piece)
        if end:
            out[pos] = eot_id
            pos += 1
    return out


def _batches(reader: DocumentReader) -> Iterator[tuple[list[str], list[bool]]]:
    texts: list[str] = []
    ends: list[bool] = []
    size = 0
    for text, end in reader:
        texts.append(text)
        ends.append(end)
        size += len(text)
        if size >= BATCH_CHARS or len(texts) >= BATCH_PIECES:
            yield texts, ends
            texts, ends, size = [], [], 0
    if texts:
        yield texts, ends


_WORKER: tuple | None = None  # (tokenizer, dtype), set before the workers are forked


def _encode_in_worker(texts: list[str], ends: list[bool]) -> np.ndarray:
    tok, dtype = _WORKER
    return _with_eot(tok.encode_batch(texts), ends, tok.eot_id, dtype)


def encoded_batches(reader: DocumentReader, tok: Tokenizer, dtype: np.dtype, workers: int) -> Iterator[np.ndarray]:
    """The ids of the reader's batches, in order, EOT after each document; encoded by
    `workers` forked processes when more than one, with a few batches in flight, so
    memory stays bounded (not Pool.imap, which would read the whole corpus ahead)."""
    if workers <= 1:
        for texts, ends in _batches(reader):
            yield _with_eot(tok.encode_batch(texts), ends, tok.eot_id, dtype)
        return
    global _WORKER
    _WORKER = (tok, dtype)
    try:
        with fork_pool(workers) as pool:
            pending: deque = deque()
            for texts, ends in _batches(reader):
                pending.append(pool.apply_async(_encode_in_worker, (texts, ends)))
                if len(pending) > 2 * workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
    finally:
        _WORKER = None


def workers_for(source: Source) -> int:
    """Processes for the trained BPE's Python work on `source`: one per core, or 1 for a
    small corpus (not worth the forks) and off Linux (plait/data/workers.py)."""
    if source.total_bytes < POOL_MIN_BYTES or not sys.platform.startswith("linux"):
        return 1
    return os.cpu_count() or 1


def build(tmp: Path, source: Source, opts: PrepareOptions, tok: Tokenizer, header: dict,
          progress: bool = False) -> dict:
    """Tokenize `source` into shards in the folder `tmp`; write the tokenizer and,
    last, the manifest; returns the manifest. `header`: entries the manifest starts with."""
    t0 = time.perf_counter()
    dtype = np.dtype("<u2") if tok.vocab_size <= 65536 else np.dtype("<u4")
    writer = ShardWriter(tmp, dtype, opts.shard_tokens)
    bar = tqdm(total=source.total_bytes, unit="B", unit_scale=True, desc="preparing", file=sys.stderr,
               dynamic_ncols=True, disable=None if progress else True)  # None: only on a terminal
    if source.kind == "bin":
        path = source.files[0]
        documents = characters = 0
        for chunk in bin_chunks(path, tok.vocab_size, opts.bin_dtype):
            writer.append(chunk)
            documents += int(np.count_nonzero(chunk == tok.eot_id))
            bar.update(chunk.nbytes)
            bar.set_postfix(tokens=f"{writer.tokens:,}", refresh=False)
    else:
        # [Note: cutting text without changing its tokens]: a tokenizer file gets whole documents.
        reader = DocumentReader(source, opts.text_field, cut=tok.kind != "file")
        # Only the trained BPE gains from processes: bytes need no work, and tokenizers
        # encodes a tokenizer file's batches on every core by itself.
        batches = encoded_batches(reader, tok, dtype, workers_for(source) if tok.kind == "bpe" else 1)
        try:
            for ids in batches:
                writer.append(ids)
                bar.update(reader.bytes_read - bar.n)
                bar.set_postfix(tokens=f"{writer.tokens:,}", refresh=False)
        finally:
            batches.close()
        documents, characters = reader.documents, reader.characters
        if characters == 0:
            raise DataError(f"--data {source.path}: no text in its {documents} documents; give some text")
    bar.close()
    shards = writer.close()
    n = writer.tokens
    if n < 2:
        raise DataError(f"--data {source.path}: {n} tokens, too few to split into training and validation; "
                        "give more data")
    n_val = min(max(int(n * opts.val_fraction), 1), n - 1)
    tok.save(tmp / "tokenizer.json")
    manifest = {
        **header,
        "documents": documents, "characters": characters, "source_bytes": source.total_bytes,
        "tokenizer": tok.kind, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
        "bpe_sample_mb": opts.bpe_sample_mb if tok.kind == "bpe" else None,
        "dtype": dtype.name, "tokens": n, "shards": shards,
        "val_fraction": opts.val_fraction, "train_tokens": n - n_val, "val_tokens": n_val,
        "encode_seconds": round(time.perf_counter() - t0, 3),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    # On disk before the rename, so after a power cut a folder that looks
    # complete (manifest present) really is. The shards were synced as they closed.
    fsync(tmp / "tokenizer.json")
    fsync(tmp / MANIFEST)
    return manifest
