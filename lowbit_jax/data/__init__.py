"""Corpora for the reference models: the Python standard library as LM text."""
from lowbit_jax.data.stdlib_corpus import (
    DEFAULT_VOCAB_SIZE,
    EOS,
    SPLITS,
    Document,
    batch_at,
    batches,
    cache_root,
    corpus_dir,
    corpus_key,
    encode_documents,
    get_tokenizer,
    list_files,
    load_corpus,
    num_bytes,
    split_num_bytes,
    split_of,
    stdlib_root,
    token_byte_lengths,
    token_stream,
    train_tokenizer,
)

__all__ = [
    "DEFAULT_VOCAB_SIZE", "EOS", "SPLITS", "Document", "batch_at", "batches",
    "cache_root", "corpus_dir", "corpus_key", "encode_documents", "get_tokenizer",
    "list_files", "load_corpus", "num_bytes", "split_num_bytes", "split_of",
    "stdlib_root", "token_byte_lengths", "token_stream", "train_tokenizer",
]
