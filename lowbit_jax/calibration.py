"""Calibration observers: static activation ranges as pure (init, update, finalize).

An observer turns example activations into the static range that
``quantize(x, spec, amax=..., amin=...)`` and ``fake_quant`` take. It is three
pure functions over an explicit state pytree (a dict of float32/int32 arrays),
with no hidden state, so it runs under ``jax.jit`` and ``lax.scan`` and its state
can live in any variable collection:

>>> from lowbit_jax import calibration
>>> obs = calibration.get("percentile", percentile=99.9)
>>> state = obs.init(x0, spec)                # zeros, shaped by the spec
>>> for x in batches:
...   state = jax.jit(obs.update)(state, x)
>>> rng = obs.finalize(state, spec)           # {"amax": ..., "amin": ... or None}
>>> y = lowbit_jax.fake_quant(x, spec, **rng)

Observers (``names()``; a spec's ``calibration`` field names one):

* ``"minmax"``: running min and max of the data.
* ``"absmax_ema"``: exponential moving averages of each batch's max |x| (and of
  its min and max, for asymmetric specs): ``m_1 = a_1``,
  ``m_t = decay * m_{t-1} + (1 - decay) * a_t`` (option ``decay``, 0.9).
* ``"percentile"``: the ``percentile``-th percentile of |x| (default 99.99), or
  the ``percentile``-th and ``100 - percentile``-th of x for asymmetric specs,
  read from a streaming histogram: the two order statistics ``np.percentile``
  interpolates between are each placed inside their bin by rank, so the result
  lies within one bin width of ``np.percentile`` of all the data seen.
* ``"mse"``: the clipping ratio ``r`` of the observed range (a grid of
  ``num_ratios`` values from ``min_ratio`` to 1) that minimizes the squared
  quantization error of the spec's own quantizer, measured on the histogram
  (4 evenly spaced points inside each bin, each carrying a quarter of its
  count). Banner et al. 2019 ("Post training 4-bit quantization of
  convolutional networks for rapid-deployment") derive this MSE-optimal
  clipping analytically for Laplace/Gaussian data; here it is searched on the
  observed distribution, for any format.
* ``"kl"``: the threshold minimizing KL(P || Q) over the |x| histogram
  (Migacz 2017, "8-bit Inference with TensorRT", GTC). For each candidate
  threshold (the upper edge of bin ``i``, ``i`` from ``start_bin`` to
  ``bins``), P is the histogram up to it with the clipped tail added to its
  last bin, and Q is the same bins quantized: TensorRT merges them into 128
  equal chunks; here bins whose centers the spec's quantizer (at that
  threshold) maps to the same grid value are merged, which for int8 gives the
  same 128 non-negative levels and for FP and codebook formats follows their
  non-uniform grid. Each merged group's mass is spread evenly over its
  non-empty bins. The search starts at ``start_bin`` = the number of
  non-negative grid values (128 for int8, as TensorRT). A P bin that Q leaves
  empty (only the last one, when it is empty but the tail was folded into it)
  counts as Q = 1e-6. Asymmetric specs search a symmetric threshold T on the
  signed histogram and use the range ``[max(-T, min), min(T, max)]``.

The streaming histogram (percentile, mse, kl) has ``2 * bins`` equal bins over
``[-R, R]`` (``bins`` per side, default 2048). ``R`` is always a power of two,
the smallest one strictly above every |x| seen so far. When a batch exceeds
it, ``R`` grows by ``2**k`` and the old counts are re-binned by merging groups
of ``2**k`` adjacent bins. That is exact, since the old bin edges are a subset
of the new ones, and so is binning itself (``|x| * (bins / R)`` is a
multiplication by a power of two): the histogram after any sequence of batches
is bit for bit the histogram of all their data in one batch, whatever the
order. The price is a resolution between ``max|x| / bins`` and twice that.
Symmetric specs fold the two halves into a |x| histogram of ``bins`` bins over
``[0, R]``.

Non-finite values (NaN, +-inf) are ignored by every observer. An observer that
has seen no finite values finalizes to a zero range.

Ranges and ``clip_ratio``: the core multiplies a static ``amax``/``amin`` by
``spec.clip_ratio``. The statistics (minmax, absmax_ema, percentile) return the
statistic itself, so ``clip_ratio`` clips further. The searches (mse, kl)
choose the effective range themselves and return it divided by
``clip_ratio``, so the core's multiplication lands on it and ``clip_ratio``
does not change the result. Stochastic rounding is evaluated as
round-to-nearest.

Granularity (static scales): the state follows the spec's granularity.

* per-tensor: ``axis`` ``None`` or ``"tensor"``, or an axis tuple covering
  every dim: one range, scalar state.
* per-channel along the feature axis (the last axis, channels-last as in
  Flax): an ``axis`` that shares each scale over every dim except the last,
  e.g. ``axis=0`` for ``x[tokens, K]`` or ``axis=(0, 1)`` for ``x[B, S, K]``:
  one range per feature, state with a leading ``[K]`` dim.
* per-token (any other axis, e.g. the default ``axis=-1`` of an activation
  spec): rejected with a ValueError, since a static range cannot depend on
  each call's tokens; use a dynamic activation spec for that.
* block/group/tile specs (MX, ``group_size``, ``tile``): one per-tensor
  range, which the core's block rule broadcasts to every block (all blocks then
  share one scale).
* two-level block formats (NVFP4): one per-tensor range that fixes the float32
  tensor scale; every block's E4M3 scale stays dynamic (the rules pass it as
  ``tensor_amax``). Only range observers fit here (minmax, absmax_ema,
  percentile): mse and kl score a per-element quantizer, which this is not,
  and ``QuantRule`` rejects them.

Cost: per-tensor states are a few scalars (minmax, ema) or ``2 * bins``
float32 counts (16 KiB at the default); per-channel states multiply that by K,
and ``kl`` finalize costs ``O(K * bins**2)``: lower ``bins`` or raise ``stride``
for wide per-channel tensors.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowbit_jax.core._quantize import fake_quant
from lowbit_jax.core._spec import CALIBRATIONS, TENSOR, QuantSpec, as_spec
from lowbit_jax.formats import BlockFormat

State = dict
_EMPTY_Q = 1e-6
_MSE_POINTS = 4  # evaluation points per histogram bin (mse)
_MAX_BINS = 1 << 16


@dataclasses.dataclass(frozen=True)
class Observer:
  """A calibration observer: three pure functions over an explicit state.

  Attributes:
    name: the observer's name (one of ``names()``).
    init: ``init(x_example, spec) -> state``: a zero state for activations
      shaped like ``x_example`` (an array or ``jax.ShapeDtypeStruct``; only its
      shape and dtype are read) quantized with ``spec``.
    update: ``update(state, x) -> state``: folds one batch in. Jit-able; ``x``
      may have any leading shape (the last dim must match for per-channel).
      Non-finite values (NaN, inf) are skipped: a grouped matmul's rows of
      no group reach it as NaN.
    finalize: ``finalize(state, spec) -> {"amax": ..., "amin": ... or None}``:
      the static range, float32, scalar or ``[K]``; ``amin`` only for
      asymmetric specs. Jit-able with ``spec`` static.
  """
  name: str
  init: Callable[[Any, QuantSpec], State]
  update: Callable[[State, jax.Array], State]
  finalize: Callable[[State, QuantSpec], dict]


# ---------------------------------------------------------------------------
# Granularity


def static_channels(spec: QuantSpec, shape: tuple) -> Optional[int]:
  """Number of static ranges along the feature axis for activations of ``shape``.

  Args:
    spec: the activation QuantSpec.
    shape: activation shape; the feature axis is the last.

  Returns:
    None for one per-tensor range, else K = ``shape[-1]`` (per-channel).

  Raises:
    ValueError: the spec is per-token (or keeps a scale per index of a dim other
      than the feature axis), which a static range cannot express.
  """
  ndim = len(shape)
  if ndim == 0:
    raise ValueError("calibration needs activations with at least 1 dim, got a "
                     "scalar; reshape it with x.reshape(1)")
  if (isinstance(spec.format, BlockFormat) or spec.group_size is not None
      or spec.tile is not None):
    return None  # block rule: one per-tensor range broadcast to every block
  ax = spec.axis
  if ax is None or ax == TENSOR:
    return None
  axes = ax if isinstance(ax, tuple) else (ax,)
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f"spec axis {ax!r} is out of range for activations of shape "
                       f"{tuple(shape)}")
  shared = {a % ndim for a in axes}
  kept = [i for i in range(ndim) if i not in shared]
  if not kept:
    return None
  if kept == [ndim - 1]:
    return int(shape[-1])
  raise ValueError(
      f"spec axis={ax!r} on activations of shape {tuple(shape)} keeps a separate "
      f"scale for every index of dims {kept}: that is a per-token (per-row) scale, "
      "which changes with each call's data and cannot be calibrated statically. Use "
      "a dynamic activation spec (QuantRule(..., static=False)) for per-token "
      "scales, or for a static one use axis='tensor' (per-tensor) or an axis that "
      f"covers every dim but the last, e.g. axis={tuple(range(ndim - 1))!r} "
      "(per-channel along the feature axis)")


def non_finite_inputs_error(paths: Sequence[str]) -> ValueError:
  """The error of calibration inputs whose Hessian or range is not finite
  (``capture_hessians`` and the Linen capture raise it)."""
  return ValueError(
      f"the calibration inputs of {list(paths[:5])}{' ...' if len(paths) > 5 else ''} "
      "are not finite: their Hessian X^T X holds NaN or inf (a NaN or inf in the "
      "activations, or values above ~1e19 whose squares overflow float32); check "
      "the calibration batches (and the model on them) before PTQ")


def _check_x(x) -> jax.Array:
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"observers take arrays, got {type(x).__name__}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"observers take float arrays, got dtype {x.dtype}; cast the "
                    "activations to a float dtype")
  if len(x.shape) == 0:
    raise ValueError("observers need at least a 1-d array, got a scalar; reshape "
                     "it with x.reshape(1)")
  return x


def _channel_shape(x_example, spec) -> tuple:
  spec = as_spec(spec)
  _check_x(x_example)
  k = static_channels(spec, tuple(x_example.shape))
  return () if k is None else (k,)


def _reduce_axes(state: State, x: jax.Array) -> tuple:
  """Axes of x to reduce for the state's granularity (all, or all but last)."""
  x = _check_x(x)
  c = state["max"].shape
  if not c:
    return tuple(range(x.ndim))
  if x.shape[-1] != c[0]:
    raise ValueError(f"this observer state is per-channel with {c[0]} channels, "
                     f"but x has shape {tuple(x.shape)} (last dim {x.shape[-1]}); "
                     "pass activations with the same feature dim as at init")
  return tuple(range(x.ndim - 1))


