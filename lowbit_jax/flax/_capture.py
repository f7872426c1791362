"""Per-Dense-layer input statistics of an unmodified Linen model, for PTQ.

``capture_dense_stats`` runs the model on calibration batches under
``flax.linen.intercept_methods`` and, for every ``nn.Dense`` call, accumulates
statistics of its input ``x[..., K]`` (flattened to rows):

* ``gram``: ``X^T X`` ``[K, K]`` (GPTQ's Hessian, up to a factor),
* ``absmax``: max |x_j| per input channel (SmoothQuant),
* ``abssum``: sum of |x_j| (mean |x_j| = abssum / count; AWQ),
* ``count``: number of rows (weighted by the token mask),
* ``sample``: up to ``max_samples`` rows drawn at random (AWQ's search, reports).

Layers are keyed by ``'/'.join(module.path)``, which is also the layer's path
in the params tree (``params[p0][p1]...['kernel']``). The capture also records
the model's structure as seen at the call boundaries: which Dense layers read
the very same input array (they must share a smoothing or rotation), and which
module produced that array when it came straight from an ``nn.LayerNorm``,
``nn.RMSNorm`` or ``nn.Dense`` (a candidate to fold a transformation into).

Grouped matmuls (``lowbit_jax.flax.RaggedDense``: MoE experts, rows sorted by
expert) are captured per group as ``ExpertStats``: the Gram matrix, absmax,
mean |x| and row count of each expert are built from only the rows (tokens)
routed to it, read from the call's ``group_sizes``; the retained sample keeps
each row's expert. Their rows are (token, expert) pairs, so ``token_mask``
does not apply to them.

Convolutions (``nn.Conv``) are captured as the matmul the kernel performs:
each row is one output position's im2col patch
(``lax.conv_general_dilated_patches`` of the input as the layer hands it to
``lax.conv_general_dilated``: after its CIRCULAR/REFLECT/CAUSAL padding, with
its strides, padding and dilations), its features reordered from the patches'
(input channel, window position) order to the kernel's, so that
``patches @ kernel.reshape(-1, features)`` equals the conv output (checked on
every batch). A transposed conv (``nn.ConvTranspose``) is captured as the
input-dilated conv ``lax.conv_transpose`` lowers to (unit strides, the input
dilated by the layer's strides, ``conv_transpose_lowering``): its rows are
that conv's patches taken through the same spatial map as its output (the
flip of ``transpose_kernel``, the periodic wrap of ``padding="CIRCULAR"``,
which sums patch rows), so ``rows @ conv_matrix(kernel, in_axis, out_axis)``
plus the bias equals the layer's output (checked on every batch against the
layer's own output). Grouped/depthwise convs (``feature_group_count > 1``),
masked convs and unshared (``ConvLocal``) ones are not captured; they are
listed in ``Capture.skipped`` with the reason.

Each batch runs under ``jax.jit``; a new batch shape compiles again.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lowbit_jax._experts import routed_rows
from lowbit_jax.calibration import non_finite_inputs_error
from lowbit_jax.flax._linen import RaggedDense, conv_transpose_lowering

_HI = jax.lax.Precision.HIGHEST
NORM_TYPES = (nn.LayerNorm, nn.RMSNorm, nn.BatchNorm, nn.GroupNorm)


class DenseStats(NamedTuple):
  """Accumulated input statistics of one Dense layer (all float32).

  Attributes:
    gram: ``[K, K]`` sum over rows of ``x^T x``.
    absmax: ``[K]`` max |x_j|.
    abssum: ``[K]`` sum of |x_j|.
    count: scalar, the number of rows (mask-weighted).
    sample: ``[S, K]`` retained input rows (``S <= max_samples``).
  """
  gram: jax.Array
  absmax: jax.Array
  abssum: jax.Array
  count: jax.Array
  sample: jax.Array

  @property
  def mean_abs(self) -> jax.Array:
    """Mean |x_j| per input channel."""
    return self.abssum / jnp.maximum(self.count, 1.0)


class ExpertStats(NamedTuple):
  """Accumulated input statistics of a grouped matmul, one set per group (expert).

  Attributes:
    gram: ``[G, K, K]``: ``gram[g]`` sums ``x^T x`` over the rows routed to
      group ``g`` only.
    absmax: ``[G, K]`` max |x_j| per group.
    abssum: ``[G, K]`` sum of |x_j| per group.
    count: ``[G]`` rows routed to each group.
    sample: ``[S, K]`` retained input rows (all groups).
    sample_group: ``[S]`` the group of each retained row.
  """
  gram: jax.Array
  absmax: jax.Array
  abssum: jax.Array
  count: jax.Array
  sample: jax.Array
  sample_group: jax.Array

  @property
  def mean_abs(self) -> jax.Array:
    """Mean |x_j| per group and input channel (0 for a group without rows)."""
    return self.abssum / jnp.maximum(self.count, 1.0)[:, None]


class Capture(NamedTuple):
  """What ``capture_dense_stats`` returns.

  Attributes:
    stats: layer path -> DenseStats (``ExpertStats`` for a ``RaggedDense``).
    order: layer paths in the order of their first call.
    groups: lists of layer paths that read the same input array (first call),
      in call order; every captured layer is in exactly one group.
    producers: layer path -> ``(kind, path)`` of the module whose output the
      layer reads directly, ``kind`` being "norm" (LayerNorm, RMSNorm,
      BatchNorm, GroupNorm), "dense" or "conv"; None when the input came from
      anything else (an einsum, an activation, a reshape...). For a conv see
      ``convs``.
    convs: the captured ``nn.Conv`` / ``nn.ConvTranspose`` paths (their stats
      are of im2col patches, features in the row order of
      ``conv_matrix(kernel, *conv_axes[path])``). A conv's producer is the
      module that returned its input or, failing that, the latest conv,
      Dense or norm whose output has the input's shape (e.g. before a ReLU):
      a candidate for a fold, to be checked numerically. Convs reading the
      same input array share a group.
    skipped: layer path -> why a layer matching ``layers`` was not captured
      (grouped, masked or unshared convs).
    conv_axes: conv path (every conv called, captured or not) -> its
      kernel's ``(in_axis, out_axis)``.
  """
  stats: dict
  order: list
  groups: list
  producers: dict
  convs: tuple = ()
  skipped: Optional[dict] = None
  conv_axes: Optional[dict] = None


def layer_path(module: nn.Module) -> str:
  """The key of a module: ``'/'.join(module.path)``."""
  return "/".join(str(p) for p in module.path)


def split_batch(batch: Any) -> tuple:
  """``(args, kwargs)`` for ``model.apply`` from a calibration batch.

  A tuple or list is positional arguments, a dict keyword arguments, anything
  else a single positional argument.
  """
  if isinstance(batch, (tuple, list)):
    return tuple(batch), {}
  if isinstance(batch, Mapping):
    return (), dict(batch)
  return (batch,), {}


def _dense_input(args, kwargs):
  if args:
    return args[0]
  if "inputs" in kwargs:
    return kwargs["inputs"]
  raise ValueError("an nn.Dense was called without inputs")


def capture_dense_stats(model: nn.Module, params: Any, calib_batches: Sequence[Any], *,
                        layers: str = ".*", token_mask: Optional[Callable] = None,
                        max_samples: int = 512, seed: int = 0,
                        apply_kwargs: Optional[Mapping[str, Any]] = None,
                        other_variables: Optional[Mapping[str, Any]] = None
                        ) -> Capture:
  """Collects per-Dense input statistics of a Linen model over calibration batches.

  Args:
    model: the (unmodified) Linen module.
    params: its params.
    calib_batches: a sequence of batches; each is passed to ``model.apply`` as
      positional arguments (tuple/list), keyword arguments (dict) or a single
      argument.
    layers: regex; only Dense, RaggedDense and conv layers whose path fully
      matches are captured.
    token_mask: optional ``batch -> mask`` (e.g. ``lambda b: b[1]`` for an
      attention mask): rows of a Dense input whose leading shape equals the
      mask's shape are weighted by it (padding tokens count 0); inputs of
      another leading shape are not masked.
    max_samples: most input rows retained per layer (split evenly over the
      batches, drawn at random among the unmasked rows).
    seed: seed of the row sampling.
    apply_kwargs: extra keyword arguments for ``model.apply`` (e.g.
      ``{"method": ...}`` or ``{"train": False}``).
    other_variables: variable collections besides params (e.g. batch_stats).

  Returns:
    A ``Capture``.

  Raises:
    ValueError: no batches, no Dense layer matched, or bad arguments.
  """
  batches = list(calib_batches)
  if not batches:
    raise ValueError("calib_batches is empty; pass at least one batch")
  if not isinstance(max_samples, int) or max_samples < 0:
    raise ValueError(f"max_samples must be an int >= 0, got {max_samples!r}")
  pattern = re.compile(layers)
  apply_kwargs = dict(apply_kwargs or {})
  variables_extra = dict(other_variables or {})
  per_batch = -(-max_samples // len(batches)) if max_samples else 0
  # Python-side structure, filled while tracing (the same on every trace).
  structure: dict = {}

  def run(p, batch, key):
    outer = getattr(jax.tree.leaves(p)[0], "_trace", None)

    def recorded(path, x):
      """``x``, unless it lives in an inner trace (nn.remat, nn.scan, ...)."""
      if isinstance(x, jax.core.Tracer) and getattr(x, "_trace", None) is not outer:
        raise ValueError(
            f"layer {path!r} runs inside a lifted transform (nn.remat, nn.scan, "
            "nn.vmap, a nested jit) whose body cannot hand its inputs back to the "
            "capture; capture a version of the model without it (remat changes "
            "memory, not values), or use ptq_params on a function of the "
            "parameters (lambda p, *a: model.apply({'params': p}, *a)), whose "
            "front end follows remat")
      return x

    order, calls, ragged = [], {}, {}
    outputs = {}   # id(output array) -> (kind, path)
    keep = []      # keeps traced arrays alive so ids are not reused
    input_group = {}   # id(input) -> group index
    groups, producers = [], {}
    convs, skipped, errs, busy = [], {}, [], set()
    recent = []    # (output shape, kind, path) of convs, Dense layers, norms
    conv_axes = {}   # conv path -> its kernel's (in_axis, out_axis)

    def first_seen(path, x, store):
      """``store[path]``, registered (order, producer, input group) on first use."""
      if path not in store:
        order.append(path)
        store[path] = []
        producers[path] = outputs.get(id(x))
        g = input_group.setdefault(id(x), len(groups))
        if g == len(groups):
          groups.append([])
        groups[g].append(path)
      return store[path]

    def conv_output(mod, out):
      """Registers a conv's output as a fold candidate (its output channels)."""
      keep.append(out)
      ks = mod.kernel_size
      conv_axes[layer_path(mod)] = conv_transpose_axes(
          mod, (1 if isinstance(ks, int) else len(ks)) + 2)
      if getattr(mod, "mask", None) is None:
        outputs[id(out)] = ("conv", layer_path(mod))
        recent.append((tuple(out.shape), "conv", layer_path(mod)))

    def conv_producer(path, x):
      """The module whose output channels a scaling of conv ``path``'s input folds into.

      The module that returned ``x`` itself or else the latest conv, Dense or
      norm whose output has ``x``'s shape (``x`` may be it after elementwise
      ops, e.g. a ReLU); the fold is checked numerically before it is used.
      """
      if id(x) in outputs:
        return outputs[id(x)]
      for shape, kind, prod in reversed(recent):
        if shape == tuple(x.shape) and prod != path:
          return (kind, prod)
      return None

    def interceptor(next_fun, args, kwargs, context):
      mod = context.module
      if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
      conv_t = isinstance(mod, nn.ConvTranspose)
      if (isinstance(mod, nn.Conv) or conv_t) and id(mod) not in busy:
        path = layer_path(mod)
        why = _conv_unsupported(mod)
        if not pattern.fullmatch(path) or why is not None:
          if pattern.fullmatch(path):
            skipped[path] = why
          out = next_fun(*args, **kwargs)
          conv_output(mod, out)
          return out
        x_in = _dense_input(args, kwargs)
        if conv_t:
          out = next_fun(*args, **kwargs)
          x, err = _conv_transpose_patches(mod, x_in, out)
        else:
          got = []
          out = _call_conv_recording(mod, busy, got, args, kwargs)
          x, err = got[0]
        errs.append((path, err))
        keep.extend([x_in, x])
        new = path not in calls
        first_seen(path, x_in, calls).append(recorded(path, x))
        if new:
          convs.append(path)
          if producers[path] is None:
            producers[path] = conv_producer(path, x_in)
        conv_output(mod, out)
        return out
      if isinstance(mod, nn.Dense):
        path = layer_path(mod)
        x = _dense_input(args, kwargs)
        out = next_fun(*args, **kwargs)
        keep.extend([x, out])
        outputs[id(out)] = ("dense", path)
        recent.append((tuple(out.shape), "dense", path))
        if pattern.fullmatch(path):
          first_seen(path, x, calls).append(recorded(path, x))
        return out
      if isinstance(mod, RaggedDense):
        path = layer_path(mod)
        x, group_sizes = _ragged_inputs(args, kwargs)
        out = next_fun(*args, **kwargs)
        keep.extend([x, out])
        if pattern.fullmatch(path):
          first_seen(path, x, ragged).append((recorded(path, x), group_sizes))
        return out
      if isinstance(mod, NORM_TYPES):
        out = next_fun(*args, **kwargs)
        keep.append(out)
        outputs[id(out)] = ("norm", layer_path(mod))
        recent.append((tuple(out.shape), "norm", layer_path(mod)))
        return out
      return next_fun(*args, **kwargs)

    args, kwargs = split_batch(batch)
    mask = None if token_mask is None else jnp.asarray(token_mask(batch))
    with nn.intercept_methods(interceptor):
      model.apply({"params": p, **variables_extra}, *args, **kwargs, **apply_kwargs)
    structure.update(order=order, groups=groups, producers=producers, convs=convs,
                     skipped=skipped, conv_axes=conv_axes)
    result = {}
    for i, path in enumerate(order):
      if path in ragged:
        result[path] = _expert_batch_stats(ragged[path], per_batch,
                                           jax.random.fold_in(key, i))
        continue
      rows, wts = [], []
      for x in calls[path]:
        k = x.shape[-1]
        rows.append(x.reshape(-1, k).astype(jnp.float32))
        if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
          wts.append(mask.reshape(-1).astype(jnp.float32))
          masked.add(path)
        else:
          wts.append(jnp.ones((math.prod(x.shape[:-1]),), jnp.float32))
      xr = jnp.concatenate(rows)
      wt = jnp.concatenate(wts)
      xw = xr * wt[:, None]
      gram = jnp.matmul(xw.T, xr, precision=_HI)
      valid = wt > 0
      absmax = jnp.max(jnp.where(valid[:, None], jnp.abs(xr), 0.0), axis=0)
      abssum = jnp.sum(jnp.abs(xw), axis=0)
      n_keep = min(per_batch, xr.shape[0])
      score = jax.random.uniform(jax.random.fold_in(key, i), (xr.shape[0],)) + \
          2.0 * valid
      _, idx = jax.lax.top_k(score, n_keep)
      result[path] = (gram, absmax, abssum, jnp.sum(wt), xr[idx], valid[idx])
    return result, {p: e for p, e in errs}

  masked: set = set()   # the layers whose inputs the mask weighted (at trace time)
  fwd = jax.jit(run)
  base = jax.random.key(seed)
  acc: dict = {}
  samples: dict = {}
  for b, batch in enumerate(batches):
    out, conv_errs = fwd(params, batch, jax.random.fold_in(base, b))
    for path, err in conv_errs.items():
      if not float(err) <= _PATCH_RTOL:
        raise ValueError(
            f"conv {path!r}: its im2col patches times the reshaped kernel differ "
            f"from the conv output (relative error {float(err):.3g}); this conv's "
            "configuration is not supported by the capture: exclude it with layers=")
    for path, res in out.items():
      if len(res) == 7:  # a grouped matmul
        _accumulate_experts(acc, samples, path, res)
        continue
      gram, absmax, abssum, cnt, rows, valid = res
      if path in acc:
        g0, a0, s0, c0 = acc[path]
        acc[path] = (g0 + gram, jnp.maximum(a0, absmax), s0 + abssum, c0 + cnt)
      else:
        acc[path] = (gram, absmax, abssum, cnt)
      samples.setdefault(path, []).append(rows[jnp.asarray(valid)])
  if not structure.get("order"):
    raise ValueError(f"no nn.Dense (or RaggedDense) layer whose path fully matches "
                     f"{layers!r} was called; check the regex against paths like "
                     "'block/query'")
  dense = [p for p in structure["order"] if len(acc[p]) != 5]
  if token_mask is not None and dense and not masked:
    raise ValueError(
        "token_mask returned a mask whose shape matches the leading (non-feature) "
        f"shape of no captured layer's input ({dense[:3]}...): it would weight "
        "nothing. Return a mask of the activations' leading shape, e.g. [batch, "
        "seq] for [batch, seq, features] inputs")
  # (as capture_hessians refuses them: a NaN calibration batch made every
  # layer fall back to RTN silently, blaming a residual connection)
  bad = [p for p in structure["order"]
         if not bool(jnp.all(jnp.isfinite(acc[p][0])) & jnp.all(jnp.isfinite(acc[p][1])))]
  if bad:
    raise non_finite_inputs_error(bad)
  stats = {}
  for path in structure["order"]:
    if len(acc[path]) == 5:  # a grouped matmul
      gram, absmax, abssum, cnt, _ = acc[path]
      rows = jnp.concatenate([r for r, _ in samples[path]])[:max_samples]
      gids = jnp.concatenate([g for _, g in samples[path]])[:max_samples]
      stats[path] = ExpertStats(gram, absmax, abssum, cnt, rows, gids)
      continue
    gram, absmax, abssum, cnt = acc[path]
    sample = jnp.concatenate(samples[path])[:max_samples]
    stats[path] = DenseStats(gram, absmax, abssum, cnt, sample)
  return Capture(stats, list(structure["order"]),
                 [list(g) for g in structure["groups"]], dict(structure["producers"]),
                 tuple(structure["convs"]), dict(structure["skipped"]),
                 dict(structure["conv_axes"]))


