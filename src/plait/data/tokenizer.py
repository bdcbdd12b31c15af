"""Tokenizers: a GPT-2 style byte-level BPE trained on the corpus, or raw bytes.

Both map any string to ids and back without loss, and both know the document
separator `EOT`. A literal `EOT` inside text encodes to `eot_id` in both, so
the two kinds agree on what a document boundary is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from plait.errors import ConfigError, DataError

EOT = "<|endoftext|>"

# Bumped when the saved JSON layout changes, so old files fail loudly.
_FORMAT = 1
_BYTE_VOCAB = 257


class Tokenizer:
    """A text <-> ids mapping of kind "bpe" (Hugging Face byte-level BPE) or "byte".

    Build one with `train_bpe`, `byte_tokenizer` or `Tokenizer.load`.
    """

    def __init__(self, kind: str, hf: HFTokenizer | None = None):
        if kind == "bpe":
            if hf is None:
                raise ValueError("a bpe Tokenizer needs its Hugging Face tokenizer")
            eot_id = hf.token_to_id(EOT)
            if eot_id is None:
                raise ValueError(f"the bpe tokenizer has no {EOT} token")
            self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
            self.eot_id = eot_id
        elif kind == "byte":
            self.vocab_size = _BYTE_VOCAB
            self.eot_id = 256
        else:
            raise ValueError(f"unknown tokenizer kind {kind!r}; use 'bpe' or 'byte'")
        self.kind = kind
        self._hf = hf

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
        if obj.get("kind") == "bpe":
            return cls("bpe", HFTokenizer.from_str(json.dumps(obj["huggingface"])))
        if obj.get("kind") == "byte":
            return cls("byte")
        raise DataError(f"{path} has unknown tokenizer kind {obj.get('kind')!r}; expected 'bpe' or 'byte'")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (as GPT-2's) with `vocab_size` tokens, EOT included.

    The result is the same for the same texts and vocab_size. It can be smaller
    than asked when the texts run out of pairs to merge.
    """
    if vocab_size < _BYTE_VOCAB:
        raise ConfigError(
            f"--vocab-size {vocab_size} is too small for byte-level BPE; use at least {_BYTE_VOCAB}"
        )
    hf = HFTokenizer(models.BPE())
    # No prefix space: it would add a space the decoder keeps, breaking round trips.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer("bpe", hf)


def byte_tokenizer() -> Tokenizer:
    """The byte tokenizer: ids 0..255 are UTF-8 bytes, 256 is EOT (vocab_size 257)."""
    return Tokenizer("byte")