def _finite_minmax(xf, axes):
  fin = jnp.isfinite(xf)
  lo = jnp.min(jnp.where(fin, xf, jnp.inf), axis=axes)
  hi = jnp.max(jnp.where(fin, xf, -jnp.inf), axis=axes)
  return lo, hi


def _minmax_range(lo, hi, spec: QuantSpec) -> dict:
  seen = hi >= lo
  if spec.symmetric:
    amax = jnp.where(seen, jnp.maximum(jnp.abs(lo), jnp.abs(hi)), 0.0)
    return {"amax": amax.astype(jnp.float32), "amin": None}
  return {"amax": jnp.where(seen, hi, 0.0).astype(jnp.float32),
          "amin": jnp.where(seen, lo, 0.0).astype(jnp.float32)}


# ---------------------------------------------------------------------------
# minmax


def _minmax_init(x_example, spec) -> State:
  c = _channel_shape(x_example, spec)
  return {"batches": jnp.zeros((), jnp.int32),
          "min": jnp.full(c, jnp.inf, jnp.float32),
          "max": jnp.full(c, -jnp.inf, jnp.float32)}


def _empty(x) -> bool:
  return math.prod(jnp.shape(x)) == 0


def _minmax_update(state: State, x) -> State:
  axes = _reduce_axes(state, x)
  if _empty(x):   # an empty batch adds nothing (and has no min or max)
    return state
  lo, hi = _finite_minmax(jnp.asarray(x, jnp.float32), axes)
  return {"batches": state["batches"] + 1,
          "min": jnp.minimum(state["min"], lo),
          "max": jnp.maximum(state["max"], hi)}