# Largest relative error of patches @ kernel against the conv output (float32
# accumulation on both sides; a wrong feature order or padding gives O(1)).
_PATCH_RTOL = 2e-2


def _conv_unsupported(mod: nn.Module) -> Optional[str]:
  """Why an ``nn.Conv`` / ``nn.ConvTranspose`` cannot be captured as one matmul, or None."""
  if getattr(mod, "feature_group_count", 1) != 1:
    return (f"grouped/depthwise conv (feature_group_count="
            f"{mod.feature_group_count}): its kernel is not one [kh*kw*cin, cout] "
            "matmul; exclude it or quantize it with RTN through quantize_linen")
  if getattr(mod, "mask", None) is not None:
    return "masked conv (mask=...): the kernel the input meets is kernel * mask"
  if not getattr(mod, "shared_weights", True):
    return "unshared (ConvLocal) weights"
  return None


def conv_patches(lhs: jax.Array, kernel_shape: tuple, window_strides, padding,
                 lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None) -> jax.Array:
  """im2col patches of a channels-last conv input, in the kernel's feature order.

  Args:
    lhs: the conv input ``[N, *spatial, cin]`` (as ``lax.conv_general_dilated``
      receives it).
    kernel_shape: ``(*window, cin, cout)`` (HWIO-style, channels last).
    window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers:
      the conv's ``lax.conv_general_dilated`` arguments.

  Returns:
    ``[N, *out_spatial, prod(window) * cin]`` such that ``patches @
    kernel.reshape(-1, cout)`` is the conv output (``feature_group_count=1``).
  """
  window = tuple(kernel_shape[:-2])
  cin = kernel_shape[-2]
  p = jax.lax.conv_general_dilated_patches(
      lhs, window, window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, precision=_HI)
  # conv_general_dilated_patches orders features (input channel, window).
  lead = p.shape[:-1]
  p = p.reshape(lead + (cin, math.prod(window)))
  return jnp.swapaxes(p, -1, -2).reshape(lead + (math.prod(window) * cin,))


