"""A real text corpus present on every machine: the Python standard library.

The corpus is the ``.py`` source of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``), without site-packages, the test suites
(any ``test/``, ``tests/`` or ``idle_test/`` directory) and files larger than
200 kB. Files are split into ``"train"`` and ``"heldout"`` by a stable hash of
their path relative to the stdlib root, so a file lands in the same split on
every machine and every Python version that ships it. Files generated from
one template can land on both sides (``near_copies``: a fifth of the held-out
bytes on Python 3.11 are codec tables nearly all of whose lines are in
training), so absolute held-out perplexities are optimistic; comparisons
between formats on the split are not affected.

A byte-level BPE tokenizer (Radford et al., 2019, "Language Models are
Unsupervised Multitask Learners"; trained with Hugging Face ``tokenizers``) is
fitted on the training split only. The tokenizer and the tokenized splits
(``uint16`` ``.npy``) are cached under ``$LOWBIT_JAX_CACHE`` (default
``~/.cache/lowbit_jax``) in a directory keyed by a hash of the file list and
contents, the Python version and the vocabulary size.

Token streams are documents joined as ``[EOS] doc_1 [EOS] doc_2 ...``: every
token of every document has a predecessor, so a language model scored on the
whole stream scores every byte of the split, and ``num_bytes(split)`` is the
denominator of bits per byte.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pathlib
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lowbit_jax import _io

SPLITS = ("train", "heldout")
EOS = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 8192
DEFAULT_HELDOUT_FRACTION = 0.05
MAX_FILE_BYTES = 200_000
_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages",
                            "dist-packages", "__pycache__"})
_CACHE_FORMAT = 1  # bump when the cached artefacts change meaning


@dataclasses.dataclass(frozen=True)
class Document:
  """One source file of the corpus.

  Attributes:
    path: path relative to the stdlib root, with ``/`` separators.
    text: the file's contents, decoded as UTF-8.
  """
  path: str
  text: str


def stdlib_root() -> pathlib.Path:
  """Returns the running interpreter's standard library directory."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def cache_root() -> pathlib.Path:
  """Returns the cache directory: ``$LOWBIT_JAX_CACHE`` or ``~/.cache/lowbit_jax``."""
  env = os.environ.get("LOWBIT_JAX_CACHE")
  if env:
    return pathlib.Path(env).expanduser()
  return pathlib.Path.home() / ".cache" / "lowbit_jax"


def list_files(root: str | os.PathLike[str] | None = None,
               max_bytes: int = MAX_FILE_BYTES) -> list[str]:
  """Lists the corpus files, sorted, as paths relative to ``root``.

  Args:
    root: the stdlib directory; defaults to ``stdlib_root()``.
    max_bytes: files larger than this many bytes are left out.

  Returns:
    Sorted relative POSIX paths of the ``.py`` files that are not under a
    ``test``, ``tests``, ``idle_test``, ``site-packages``, ``dist-packages`` or
    ``__pycache__`` directory and are at most ``max_bytes`` long.

  Raises:
    ValueError: if ``root`` is not a directory or holds no such file.
  """
  root_path = pathlib.Path(root) if root is not None else stdlib_root()
  if not root_path.is_dir():
    raise ValueError(f"stdlib root {str(root_path)!r} is not a directory; pass the "
                     "directory that holds the standard library's .py files.")
  found = []
  for dirpath, dirnames, filenames in os.walk(root_path):
    dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
    for name in filenames:
      if not name.endswith(".py"):
        continue
      full = pathlib.Path(dirpath) / name
      if not full.is_file() or full.stat().st_size > max_bytes:
        continue
      found.append(full.relative_to(root_path).as_posix())
  if not found:
    raise ValueError(f"no .py files found under {str(root_path)!r}.")
  return sorted(found)


def split_of(path: str, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> str:
  """Returns ``"heldout"`` or ``"train"`` for a corpus path, by a stable hash.

  Args:
    path: path relative to the stdlib root, with ``/`` separators.
    heldout_fraction: the expected fraction of files held out, in (0, 1).

  Returns:
    The split name. It depends only on ``path`` and ``heldout_fraction``
    (SHA-256 of the UTF-8 path), never on the machine or Python version.

  Raises:
    ValueError: if ``heldout_fraction`` is not in (0, 1).
  """
  if not 0.0 < heldout_fraction < 1.0:
    raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}.")
  digest = hashlib.sha256(path.encode("utf-8")).digest()
  u = int.from_bytes(digest[:8], "big") / 2.0**64
  return "heldout" if u < heldout_fraction else "train"