def _minmax_finalize(state: State, spec) -> dict:
  return _minmax_range(state["min"], state["max"], as_spec(spec))


# ---------------------------------------------------------------------------
# absmax_ema


def _ema_observer(decay: float) -> Observer:
  d = np.float32(decay)

  def init(x_example, spec) -> State:
    c = _channel_shape(x_example, spec)
    z = jnp.zeros(c, jnp.float32)
    return {"batches": jnp.zeros((), jnp.int32), "absmax": z, "min": z, "max": z,
            "seen": jnp.zeros(c, bool)}

  def update(state: State, x) -> State:
    axes = _reduce_axes(state, x)
    if _empty(x):   # an empty batch adds nothing (and has no min or max)
      return state
    lo, hi = _finite_minmax(jnp.asarray(x, jnp.float32), axes)
    valid = hi >= lo  # a channel with no finite value in this batch is skipped
    a = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    seen = state["seen"]

    def ema(old, new):
      mixed = jnp.where(seen, d * old + (1 - d) * new, new)
      return jnp.where(valid, mixed, old)

    return {"batches": state["batches"] + 1, "absmax": ema(state["absmax"], a),
            "min": ema(state["min"], lo), "max": ema(state["max"], hi),
            "seen": seen | valid}

  def finalize(state: State, spec) -> dict:
    spec = as_spec(spec)
    if spec.symmetric:
      return {"amax": state["absmax"].astype(jnp.float32), "amin": None}
    return {"amax": state["max"].astype(jnp.float32),
            "amin": state["min"].astype(jnp.float32)}

  return Observer("absmax_ema", init, update, finalize)


