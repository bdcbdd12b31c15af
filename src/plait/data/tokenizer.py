"""Tokenizers: a GPT-2 style byte-level BPE trained on the corpus, raw bytes, or
any Hugging Face `tokenizers` file.

All map strings to ids and back, and all know a document separator: `EOT` for
the trained BPE and the byte tokenizer (a literal `EOT` inside text encodes to
`eot_id` in both, so they agree on what a document boundary is), the file's
own end-of-text token for a tokenizer file (`EOT_NAMES`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from plait.data.fast_bpe import AsciiEncoder, is_plain_byte_level, pretoken_counts, training_texts
from plait.errors import ConfigError, DataError

EOT = "<|endoftext|>"

# Bumped when the saved JSON layout changes, so old files fail loudly.
_FORMAT = 1
_BYTE_VOCAB = 257
# The end-of-text token of a tokenizer file: the first of these its vocabulary has.
EOT_NAMES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")


class Tokenizer:
    """A text <-> ids mapping of kind "bpe" (byte-level BPE trained here), "byte",
    or "file" (a Hugging Face tokenizer file given by the user).

    Build one with `train_bpe`, `byte_tokenizer`, `tokenizer_file` or `Tokenizer.load`.
    """

    def __init__(self, kind: str, hf: HFTokenizer | None = None, eot: str = EOT):
        if kind in ("bpe", "file"):
            if hf is None:
                raise ValueError(f"a {kind} Tokenizer needs its Hugging Face tokenizer")
            eot_id = hf.token_to_id(eot)
            if eot_id is None:
                raise ValueError(f"the {kind} tokenizer has no {eot} token")
            # The largest id + 1, not the count: a file's vocabulary may have holes.
            self.vocab_size = max(hf.get_vocab(with_added_tokens=True).values()) + 1
            self.eot_id = eot_id
        elif kind == "byte":
            self.vocab_size = _BYTE_VOCAB
            self.eot_id = 256
        else:
            raise ValueError(f"unknown tokenizer kind {kind!r}; use 'bpe', 'byte' or 'file'")
        self.kind = kind
        self.eot = eot
        self._hf = hf
        self._ascii: AsciiEncoder | bool | None = None  # made on the first encode_batch

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        """Return the token ids of `text`; a literal EOT becomes `eot_id`."""
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False).ids
        ids: list[int] = []
        for i, part in enumerate(text.split(EOT)):
            if i:
                ids.append(self.eot_id)
            ids.extend(part.encode("utf-8"))
        return ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """The ids of each text, as `encode` gives them, computed on all cores.

        Hugging Face's batch encoding runs its texts in parallel in Rust
        threads; the byte tokenizer needs no parallelism (it is a memcpy).
        """
        if self._hf is not None:
            if self.kind == "bpe":  # [Note: the ASCII fast path]
                if self._ascii is None:
                    plain = is_plain_byte_level(self._hf)
                    self._ascii = AsciiEncoder(self._hf, self.eot, self.eot_id) if plain else False
                if self._ascii:
                    return self._ascii.encode_batch(texts)
            # The "fast" variant skips the character offsets, which nothing here uses.
            return [np.asarray(e.ids, dtype=np.uint32)
                    for e in self._hf.encode_batch_fast(texts, add_special_tokens=False)]
        out = []
        for text in texts:
            parts = [np.frombuffer(p.encode("utf-8"), dtype=np.uint8) for p in text.split(EOT)]
            ids = np.empty(sum(map(len, parts)) + len(parts) - 1, dtype=np.uint32)
            pos = 0
            for i, part in enumerate(parts):
                if i:
                    ids[pos] = self.eot_id
                    pos += 1
                ids[pos:pos + len(part)] = part
                pos += len(part)
            out.append(ids)
        return out

    def decode(self, ids: list[int]) -> str:
        """Return the text of `ids`; invalid UTF-8 (say, from sampling) becomes U+FFFD."""
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=False)
        parts, run = [], bytearray()
        for i in ids:
            if i == self.eot_id:
                parts.append(run.decode("utf-8", errors="replace"))
                parts.append(EOT)
                run = bytearray()
            elif 0 <= i < 256:
                run.append(i)
            else:
                raise ValueError(f"token id {i} is outside the byte vocabulary 0..256")
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def save(self, path) -> None:
        """Write the tokenizer to one JSON file that `Tokenizer.load` reads back."""
        obj = {"plait_tokenizer": _FORMAT, "kind": self.kind}
        if self._hf is not None:
            obj["eot"] = self.eot
            obj["huggingface"] = json.loads(self._hf.to_str())
        Path(path).write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Read a tokenizer written by `save`."""
        path = Path(path)
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"tokenizer file {path} does not exist; give the file `save` wrote") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"tokenizer file {path} is not valid JSON ({e}); give the file `save` wrote") from None
        if not isinstance(obj, dict) or obj.get("plait_tokenizer") != _FORMAT:
            raise DataError(f"{path} is not a plait tokenizer file (format {_FORMAT}); give the file `save` wrote")
        if obj.get("kind") in ("bpe", "file"):
            return cls(obj["kind"], HFTokenizer.from_str(json.dumps(obj["huggingface"])), obj.get("eot", EOT))
        if obj.get("kind") == "byte":
            return cls("byte")
        raise DataError(f"{path} has unknown tokenizer kind {obj.get('kind')!r}; expected 'bpe', 'byte' or 'file'")


