"""Encoding ASCII text with plait's trained byte-level BPE, faster than `tokenizers` does.

[Note: the ASCII fast path]
Measured on this project's 2-core machine, Hugging Face's byte-level BPE encodes Python
source at about 1 MB/s on both cores, and its pre-tokenizer (the GPT-2 regular
expression, run by Oniguruma) takes most of that. For ASCII text the same split is
a simple pattern that Python's `re` runs at over 10 MB/s, and BPE works on each
pre-token alone, so the ids of a text are the ids of its pre-tokens, in order:
- split with `_ASCII_PATTERN`, GPT-2's pattern with its Unicode classes written out
  for ASCII (\\p{L} is [A-Za-z], \\p{N} is [0-9], \\s is [ \\t\\n\\v\\f\\r]); on ASCII text
  it matches exactly what the original matches;
- look each pre-token up in a bounded cache, encoding the ones not in it with the
  tokenizer itself (`encode_batch_fast`: a pre-token alone splits to itself);
- join the cached ids.
Text that is not pure ASCII, and every tokenizer but plait's own trained BPE (whose
pipeline is known: no normaliser, `ByteLevel(add_prefix_space=False)`), goes through
`tokenizers` as it is. tests/data/test_fast_bpe.py checks the two give the same ids.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import pre_tokenizers

from plait.data.workers import fork_pool

_WS = r" \t\n\x0b\x0c\r"
_ASCII_PATTERN = re.compile(
    rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+""")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
# A cut falls after a character that is not white space (Python's \S is narrower than
# Unicode's) and before an ASCII space, tab or line break.
_CUT = re.compile(r"\S(?=[ \t\n\r])")
LEARN_CHUNK = 8192
CACHE_WORDS = 1 << 17  # ~130 K pre-tokens, about 25 MB (measured: 47 MB for 250 K); emptied when full


def is_plain_byte_level(hf: HFTokenizer) -> bool:
    """Whether `hf` has the pipeline the fast path reproduces (plait's trained BPE)."""
    obj = json.loads(hf.to_str())
    pre = obj.get("pre_tokenizer") or {}
    return (obj.get("normalizer") is None and obj.get("model", {}).get("type") == "BPE"
            and pre.get("type") == "ByteLevel" and pre.get("add_prefix_space") is False
            and pre.get("use_regex", True) is True)


class AsciiEncoder:
    """Encodes texts as `hf.encode(text, add_special_tokens=False)` does, ASCII stretches
    on the fast path (see the note). `eot`: the tokenizer's one special token."""

    def __init__(self, hf: HFTokenizer, eot: str, eot_id: int):
        self.hf, self.eot = hf, eot
        self._eot = np.array([eot_id], dtype=np.uint32)
        self._cache: dict[str, bytes] = {}  # pre-token -> its ids, as the bytes of a uint32 array

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """The ids (uint32) of each text; the stretches that are not ASCII go to `tokenizers` in one batch."""
        plans: list[list] = []  # per text, its parts in order: the EOT array, a str (slow), an int (words)
        slow: list[str] = []
        words: list[list[str]] = []  # the pre-tokens of each ASCII stretch
        for text in texts:
            parts: list = []
            # Special tokens are split out before pre-tokenizing, so each side stands alone.
            for k, piece in enumerate(text.split(self.eot)):
                if k:
                    parts.append(self._eot)
                for segment, ascii_only in ascii_segments(piece):
                    if ascii_only:
                        parts.append(len(words))
                        words.append(_ASCII_PATTERN.findall(segment))
                    else:
                        parts.append(segment)
                        slow.append(segment)
            plans.append(parts)
        joined = self._join(words)
        done = iter([np.asarray(e.ids, dtype=np.uint32)
                     for e in self.hf.encode_batch_fast(slow, add_special_tokens=False)])
        out = []
        for parts in plans:
            arrays = [np.frombuffer(joined[p], dtype=np.uint32) if isinstance(p, int)
                      else next(done) if isinstance(p, str) else p for p in parts]
            out.append(np.concatenate(arrays) if arrays else np.empty(0, dtype=np.uint32))
        return out

    def _join(self, words: list[list[str]]) -> list[bytes]:
        """The ids of each list of pre-tokens, as the bytes of a uint32 array.

        Joined from the cache straight away; only the lists with a pre-token not in it
        (few, once the cache is warm) are looked at word by word, and those words learnt.
        """
        get = self._cache.__getitem__
        joined: list = []
        missed = []
        for i, ws in enumerate(words):
            try:
                joined.append(b"".join(map(get, ws)))
            except KeyError:
                joined.append(None)
                missed.append(i)
        if missed:
            self._learn(set().union(*(words[i] for i in missed)))
            get = self._cache.__getitem__  # the same dict: `_learn` empties it, never replaces it
            for i in missed:
                joined[i] = b"".join(map(get, words[i]))
        return joined

    def _learn(self, words: set[str]) -> None:
        """Put every word of `words` in the cache, encoding those not there yet in one batch."""
        cache = self._cache
        missing = list(words.difference(cache))
        if not missing:
            return
        if len(cache) + len(missing) > CACHE_WORDS:
            cache.clear()
            missing = list(words)
        # A pre-token alone pre-tokenizes to itself, so encoding the words as one pre-split
        # text gives each its BPE, and `word_ids` says which ids are whose. One Encoding per
        # chunk, not one per word: tokenizers' Encodings cost some 30 us each to make and
        # about a kilobyte each until dropped.
        for start in range(0, len(missing), LEARN_CHUNK):
            chunk = missing[start:start + LEARN_CHUNK]
            enc = self.hf.encode(chunk, is_pretokenized=True, add_special_tokens=False)
            ids = np.asarray(enc.ids, dtype=np.uint32)
            # Every word has at least one id: a word's ids end where the word index changes.
            ends = np.append(np.flatnonzero(np.diff(np.asarray(enc.word_ids, dtype=np.int64))) + 1, len(ids))
            begin = 0
            for word, end in zip(chunk, ends.tolist()):
                cache[word] = ids[begin:end].tobytes()
                begin = end