# ---------------------------------------------------------------------------
# Streaming histogram (percentile, mse, kl)


def _hist_init(bins: int):
  def init(x_example, spec) -> State:
    c = _channel_shape(x_example, spec)
    return {"batches": jnp.zeros((), jnp.int32),
            "min": jnp.full(c, jnp.inf, jnp.float32),
            "max": jnp.full(c, -jnp.inf, jnp.float32),
            "range": jnp.zeros(c, jnp.float32),
            "hist": jnp.zeros(c + (2 * bins,), jnp.float32)}
  return init


def _half_index(j: jax.Array, n: int):
  """Signed bin j in [0, 2n) -> (side: +1/-1, magnitude bin a in [0, n))."""
  pos = j >= n
  return pos, jnp.where(pos, j - n, n - 1 - j)


def _rebin(hist: jax.Array, k: jax.Array, n: int) -> jax.Array:
  """Merges groups of 2**k bins of a [C..., 2n] histogram (range grown 2**k)."""
  j = jnp.arange(2 * n, dtype=jnp.int32)
  pos, a = _half_index(j, n)
  kk = jnp.minimum(k, 30)[..., None]
  a_new = lax.shift_right_logical(jnp.broadcast_to(a, kk.shape[:-1] + (2 * n,)),
                                  jnp.broadcast_to(kk, kk.shape[:-1] + (2 * n,)))
  j_new = jnp.where(pos, n + a_new, n - 1 - a_new)
  return _scatter_rows(hist, j_new, n)


def _scatter_rows(w: jax.Array, idx: jax.Array, n: int) -> jax.Array:
  """Per-row histogram of ``2n`` bins: rows are all dims but the last."""
  rows = math.prod(w.shape[:-1])
  w2 = w.reshape(rows, -1)
  i2 = idx.reshape(rows, -1) + (jnp.arange(rows, dtype=jnp.int32) * (2 * n))[:, None]
  out = jnp.bincount(i2.reshape(-1), weights=w2.reshape(-1), length=rows * 2 * n)
  return out.reshape(w.shape[:-1] + (2 * n,)).astype(jnp.float32)


def _hist_update(n: int):
  def update(state: State, x) -> State:
    axes = _reduce_axes(state, x)
    if _empty(x):   # an empty batch adds nothing (and has no min or max)
      return state
    xf = jnp.asarray(x, jnp.float32)
    fin = jnp.isfinite(xf)
    lo, hi = _finite_minmax(xf, axes)
    bmax = jnp.max(jnp.where(fin, jnp.abs(xf), 0.0), axis=axes)
    # R is a power of two strictly above every |x| seen (0 until a nonzero).
    r = state["range"]
    _, e_b = jnp.frexp(bmax)  # bmax < 2**e_b
    # (At most 2**127: float32's largest power of two; 2**128 would be inf
    # and every bin width with it. The top binade then folds into the last
    # bin, as values past the range do.)
    need = jnp.where(bmax > 0, jnp.ldexp(jnp.ones_like(bmax), jnp.minimum(e_b, 127)),
                     0.0)
    r_new = jnp.maximum(r, need)
    _, e_old = jnp.frexp(r)
    _, e_new = jnp.frexp(r_new)
    k = jnp.where(r > 0, e_new - e_old, 0).astype(jnp.int32)
    hist = _rebin(state["hist"], k, n)
    # Bin the batch: magnitude bin a = floor(|x| / R * n), mirrored by sign.
    if axes == tuple(range(xf.ndim)):
      xs, fs, rr = xf.reshape(1, -1), fin.reshape(1, -1), r_new.reshape(1, 1)
    else:
      xs = xf.reshape(-1, xf.shape[-1]).T
      fs = fin.reshape(-1, xf.shape[-1]).T
      rr = r_new[:, None]
    ax = jnp.where(fs, jnp.abs(xs), 0.0)
    inv = jnp.where(rr > 0, np.float32(n) / jnp.where(rr > 0, rr, 1.0), 0.0)
    a = jnp.clip(jnp.floor(ax * inv), 0, n - 1).astype(jnp.int32)
    idx = jnp.where(xs >= 0, n + a, n - 1 - a)
    counts = _scatter_rows(fs.astype(jnp.float32), idx, n)
    hist = hist + counts.reshape(hist.shape)
    return {"batches": state["batches"] + 1,
            "min": jnp.minimum(state["min"], lo), "max": jnp.maximum(state["max"], hi),
            "range": r_new, "hist": hist}
  return update


def _fold(hist: jax.Array, n: int) -> jax.Array:
  """Signed [.., 2n] histogram over [-R, R] -> |x| histogram [.., n] over [0, R]."""
  return hist[..., n:] + hist[..., :n][..., ::-1]


