"""End-to-end PTQ evaluation points: one (model, method, scheme, target) each.

What the sweep experiments call. A point quantizes an unmodified model by rules
(``lowbit_jax.flax.quantize_linen``), optionally after a PTQ method
(``lowbit_jax.flax.ptq.apply_ptq``: GPTQ, AWQ, SmoothQuant, rotation), and
measures it:

* MiniLM (all-MiniLM-L6-v2, pretrained): cosine similarity of each sentence's
  quantized embedding to the float32 one (mean and worst) and the Spearman
  correlation of the pairwise similarity matrices, on held-out sentences.
* Llama-style decoder (trained by ``experiments/train_lm``): held-out perplexity
  and bits per byte.
* Both: bits per weight measured from the packed QArrays (``nbytes``), and the
  SQNR of every quantized weight and of every quantized layer input.

Calibration sentences/tokens and evaluation data never overlap.
"""
from __future__ import annotations

import fcntl
import functools
import inspect
import json
import math
import os
import time


import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax import schemes as schemes_lib
from lowbit_jax._rules import QuantRule
from lowbit_jax.core import fake_quant
from lowbit_jax.eval.sentence import embedding_metrics, sqnr_db

METHODS = ("rtn", "gptq", "awq", "awq_noclip", "smoothquant", "rotation", "quarot",
           "spinquant", "omniquant")
# QuaRot's online Hadamard sites in the decoder LM (no fold exists there).
LLAMA_ONLINE = ".*/down_proj/kernel"
# SpinQuant's per-head rotation R2 in the decoder LM: value -> output projection.
LLAMA_HEADS = (".*/v_proj/kernel", ".*/o_proj/kernel")
TARGETS = schemes_lib.TARGETS
# OmniQuant on the decoder LM: its blocks, and the up -> down link (down reads
# silu(gate) * up, linear in up's output channels) for LET.
LLAMA_BLOCKS = r"layers_\d+"


def _ptq_method(method: str) -> tuple:
  """(apply_ptq method, extra apply_ptq keywords) of a sweep method name."""
  if method == "awq_noclip":   # AWQ's scale search alone (no clip search)
    return "awq", {"awq_clip": False}
  return method, {}


def _check(method: str, target: str):
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if target not in TARGETS:
    raise ValueError(f"target must be one of {TARGETS}, got {target!r}")


# Methods MiniLM cannot take, and why (checked before a sweep runs any point).
_POST_LN = ("MiniLM is post-LN: its residual stream passes through LayerNorm, so a "
            "rotation of the stream does not fold")
MINILM_UNSUPPORTED = {
    "quarot": _POST_LN,
    "spinquant": _POST_LN,
    "omniquant": "it is wired for the decoder LM (llama_point); MiniLM's post-LN "
                 "blocks would need their own block regex",
}


@functools.lru_cache(maxsize=1)
def _minilm_sentence_count() -> int:
  from lowbit_jax.models import minilm  # pylint: disable=g-import-not-at-top
  return len(minilm.sample_sentences())


def _check_minilm(method: str, n_calib: int, n_eval: int) -> None:
  """Raises for a method MiniLM cannot take or sizes its 230 sentences cannot
  give (before any work: the sweep checks every point up front)."""
  if method in MINILM_UNSUPPORTED:
    raise ValueError(f"method {method!r} does not apply to MiniLM: "
                     f"{MINILM_UNSUPPORTED[method]}; MiniLM takes "
                     f"{[m for m in METHODS if m not in MINILM_UNSUPPORTED]}")
  total = _minilm_sentence_count()
  if isinstance(n_calib, bool) or not isinstance(n_calib, int) or not (
      1 <= n_calib <= total - 8):
    raise ValueError(f"n_calib must be an int in [1, {total - 8}] (the first "
                     f"n_calib of the {total} sample sentences calibrate; at least "
                     f"8 are left to evaluate on), got {n_calib!r}")
  left = total - n_calib
  if isinstance(n_eval, bool) or not isinstance(n_eval, int) or not (
      n_eval == 0 or 3 <= n_eval <= left):
    raise ValueError(f"n_eval must be 0 (all {left} sentences not used to "
                     f"calibrate) or an int in [3, {left}] (the rank correlation "
                     f"needs 3), got {n_eval!r}")


def _rules(scheme, target: str, weights_in_params: bool) -> list:
  act = scheme.activation if target == "weights+acts" else None
  w = None if weights_in_params else scheme.weight
  if w is None and act is None:
    return []
  return [QuantRule(".*", weight=w, activation=act)]