def ascii_segments(text: str):
    """(segment, is ASCII) of `text` in order, cut only where the tokens cannot change
    ([Note: cutting text without changing its tokens]): each stretch around non-ASCII
    characters, from the cut before it to the cut after it, is one segment."""
    if text.isascii():
        if text:
            yield text, True
        return
    pos, n = 0, len(text)
    while pos < n:
        m = _NON_ASCII.search(text, pos)
        if m is None:
            yield text[pos:], True
            return
        start = pos
        for cut in _CUT.finditer(text, max(pos, m.start() - 4096), m.start() + 1):
            start = cut.end()
        after = _CUT.search(text, m.start())
        end = after.end() if after else n
        if start > pos:
            yield text[pos:start], True
        yield text[start:end], False
        pos = end


# [Note: training on words split here]
# BpeTrainer keeps nothing of its texts but the count of each pre-token, and finding them
# (GPT-2's pattern run by Oniguruma) is about half of a training's CPU. So they are found
# and counted here, in worker processes for a large corpus: an ASCII stretch's pre-tokens
# by `_ASCII_PATTERN`, the rest's by tokenizers' own pre-tokenizer. The trainer is then
# given each distinct pre-token in its byte-level form (which has no white space: the
# byte-level alphabet maps spaces and controls to letters), repeated as often as it occurs
# and separated by spaces, and splits only at white space. The same counts give the same
# merges, so the BPE is the one training on the raw text gives (tests/data/test_tokenizer.py).
# Measured on 8 MB of Python source on the 2-core machine while other jobs ran: 1.0 to 1.6 s
# of CPU counting and 2.1 s in the trainer, against 4.2 s in the trainer on the raw text.
# (Handing over the split text instead of the counts cost 1 s more: every character translated.)
_GPT2_SPLIT = pre_tokenizers.ByteLevel(add_prefix_space=False)
TRAIN_CHUNK_CHARS = 1 << 16  # per text handed to the trainer: enough texts for its threads
COUNT_GROUP_CHARS = 1 << 20  # per task of a counting worker


def _byte_level_table() -> dict[int, str]:
    """str.translate's table: each ASCII character to its byte-level form, as tokenizers maps it."""
    plain = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    table = {c: plain.pre_tokenize_str(chr(c))[0][0] for c in range(128)}
    return {c: m for c, m in table.items() if m != chr(c)}


_TO_BYTE_LEVEL = _byte_level_table()


def pretoken_counts(texts: Iterable[str], workers: int = 1) -> Counter:
    """How often each GPT-2 pre-token of the texts occurs, by its byte-level form (see the
    note); counted in `workers` forked processes when more than one."""
    if workers <= 1:
        return _count(texts)
    # Read here, not by the pool's feeder thread: an error in the text (not UTF-8, say) is
    # raised as it is. The sample is bounded, and a pool reads its tasks all ahead anyway.
    groups = list(_groups(texts))
    total: Counter = Counter()
    with fork_pool(workers) as pool:
        for part in pool.imap_unordered(_count, groups):
            total.update(part)
    return total


def _groups(texts: Iterable[str]) -> Iterator[list[str]]:
    group, size = [], 0
    for text in texts:
        group.append(text)
        size += len(text)
        if size >= COUNT_GROUP_CHARS:
            yield group
            group, size = [], 0
    if group:
        yield group


def _count(texts: Iterable[str]) -> Counter:
    ascii_counts: Counter = Counter()
    counts: Counter = Counter()
    for text in texts:
        for segment, ascii_only in ascii_segments(text):
            if ascii_only:
                ascii_counts.update(_ASCII_PATTERN.findall(segment))
            else:
                counts.update(word for word, _ in _GPT2_SPLIT.pre_tokenize_str(segment))
    for word, n in ascii_counts.items():
        counts[word.translate(_TO_BYTE_LEVEL)] += n
    return counts


def training_texts(counts: Counter) -> Iterator[str]:
    """Texts for a trainer that splits at white space with these pre-token counts: each
    pre-token, as often as it occurs (see the note)."""
    chunk, size = [], 0
    for word, n in counts.items():
        chunk.append((word + " ") * n)
        size += (len(word) + 1) * n
        if size >= TRAIN_CHUNK_CHARS:
            yield "".join(chunk)
            chunk, size = [], 0
    if chunk:
        yield "".join(chunk)