def _per_row(fn, state: State, *extra):
  """Applies a per-tensor finalize ``fn(hist, R, lo, hi)`` to each channel."""
  if state["max"].ndim == 0:
    return fn(state["hist"], state["range"], state["min"], state["max"], *extra)
  return lax.map(lambda a: fn(*a, *extra),
                 (state["hist"], state["range"], state["min"], state["max"]))


def _order_stat(h: jax.Array, cum: jax.Array, lo_edge, width, m) -> jax.Array:
  """Estimate of the m-th smallest value (1-based): inside its bin, by rank."""
  j = jnp.clip(jnp.searchsorted(cum, m, side="left"), 0, h.shape[0] - 1)
  before = cum[j] - h[j]
  frac = jnp.where(h[j] > 0, (m - before - 0.5) / jnp.where(h[j] > 0, h[j], 1.0), 0.5)
  return lo_edge + (j + jnp.clip(frac, 0.0, 1.0)) * width


def _quantile(h: jax.Array, lo_edge, width, q, bottom, top) -> jax.Array:
  """The q-quantile (q in [0, 1]) of a histogram, as ``np.quantile`` defines it.

  ``np.quantile`` (method "linear") interpolates between the order statistics
  of rank ``floor(q (N - 1))`` and the next; each is located inside its bin
  (the first and last exactly: ``bottom`` and ``top``, the observed extremes,
  where known: None places that one in its bin like the others), so the
  result is within one bin width of ``np.quantile`` of the raw data.
  """
  total = jnp.sum(h)
  cum = jnp.cumsum(h)
  pos = q * jnp.maximum(total - 1.0, 0.0)
  k0 = jnp.floor(pos)
  g = pos - k0

  def stat(m):
    v = _order_stat(h, cum, lo_edge, width, m)
    v = v if top is None else jnp.where(m >= total, top, v)
    return v if bottom is None else jnp.where(m <= 1, bottom, v)

  v0 = stat(k0 + 1.0)
  v1 = stat(jnp.minimum(k0 + 2.0, total))
  return jnp.clip(v0 + g * (v1 - v0), bottom, top)


def _quantile_at(h: jax.Array, lo_edge, width, q: float, bottom, top) -> jax.Array:
  """``_quantile`` at a Python float ``q``, ranked from the nearer end.

  Above the median the rank counts from the top, through ``np.quantile(x, q)
  == -np.quantile(-x, 1 - q)`` (exact for its linear interpolation): in
  float32, ``q (N - 1)`` and the running count lose whole ranks past 2**24
  values, several bins in a sparse tail (p = 99.9999 over 6e7 values: 5
  bins), while the few values above a high percentile count exactly. ``1 -
  q`` is taken in float64.
  """
  if q <= 0.5:
    return _quantile(h, lo_edge, width, np.float32(q), bottom, top)
  hi_edge = lo_edge + h.shape[-1] * width
  # (Without an observed minimum, the smallest value is placed in its bin:
  # the histogram's lower edge is no value, e.g. 0 for magnitudes.)
  return -_quantile(h[..., ::-1], -hi_edge, width, np.float32(1.0 - q), -top,
                    None if bottom is None else -bottom)


def _percentile_finalize(n: int, p: float):
  q = float(p) / 100.0

  def one(hist, r, lo, hi, symmetric):
    seen = hi >= lo
    w = r / n
    if symmetric:
      a0 = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
      v = _quantile_at(_fold(hist, n), 0.0, w, q, None, a0)
      return jnp.where(seen, v, 0.0), None
    vhi = _quantile_at(hist, -r, w, q, lo, hi)
    vlo = _quantile_at(hist, -r, w, (100.0 - float(p)) / 100.0, lo, hi)
    return jnp.where(seen, vhi, 0.0), jnp.where(seen, vlo, 0.0)

  def finalize(state: State, spec) -> dict:
    spec = as_spec(spec)
    amax, amin = _per_row(one, state, spec.symmetric)
    return {"amax": amax, "amin": amin}

  return finalize


def _eval_spec(spec: QuantSpec) -> QuantSpec:
  """The spec's element quantizer on a 1-d array of histogram bin centers.

  With a static range every block uses the same scale, so the quantizer acts
  element by element; this spec reproduces it on a 1-d array.
  """
  return dataclasses.replace(spec, axis=0, tile=None, pad=True, rounding="nearest")


def _fq(c, spec, amax, amin):
  return fake_quant(c, spec, amax=amax, amin=amin)


def _bin_points(h: jax.Array, lo_edge, width, per_bin: int):
  """Points spread evenly inside each bin, each weighted 1/per_bin of its count."""
  m = h.shape[0]
  off = (jnp.arange(per_bin, dtype=jnp.float32) + 0.5) / per_bin
  pts = lo_edge + (jnp.arange(m, dtype=jnp.float32)[:, None] + off) * width
  wts = jnp.broadcast_to(h[:, None] / per_bin, (m, per_bin))
  return pts.reshape(-1), wts.reshape(-1)