def near_copies(threshold: float = 0.95, *,
                root: str | os.PathLike[str] | None = None,
                heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
                ) -> list[tuple[str, float, int]]:
  """Held-out files that are near-copies of training files, by their lines.

  The split hashes paths, so files generated from one template can land on
  both sides: the charmap codec tables in ``encodings/`` (``cp858.py`` is
  ``cp850.py`` with one character changed) are the stdlib's. A language
  model has seen nearly all of such a file in training, so the held-out
  perplexity is lower than on truly unseen text. Comparisons between
  quantization formats on this one split are unaffected (every format is
  scored on the same files); absolute perplexities are optimistic. On
  Python 3.11's stdlib this lists 4 files (cp858, cp865, iso8859_6,
  mac_iceland), 92,964 of the 467,598 held-out bytes (19.9%);
  ``python -c "from lowbit_jax.data import stdlib_corpus as c;
  print(c.near_copies())"`` lists them for the running interpreter.

  Args:
    threshold: the fraction of a held-out file's distinct non-blank lines
      that must occur in the training split.
    root, heldout_fraction: as for ``load_corpus``.

  Returns:
    ``[(path, fraction of its lines found in training, UTF-8 bytes)]``,
    sorted by path.
  """
  if not 0.0 < threshold <= 1.0:
    raise ValueError(f"threshold must be in (0, 1], got {threshold}.")
  train = set()
  for d in load_corpus("train", root=root, heldout_fraction=heldout_fraction):
    train.update(line.strip() for line in d.text.splitlines())
  out = []
  for d in load_corpus("heldout", root=root, heldout_fraction=heldout_fraction):
    lines = {line.strip() for line in d.text.splitlines()} - {""}
    if lines:
      frac = sum(line in train for line in lines) / len(lines)
      if frac >= threshold:
        out.append((d.path, frac, len(d.text.encode("utf-8"))))
  return out


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")


def load_corpus(split: str, *, root: str | os.PathLike[str] | None = None,
                heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
                ) -> list[Document]:
  """Loads one split of the stdlib corpus.

  Args:
    split: ``"train"`` or ``"heldout"``.
    root: the stdlib directory; defaults to ``stdlib_root()``.
    heldout_fraction: fraction of files held out (see ``split_of``).

  Returns:
    The split's documents, sorted by path. Files that are not valid UTF-8 are
    skipped (the stdlib has none; a patched one might).

  Raises:
    ValueError: for an unknown split name or a bad root.
  """
  _check_split(split)
  root_path = pathlib.Path(root) if root is not None else stdlib_root()
  docs = []
  for rel in list_files(root_path):
    if split_of(rel, heldout_fraction) != split:
      continue
    try:
      text = (root_path / rel).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
      continue
    docs.append(Document(rel, text))
  return docs


def num_bytes(docs: Sequence[Document]) -> int:
  """Returns the UTF-8 byte count of the documents' text (the bits/byte denominator).

  Args:
    docs: documents, e.g. ``load_corpus("heldout")``.

  Returns:
    The total number of bytes. The EOS separators count zero bytes.
  """
  return sum(len(d.text.encode("utf-8")) for d in docs)


def train_tokenizer(texts: Iterable[str],
                    vocab_size: int = DEFAULT_VOCAB_SIZE) -> tokenizers.Tokenizer:
  """Trains a byte-level BPE tokenizer (deterministic for fixed input).

  Args:
    texts: training documents (iterated once, in order).
    vocab_size: total vocabulary size, including the 256 byte tokens and the
      ``<|endoftext|>`` special token (id 0). At most 65536, so ids fit uint16.

  Returns:
    A ``tokenizers.Tokenizer`` whose ``decode(encode(s).ids)`` is ``s`` for any
    string ``s``.

  Raises:
    ValueError: if ``vocab_size`` is not in [258, 65536].
  """
  if not 258 <= vocab_size <= 65536:
    raise ValueError(f"vocab_size must be in [258, 65536] (256 bytes + EOS + at "
                     f"least one merge, ids must fit uint16), got {vocab_size}.")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                               use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      min_frequency=2,
      special_tokens=[EOS],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  # The text "<|endoftext|>" is bytes like any other, not the EOS token: a
  # literal in a document must neither end it nor drop its bytes from the
  # bits-per-byte count. (The flag is not saved in tokenizer.json, so
  # get_tokenizer and encode_documents set it too.)
  tok.encode_special_tokens = True
  return tok


