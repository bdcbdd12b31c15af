"""Pre-tokenized `.bin` files: read in bounded chunks and checked against a vocabulary.

Two layouts are read. nanoGPT's: the token ids and nothing else, little-endian
uint16 (or uint32, `--bin-dtype`). llm.c's: a header of 256 int32 (magic
20240520, version 1 for uint16 tokens or 2 for uint32, the token count) and then
the ids. Documents are separated by the tokenizer's end-of-text id, as both
tools write them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from plait.errors import DataError

LLMC_MAGIC = 20240520
LLMC_HEADER_BYTES = 256 * 4
LLMC_DTYPES = {1: "<u2", 2: "<u4"}
BIN_DTYPES = ("uint16", "uint32")
CHUNK_TOKENS = 1 << 22  # 4 Mi tokens (8 or 16 MB) per read


def bin_layout(path: Path, bin_dtype: str = "uint16") -> tuple[np.dtype, int, int]:
    """(dtype, header bytes, token count) of a `.bin`; DataError when its size does not fit."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            first = f.read(12)
            head = np.frombuffer(first, dtype="<i4") if len(first) == 12 else np.zeros(0, dtype="<i4")
    except OSError as e:
        raise DataError(f"--data {path}: cannot read it ({e.strerror}); check its permissions") from None
    if len(head) == 3 and head[0] == LLMC_MAGIC and int(head[1]) in LLMC_DTYPES:
        dtype, header = np.dtype(LLMC_DTYPES[int(head[1])]), LLMC_HEADER_BYTES
        count = int(head[2])
        if size != header + count * dtype.itemsize:
            raise DataError(f"--data {path}: its llm.c header says {count} tokens of {dtype.itemsize} bytes, "
                            f"but it holds {size - header} bytes after the header; the file is cut short or "
                            "damaged, write it again")
        return dtype, header, count
    dtype = np.dtype("<u2" if bin_dtype == "uint16" else "<u4")
    if size == 0:
        raise DataError(f"--data {path}: the file is empty; give a file with tokens in it")
    if size % dtype.itemsize:
        raise DataError(f"--data {path}: its {size} bytes are not a whole number of {bin_dtype} tokens "
                        f"({dtype.itemsize} bytes each); give the right --bin-dtype, or a complete file")
    return dtype, 0, size // dtype.itemsize


def bin_chunks(path: Path, vocab_size: int, bin_dtype: str = "uint16",
               chunk_tokens: int = CHUNK_TOKENS) -> Iterator[np.ndarray]:
    """The token ids of a `.bin`, a chunk at a time, each id checked to be below `vocab_size`."""
    dtype, header, count = bin_layout(path, bin_dtype)
    mapped = np.memmap(path, dtype=dtype, mode="r", offset=header, shape=(count,))
    for start in range(0, count, chunk_tokens):
        chunk = np.array(mapped[start:start + chunk_tokens])  # a copy: the map's pages can go
        bad = np.flatnonzero(chunk >= vocab_size)
        if len(bad):
            at = int(bad[0])
            raise DataError(f"--data {path}: token {start + at} is id {int(chunk[at])}, not below the "
                            f"tokenizer's vocabulary of {vocab_size}; give the tokenizer the file was made "
                            "with (--tokenizer)")
        yield chunk
    del mapped