def _mse_finalize(n: int, num: int, min_ratio: float):
  # numpy, not jnp: observers are cached (``get``), and one first built
  # inside a trace would keep a tracer (later calls: UnexpectedTracerError).
  ratios = np.linspace(min_ratio, 1.0, num, dtype=np.float32)

  def one(hist, r, lo, hi, spec):
    es = _eval_spec(spec)
    clip = np.float32(spec.clip_ratio)
    seen = hi >= lo
    w = r / n
    if spec.symmetric:
      c, h = _bin_points(_fold(hist, n), 0.0, w, _MSE_POINTS)
      a0 = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
      err = lambda t: jnp.sum(  # noqa: E731
          h * (_fq(c, es, t * a0 / clip, None) - c) ** 2)
    else:
      c, h = _bin_points(hist, -r, w, _MSE_POINTS)
      err = lambda t: jnp.sum(  # noqa: E731
          h * (_fq(c, es, t * hi / clip, t * lo / clip) - c) ** 2)
    rs = jnp.asarray(ratios)
    errs = lax.map(err, rs)
    # Ties go to the larger ratio (less clipping).
    best = rs[num - 1 - jnp.argmin(errs[::-1])]
    if spec.symmetric:
      return jnp.where(seen, best * a0 / clip, 0.0), None
    return (jnp.where(seen, best * hi / clip, 0.0),
            jnp.where(seen, best * lo / clip, 0.0))

  def finalize(state: State, spec) -> dict:
    spec = as_spec(spec)
    amax, amin = _per_row(one, state, spec)
    return {"amax": amax, "amin": amin}

  return finalize


def _kl_levels(spec: QuantSpec) -> int:
  """Default first candidate: the format's non-negative grid values (TensorRT: 128)."""
  v = np.asarray(spec.storage_format.values())
  if spec.symmetric:
    return int(np.sum(v >= 0))
  return int(math.ceil(v.size / 2))


def _clip_most(div: jax.Array, clipped: jax.Array, h: jax.Array,
               zero_bin: int) -> jax.Array:
  """``div``, or inf for a threshold that clips more than half the values
  outside the bin of zero.

  Such a threshold folds most of the mass into its edge bin; when that leaves
  one populated level, P and its merged Q are the same spike, KL is 0, and
  the argmin would pick a range below every value (N(5, 1) data: amax 1.1,
  everything clipped). Exact zeros (ReLU outputs, sparse activations) are
  not counted as kept: with 80% zeros a threshold clipping nearly every
  non-zero value kept "most" of the data."""
  return jnp.where(clipped > 0.5 * (jnp.sum(h) - h[zero_bin]), jnp.inf, div)


def _kl_div(p: jax.Array, q: jax.Array) -> jax.Array:
  p = p / jnp.maximum(jnp.sum(p), 1e-30)
  q = q / jnp.maximum(jnp.sum(q), 1e-30)
  q = jnp.where(q > 0, q, _EMPTY_Q)
  ps = jnp.where(p > 0, p, 1.0)
  return jnp.sum(jnp.where(p > 0, p * jnp.log(ps / q), 0.0))


def _merge_by_grid(h: jax.Array, inside: jax.Array, qv: jax.Array) -> jax.Array:
  """Q: mass of bins with the same quantized value, spread over their non-empty bins."""
  m = h.shape[0]
  change = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                            (qv[1:] != qv[:-1]).astype(jnp.int32)])
  seg = jnp.cumsum(change)
  hin = jnp.where(inside, h, 0.0)
  nz = (inside & (h > 0)).astype(jnp.float32)
  gsum = jax.ops.segment_sum(hin, seg, num_segments=m)
  gcnt = jax.ops.segment_sum(nz, seg, num_segments=m)
  return jnp.where(nz > 0, gsum[seg] / jnp.maximum(gcnt[seg], 1.0), 0.0)