def _call_conv_recording(mod: nn.Module, busy: set, got: list, args, kwargs):
  """Runs ``mod`` with its lax conv recorded: appends ``(patches, rel_error)``."""
  inner = mod.conv_general_dilated or jax.lax.conv_general_dilated

  def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
           dimension_numbers=None, feature_group_count=1, batch_group_count=1,
           precision=None, preferred_element_type=None):
    y = inner(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
              dimension_numbers, feature_group_count, batch_group_count, precision,
              preferred_element_type)
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if (tuple(dn.lhs_spec) != (0, lhs.ndim - 1) + tuple(range(1, lhs.ndim - 1))
        or tuple(dn.rhs_spec) != (rhs.ndim - 1, rhs.ndim - 2)
        + tuple(range(rhs.ndim - 2))):
      raise ValueError(f"nn.Conv {layer_path(mod)!r}: only channels-last inputs and "
                       "(*window, cin, cout) kernels are captured")
    x = conv_patches(lhs.astype(jnp.float32), tuple(rhs.shape), window_strides,
                     padding, lhs_dilation, rhs_dilation, dimension_numbers)
    w2 = rhs.astype(jnp.float32).reshape(-1, rhs.shape[-1])
    ref = jax.lax.conv_general_dilated(
        lhs.astype(jnp.float32), rhs.astype(jnp.float32), window_strides, padding,
        lhs_dilation, rhs_dilation, dimension_numbers, precision=_HI)
    diff = jnp.max(jnp.abs(jnp.matmul(x, w2, precision=_HI) - ref))
    err = diff / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30)
    got.append((x, err))
    return y

  clone = mod.clone(parent=mod.scope, conv_general_dilated=conv,
                    conv_general_dilated_cls=None)
  busy.add(id(clone))
  try:
    return clone(*args, **kwargs)
  finally:
    busy.discard(id(clone))


