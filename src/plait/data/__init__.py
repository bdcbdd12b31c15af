"""Text in, token batches out: tokenizers, corpus preparation into shards, batch sampling."""

from plait.data.batches import batch_offsets, get_batch
from plait.data.corpus import (PreparedData, check_length, is_prepared, load_prepared, prepare, prepare_to)
from plait.data.fingerprint import fingerprint
from plait.data.preparation import PrepareOptions
from plait.data.shards import Tokens
from plait.data.sources import default_corpus, read_documents
from plait.data.tokenizer import EOT, Tokenizer, byte_tokenizer, tokenizer_file, train_bpe

__all__ = [
    "EOT",
    "PrepareOptions",
    "PreparedData",
    "Tokenizer",
    "Tokens",
    "batch_offsets",
    "byte_tokenizer",
    "check_length",
    "default_corpus",
    "fingerprint",
    "get_batch",
    "is_prepared",
    "load_prepared",
    "prepare",
    "prepare_to",
    "read_documents",
    "tokenizer_file",
    "train_bpe",
]