def _kl_finalize(n: int, start_bin: Optional[int], stride: int):

  def one(hist, r, lo, hi, spec):
    es = _eval_spec(spec)
    clip = np.float32(spec.clip_ratio)
    seen = hi >= lo
    w = r / n
    s0 = min(max(start_bin if start_bin is not None else _kl_levels(spec), 1), n)
    cand = jnp.asarray(np.arange(n, s0 - 1, -stride)[::-1].copy(), jnp.int32)
    if spec.symmetric:
      h = _fold(hist, n)
      c = (jnp.arange(n, dtype=jnp.float32) + 0.5) * w
      j = jnp.arange(n, dtype=jnp.int32)

      def kl(i):
        inside = j < i
        tail = jnp.sum(jnp.where(inside, 0.0, h))
        p = jnp.where(inside, h, 0.0) + jnp.where(j == i - 1, tail, 0.0)
        qv = _fq(c, es, i * w / clip, None)
        return _clip_most(_kl_div(p, _merge_by_grid(h, inside, qv)), tail, h, 0)
    else:
      h = hist
      c = -r + (jnp.arange(2 * n, dtype=jnp.float32) + 0.5) * w
      j = jnp.arange(2 * n, dtype=jnp.int32)

      def kl(i):
        inside = (j >= n - i) & (j < n + i)
        left = jnp.sum(jnp.where(j < n - i, h, 0.0))
        right = jnp.sum(jnp.where(j >= n + i, h, 0.0))
        p = (jnp.where(inside, h, 0.0) + jnp.where(j == n - i, left, 0.0)
             + jnp.where(j == n + i - 1, right, 0.0))
        t = i * w
        qv = _fq(c, es, jnp.minimum(t, hi) / clip, jnp.maximum(-t, lo) / clip)
        return _clip_most(_kl_div(p, _merge_by_grid(h, inside, qv)), left + right, h,
                          n)

    divs = lax.map(kl, cand)
    t = cand[jnp.argmin(divs)] * w
    if spec.symmetric:
      a0 = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
      return jnp.where(seen, jnp.minimum(t, a0) / clip, 0.0), None
    return (jnp.where(seen, jnp.minimum(t, hi) / clip, 0.0),
            jnp.where(seen, jnp.maximum(-t, lo) / clip, 0.0))

  def finalize(state: State, spec) -> dict:
    spec = as_spec(spec)
    amax, amin = _per_row(one, state, spec)
    return {"amax": amax, "amin": amin}

  return finalize


# ---------------------------------------------------------------------------
# Registry


def _check_bins(bins) -> int:
  if not isinstance(bins, (int, np.integer)) or isinstance(bins, bool) or not (
      8 <= bins <= _MAX_BINS):
    raise ValueError(f"bins must be an int in [8, {_MAX_BINS}] (bins per side of 0), "
                     f"got {bins!r}")
  return int(bins)


def _frac(name: str, v, lo_open: float, hi: float, hi_closed: bool) -> float:
  ok = isinstance(v, (int, float, np.floating)) and not isinstance(v, bool)
  if ok:
    v = float(v)
    ok = v > lo_open and (v <= hi if hi_closed else v < hi)
  if not ok:
    rb = "]" if hi_closed else ")"
    raise ValueError(f"{name} must be a number in ({lo_open}, {hi}{rb}, got {v!r}")
  return v


def _positive_int(name: str, v) -> int:
  if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
    raise ValueError(f"{name} must be a positive int, got {v!r}")
  return int(v)


def _make_minmax() -> Observer:
  return Observer("minmax", _minmax_init, _minmax_update, _minmax_finalize)


def _make_ema(decay: float = 0.9) -> Observer:
  return _ema_observer(_frac("decay", decay, 0.0, 1.0, False))


def _make_percentile(percentile: float = 99.99, bins: int = 2048) -> Observer:
  p = _frac("percentile", percentile, 0.0, 100.0, True)
  if p < 50:
    raise ValueError(f"percentile is the upper percentile of the range, in [50, 100];"
                     f" got {percentile!r}")
  n = _check_bins(bins)
  return Observer("percentile", _hist_init(n), _hist_update(n),
                  _percentile_finalize(n, p))


def _make_mse(bins: int = 2048, num_ratios: int = 100,
              min_ratio: float = 0.01) -> Observer:
  n = _check_bins(bins)
  num = _positive_int("num_ratios", num_ratios)
  if num < 2:
    raise ValueError(f"num_ratios must be at least 2, got {num_ratios!r}")
  mr = _frac("min_ratio", min_ratio, 0.0, 1.0, False)
  return Observer("mse", _hist_init(n), _hist_update(n), _mse_finalize(n, num, mr))


def _make_kl(bins: int = 2048, start_bin: Optional[int] = None,
             stride: int = 1) -> Observer:
  n = _check_bins(bins)
  if start_bin is not None:
    _positive_int("start_bin", start_bin)
    if start_bin > n:
      raise ValueError(f"start_bin ({start_bin}) must be at most bins ({n})")
  s = _positive_int("stride", stride)
  return Observer("kl", _hist_init(n), _hist_update(n), _kl_finalize(n, start_bin, s))


_FACTORIES = {"minmax": _make_minmax, "absmax_ema": _make_ema,
              "percentile": _make_percentile, "mse": _make_mse, "kl": _make_kl}