def conv_matrix(kernel: jax.Array, in_axis: int = -2, out_axis: int = -1) -> jax.Array:
  """A conv kernel as the ``[prod(window) * cin, cout]`` matrix its im2col patches meet.

  Rows in ``(*window, cin)`` order (``conv_patches``); ``in_axis`` /
  ``out_axis`` are the kernel's channel axes (``(-2, -1)`` for ``nn.Conv``
  and ``nn.ConvTranspose``, ``(-1, -2)`` for a ``transpose_kernel``
  ConvTranspose, whose spatial flip the capture moves onto the patches).
  """
  k = jnp.moveaxis(kernel, (in_axis, out_axis), (-2, -1))
  return k.reshape(-1, k.shape[-1])


def conv_unmatrix(w2: jax.Array, shape: tuple, in_axis: int = -2,
                  out_axis: int = -1) -> jax.Array:
  """``conv_matrix``'s inverse: the matrix back in the kernel's ``shape``."""
  nd = len(shape)
  ia, oa = in_axis % nd, out_axis % nd
  window = tuple(d for i, d in enumerate(shape) if i not in (ia, oa))
  k = w2.reshape(window + (shape[ia], shape[oa]))
  return jnp.moveaxis(k, (-2, -1), (ia, oa))


def conv_transpose_axes(mod: nn.Module, ndim: int) -> tuple:
  """``(in_axis, out_axis)`` of a conv layer's kernel of ``ndim`` dims."""
  if isinstance(mod, nn.ConvTranspose) and mod.transpose_kernel:
    return ndim - 1, ndim - 2
  return ndim - 2, ndim - 1