def _attn_rules(kv: str, qk: str) -> list:
  """Rules of a quantized KV cache (per token) and ``q.k`` (per head vector)."""
  from lowbit_jax.core import QuantSpec  # pylint: disable=g-import-not-at-top
  out = []
  if kv != "none":
    out.append(QuantRule(r".*/attn/cache/(key|value)", ops=("kv_cache",),
                         activation=QuantSpec(kv, axis=-1)))
  if qk != "none":
    out.append(QuantRule(r".*/attn/qk", ops=("act_matmul",),
                         activation=QuantSpec(qk, axis=-1)))
  return out


def _kernels(params) -> dict:
  """{path: kernel} of every 2-d Dense kernel in a params tree."""
  out = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = "/".join(str(getattr(k, "key", k)) for k in kp)
    if path.endswith("/kernel") and getattr(leaf, "ndim", 0) == 2:
      out[path] = leaf
  return out


@functools.lru_cache(maxsize=64)
def _jit_fake_quant(spec):
  """``fake_quant(., spec)`` compiled once per spec and shape (called eagerly,
  it would dispatch and compile op by op for every layer)."""
  return jax.jit(functools.partial(fake_quant, spec=spec))


def layer_sqnr(params, qparams, scheme, target: str, capture=None) -> dict:
  """Per-layer SQNR (dB): quantized weight vs float, and layer input vs its
  quantized version (inputs retained by the calibration capture)."""
  out = {"weight": {}, "activation": {}}
  fw, qw = _kernels(params), _kernels(qparams)
  wspec = scheme.weight
  for path, w in fw.items():
    if wspec is None:
      continue
    q = qw[path] if qw is not qparams else None
    if q is None or q is w:
      q = _jit_fake_quant(wspec.with_axis(0))(w)
    out["weight"][path] = sqnr_db(np.asarray(w), np.asarray(q))
  if target == "weights+acts" and scheme.activation is not None and capture is not None:
    for layer, st in capture.stats.items():
      x = st.sample
      if x.shape[0] == 0:
        continue
      xq = _jit_fake_quant(scheme.activation.with_axis(-1))(x)
      out["activation"][layer + "/kernel"] = sqnr_db(np.asarray(x), np.asarray(xq))
  return out


def measured_weight_bits(model, variables, scheme, example_args: tuple) -> float:
  """Bits per quantized weight element, from real quantization's packed bytes."""
  if scheme.weight is None:
    return 32.0
  from lowbit_jax.flax import quantize_linen  # pylint: disable=g-import-not-at-top
  q = quantize_linen([QuantRule(".*", weight=scheme.weight)], mode="real")
  qv = q.quantize_params(model, variables, *example_args)
  nbytes, n = 0, 0
  for leaf in jax.tree_util.tree_leaves(
      qv["params"], is_leaf=lambda x: hasattr(x, "nbytes") and hasattr(x, "spec")):
    if hasattr(leaf, "spec") and hasattr(leaf, "codes"):
      nbytes += leaf.nbytes
      n += math.prod(leaf.shape)
  return 8.0 * nbytes / n if n else 32.0


# ---------------------------------------------------------------------------
# MiniLM


@functools.lru_cache(maxsize=1)
def _minilm():
  from lowbit_jax.models import minilm  # pylint: disable=g-import-not-at-top
  model, params = minilm.load_pretrained(precision=jax.lax.Precision.HIGHEST)
  return minilm, model, params


@functools.lru_cache(maxsize=4)
def _minilm_data(n_calib: int, n_eval: int):
  _check_minilm("rtn", n_calib, n_eval)
  minilm, model, params = _minilm()
  sents = minilm.sample_sentences()
  calib, evals = sents[:n_calib], sents[n_calib:]
  if n_eval:
    evals = evals[:n_eval]
  ref = _encode(evals, model=model, params=params)
  return calib, evals, ref


