"""Token shards on disk: written by appending, read back memory-mapped as one array.

A prepared corpus is one stream of token ids cut into files `shard-00000.bin`,
`shard-00001.bin`, ... of at most `shard_tokens` ids each (raw little-endian
uint16 or uint32, no header: `np.memmap` opens them directly). `Tokens` reads
any range of the stream, across shard boundaries, as if it were one array, so
batches drawn from it (plait/data/batches.py) are the ones one array gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np

from plait.fsync import fsync

SHARD_TOKENS = 1 << 28  # 256 Mi tokens: 512 MB of uint16, few files for a large corpus


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.bin"


class ShardWriter:
    """Appends token ids to shards in `folder`, starting a new shard every `shard_tokens` ids."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int = SHARD_TOKENS):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.folder, self.dtype, self.shard_tokens = Path(folder), np.dtype(dtype), shard_tokens
        self.shards: list[dict] = []  # {"file": name, "tokens": n} of each shard begun
        self.tokens = 0
        self._file: BinaryIO | None = None

    def append(self, ids: np.ndarray) -> None:
        """Write `ids` (any integer dtype whose values fit) at the end of the stream."""
        ids = np.asarray(ids).astype(self.dtype, copy=False)
        while len(ids):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._next_shard()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, ids = ids[:room], ids[room:]
            self._file.write(part.tobytes())
            self.shards[-1]["tokens"] += len(part)
            self.tokens += len(part)

    def _next_shard(self) -> None:
        self._close_file()
        name = shard_name(len(self.shards))
        self._file = open(self.folder / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            fsync(self.folder / self.shards[-1]["file"])  # on disk before the manifest names it
            self._file = None

    def close(self) -> list[dict]:
        """Flush and sync every shard; returns the shards' names and token counts, in order."""
        self._close_file()
        return [dict(s) for s in self.shards]


class Tokens:
    """A read-only run of token ids spread over several arrays, indexed as one array.

    `len`, integer and slice indexing, and integer-array indexing (what
    `get_batch` does) give what the concatenation of the arrays gives, without
    making it: a memory-mapped corpus of any size costs only the pages read.
    """

    def __init__(self, parts: list[np.ndarray]):
        self.parts = [p for p in parts if len(p)]
        if not self.parts:
            raise ValueError("Tokens needs at least one token")
        self.dtype = self.parts[0].dtype
        # starts[i] is the stream offset of parts[i]; starts[-1] the total length.
        self.starts = np.cumsum([0] + [len(p) for p in self.parts], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __repr__(self) -> str:
        return f"Tokens({len(self):,} tokens of {self.dtype.name} in {len(self.parts)} parts)"

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate(self.parts)
        return out if dtype is None else out.astype(dtype)

    def tolist(self) -> list[int]:
        return np.asarray(self).tolist()

    def __getitem__(self, index):
        n = len(self)
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step != 1:
                return np.asarray(self)[index]
            return self._take(np.arange(start, max(start, stop), dtype=np.int64))
        if isinstance(index, (int, np.integer)):
            i = int(index) + n if index < 0 else int(index)
            if not 0 <= i < n:
                raise IndexError(f"index {index} is out of range for {n} tokens")
            return self._take(np.array([i]))[0]
        return self._take(np.asarray(index, dtype=np.int64))

    def _take(self, index: np.ndarray) -> np.ndarray:
        """The ids at `index` (any shape, each in [0, len)), in `index`'s shape."""
        flat = index.ravel()
        if len(flat) and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"an index is out of range for {len(self)} tokens")
        part = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=self.dtype)
        for p in np.unique(part):
            mask = part == p
            out[mask] = self.parts[p][flat[mask] - self.starts[p]]
        return out.reshape(index.shape)


def open_range(folder: Path, shards: list[dict], dtype: np.dtype, start: int, stop: int) -> np.ndarray | Tokens:
    """Tokens [start, stop) of the stream in `folder`'s shards, memory-mapped.

    Within one shard this is a plain `np.memmap` view; across shards, `Tokens`.
    """
    parts, offset = [], 0
    for shard in shards:
        n = shard["tokens"]
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            path = Path(folder) / shard["file"]
            if path.stat().st_size != n * dtype.itemsize:
                raise ValueError(f"{shard['file']} has {path.stat().st_size} bytes, not {n} tokens")
            parts.append(np.memmap(path, dtype=dtype, mode="r", shape=(n,))[lo - offset:hi - offset])
        offset += n
    if not parts:
        raise ValueError(f"no tokens in [{start}, {stop})")
    return parts[0] if len(parts) == 1 else Tokens(parts)