def _conv_transpose_patches(mod: nn.ConvTranspose, x, out):
  """(rows of the matmul an ``nn.ConvTranspose`` performs, relative error).

  The patches are those of the input-dilated conv the layer lowers to
  (``conv_transpose_lowering``), taken through the same linear spatial map
  as its output (the flip back of ``transpose_kernel``, the wrap of
  ``padding="CIRCULAR"``), so that ``rows @ conv_matrix(kernel)`` plus the
  bias is the layer's output (checked against it).
  """
  params = {"kernel": mod.get_variable("params", "kernel")}
  if mod.use_bias:
    params["bias"] = mod.get_variable("params", "bias")
  low = conv_transpose_lowering(mod, x, params)
  kernel = jnp.asarray(low.kernel, jnp.float32)
  n = kernel.ndim - 2
  w2 = conv_matrix(kernel, low.in_axis, low.out_axis)
  window = tuple(kernel.shape[:n])
  cin = kernel.shape[low.in_axis]
  spatial = tuple(range(1, n + 1))
  dn = jax.lax.ConvDimensionNumbers((0, n + 1) + spatial,
                                    (n + 1, n) + tuple(range(n)),
                                    (0, n + 1) + spatial)
  a = low.conv_args
  p = conv_patches(low.lhs.astype(jnp.float32), window + (cin, w2.shape[-1]),
                   a["window_strides"], a["padding"], a["lhs_dilation"],
                   a["rhs_dilation"], dn)
  rows = low.post(p)
  y = out.astype(jnp.float32).reshape(rows.shape[:-1] + (w2.shape[-1],))
  if mod.use_bias:
    y = y - params["bias"].astype(jnp.float32)
  diff = jnp.max(jnp.abs(jnp.matmul(rows, w2, precision=_HI) - y))
  return rows, diff / jnp.maximum(jnp.max(jnp.abs(y)), 1e-30)


