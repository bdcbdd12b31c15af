"""The documents of a corpus, read as a stream, one piece of text at a time.

Inputs: the default corpus (`default_corpus`); a text file (any suffix), which
is one document; a `.jsonl` or `.jsonl.gz` file, one document per line in a
field; a folder, whose `.txt`, `.md`, `.rst`, `.jsonl` and `.jsonl.gz` files
(recursively, sorted by relative path) are read in turn; a pre-tokenized
`.bin` (plait/data/token_files.py reads that one). Nothing here holds more
than one document, or one piece of a long text file, at a time.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from plait.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
BIN_SUFFIX = ".bin"
# A long text file is read in blocks of this many bytes and handed on in pieces of
# about this size, so that one big file costs no more memory than many small ones.
BLOCK_BYTES = 1 << 20
# [Note: cutting text without changing its tokens]
# A piece ends only between a character that is not white space and one of " \t\n\r".
# The GPT-2 pre-tokenizer (byte-level BPE) never puts such a pair inside one
# pre-token (its patterns either end before white space or begin with it), and BPE
# merges stay inside pre-tokens, so the pieces encode to exactly the tokens of the
# whole text; for bytes any cut is exact. EOT has no white space, so it is never cut.
# A tokenizer file may normalise or prefix each text (SentencePiece's "▁"), so for
# it a document is never cut.
_CUT = re.compile(r"\S(?=[ \t\n\r])")


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


def default_corpus_file() -> Path:
    """The file that holds the default corpus, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("pydoc_data.topics")
    if spec is None or not spec.origin:
        raise DataError("this Python has no pydoc_data module for the default corpus; give text with --data")
    return Path(spec.origin)


def file_kind(path: Path) -> str | None:
    """"text", "jsonl" or None (not read in a folder), from the name."""
    return _kind_of_name(path.name)


def _kind_of_name(name: str) -> str | None:
    name = name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "text" if name.endswith(TEXT_SUFFIXES) and name not in TEXT_SUFFIXES else None


def folder_files(root: Path) -> list[tuple[str, Path, int]]:
    """(path relative to `root`, path, size) of each file a folder gives (`file_kind`),
    recursively, sorted by the relative path ("/"-separated).

    As `Path.rglob` finds them (symlinked folders not entered, unreadable ones skipped), but with one `os.scandir`
    per folder and one stat per file: every start on a raw corpus lists it, and on a
    corpus of tens of thousands of files rglob's Path objects cost most of a second.
    """
    found: list[tuple[str, Path, int]] = []

    def walk(folder: str, rel: str) -> None:
        try:
            entries = os.scandir(folder)
        except PermissionError:
            return  # as rglob: a folder that cannot be listed gives no files
        with entries:
            for entry in entries:
                if entry.is_dir() and not entry.is_symlink():
                    walk(entry.path, f"{rel}{entry.name}/")
                elif _kind_of_name(entry.name) and entry.is_file():
                    found.append((rel + entry.name, Path(entry.path), entry.stat().st_size))

    walk(str(root), "")
    found.sort(key=lambda f: f[0])
    return found


@dataclass(frozen=True)
class Source:
    """What `--data` names: its kind ("default", "files" or "bin"), its files in
    reading order and their total size in bytes."""

    path: str | None
    kind: str
    files: tuple[Path, ...]
    total_bytes: int

    def describe(self) -> str:
        if self.kind == "default":
            import sys

            return "pydoc_data.topics (CPython %d.%d.%d)" % sys.version_info[:3]
        return str(Path(self.path).resolve())


def open_source(path: str | None) -> Source:
    """Find the files of `path` and check the cheap things (it exists, has text),
    reading none of them. Raises DataError with the fix."""
    if path is None:
        f = default_corpus_file()
        return Source(None, "default", (f,), f.stat().st_size)
    root = Path(path)
    if root.is_file():
        size = root.stat().st_size
        if root.name.lower().endswith(BIN_SUFFIX):
            return Source(path, "bin", (root,), size)
        if size == 0:
            raise DataError(f"--data {path}: the file is empty; give a file with text in it")
        return Source(path, "files", (root,), size)
    if not root.is_dir():
        raise DataError(f"--data {path}: no such file or folder")
    try:
        found = folder_files(root)
    except OSError as e:
        raise DataError(f"--data {path}: cannot list the folder ({e.strerror}: {e.filename}); check its "
                        "permissions") from None
    if not found:
        raise DataError(f"--data {path}: the folder has no .txt, .md, .rst, .jsonl or .jsonl.gz files; "
                        "put text files in it")
    files = [p for _, p, _ in found]
    sizes = [size for _, _, size in found]
    if not any(sizes):
        raise DataError(f"--data {path}: all {len(files)} text files in the folder are empty; give some text")
    return Source(path, "files", tuple(files), sum(sizes))