def _length_groups(sentences: list) -> list:
  """At most two groups of sentence indices, each run as one padded batch.

  Every distinct batch shape costs a trace and an XLA compilation of the
  quantized model at every sweep point, which on CPU takes longer than running
  the batch. The sentences are sorted by token count and cut where the padded
  token count (rows x length rounded up to 16, as ``minilm.encode`` pads) of
  the two groups is smallest: the sweep's 198 evaluation sentences run as a
  [192, 32] and a [6, 80] batch.
  """
  from lowbit_jax.models import minilm  # pylint: disable=g-import-not-at-top
  lens = np.asarray(minilm.tokenize(list(sentences))["attention_mask"]).sum(axis=1)
  order = np.argsort(lens, kind="stable")
  n = len(order)
  padded = np.minimum(-(-lens[order] // 16) * 16, minilm.MAX_SEQ_LENGTH)
  cost = [k * padded[k - 1] + (n - k) * padded[-1] for k in range(1, n + 1)]
  k = int(np.argmin(cost)) + 1
  return [order[:k].tolist()] + ([order[k:].tolist()] if k < n else [])


def _encode(sentences: list, **kwargs) -> np.ndarray:
  """``minilm.encode`` in at most two batches (``_length_groups``); rows in
  input order. Per-token and per-block quantization give the same embeddings
  in any batching; a per-tensor activation scale (NVFP4's) is the batch's."""
  from lowbit_jax.models import minilm  # pylint: disable=g-import-not-at-top
  out = None
  for idx in _length_groups(sentences):
    emb = minilm.encode([sentences[i] for i in idx], batch_size=len(idx), **kwargs)
    if out is None:
      out = np.zeros((len(sentences), emb.shape[1]), emb.dtype)
    out[idx] = emb
  return out


@functools.lru_cache(maxsize=2)
def _minilm_capture(n_calib: int):
  """The float model's Dense inputs on the calibration sentences (the same for
  every scheme: captured once per sweep)."""
  from lowbit_jax.flax._capture import capture_dense_stats  # pylint: disable=g-import-not-at-top
  minilm, model, params = _minilm()
  batch = minilm.tokenize(minilm.sample_sentences()[:n_calib])
  batches = [(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])]
  return capture_dense_stats(model, params, batches, token_mask=lambda b: b[1],
                             max_samples=256)


def rtn_weights(params, spec):
  """``params`` with every 2-d Dense kernel fake-quantized along its input axis,
  as a rule ``QuantRule(".*", weight=spec)`` quantizes it inside the model."""
  fq = _jit_fake_quant(spec.with_axis(0))

  def one(kp, leaf):
    path = "/".join(str(getattr(k, "key", k)) for k in kp)
    if path.endswith("/kernel") and getattr(leaf, "ndim", 0) == 2:
      return fq(leaf)
    return leaf
  return jax.tree_util.tree_map_with_path(one, params)


@functools.lru_cache(maxsize=2)
def _minilm_rtn_params(scheme: str):
  """MiniLM's params with RTN-quantized kernels (the weight-only and
  weights+acts points of a scheme share them)."""
  return rtn_weights(_minilm()[2], schemes_lib.get(scheme).weight)


@functools.lru_cache(maxsize=32)
def _minilm_weight_bits(scheme: str) -> float:
  """``measured_weight_bits`` of MiniLM under a scheme (once per scheme: the
  weight-only and weights+acts points share it)."""
  minilm, model, params = _minilm()
  ex = minilm.tokenize(["calibration shape example"])
  args = tuple(jnp.asarray(ex[k]) for k in ("input_ids", "attention_mask",
                                            "token_type_ids"))
  return measured_weight_bits(model, {"params": params}, schemes_lib.get(scheme), args)


def minilm_point(scheme: str, target: str = "weights", method: str = "rtn", *,
                 n_calib: int = 32, n_eval: int = 0, gptq_act_order: bool = True
                 ) -> dict:
  """Quantizes all-MiniLM-L6-v2 and measures how far its embeddings move.

  Args:
    scheme: a name from ``lowbit_jax.schemes.SCHEMES``.
    target: "weights" (weight-only) or "weights+acts".
    method: one of ``METHODS`` (PTQ applied to the weights before evaluation).
    n_calib: calibration sentences (the first ones of ``sample_sentences()``).
    n_eval: evaluation sentences (0: all the others).
    gptq_act_order: GPTQ's act-order option.

  Returns:
    Metrics: mean_cos, worst_cos, spearman, bits_per_weight, seconds of each
    stage, and ``layers`` (per-layer SQNR).
  """
  _check(method, target)
  _check_minilm(method, n_calib, n_eval)
  sch = schemes_lib.get(scheme)
  minilm, model, params = _minilm()
  calib, evals, ref = _minilm_data(n_calib, n_eval)
  t0 = time.time()
  if sch.weight is None and (sch.activation is None or target == "weights"):
    return {"mean_cos": 1.0, "worst_cos": 1.0, "spearman": 1.0, "bits_per_weight": 32.0,
            "n_eval": len(evals), "layers": {"weight": {}, "activation": {}}}
  batch = minilm.tokenize(calib)
  calib_batches = [(batch["input_ids"], batch["attention_mask"],
                    batch["token_type_ids"])]
  from lowbit_jax.flax import quantize_linen  # pylint: disable=g-import-not-at-top
  from lowbit_jax.flax import ptq as ptq_lib  # pylint: disable=g-import-not-at-top
  mask = lambda b: b[1]  # noqa: E731  (padding tokens do not count)
  capture = None
  if target == "weights+acts":  # retained layer inputs give the activation SQNR
    capture = _minilm_capture(n_calib)
  qparams = params
  report = {}
  if method != "rtn" and sch.weight is not None:
    act = sch.activation if target == "weights+acts" else None
    name, extra = _ptq_method(method)
    if name == "gptq":
      extra["act_order"] = gptq_act_order
    qparams, report = ptq_lib.apply_ptq(
        model, params, calib_batches, name, sch.weight, act, token_mask=mask, **extra)
  elif sch.weight is not None:
    # RTN: the weights fake-quantized once, ahead of the model (the same
    # fake_quant the rule would apply inside it): a weight-only point then runs
    # the float model already compiled for the reference embeddings.
    qparams = _minilm_rtn_params(scheme)
  t_ptq = time.time() - t0
  rules = _rules(sch, target, weights_in_params=True)
  t1 = time.time()
  if rules:
    q = quantize_linen(rules, mode="fake")
    emb = _encode(evals, model=model, params=qparams, apply_fn=q(model.apply))
  else:
    emb = _encode(evals, model=model, params=qparams)
  t_eval = time.time() - t1
  m = embedding_metrics(ref, emb)
  m["bits_per_weight"] = _minilm_weight_bits(scheme)
  layers = layer_sqnr(params, qparams, sch, target, capture)
  if layers["weight"]:
    m["mean_weight_sqnr_db"] = _mean(layers["weight"].values())
  if layers["activation"]:
    m["mean_act_sqnr_db"] = _mean(layers["activation"].values())
  m.update(n_eval=len(evals), seconds_ptq=round(t_ptq, 2), seconds_eval=round(t_eval, 2),
           layers=layers)
  if report:
    m["ptq_report"] = {k: v for k, v in report.items()
                       if isinstance(v, (int, float, str))}
  return m


def _check_attention(kv: str, qk: str, r3: bool) -> None:
  """``kv``/``qk`` are "none" or registered formats; R3 needs one of them."""
  from lowbit_jax import formats  # pylint: disable=g-import-not-at-top
  for name, val in (("kv", kv), ("qk", qk)):
    if val != "none" and val not in formats.names():
      raise ValueError(f"{name} must be 'none' or a registered format name "
                       f"(lowbit_jax.formats.names()), got {val!r}")
  if r3 and kv == "none" and qk == "none":
    raise ValueError("r3=True rotates the queries and keys for a quantized KV cache "
                     "or q.k; set kv= or qk= to a format name (or r3=False)")


def _mean(vals) -> float:
  """Mean SQNR over layers: lossless (+inf) layers left out, all lossless is
  +inf, and a NaN or -inf layer (nothing of the signal left) makes it NaN or
  -inf (never read as a good number)."""
  vals = list(vals)
  if any(math.isnan(x) for x in vals):
    return float("nan")
  if any(x == -math.inf for x in vals):
    return -math.inf
  v = [x for x in vals if math.isfinite(x)]
  return float(np.mean(v)) if v else float("inf")


# ---------------------------------------------------------------------------
# Decoder LM


# Config fields that do not change the trained model (logging, evaluation,
# checkpoint cadence, where caches live, how the run was laid out).
def _run_only_fields() -> tuple:
  from lowbit_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  return state_lib.RUN_ONLY_FIELDS


def _folded_weight_sqnr(report: dict) -> dict:
  """Kernel path -> weight SQNR (dB) from an ``apply_ptq`` report (the folded
  domain of a rotation or OmniQuant), keyed by kernel as ``layer_sqnr`` keys
  its rows, so every method's row fills the same heatmap columns."""
  return {f"{p}/kernel": e["weight_sqnr_db"] for p, e in report["layers"].items()
          if "weight_sqnr_db" in e}


def _check_workdir_config(workdir: str, config) -> None:
  """Raises unless the training run in ``workdir`` (its ``config.json``) was
  made with ``config``, so a sweep never measures a model other than the one
  it asked for. Fields only one side has (an option added since) and the
  run-only fields are not compared."""
  from lowbit_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  diff = state_lib.run_config_mismatch(workdir, config, ignore=_run_only_fields())
  if diff:
    raise ValueError(
        f"{workdir} holds a model trained with another config: {diff}. Point "
        f"point_kwargs.workdir at another directory, or delete {workdir} to train "
        "this one there.")


def llama_fingerprint(workdir: str) -> str:
  """12 hex digits identifying the finished model in ``workdir`` (its config
  and final evaluation): sweep rows carry it, so rows measured on a model
  since retrained there are not reused."""
  from lowbit_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  return state_lib.run_fingerprint(workdir)


@functools.lru_cache(maxsize=2)
def _llama(workdir: str, variant: str, train_steps: int = 0):
  """A trained decoder: restored from ``workdir`` or trained there first.

  ``train_steps`` (> 0) shortens the variant's training (warm-up at most a
  tenth of it), e.g. the ``base`` model trained and swept in one GPU call.
  """
  from lowbit_jax import train_lm  # pylint: disable=g-import-not-at-top
  from lowbit_jax.models.llama import Llama  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  cfg_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "configs", "train_lm.py")
  spec = importlib.util.spec_from_file_location("_train_lm_cfg", cfg_path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config(variant)
  if train_steps:
    config.steps = int(train_steps)
    config.warmup_steps = min(config.warmup_steps, max(1, config.steps // 10))
  final = os.path.join(workdir, "final_eval.json")
  # Sweep processes sharing a GPU (one per method) all find the model
  # missing at once: the first takes the lock and trains, the others wait on
  # it and then restore, instead of training concurrently into one workdir
  # (which ran the GPU out of memory and left no restorable checkpoint).
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, ".train.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      _check_workdir_config(workdir, config)
      if not os.path.exists(final):
        train_lm.train(config, workdir)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  mcfg = train_lm.model_config(config)
  model = Llama(mcfg)
  data = train_lm.load_data(config.data.vocab_size if "data" in config and
                            "vocab_size" in config.data else mcfg.vocab)
  # The run's own optimizer: its state's tree (clipping, quantized moments)
  # is what the checkpoint holds.
  from lowbit_jax.train import run_optimizer  # pylint: disable=g-import-not-at-top
  tx, _ = run_optimizer(config, None)
  mesh = train_lm.make_mesh(1)
  mgr = train_lm.checkpoint_manager(os.path.join(workdir, "checkpoints"))
  state = train_lm.restore_checkpoint(mgr, train_lm.abstract_state(model, tx, mesh))
  if state is None:
    raise FileNotFoundError(
        f"{workdir} has final_eval.json but no checkpoint under "
        f"{os.path.join(workdir, 'checkpoints')} to restore: the training that "
        "wrote it was interrupted or its checkpoints were removed. Delete "
        f"{final} (or the whole workdir) to train again, or point "
        "point_kwargs.workdir at a finished run.")
  return config, model, state.params, data


def _check_llama_sizes(n_calib: int, batch: int, seq_len: int,
                       max_eval_tokens: int) -> None:
  for name, v, low in (("n_calib", n_calib, 1), ("batch", batch, 1),
                       ("seq_len", seq_len, 2),
                       ("max_eval_tokens", max_eval_tokens, 0)):  # 0: all of them
    if v < low:
      raise ValueError(f"{name} must be >= {low}, got {v}")


def llama_point(scheme: str, target: str = "weights", method: str = "rtn", *,
                workdir: str, variant: str = "smoke", seq_len: int = 128,
                batch: int = 8, max_eval_tokens: int = 32768, n_calib: int = 8,
                train_steps: int = 0, omniquant_steps: int = 200,
                kv: str = "none", qk: str = "none", r3: bool = False,
                kv_window: int = 32) -> dict:
  """Quantizes the trained decoder LM and measures held-out perplexity.

  The model is restored from ``workdir`` or, when that holds no finished run,
  trained there first (``configs/train_lm.py:<variant>``, ``train_steps`` > 0
  overriding its steps). ``method="omniquant"`` trains LWC (and, with
  activations, LET between each RMSNorm and its readers and between up and
  down projections) for ``omniquant_steps`` AdamW steps per block (Shao et
  al. 2024).

  Attention quantization (``kv``, ``qk``, ``r3``): ``kv`` a format name
  stores the KV cache quantized per token (keys and values, one scale per
  head vector, a float window of the newest ``kv_window`` tokens) and the
  perplexity is then measured teacher forced through the cache
  (``decode.make_teacher_forced``, one-token prompt); ``qk`` a format name
  quantizes both operands of attention's ``q.k`` per head vector (the
  ``act_matmul`` site ``layers_*/attn/qk``); ``r3`` adds SpinQuant's R3 (Liu
  et al. 2024, Sec. 3: a Hadamard on queries and keys over ``head_dim``; the
  cache stores rotated keys), through ``apply_ptq(r3=True)`` for
  ``quarot``/``spinquant`` and ``algorithms.r3_rules`` for the other methods.
  SpinQuant's learning loss quantizes weights and linear-layer inputs only
  (not the cache or ``q.k``), so its R1/R2 are learned the same with or
  without ``kv``/``qk``/``r3``; R3 is a fixed Hadamard, as in the paper.

  Raises:
    ValueError: an unknown method or target, ``kv``/``qk`` not ``"none"`` or
      a registered format, or ``r3`` without ``kv`` or ``qk`` (it would
      change nothing).
  """
  _check(method, target)
  _check_attention(kv, qk, r3)
  _check_llama_sizes(n_calib, batch, seq_len, max_eval_tokens)
  from lowbit_jax import train_lm  # pylint: disable=g-import-not-at-top
  from lowbit_jax.flax import quantize_linen  # pylint: disable=g-import-not-at-top
  from lowbit_jax.flax import ptq as ptq_lib  # pylint: disable=g-import-not-at-top
  from lowbit_jax.algorithms import r3_rules  # pylint: disable=g-import-not-at-top
  from lowbit_jax.models import decode  # pylint: disable=g-import-not-at-top
  sch = schemes_lib.get(scheme)
  config, model, params, data = _llama(workdir, variant, train_steps)
  t0 = time.time()
  calib_tokens = np.asarray(data.train_tokens[: n_calib * seq_len]).astype(np.int32)
  calib_batches = [(jnp.asarray(calib_tokens.reshape(n_calib, seq_len)),)]
  qparams = params
  report = {}
  if method != "rtn" and sch.weight is not None:
    act = sch.activation if target == "weights+acts" else None
    name, extra = _ptq_method(method)
    if method in ("quarot", "spinquant"):
      extra["online"] = LLAMA_ONLINE
    if method == "spinquant":   # learns R1 and R2 (Liu et al. 2024)
      extra["heads"] = LLAMA_HEADS + (model.config.head_dim,)
    if method == "omniquant":
      from lowbit_jax.algorithms import OmniQuantOptions  # pylint: disable=g-import-not-at-top
      extra["omniquant"] = OmniQuantOptions(steps=omniquant_steps, blocks=LLAMA_BLOCKS)
      extra["extra_folds"] = {f"layers_{i}/mlp/down_proj": f"layers_{i}/mlp/up_proj"
                              for i in range(model.config.n_layers)
                              if not model.config.n_experts}
    if r3 and method in ("quarot", "spinquant"):
      extra["r3"] = True
    qparams, report = ptq_lib.apply_ptq(
        model, params, calib_batches, name, sch.weight, act, **extra)
  rules = _rules(sch, target, weights_in_params=(method != "rtn")) + _attn_rules(kv, qk)
  if "rotation" in report:   # QuaRot: online Hadamards at the down projections
    rules = list(report["rotation"].rules(rules))   # (and R3 where r3 was given)
  if r3 and ("rotation" not in report or report["rotation"].r3 is None):
    rules = list(r3_rules(rules))
  if rules:
    q = quantize_linen(rules, mode="fake")
    apply = q(lambda p, t: model.apply({"params": p}, t))
  else:
    apply = lambda p, t: model.apply({"params": p}, t)  # noqa: E731
  if kv != "none":   # teacher forced through the quantized cache
    forced = decode.make_teacher_forced(model, seq_len, batch, prompt_len=1,
                                        cache_rules=rules, residual=kv_window,
                                        apply_fn=q(model.apply))
    apply = lambda p, t: forced({"params": p}, t)  # noqa: E731
  res = train_lm.evaluate(apply, qparams, data, seq_len=seq_len, batch=batch,
                          max_tokens=max_eval_tokens)
  m = {k: float(v) for k, v in res.items() if isinstance(v, (int, float))}
  ex = (calib_batches[0][0][:1],)
  m["bits_per_weight"] = measured_weight_bits(model, {"params": params}, sch, ex)
  if "rotation" in report or method == "omniquant":   # SQNR in the folded domain
    layers = {"weight": _folded_weight_sqnr(report), "activation": {}}
  else:
    layers = layer_sqnr(params, qparams if method != "rtn" else params, sch, target)
  if layers["weight"]:
    m["mean_weight_sqnr_db"] = _mean(layers["weight"].values())
  m["layers"] = layers
  clip = [e["clip_error_vs_rtn"] for e in report.get("layers", {}).values()
          if "clip_error_vs_rtn" in e]
  if clip:   # AWQ's clip search: layer output error vs RTN of the scaled kernel
    m["awq_clip_error_vs_rtn"] = float(np.mean(clip))
  if "blocks" in report:   # OmniQuant: block output MSE, RTN vs learned
    m["block_mse_rtn"] = float(np.mean([b["loss_rtn"] for b in report["blocks"].values()]))
    m["block_mse"] = float(np.mean([b["loss"] for b in report["blocks"].values()]))
  if "spinquant" in report:   # the quantized calibration loss before/after learning
    m.update({f"spinquant_{k}": report["spinquant"][k]
              for k in ("calib_before", "calib_after", "best_step")})
  m["seconds"] = round(time.time() - t0, 2)
  return m


POINTS = {"minilm": minilm_point, "llama": llama_point}


# ---------------------------------------------------------------------------
# Sweeps from a config


_LABELLED = ("scheme", "target", "method", "kv", "qk", "r3", "model")


def _label(row: dict, axes=()) -> str:
  """A point's short label; axes beyond the usual ones (e.g. n_calib) are
  added as ``name=value``, so that two points never share a label."""
  attn = "".join(f"/{k}:{row[k]}" for k in ("kv", "qk")
                 if row.get(k, "none") != "none") + ("/R3" if row.get("r3") else "")
  other = "".join(f"/{k}={row[k]}" for k in axes if k not in _LABELLED)
  return f"{row.get('scheme')}/{'W' if row.get('target') == 'weights' else 'W+A'}" + (
      f"/{row['method']}" if row.get("method", "rtn") != "rtn" else "") + attn + other


def run_sweep_config(config, log=None) -> dict:
  """Runs the sweep a config describes; writes results, table and plots.

  Config fields: ``model`` (a key of ``POINTS``), ``axes`` (name -> values;
  each point's values become the point function's arguments), ``exclude``
  (partial points to drop), ``point_kwargs`` (fixed keyword arguments),
  ``out_dir``, ``metrics`` (table columns), ``plot.x``/``plot.y``/
  ``plot.maximize``.

  Returns:
    dict with ``rows``, ``table`` (markdown) and the written ``paths``.
  """
  from lowbit_jax import sweep  # pylint: disable=g-import-not-at-top
  log = log or sweep.log_stderr
  if config.model not in POINTS:
    raise ValueError(f"config.model must be one of {sorted(POINTS)}, got "
                     f"{config.model!r}")
  fn = POINTS[config.model]
  axes = {k: list(v) for k, v in dict(config.axes).items()}
  exclude = [dict(e) for e in config.get("exclude", [])]
  points = [dict(p, model=config.model) for p in sweep.expand(axes, exclude, log=log)]
  kwargs = dict(config.get("point_kwargs", {}))
  sig = inspect.signature(fn)
  for p in points:  # fail on a typo before hours of work (training), not at that point
    schemes_lib.get(p["scheme"])
    _check(p.get("method", "rtn"), p.get("target", "weights"))
    _check_attention(p.get("kv", "none"), p.get("qk", "none"), p.get("r3", False))
    args = {k: v for k, v in p.items() if k != "model"}
    clash = sorted(set(args) & set(kwargs))
    if clash:
      raise ValueError(f"config.point_kwargs sets {clash}, which the sweep's axes "
                       "set per point: drop them from one of the two")
    try:
      bound = sig.bind(**args, **kwargs)
    except TypeError as e:
      raise ValueError(f"config.point_kwargs or axes do not fit the {config.model!r} "
                       f"point function ({e}); its arguments: "
                       f"{list(sig.parameters)}") from None
    if fn is llama_point:
      bound.apply_defaults()
      _check_llama_sizes(*(bound.arguments[k] for k in
                           ("n_calib", "batch", "seq_len", "max_eval_tokens")))
    elif fn is minilm_point:
      bound.apply_defaults()
      _check_minilm(*(bound.arguments[k] for k in ("method", "n_calib", "n_eval")))
  if config.model == "llama" and "workdir" in axes:
    raise ValueError("config.axes has 'workdir': a llama sweep's model is one "
                     "workdir, set as config.point_kwargs.workdir (its fingerprint "
                     "joins every point's id, so a retrained model's points run "
                     "again; an axis of workdirs would reuse rows of an older "
                     "model). Sweep each workdir as a sweep of its own")
  os.makedirs(config.out_dir, exist_ok=True)
  results = os.path.join(config.out_dir, "results.jsonl")

  def run_point(p):
    args = {k: v for k, v in p.items() if k != "model"}
    return fn(**args, **kwargs)

  settings = dict(kwargs)
  if config.model == "llama" and "workdir" in kwargs:
    # Train (or find) the model first: its fingerprint joins every point's
    # id, so a workdir retrained since (other data, steps, code) reruns them.
    dflt = {k: v.default for k, v in inspect.signature(llama_point).parameters.items()}
    models = {tuple({**dflt, **kwargs, **p}[k] for k in ("variant", "train_steps"))
              for p in points}
    if len(models) > 1:
      raise ValueError(f"the sweep asks for {len(models)} models (variant, "
                       f"train_steps) = {sorted(models)} in one workdir "
                       f"{kwargs['workdir']!r}; sweep each in a workdir of its own")
    _llama(kwargs["workdir"], *models.pop())
    settings["model_fingerprint"] = llama_fingerprint(kwargs["workdir"])
  rows = sweep.run(points, run_point, results, log=log, settings=settings)
  metrics = list(config.metrics)
  returned = set().union(*(r["metrics"] for r in rows)) if rows else set()
  unknown = [m for m in metrics + [config.plot.x, config.plot.y]
             if m not in returned]
  if rows and unknown:  # a typo gives an empty column or an empty plot: say so
    # (a name only some kinds of point return, e.g. activation SQNR of
    # weight-only points, is legitimately absent, so this warns, not raises)
    log(f"sweep: config.metrics / config.plot name {sorted(set(unknown))}, which no "
        f"point returned (they return {sorted(returned)}): their columns and plot "
        "are empty; fix a misspelled name and rerun (finished points do not run "
        "again)")
  keys = [k for k in axes]
  table = sweep.markdown_table(rows, keys, metrics)
  paths = {"results": results}
  with open(os.path.join(config.out_dir, "table.md"), "w") as f:
    f.write(table + "\n")
  paths["table"] = os.path.join(config.out_dir, "table.md")
  px, py = config.plot.x, config.plot.y
  for r in rows:
    r["label"] = _label(r, axes)
  paths["tradeoff"] = sweep.plot_tradeoff(
      rows, px, py, "label", "target" if "target" in axes else None,
      os.path.join(config.out_dir, "tradeoff.png"),
      title=f"{config.model}: {py} vs {px}", maximize_y=bool(config.plot.maximize))
  for kind in ("weight", "activation"):
    sel = [r for r in rows if r["metrics"].get("layers", {}).get(kind)]
    if not sel:
      continue
    cols = list(dict.fromkeys(c for r in sel for c in r["metrics"]["layers"][kind]))
    mat = [[r["metrics"]["layers"][kind].get(c, float("nan")) for c in cols]
           for r in sel]
    short = [c.replace("/kernel", "").replace("encoder/", "") for c in cols]
    paths[f"heatmap_{kind}"] = sweep.plot_heatmap(
        mat, [r["label"] for r in sel], short,
        os.path.join(config.out_dir, f"layer_sqnr_{kind}.png"),
        title=f"per-layer {kind} SQNR (dB)")
  return {"rows": rows, "table": table, "paths": paths}


# ---------------------------------------------------------------------------
# Real quantization to a checkpoint, and evaluating one


def minilm_save_quantized(scheme: str, target: str, directory: str, *,
                          force: bool = False) -> dict:
  """Real-quantizes MiniLM (packed QArray weights) and saves it with orbax.

  Returns:
    dict with the fp32 and quantized parameter bytes and the bytes on disk.
  """
  import json  # pylint: disable=g-import-not-at-top
  from lowbit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from lowbit_jax.flax import quantize_linen  # pylint: disable=g-import-not-at-top
  _check("rtn", target)
  sch = schemes_lib.get(scheme)
  if sch.weight is None:
    raise ValueError(f"scheme {scheme!r} has no weight format: nothing to quantize")
  minilm, model, params = _minilm()
  ex = minilm.tokenize(["calibration shape example"])
  args = tuple(jnp.asarray(ex[k]) for k in ("input_ids", "attention_mask",
                                            "token_type_ids"))
  q = quantize_linen(_rules(sch, target, weights_in_params=False), mode="real")
  qv = q.quantize_params(model, {"params": params}, *args)
  checkpoint.save(directory, qv["params"], force=force, extra_files={
      "ptq_point.json": json.dumps({"model": "minilm", "scheme": scheme,
                                    "target": target})})
  fp_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
  q_bytes = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree_util.tree_leaves(
      qv["params"], is_leaf=lambda x: hasattr(x, "codes")))
  return {"fp32_param_bytes": int(fp_bytes), "quantized_param_bytes": int(q_bytes),
          "disk_bytes": int(checkpoint.disk_bytes(directory)), "directory": directory}


def minilm_evaluate_checkpoint(directory: str, *, n_calib: int = 32, n_eval: int = 0,
                               use_kernel: str = "auto") -> dict:
  """Evaluates a checkpoint saved by ``minilm_save_quantized`` in real mode."""
  import json  # pylint: disable=g-import-not-at-top
  from lowbit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from lowbit_jax.flax import quantize_linen  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory} does not exist (save one with "
                            "experiments/ptq.py --config.save_dir=...)")
  meta_path = os.path.join(directory, "ptq_point.json")
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"{meta_path} is missing: {directory} was not written by "
                            "experiments/ptq.py (minilm_save_quantized)")
  # The point's description is read with the arrays, so a concurrent save
  # cannot pair one point's label with another's weights.
  qparams, extra = checkpoint.restore(directory, files=("ptq_point.json",))
  meta = json.loads(extra["ptq_point.json"])
  sch = schemes_lib.get(meta["scheme"])
  minilm, model, _ = _minilm()
  _, evals, ref = _minilm_data(n_calib, n_eval)
  q = quantize_linen(_rules(sch, meta["target"], weights_in_params=False), mode="real",
                     use_kernel=use_kernel)
  emb = _encode(evals, model=model, params=qparams, apply_fn=q(model.apply))
  m = embedding_metrics(ref, emb)
  m.update(meta)
  return m