def _ragged_inputs(args, kwargs):
  names = ("x", "group_sizes")
  vals = list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]
  if len(vals) != 2:
    raise ValueError("a RaggedDense was called without (x, group_sizes)")
  return vals[0], vals[1]


def _expert_batch_stats(calls, n_keep: int, key):
  """Per-group statistics of one batch's calls of a grouped matmul."""
  grams, amaxs, asums, cnts, rows_all, gids_all, valid_all = [], [], [], [], [], [], []
  for x, group_sizes in calls:
    xr, xg, onehot, gid, valid = routed_rows(x, group_sizes)
    grams.append(jnp.einsum("gmk,gmj->gkj", xg, xg, precision=_HI))
    amaxs.append(jnp.max(jnp.abs(xg), axis=1))
    asums.append(jnp.sum(jnp.abs(xg), axis=1))
    cnts.append(jnp.sum(onehot, axis=0))
    rows_all.append(xr)
    gids_all.append(gid)
    valid_all.append(valid)
  xr = jnp.concatenate(rows_all)
  gid = jnp.concatenate(gids_all)
  valid = jnp.concatenate(valid_all)
  n = min(n_keep, xr.shape[0])
  score = jax.random.uniform(key, (xr.shape[0],)) + 2.0 * valid
  _, idx = jax.lax.top_k(score, n)
  return (sum(grams), functools.reduce(jnp.maximum, amaxs), sum(asums), sum(cnts),
          xr[idx], gid[idx], valid[idx])


def _accumulate_experts(acc: dict, samples: dict, path: str, res) -> None:
  gram, absmax, abssum, cnt, rows, gid, valid = res
  if path in acc:
    g0, a0, s0, c0, _ = acc[path]
    acc[path] = (g0 + gram, jnp.maximum(a0, absmax), s0 + abssum, c0 + cnt, None)
  else:
    acc[path] = (gram, absmax, abssum, cnt, None)
  keep = jnp.asarray(valid)
  samples.setdefault(path, []).append((rows[keep], gid[keep]))