class DocumentReader:
    """Iterates (text, ends_document) over a source's documents, in order.

    A document is one or more pieces; its last piece has ends_document True
    (an empty document is one empty piece). `cut`: whether long text files
    may be handed on in pieces ([Note: cutting text without changing its
    tokens]). `bytes_read`: how far through the source's files it is, for a
    progress bar; `documents` and `characters`: what it has handed on so far.
    """

    def __init__(self, source: Source, text_field: str = "text", cut: bool = True):
        self.source, self.text_field, self.cut = source, text_field, cut
        self.documents = self.characters = 0
        self._done_bytes = 0
        self._raw: BinaryIO | None = None

    @property
    def bytes_read(self) -> int:
        raw = self._raw
        return self._done_bytes + (raw.tell() if raw is not None and not raw.closed else 0)

    def __iter__(self) -> Iterator[tuple[str, bool]]:
        if self.source.kind == "default":
            for doc in default_corpus():
                yield from self._counted([(doc, True)])
            self._done_bytes = self.source.total_bytes
            return
        for path in self.source.files:
            pieces = self._jsonl(path) if file_kind(path) == "jsonl" else self._text(path)
            yield from self._counted(pieces)
            self._done_bytes += path.stat().st_size
            self._raw = None

    def _counted(self, pieces) -> Iterator[tuple[str, bool]]:
        for text, end in pieces:
            self.characters += len(text)
            self.documents += end
            yield text, end

    def _open(self, path: Path) -> BinaryIO:
        try:
            self._raw = open(path, "rb")
        except OSError as e:
            raise DataError(f"--data {path}: cannot read it ({e.strerror}); check its permissions") from None
        return self._raw

    def _text(self, path: Path) -> Iterator[tuple[str, bool]]:
        # Bytes then decode, so line endings are kept exactly as in the file.
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset, carry = 0, ""
        with self._open(path) as f:
            while True:
                try:
                    block = f.read(BLOCK_BYTES)
                except OSError as e:
                    raise DataError(f"--data {path}: cannot read it ({e.strerror}); check the file") from None
                pending = len(decoder.getstate()[0])  # bytes of a character cut by the last block
                try:
                    carry += decoder.decode(block, final=not block)
                except UnicodeDecodeError as e:
                    raise DataError(f"--data {path}: not UTF-8 text (byte {offset - pending + e.start}); "
                                    "convert it to UTF-8 or remove it") from None
                offset += len(block)
                if not block:
                    yield carry, True
                    return
                if self.cut and len(carry) >= BLOCK_BYTES:
                    last = None
                    for last in _CUT.finditer(carry, max(0, len(carry) - 65536)):
                        pass
                    if last is not None:  # else no place to cut yet: read on
                        yield carry[:last.end()], False
                        carry = carry[last.end():]

    def _jsonl(self, path: Path) -> Iterator[tuple[str, bool]]:
        raw = self._open(path)
        lines = gzip.GzipFile(fileobj=raw, mode="rb") if path.name.lower().endswith(".gz") else raw
        field = self.text_field
        with raw, lines:
            number = 0
            while True:
                try:
                    line = lines.readline()
                except (OSError, EOFError, zlib.error) as e:
                    raise DataError(f"--data {path}: not a readable gzip file ({e}); check the file") from None
                if not line:
                    return
                number += 1
                if not line.strip():
                    continue  # a blank line holds no document
                where = f"--data {path}: line {number}"
                try:
                    obj = json.loads(line)
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not UTF-8 text (byte {e.start} of the line); "
                                    "convert the file to UTF-8") from None
                except ValueError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.pos + 1}); "
                                    "fix or remove that line") from None
                if not isinstance(obj, dict) or field not in obj:
                    raise DataError(f'{where}: no "{field}" field; name the field that holds the text '
                                    "with --text-field")
                text = obj[field]
                if not isinstance(text, str):
                    raise DataError(f'{where}: the "{field}" field is {type(text).__name__}, not text; '
                                    "name the field that holds the text with --text-field")
                yield text, True


def read_documents(path: str | None, text_field: str = "text") -> list[str]:
    """The documents of `path` as a list (see `open_source`): for small corpora
    and tests; preparation streams them instead (`DocumentReader`)."""
    docs: list[str] = []
    run = ""
    for text, end in DocumentReader(open_source(path), text_field, cut=False):
        run += text
        if end:
            docs.append(run)
            run = ""
    return docs