assert tuple(_FACTORIES) == CALIBRATIONS


def names() -> tuple:
  """Names of the observers (the values a QuantSpec's ``calibration`` takes)."""
  return tuple(_FACTORIES)


def get(name: str, **options) -> Observer:
  """The observer called ``name``, configured with ``options``.

  Options: ``minmax``: none. ``absmax_ema``: ``decay`` (0.9). ``percentile``:
  ``percentile`` (99.99), ``bins`` (2048). ``mse``: ``bins`` (2048),
  ``num_ratios`` (100), ``min_ratio`` (0.01). ``kl``: ``bins`` (2048),
  ``start_bin`` (the format's non-negative grid size, 128 for int8),
  ``stride`` (1: every candidate threshold).

  Args:
    name: one of ``names()``.
    **options: the observer's options (see above).

  Returns:
    An Observer.

  Raises:
    ValueError: unknown name, or an option out of range.
    TypeError: an option the observer does not take.
  """
  if name not in _FACTORIES:
    raise ValueError(f"unknown observer {name!r}; choose one of {names()}")
  allowed = tuple(inspect.signature(_FACTORIES[name]).parameters)
  bad = sorted(set(options) - set(allowed))
  if bad:
    raise TypeError(f"observer {name!r} takes no option(s) {bad}; its options are "
                    f"{allowed or 'none'}")
  try:
    return _cached(name, tuple(sorted(options.items())))
  except TypeError:  # an unhashable option value: validate it uncached
    return _FACTORIES[name](**options)


@functools.lru_cache(maxsize=256)
def _cached(name: str, options: tuple) -> Observer:
  # Observers are immutable: equal options share one, so jit caches hit.
  return _FACTORIES[name](**dict(options))


def calibrate(fn: Callable[[Any], jax.Array], batches: Iterable, spec,
              observer: Union[None, str, Observer] = None,
              **options) -> dict:
  """Folds ``fn(batch)`` over ``batches`` through an observer; the static range.

  Args:
    fn: maps one batch to the activation array to calibrate.
    batches: an iterable of batches (consumed once).
    spec: the activation QuantSpec (or a format name; per-tensor then).
    observer: an Observer or a name; default ``spec.calibration``.
    **options: options for ``get`` when the observer is given by name.

  Returns:
    ``{"amax": ..., "amin": ... or None}``, ready for
    ``fake_quant(x, spec, **result)``; for a two-level spec (NVFP4:
    ``tensor_scale``) ``{"tensor_amax": ...}``, the range its tensor scale
    takes (its block scales stay dynamic, as a static rule quantizes it).

  Raises:
    ValueError: ``batches`` is empty, or the spec cannot be static (per-token).
    TypeError: ``fn`` did not return a float array.
  """
  spec = as_spec(spec)
  if observer is None:
    observer = spec.calibration
  if isinstance(observer, str):
    observer = get(observer, **options)
  elif not isinstance(observer, Observer):
    raise TypeError(f"observer must be a name or an Observer, got "
                    f"{type(observer).__name__}")
  elif options:
    raise TypeError("options go with an observer given by name, not an Observer")
  update = jax.jit(observer.update)
  state = None
  for batch in batches:
    y = fn(batch)
    if state is None:
      state = observer.init(y, spec)
    state = update(state, y)
  if state is None:
    raise ValueError("calibrate() got no batches; pass a non-empty iterable")
  r = jax.jit(observer.finalize, static_argnums=1)(state, spec)
  return {"tensor_amax": r["amax"]} if spec.tensor_scale else r


@functools.lru_cache(maxsize=256)
def _state_fields(observer: Observer, spec: QuantSpec) -> Optional[list]:
  """The sorted fields of ``observer``'s states for ``spec`` (None: a spec a
  one-channel probe cannot take)."""
  try:
    return sorted(jax.eval_shape(lambda x: observer.init(x, spec),
                                 jax.ShapeDtypeStruct((1, 1), jnp.float32)))
  except (ValueError, TypeError):
    return None


def check_state(observer: Observer, state, spec: QuantSpec, where: str = "") -> None:
  """Raises a ValueError unless ``state`` has the fields ``observer``'s own
  states have (a state of another observer would be read as this one's)."""
  want = _state_fields(observer, as_spec(spec))
  got = sorted(state) if isinstance(state, Mapping) else None
  if want is not None and got != want:
    raise ValueError(
        f"{where}the calibration statistics {got if got is not None else type(state).__name__} "
        f"are not a state of the {observer.name!r} observer the spec names "
        f"(calibration={spec.calibration!r}: fields {want}); calibrate "
        "with the same spec, or pass a finalized range {'amax': ..., 'amin': ...}")


__all__ = ["Observer", "get", "names", "calibrate", "check_state", "static_channels"]