def tokenizer_file(path) -> Tokenizer:
    """The tokenizer in `path`: any Hugging Face `tokenizers` file (tokenizer.json),
    or a file plait wrote (`Tokenizer.save`, e.g. a prepared folder's).

    Its end-of-text token is the first of `EOT_NAMES` in its vocabulary. Raises
    DataError naming the file when it cannot be read or is no tokenizer.
    """
    fix = "give the tokenizer.json of a Hugging Face tokenizer"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"--tokenizer {path}: not a tokenizer file (not UTF-8 text); {fix}") from None
    except OSError as e:
        raise DataError(f"--tokenizer {path}: cannot read it ({e.strerror}); {fix}") from None
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise DataError(f"--tokenizer {path}: not a tokenizer file (not JSON: {e}); {fix}") from None
    if isinstance(obj, dict) and "plait_tokenizer" in obj:
        return Tokenizer.load(path)
    try:
        hf = HFTokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"--tokenizer {path}: not a tokenizer file ({reason}); {fix}") from None
    eot = next((name for name in EOT_NAMES if hf.token_to_id(name) is not None), None)
    if eot is None:
        raise DataError(f"--tokenizer {path}: it has no end-of-text token ({', '.join(EOT_NAMES)}); "
                        f"add {EOT} to it as a special token")
    return Tokenizer("file", hf, eot)


def train_bpe(texts: Iterable[str], vocab_size: int, workers: int = 1) -> Tokenizer:
    """Train a byte-level BPE (as GPT-2's) with `vocab_size` tokens, EOT included.

    The result is the same for the same texts and vocab_size. It can be smaller
    than asked when the texts run out of pairs to merge. `workers`: processes the
    texts' pre-tokens are counted in (forked, plait/data/workers.py), when more than one.
    """
    if vocab_size < _BYTE_VOCAB:
        raise ConfigError(
            f"--vocab-size {vocab_size} is too small for byte-level BPE; use at least {_BYTE_VOCAB}"
        )
    hf = HFTokenizer(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Trained on the texts' GPT-2 pre-tokens, split here ([Note: training on words split here]).
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.train_from_iterator(training_texts(pretoken_counts(texts, workers)), trainer=trainer)
    # No prefix space: it would add a space the decoder keeps, breaking round trips.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return Tokenizer("bpe", hf)


def byte_tokenizer() -> Tokenizer:
    """The byte tokenizer: ids 0..255 are UTF-8 bytes, 256 is EOT (vocab_size 257)."""
    return Tokenizer("byte")
