"""Text in, token batches out: tokenizers, corpus preparation, batch sampling."""

from plait.data.batches import batch_offsets, get_batch
from plait.data.corpus import PreparedData, check_length, default_corpus, prepare, read_documents
from plait.data.tokenizer import EOT, Tokenizer, byte_tokenizer, train_bpe

__all__ = [
    "EOT",
    "PreparedData",
    "Tokenizer",
    "batch_offsets",
    "byte_tokenizer",
    "check_length",
    "default_corpus",
    "get_batch",
    "prepare",
    "read_documents",
    "train_bpe",
]
