"""Shared pieces of the training tests: a tiny model and synthetic token data."""
import numpy as np
import tokenizers

from lowbit_jax.models.llama import LlamaConfig
from lowbit_jax.train import LMData

VOCAB = 256


def tiny_config(**changes) -> LlamaConfig:
  """A one-block Llama whose every sharded dim divides by 8."""
  return LlamaConfig.smoke(**{**dict(vocab=VOCAB, d_model=32, n_layers=1, n_heads=4,
                                     n_kv_heads=2, d_ff=64, max_len=32), **changes})


def synthetic_data(n_train: int = 20000, n_heldout: int = 600, seed: int = 0
                   ) -> LMData:
  """Token streams with some structure (a noisy bigram chain), no corpus needed."""
  rng = np.random.default_rng(seed)
  nxt = rng.integers(0, VOCAB, size=VOCAB)

  def stream(n):
    out = np.empty(n, np.int64)
    out[0] = 0
    noise = rng.random(n) < 0.3
    rand = rng.integers(0, VOCAB, size=n)
    for i in range(1, n):
      out[i] = rand[i] if noise[i] else nxt[out[i - 1]]
    return out.astype(np.uint16)

  vocab = {f"t{i}": i for i in range(VOCAB)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
  return LMData(tokenizer=tok, train_tokens=stream(n_train),
                heldout_tokens=stream(n_heldout),
                token_bytes=np.ones(VOCAB, np.int64))


def batches(data: LMData, n: int, batch: int = 8, seq_len: int = 16, seed: int = 0):
  """The first ``n`` training batches ``int32 [batch, seq_len + 1]``."""
  from lowbit_jax.data import stdlib_corpus
  return [stdlib_corpus.batch_at(data.train_tokens, s, batch, seq_len, seed)
          for s in range(n)]
