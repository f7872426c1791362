"""Tests of the decoder's KV cache (float and quantized) and the decode loop."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit_jax import QArray, QuantRule, QuantSpec, dequantize, fake_quant
from lowbit_jax.models import decode
from lowbit_jax.models import kv_cache as kv
from lowbit_jax.models.llama import Llama, LlamaConfig

_CFG = LlamaConfig.smoke(vocab=96, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
                         max_len=32)


@pytest.fixture(scope="module")
def model_vars():
  model = Llama(_CFG)
  v = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  return model, v, jax.jit(model.apply)


def _tokens(b, t, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, _CFG.vocab)


def _rule(spec, path=".*/attn/cache/.*"):
  return [QuantRule(path, activation=spec, ops=("kv_cache",))]


_INT8 = _rule(QuantSpec("int8", axis=-1))
_FP8 = _rule(QuantSpec("fp8_e4m3", axis=-1))
_KIVI4 = kv.kivi_rules(4, group_size=4)
_T, _P = 14, 9  # tokens per row, prompt (prefilled) tokens


@pytest.mark.parametrize("rotate", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_float_cache_teacher_forced_equals_full_forward(model_vars, rotate):
  model, v, apply = model_vars
  toks = _tokens(2, _T)
  full = apply(v, toks)
  got = decode.make_teacher_forced(model, _T, 2, prompt_len=_P, rotate=rotate)(v, toks)
  np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=2e-5, rtol=1e-5)


def test_greedy_decode_is_argmax_of_full_forward_and_padding_is_exact(model_vars):
  model, v, apply = model_vars
  prompts = [[3, 17, 42, 8, 9], [11, 60]]
  toks, lens = decode.left_pad(prompts)
  n = 6
  out = decode.generate(model, v, toks, lens, n)
  again = decode.generate(model, v, toks, lens, n)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(again))
  # The reference: argmax of a full forward pass at each step, each row
  # unpadded (right-filled to a fixed length, which causality ignores).
  seqs = [list(p) for p in prompts]
  for _ in range(n):
    batch = np.zeros((2, _T), np.int32)
    for r, s in enumerate(seqs):
      batch[r, :len(s)] = s
    logits = apply(v, jnp.asarray(batch))
    for r, s in enumerate(seqs):
      s.append(int(jnp.argmax(logits[r, len(s) - 1])))
  for r, p in enumerate(prompts):
    assert list(np.asarray(out[r])) == seqs[r][len(p):], r


def test_sample_token_temperature_top_k_and_keys():
  logits = jnp.asarray([[0.0, 3.0, 1.0, 2.9, -1.0]] * 4000)
  sample = jax.jit(decode.sample_token, static_argnums=(2, 3))
  greedy = sample(logits, None, 0.0, None)
  np.testing.assert_array_equal(np.asarray(greedy), 1)
  key = jax.random.key(5)
  a = sample(logits, key, 1.0, 2)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(sample(logits, key, 1.0, 2)))
  assert not np.array_equal(np.asarray(a),
                            np.asarray(sample(logits, jax.random.key(6), 1.0, 2)))
  assert set(np.unique(np.asarray(a))) == {1, 3}  # only the top 2
  frac = float(jnp.mean(a == 1))
  assert frac == pytest.approx(1 / (1 + math.exp(-0.1)), abs=0.03)
  hot = sample(logits, key, 1.0, None)
  assert set(np.unique(np.asarray(hot))) == {0, 1, 2, 3, 4}
  # Exactly k candidates where logits tie (bf16 logits often do): top_k=1 is
  # greedy, top_k=2 with a tie at the second place keeps the lower id.
  tied = jnp.asarray([[1.0, 3.0, 3.0, 0.5]] * 2000)
  np.testing.assert_array_equal(np.asarray(sample(tied, key, 1.0, 1)), 1)
  tied2 = jnp.asarray([[1.0, 3.0, 2.0, 2.0]] * 2000)
  assert set(np.unique(np.asarray(sample(tied2, key, 1.0, 2)))) == {1, 2}


@pytest.mark.slow
def test_sampled_generate_is_reproducible_and_top_k_1_is_greedy(model_vars):
  model, v, _ = model_vars
  toks, lens = decode.left_pad([[3, 17, 42], [11, 60, 5]])
  run = lambda k, t, top: decode.generate(  # noqa: E731
      model, v, toks, lens, 5, key=jax.random.key(k), temperature=t, top_k=top)
  np.testing.assert_array_equal(np.asarray(run(7, 1.5, 20)),
                                np.asarray(run(7, 1.5, 20)))
  assert not np.array_equal(np.asarray(run(7, 1.5, 20)), np.asarray(run(8, 1.5, 20)))
  np.testing.assert_array_equal(np.asarray(decode.generate(model, v, toks, lens, 5)),
                                np.asarray(run(9, 0.7, 1)))


def test_generate_needs_a_key_to_sample(model_vars):
  model, v, _ = model_vars
  with pytest.raises(ValueError, match="PRNG key"):
    decode.generate(model, v, *decode.left_pad([[1, 2]]), 3, temperature=1.0)


def test_generate_refuses_impossible_lengths_and_decoding_past_max_len(model_vars):
  model, v, _ = model_vars
  toks, _ = decode.left_pad([[5, 6, 7]])
  for bad in ([0], [4], [-1], [3, 3]):
    with pytest.raises(ValueError, match=r"lengths must be \[batch\] = \[1\]"):
      decode.generate(model, v, toks, jnp.asarray(bad), 2)
  with pytest.raises(ValueError, match=r"goes past the model's LlamaConfig.max_len=32"):
    decode.generate(model, v, *decode.left_pad([[5, 6, 7]]), 30)
  # Prompt ids the embedding cannot look up are refused (they decoded as
  # NaN logits, or wrapped: -1 as vocab - 1), and so is a 1-D prompt.
  vocab = model.config.vocab
  for bad in (vocab, -1):
    with pytest.raises(ValueError, match=rf"ids must be in \[0, vocab={vocab}\)"):
      decode.generate(model, v, jnp.asarray([[1, 2, bad]]), jnp.asarray([3]), 2)
  with pytest.raises(ValueError, match=r"tokens must be \[batch, prompt_len\]"):
    decode.generate(model, v, jnp.asarray([1, 2, 3]), jnp.asarray([3]), 2)
  # A numpy temperature is a number.
  out = decode.generate(model, v, *decode.left_pad([[5, 6, 7]]), 2,
                        key=jax.random.key(0), temperature=np.float32(0.8))
  assert out.shape == (1, 2)


def test_kivi_cache_with_a_length_its_key_groups_do_not_divide(model_vars):
  # generate sizes the cache prompt_len + max_new_tokens (here 3 + 20 = 23
  # slots, groups of 4 along the tokens): the default float window is still
  # one key group, and the tokens match an explicit residual of 4.
  model, v, _ = model_vars
  toks, lengths = decode.left_pad([[5, 6, 7], [8, 9]])
  rules = kv.kivi_rules(4, group_size=4)
  got = decode.generate(model, v, toks, lengths, 20, cache_rules=rules)
  want = decode.generate(model, v, toks, lengths, 20, cache_rules=rules, residual=4)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_kivi_cache_shorter_than_one_key_group_stays_float(model_vars):
  # 3 + 8 = 11 slots, key groups of 32: no group ever fills, so every token
  # stays in the float window and the tokens are the float cache's (the
  # cache refused the length, suggesting options generate never set).
  model, v, _ = model_vars
  toks, lengths = decode.left_pad([[5, 6, 7], [8, 9]])
  got = decode.generate(model, v, toks, lengths, 8,
                        cache_rules=kv.kivi_rules(4, group_size=32))
  want = decode.generate(model, v, toks, lengths, 8)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _reference(apply, v, toks, pad, prompt_len, rules, residual):
  """Decoding through a float cache whose full chunks are fake-quantized when read.

  Chunks of ``residual`` tokens hold whole groups of every spec, so
  fake-quantizing the slots below the last full chunk in one call quantizes
  each chunk on its own.

  Returns:
    ``(logits [B, T, V], the float cache after the prompt and each step)``.
  """
  b, t = toks.shape
  specs = kv.cache_specs(_CFG.n_layers, rules)
  n_q_max = (t // residual) * residual

  @jax.jit
  def step(raw, piece):
    n_q = (raw.index // residual) * residual
    slots = jnp.arange(t)[None, :, None, None]

    def view(tensor, spec):
      if spec is None:
        return tensor
      x = tensor.store
      fq = jnp.concatenate([fake_quant(x[:, :n_q_max], spec), x[:, n_q_max:]], axis=1)
      return kv.CacheTensor(jnp.where(slots < n_q, fq, x), None)
    layers = tuple(kv.LayerCache(view(l.key, ks), view(l.value, vs))
                   for l, (ks, vs) in zip(raw.layers, specs))
    logits, new = apply(v, piece, cache=raw.replace(layers=layers))
    new_slot = (slots >= raw.index) & (slots < raw.index + piece.shape[1])

    def keep(old, nw):  # the raw (unquantized) slots, plus the new tokens
      return kv.CacheTensor(jnp.where(new_slot, nw.store, old.store), None)
    return logits, new.replace(layers=tuple(
        kv.LayerCache(keep(o.key, w.key), keep(o.value, w.value))
        for o, w in zip(raw.layers, new.layers)))

  raw = kv.init_cache(_CFG, b, max_len=t, pad=pad)
  outs, raws = [], []
  for piece in [toks[:, :prompt_len]] + [toks[:, i:i + 1]
                                         for i in range(prompt_len, t)]:
    logits, raw = step(raw, piece)
    outs.append(logits)
    raws.append(raw)
  return jnp.concatenate(outs, axis=1), raws


def _decode(apply, v, toks, cache, prompt_len):
  """Prefill, then teacher-forced steps, through ``apply``; logits and caches."""
  logits, cache = apply(v, toks[:, :prompt_len], cache=cache)
  outs, caches = [logits], [cache]
  for i in range(prompt_len, toks.shape[1]):
    logits, cache = apply(v, toks[:, i:i + 1], cache=cache)
    outs.append(logits)
    caches.append(cache)
  return jnp.concatenate(outs, axis=1), caches


@pytest.mark.parametrize("name,rules,residual,prompt_len", [
    ("kivi4", _KIVI4, 4, 1),  # one token at a time: one compile per path
    pytest.param("kivi4", _KIVI4, 4, _P, marks=pytest.mark.slow),
    pytest.param("int8", _INT8, 3, _P, marks=pytest.mark.slow),
    pytest.param("fp8", _FP8, 2, _P, marks=pytest.mark.slow)])
def test_quantized_cache_matches_fake_quant_reference(model_vars, name, rules,
                                                      residual, prompt_len):
  model, v, apply = model_vars
  toks = _tokens(2, _T, seed=3)
  pad = jnp.asarray([0, 3], jnp.int32)  # row 1: a prompt of 6 tokens, left-padded
  cache = kv.init_cache(_CFG, 2, max_len=_T, pad=pad, rules=rules, residual=residual)
  got, caches = _decode(apply, v, toks, cache, prompt_len)
  ref, raws = _reference(apply, v, toks, pad, prompt_len, rules, residual)
  # (padding positions' logits mean nothing: compare the real tokens')
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(ref[0]), atol=1e-4,
                             rtol=1e-4, err_msg=name)
  np.testing.assert_allclose(np.asarray(got[1, 3:]), np.asarray(ref[1, 3:]),
                             atol=1e-4, rtol=1e-4, err_msg=name)
  full = apply(v, toks)
  assert float(jnp.max(jnp.abs(got[0] - full[0]))) > 1e-4, name  # it did quantize

  # Layer 0's keys and values depend on the tokens only: after _P tokens,
  # its store holds exactly their chunk-wise quantization, its window the rest.
  n_q = (_P // residual) * residual
  at = _P - prompt_len  # the cache after _P tokens
  for which in ("key", "value"):
    ref_t = getattr(raws[at].layers[0], which).store
    q_t = getattr(caches[at].layers[0], which)
    assert isinstance(q_t.store, QArray)
    np.testing.assert_array_equal(np.asarray(ref_t[1, :3]), 0.0)  # pads: zeros
    want = kv.fake_quant_chunks(ref_t, q_t.store.spec, residual, _P)[:, :n_q]
    np.testing.assert_allclose(np.asarray(dequantize(q_t.store)[:, :n_q]),
                               np.asarray(want), rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(want), np.asarray(ref_t[:, :n_q]))
    np.testing.assert_array_equal(np.asarray(q_t.residual[:, :_P - n_q]),
                                  np.asarray(ref_t[:, n_q:_P]))


def test_appending_tokens_together_equals_one_by_one():
  """``append`` of T tokens at once (prefill: chunks quantized together, no
  branch) leaves the cache that T single-token appends leave, bit for bit."""
  b, r = 2, 4
  cache = kv.init_cache(_CFG, b, max_len=24, rules=_KIVI4, residual=r)
  t = cache.layers[0].key
  x = jax.random.normal(jax.random.key(7), (b, 20, _CFG.n_kv_heads, _CFG.head_dim))
  append = jax.jit(kv.append)
  for start, pieces in ((0, (20,)), (3, (1, 9, 2, 5)), (1, (3, 1, 1, 4))):
    one = together = t
    idx = 0
    for n in (start,) + pieces:  # (the first piece only moves the index)
      c = cache.replace(index=jnp.asarray(idx, jnp.int32))
      together = append(together, c, x[:, idx:idx + n])
      for i in range(n):
        c = cache.replace(index=jnp.asarray(idx + i, jnp.int32))
        one = append(one, c, x[:, idx + i:idx + i + 1])
      idx += n
      for a, w in zip(jax.tree.leaves(together), jax.tree.leaves(one)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(w))


def test_decode_loop_flushing_at_a_static_cadence_equals_per_step_flushes(model_vars):
  """The jitted loop (deferred windows, a flush per ``residual`` steps:
  a head, whole windows and a tail) computes what per-call ``apply`` does."""
  model, v, apply = model_vars
  toks = _tokens(2, _T, seed=6)  # 13 steps from slot 1, window 4: 3 + 2 * 4 + 2
  got = decode.make_teacher_forced(model, _T, 2, prompt_len=1, cache_rules=_KIVI4,
                                   residual=4)(v, toks)
  cache = kv.init_cache(_CFG, 2, max_len=_T, rules=_KIVI4, residual=4)
  want, caches = _decode(apply, v, toks, cache, 1)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  deferred = caches[-1].replace(defer_flush=True)
  with pytest.raises(ValueError, match="one token per call"):
    apply(v, toks[:, :2], cache=deferred)
  # a deferred step writes the window only; flush then quantizes it
  full = caches[2]  # index 3: the next token completes the first window
  _, a = apply(v, toks[:, 3:4], cache=full.replace(defer_flush=True))
  _, b = apply(v, toks[:, 3:4], cache=full)
  assert not np.array_equal(np.asarray(a.layers[0].key.store.codes),
                            np.asarray(b.layers[0].key.store.codes))
  for x, y in zip(jax.tree.leaves(kv.flush(a.replace(defer_flush=False))),
                  jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_decode_step_has_no_conditional_and_no_cache_concatenation(model_vars):
  """The decode loop lowers with no ``case``/``if`` (a GPU copies a
  conditional's predicate to the host every step) and concatenates nothing
  of a cache's length (the cache is written in place and read whole)."""
  model, v, _ = model_vars
  slots = 32
  for rules, residual in ((None, None), (_KIVI4, 4), (_INT8, 3)):
    fn = decode.make_generate(model, 6, prompt_len=9, batch=2, cache_rules=rules,
                              residual=residual, max_len=slots)
    txt = fn.lower(v, _tokens(2, 9), jnp.full((2,), 9, jnp.int32),
                   jax.random.key(0)).as_text()
    assert "stablehlo.while" in txt
    assert not re.search(r"stablehlo\.(case|if)\b", txt), residual
    shapes = re.findall(r"stablehlo\.concatenate[^\n]*-> tensor<([0-9x]+)x[a-z]", txt)
    assert all(max(int(d) for d in s.split("x")) < slots for s in shapes), shapes


@pytest.mark.slow
def test_make_teacher_forced_with_a_quantized_cache(model_vars):
  """The jitted teacher-forced loop computes what step-by-step apply does."""
  model, v, apply = model_vars
  toks = _tokens(2, _T, seed=4)
  got = decode.make_teacher_forced(model, _T, 2, prompt_len=_P, cache_rules=_KIVI4,
                                   residual=4)(v, toks)
  cache = kv.init_cache(_CFG, 2, max_len=_T, rules=_KIVI4, residual=4)
  want, _ = _decode(apply, v, toks, cache, _P)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_cache_nbytes_shrink_by_the_expected_factor():
  b, s, kvh, d, layers = 2, 32, _CFG.n_kv_heads, _CFG.head_dim, _CFG.n_layers
  fl = kv.init_cache(_CFG, b, max_len=s)
  assert fl.nbytes == 2 * layers * b * s * kvh * d * 4
  res = b * 8 * kvh * d * 4  # one float32 residual window of 8 tokens
  i8 = kv.init_cache(_CFG, b, max_len=s, rules=_INT8, residual=8)
  per_tensor = b * s * kvh * d * 1 + b * s * kvh * 4 + res  # codes + scales
  assert i8.nbytes == 2 * layers * per_tensor
  k4 = kv.init_cache(_CFG, b, max_len=s, rules=kv.kivi_rules(4, group_size=8),
                     residual=8)
  store = k4.layers[0].key.store
  assert store.codes.dtype == jnp.uint8 and store.codes.shape == (b, s // 2, kvh, d)
  keys = b * s * kvh * d // 2 + b * (s // 8) * kvh * d * (4 + 1)  # scale + zp
  values = b * s * kvh * d // 2 + b * s * kvh * (4 + 1)
  assert k4.nbytes == layers * (keys + values + 2 * res)
  fp8 = kv.init_cache(_CFG, b, max_len=s, rules=_FP8, residual=8).layers[0].key.store
  assert fp8.codes.dtype == jnp.float8_e4m3fn and fp8.scale.shape == (b, s, kvh, 1)
  heads = kv.init_cache(_CFG, b, max_len=s, residual=8,
                        rules=_rule(QuantSpec("int8", axis=(2, 3))))
  assert heads.layers[0].value.store.scale.shape == (b, s, 1, 1)  # one per token
  # without the residual windows: int8 ~ 4x smaller, 4-bit ~ 8x minus scales
  quant = k4.nbytes - 2 * layers * res
  # float32 k + v: 8 bytes; 4-bit k + v: 1 byte, plus a scale and zero point
  # (5 bytes) per 8 key tokens and per value token and head
  assert fl.nbytes / quant == pytest.approx(8 / (1 + 5 / 8 + 5 / d), rel=1e-9)


def test_rules_choose_layers_and_reject_what_a_cache_cannot_store():
  rules = [QuantRule("layers_0/attn/cache/key", activation="int8", ops=("kv_cache",))]
  c = kv.init_cache(_CFG, 1, max_len=16, rules=rules, residual=4)
  assert isinstance(c.layers[0].key.store, QArray)
  assert not isinstance(c.layers[0].value.store, QArray)
  assert not isinstance(c.layers[1].key.store, QArray)
  assert c.layers[0].key.store.spec.axis == 3  # unset axis: per token and head
  with pytest.raises(ValueError, match="matched no cache path"):
    kv.init_cache(_CFG, 1, rules=_rule("int8", "attn/cache/k"), strict=True)
  with pytest.raises(ValueError, match="does not use"):
    kv.init_cache(_CFG, 1, rules=[QuantRule(".*cache.*", weight="int8",
                                            activation="int8", ops=("kv_cache",))])
  with pytest.raises(ValueError, match="independent chunks"):  # one scale for all
    kv.init_cache(_CFG, 1, rules=_rule(QuantSpec("int8", axis="tensor")), residual=8)
  with pytest.raises(ValueError, match="independent chunks"):  # group 4, window 6
    kv.init_cache(_CFG, 1, rules=_KIVI4, residual=6)
  with pytest.raises(ValueError, match="tensor"):
    kv.init_cache(_CFG, 1, rules=_rule(QuantSpec("nvfp4", axis=-1)))
  # rules for the weights leave the cache alone
  assert kv.init_cache(_CFG, 1, rules=[QuantRule(".*", weight="int4")]).residual == 0


@pytest.mark.slow
def test_bfloat16_model_decodes_with_a_quantized_cache():
  cfg = _CFG.replace(dtype="bfloat16")
  model = Llama(cfg)
  v = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  toks, lens = decode.left_pad([[3, 17, 42], [11, 60, 5]])
  out = decode.generate(model, v, toks, lens, 9, cache_rules=_KIVI4, residual=4)
  assert out.shape == (2, 9) and out.dtype == jnp.int32
  # a call past the last slot gives NaN logits, not silently clamped writes
  small = kv.init_cache(cfg, 2, max_len=3)
  logits, full = jax.jit(model.apply)(v, toks, cache=small)
  assert bool(jnp.all(jnp.isfinite(logits)))
  logits, _ = jax.jit(model.apply)(v, toks[:, :1], cache=full)
  assert bool(jnp.all(jnp.isnan(logits)))
  c = kv.init_cache(cfg, 2, rules=_KIVI4, residual=4, max_len=12)
  assert c.layers[0].key.residual.dtype == jnp.bfloat16
  assert math.isclose(c.nbytes, sum(l.key.store.nbytes + l.value.store.nbytes
                                    + 2 * 2 * 4 * 2 * 8 * 2 for l in c.layers))


@pytest.mark.slow
def test_weight_quantized_model_decodes_through_its_quantizer(model_vars):
  """``apply_fn`` = a quantizer's wrapped apply: the cache path keeps its
  numbers (and they are the quantized model's, not the float model's).

  Weight-only: the cache path's attention differs from the full forward's
  in the last float32 bits (about 1e-6 here), and activation quantization
  turns such a difference into a whole rounding step wherever a value sits
  on a rounding boundary (int8 weights and activations: 0.03 at one token of
  this seed), which says nothing about the cache path."""
  from lowbit_jax.flax import quantize_linen  # pylint: disable=g-import-not-at-top
  model, v, apply = model_vars
  toks = _tokens(2, _T, seed=5)
  for spec in ("int8", "int4"):
    q = quantize_linen([QuantRule(".*", weight=spec)])
    full = q(model.apply)(v, toks)
    got = decode.make_teacher_forced(model, _T, 2, prompt_len=_P,
                                     apply_fn=q(model.apply))(v, toks)
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=2e-5, rtol=1e-5)
    assert float(jnp.max(jnp.abs(got - apply(v, toks)))) > 1e-3, spec


def test_rules_given_as_an_iterator_are_read_once_and_kept(model_vars):
  # init_cache's emptiness check consumed an iterator: the cache stayed float.
  model, v, _ = model_vars
  want = kv.init_cache(_CFG, 2, max_len=16, rules=_KIVI4, residual=4)
  for rules in (iter(_KIVI4), (r for r in _KIVI4)):
    got = kv.init_cache(_CFG, 2, max_len=16, rules=rules, residual=4)
    assert got.nbytes == want.nbytes and isinstance(got.layers[0].key.store, QArray)
  toks = _tokens(2, _T, seed=4)
  np.testing.assert_array_equal(
      decode.make_teacher_forced(model, _T, 2, prompt_len=_P,
                                 cache_rules=iter(_KIVI4), residual=4)(v, toks),
      decode.make_teacher_forced(model, _T, 2, prompt_len=_P, cache_rules=_KIVI4,
                                 residual=4)(v, toks))


def test_bad_cache_sizes_and_teacher_forced_shapes_are_refused(model_vars):
  model, v, _ = model_vars
  for kw, msg in (({"batch": -1}, "batch must be a positive int"),
                  ({"batch": 2.0}, "batch must be a positive int"),
                  ({"batch": 2, "max_len": 7.9}, "max_len must be a positive int")):
    with pytest.raises(ValueError, match=msg):
      kv.init_cache(_CFG, **kw)
  fn = decode.make_teacher_forced(model, 6, 1)
  with pytest.raises(ValueError, match=r"tokens must be \[batch, seq_len\] = \(1, 6\)"):
    fn(v, _tokens(1, 9))
  with pytest.raises(ValueError, match="max_len=32"):
    decode.make_teacher_forced(model, 40, 1)
  with pytest.raises(ValueError, match="batch must be a positive int"):
    decode.make_teacher_forced(model, 6, 0)


@pytest.mark.parametrize("bits,group", [(2, 2), (4, 3)])
def test_the_default_residual_fits_codes_packed_along_tokens(model_vars, bits, group):
  # kivi_rules(2, group_size=2): the default residual (the group, 2 tokens)
  # could not hold 2-bit codes packed 4 tokens a byte, and init_cache refused
  # a residual the user never passed.
  model, v, apply = model_vars
  rules = kv.kivi_rules(bits, group_size=group)
  cache = kv.init_cache(_CFG, 1, max_len=24, rules=rules)
  assert cache.residual % group == 0 and cache.residual > group
  toks = decode.generate(model, v, _tokens(1, 5), jnp.array([5]), 6, cache_rules=rules)
  assert toks.shape == (1, 6)