def token_byte_lengths(tokenizer: tokenizers.Tokenizer) -> np.ndarray:
  """Returns how many text bytes each token id stands for (special tokens: 0).

  In a byte-level BPE vocabulary every character of a token's string stands
  for exactly one byte, so ``token_byte_lengths(tok)[stream].sum()`` is the
  exact UTF-8 size of the text a token stream encodes.

  Args:
    tokenizer: a byte-level BPE tokenizer (as built by ``train_tokenizer``).

  Returns:
    ``int64 [vocab_size]``.

  Raises:
    ValueError: if a non-special token is not made of byte-level characters.
  """
  alphabet = set(pre_tokenizers.ByteLevel.alphabet())
  special = {t.content for t in tokenizer.get_added_tokens_decoder().values()
             if t.special}
  lengths = np.zeros(tokenizer.get_vocab_size(), np.int64)
  for token, idx in tokenizer.get_vocab().items():
    if token in special:
      continue
    if not set(token) <= alphabet:
      raise ValueError(f"token {token!r} is not byte-level; token_byte_lengths "
                       "needs a byte-level BPE tokenizer (train_tokenizer).")
    lengths[idx] = len(token)
  return lengths


def corpus_key(vocab_size: int, *, root: str | os.PathLike[str] | None = None,
               heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> str:
  """Returns the cache key of the corpus: files, contents, Python version, vocab.

  Args:
    vocab_size: the tokenizer's vocabulary size.
    root: the stdlib directory; defaults to ``stdlib_root()``.
    heldout_fraction: fraction of files held out.

  Returns:
    A 16-hex-digit key.
  """
  root_path = pathlib.Path(root) if root is not None else stdlib_root()
  h = hashlib.sha256()
  h.update(json.dumps({
      "format": _CACHE_FORMAT,
      "python": "%d.%d.%d" % sys.version_info[:3],
      "vocab_size": vocab_size,
      "heldout_fraction": heldout_fraction,
  }, sort_keys=True).encode())
  for rel in list_files(root_path):
    h.update(rel.encode("utf-8") + b"\0")
    h.update(hashlib.sha256((root_path / rel).read_bytes()).digest())
  return h.hexdigest()[:16]


def _atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  _io.write_atomic(path, data)


def corpus_dir(vocab_size: int = DEFAULT_VOCAB_SIZE, *,
               cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path:
  """Returns the cache directory for this interpreter's corpus at ``vocab_size``."""
  base = pathlib.Path(cache_dir) if cache_dir is not None else cache_root()
  return base / f"stdlib_{corpus_key(vocab_size)}"


def get_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, *,
                  cache_dir: str | os.PathLike[str] | None = None
                  ) -> tokenizers.Tokenizer:
  """Returns the corpus tokenizer, training it on the train split if not cached.

  Args:
    vocab_size: vocabulary size (see ``train_tokenizer``).
    cache_dir: cache base directory; defaults to ``cache_root()``.

  Returns:
    The tokenizer, trained on ``load_corpus("train")`` texts only.
  """
  path = corpus_dir(vocab_size, cache_dir=cache_dir) / "tokenizer.json"
  if path.exists():
    tok = tokenizers.Tokenizer.from_file(str(path))
    tok.encode_special_tokens = True
    return tok
  tok = train_tokenizer((d.text for d in load_corpus("train")), vocab_size)
  _atomic_write_bytes(path, tok.to_str().encode("utf-8"))
  return tok


def encode_documents(docs: Sequence[Document],
                     tokenizer: tokenizers.Tokenizer) -> np.ndarray:
  """Tokenizes documents into one stream ``[EOS] doc_1 [EOS] doc_2 ...``.

  Args:
    docs: the documents, in order.
    tokenizer: a tokenizer with an ``<|endoftext|>`` token and ids < 65536.

  Returns:
    A ``uint16`` array of token ids.

  Raises:
    ValueError: if the tokenizer has no ``<|endoftext|>`` token or ids do not
      fit in uint16.
  """
  eos = tokenizer.token_to_id(EOS)
  if eos is None:
    raise ValueError(f"the tokenizer has no {EOS!r} token; build it with "
                     "train_tokenizer().")
  if tokenizer.get_vocab_size() > 65536:
    raise ValueError("token ids must fit uint16: vocabulary size must be <= 65536, "
                     f"got {tokenizer.get_vocab_size()}.")
  flag = tokenizer.encode_special_tokens
  tokenizer.encode_special_tokens = True   # "<|endoftext|>" in a text is text
  try:
    encodings = tokenizer.encode_batch([d.text for d in docs],
                                       add_special_tokens=False)
  finally:
    tokenizer.encode_special_tokens = flag
  parts = []
  for enc in encodings:
    parts.append(np.asarray([eos], np.uint16))
    parts.append(np.asarray(enc.ids, np.uint16))
  if not parts:
    return np.zeros((0,), np.uint16)
  return np.concatenate(parts)


def token_stream(split: str, tokenizer: tokenizers.Tokenizer, *,
                 cache_dir: str | os.PathLike[str] | None = None) -> np.ndarray:
  """Returns the tokenized split, from the cache or computed and cached.

  Args:
    split: ``"train"`` or ``"heldout"``.
    tokenizer: the tokenizer (normally ``get_tokenizer(...)``). The cache entry
      is keyed by the corpus key and a hash of the tokenizer itself.
    cache_dir: cache base directory; defaults to ``cache_root()``.

  Returns:
    A ``uint16`` array ``[EOS] doc_1 [EOS] doc_2 ...`` over the split's
    documents in path order.

  Raises:
    ValueError: for an unknown split name.
  """
  _check_split(split)
  tok_hash = hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()[:12]
  path = (corpus_dir(tokenizer.get_vocab_size(), cache_dir=cache_dir) /
          f"tokens_{split}_{tok_hash}.npy")
  if path.exists():
    return np.load(path)
  docs = load_corpus(split)
  tokens = encode_documents(docs, tokenizer)
  buf = io.BytesIO()
  np.save(buf, tokens)
  _atomic_write_bytes(path, buf.getvalue())
  meta = path.with_suffix(".json")
  _atomic_write_bytes(meta, json.dumps({
      "split": split, "num_docs": len(docs), "num_tokens": int(tokens.size),
      "num_bytes": num_bytes(docs)}, indent=1).encode())
  return tokens


def split_num_bytes(split: str) -> int:
  """Returns the UTF-8 byte count of a split's text (bits-per-byte denominator).

  Args:
    split: ``"train"`` or ``"heldout"``.

  Returns:
    ``num_bytes(load_corpus(split))``.
  """
  return num_bytes(load_corpus(split))


def batch_at(tokens: np.ndarray, step: int, batch: int, seq_len: int,
             seed: int) -> np.ndarray:
  """Returns the training batch of one step: ``batch`` random windows.

  The windows depend only on ``(tokens, step, batch, seq_len, seed)``, so a run
  resumed at ``step`` sees exactly the batches an uninterrupted run would.

  Args:
    tokens: 1-D token stream.
    step: the training step (>= 0).
    batch: number of windows.
    seq_len: model sequence length ``T``; each window holds ``T + 1`` tokens
      (inputs are ``[:, :-1]``, targets ``[:, 1:]``).
    seed: data seed.

  Returns:
    ``int32 [batch, seq_len + 1]``.

  Raises:
    ValueError: if the stream is shorter than one window or sizes are bad.
  """
  if tokens.ndim != 1:
    raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}.")
  if batch < 1 or seq_len < 1:
    raise ValueError(f"batch and seq_len must be >= 1, got {batch}, {seq_len}.")
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}.")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be an int >= 0, got {seed!r}.")
  n_starts = tokens.size - seq_len
  if n_starts < 1:
    raise ValueError(f"the stream has {tokens.size} tokens, fewer than one window "
                     f"of seq_len + 1 = {seq_len + 1}; use a shorter seq_len.")
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, n_starts, size=batch)
  idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
  return tokens[idx].astype(np.int32)


def batches(tokens: np.ndarray, batch: int, seq_len: int, seed: int, *,
            start_step: int = 0) -> Iterator[np.ndarray]:
  """Returns an endless iterator of batches ``batch_at(tokens, s, ...)``, s >= start_step.

  Args:
    tokens: 1-D token stream.
    batch: windows per batch.
    seq_len: model sequence length; windows hold ``seq_len + 1`` tokens.
    seed: data seed.
    start_step: the first step (to resume a run).

  Returns:
    An iterator of ``int32 [batch, seq_len + 1]`` arrays.

  Raises:
    ValueError: as ``batch_at`` (checked at once, not at the first ``next``).
  """
  batch_at(tokens, start_step, batch, seq_len, seed)  # validate before next()

  def generate() -> Iterator[np.ndarray]:
    step = start_step
    while True:
      yield batch_at(tokens, step, batch, seq_len, seed)
      step += 1

  return generate()
