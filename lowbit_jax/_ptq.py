"""PTQ on every front end: Hessians from the rules' sites, GPTQ/RTN as pure functions.

``capture_hessians`` runs a model in calibrate mode through the rules machinery
(Linen ``quantize_linen``, NNX ``quantize_nnx`` or ``quantize_function``) and,
at every weight site a rule matched (``dot_general`` / ``einsum`` / conv with a
parameter operand: the same sites and paths fake and real mode quantize),
accumulates the input Hessian ``H = sum x x^T`` over the op's contraction
features (float32, rows optionally weighted by a token mask) and the number of
rows. A conv's rows are its im2col patches, features in the kernel's own
layout order (the output-feature axis left out). A 2-D weight the op reads
transposed (``x @ w.T``: PyTorch-style ``[out, in]`` weights, a tied head's
``Embed.attend``) is captured in its stored layout (``SiteCall.weight_view``);
one read through a reshape, slice or broadcast is not captured, and is listed
in ``Capture.skipped`` with the reason.

``ptq_params`` then runs an algorithm per site as a pure function of
(weight, statistics, spec) -- GPTQ (Frantar et al. 2023, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers") or RTN --
and returns the new parameters, the scale grid each weight was rounded with
(so real mode stores exactly those codes) and a per-layer report. AWQ and
SmoothQuant, whose scalings must be folded into each input's producer, run in
``_ptq_scaling`` over the folds ``_fold.find_scaling_folds`` finds in the
model's jaxpr; OmniQuant (layer-wise LWC, and LET over the same folds) in
``_ptq_omni``.

The capture traces one calibrate-mode call of the model per batch shape under
``jax.jit`` (the front end's own un-jitted body), every site's Hessian being an
output of that trace. Sites inside ``lax.scan`` / ``lax.cond`` /
``lax.while_loop`` bodies or a nested ``jax.jit`` cannot hand a Hessian back
and raise an error naming the layer; grouped convs are not captured here and
are listed in ``Capture.skipped``.

Grouped matmuls (``jax.lax.ragged_dot(x [M, K], w [E, K, N], group_sizes
[E])``: MoE experts) are captured per expert: expert ``e``'s Hessian sums
``x x^T`` over exactly the rows of ``x`` in its group (the tokens routed to
it), accumulated over the batches with the rows each expert saw
(``SiteStats`` with ``op="ragged_dot"``, ``hessian [E, K, K]``, ``count
[E]``; ``_experts``, the same math as ``apply_ptq``'s Linen capture). Their
rows are (token, expert) pairs, so ``token_mask`` does not apply to them.
GPTQ then runs on each expert's ``[K, N]`` matrix with its own Hessian, RTN
rounds each expert on its own grid, and the ``[E, ...]`` scale grid is
returned so real mode stores exactly those codes; an expert no calibration
token reached has no Hessian: it is rounded to nearest and reported (see
``ptq_params``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
import types
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowbit_jax import _experts, calibration
from lowbit_jax import _rules
from lowbit_jax import _ptq_rotation
from lowbit_jax import _ptq_scaling
from lowbit_jax._ptq_scaling import AWQ_CLIP_SKIP
from lowbit_jax.algorithms.gptq import block_ranges, gptq
from lowbit_jax.algorithms.rtn import hessian_error, kernel_spec, rtn_scales
from lowbit_jax.core import fake_quant, quantize
from lowbit_jax.core._qarray import block_shape
from lowbit_jax.core._spec import QuantSpec, as_spec

_HI = lax.Precision.HIGHEST
METHODS = ("gptq", "rtn", "awq", "awq_noclip", "smoothquant", "rotation", "omniquant",
           "quarot", "spinquant")
# What rounds one site (quantize_site, and the rotations' quantizer=); the
# others transform weights first.
ROUNDING = ("rtn", "gptq")


class SiteStats(NamedTuple):
  """Input statistics of one weight site (what ``capture_hessians`` returns).

  A grouped matmul (``op="ragged_dot"``, MoE experts, weight ``[E, K, N]``)
  has one Hessian per expert: ``hessian [E, K, K]`` and ``count [E]`` from
  the rows routed to each expert only; its ``as_matrix`` is the ``[E, K, N]``
  stack itself (expert ``e``'s ``[K, N]`` matrix at ``[e]``).

  Attributes:
    hessian: float32 ``[K, K]``: ``sum x x^T`` over the rows (token-mask
      weighted), features in the order of ``as_matrix(weight)``'s rows
      (``[E, K, K]`` for experts).
    count: float32 scalar, the number of rows (mask-weighted; ``[E]`` for
      experts).
    op: "dot_general", "conv" or "ragged_dot".
    contract: the weight's contraction axes, in the order the matrix's rows
      flatten them (a matmul: ascending; a conv: its window axes, then its
      input-feature axis, which varies fastest).
    out_axis: a conv kernel's output-feature axis (None for matmuls).
    in_axis: a conv kernel's input-feature axis (None for matmuls).
    shape: the weight's logical shape.
  """
  hessian: jax.Array
  count: jax.Array
  op: str
  contract: tuple
  out_axis: Optional[int]
  in_axis: Optional[int]
  shape: tuple

  def as_matrix(self, w: jax.Array) -> jax.Array:
    """The weight as the ``[K, N]`` matrix the site's inputs meet (``x @ W``)."""
    if self.op == "ragged_dot":
      return w
    rest = tuple(i for i in range(w.ndim) if i not in self.contract)
    m = jnp.transpose(w, self.contract + rest)
    k = math.prod(w.shape[i] for i in self.contract)
    return m.reshape(k, -1)

  def from_matrix(self, m: jax.Array) -> jax.Array:
    """Inverse of ``as_matrix``: the ``[K, N]`` matrix back in the weight's layout."""
    if self.op == "ragged_dot":
      return m
    rest = tuple(i for i in range(len(self.shape)) if i not in self.contract)
    perm = self.contract + rest
    t = m.reshape(tuple(self.shape[i] for i in perm))
    return jnp.transpose(t, np.argsort(perm))


class InputStats(NamedTuple):
  """Per-row magnitudes of a site's inputs and a sample of them (AWQ, SmoothQuant).

  Rows are the ``[K]`` features of ``SiteStats.as_matrix``'s rows.

  Attributes:
    abs_sum: ``[K]`` sum of |x| over the rows (mask-weighted).
    abs_max: ``[K]`` max |x| over the (unmasked) rows.
    sample: ``[S, K]`` retained input rows (chosen at random per batch).
    sample_group: experts (``ragged_dot``) only: ``[S]`` the expert each
      retained row was routed to (the magnitudes are over all routed rows);
      None elsewhere.
  """
  abs_sum: jax.Array
  abs_max: jax.Array
  sample: jax.Array
  sample_group: Optional[jax.Array] = None


class Capture(NamedTuple):
  """What ``capture_hessians`` returns.

  Attributes:
    stats: parameter path -> ``SiteStats``, in the order sites first ran.
    sites: parameter path -> the matched ``Site`` (its rule and weight spec).
    skipped: parameter path -> why a matched weight site was not captured.
    inputs: parameter path -> ``InputStats`` (``max_samples`` > 0 only).
    unused_rules: the given rules that matched no site (a typo quantizes
      nothing); a ``QuantConfig(strict=True)`` raises on them instead.
    kinds: parameter path -> the op kinds its front end matched rules with
      (``ptq_params(capture=)`` matches its rules the same way).
  """
  stats: dict
  sites: dict
  skipped: dict
  inputs: dict = {}
  unused_rules: tuple = ()
  kinds: dict = {}


class PTQResult(NamedTuple):
  """What ``ptq_params`` returns.

  Attributes:
    params: the parameters with each treated weight replaced by its
      fake-quantized value (the same pytree kind as given; for an NNX model
      its ``nnx.State`` of Params, the model being updated in place).
    weight_scales: ``{parameter path: scale grid}``: the scales each weight
      was rounded with, in the weight's own layout, as real mode takes them
      (``real_mode_kwargs`` puts them in each front end's form); for an
      asymmetric spec a ``(scale grid, zero point grid)`` pair (method "rtn"
      gives none: its weights reach their own ranges, which real mode
      re-derives; GPTQ's and the scaling methods' need not).
    weight_tensor_scales: ``{parameter path: float32 scalar}``: the tensor
      scale a two-level (NVFP4) weight's block scales were chosen under, which
      real mode stores them under (``quantize(..., tensor_scale=)``; without
      it the tensor scale would be rebuilt from the largest block scale, which
      for GPTQ's blocks need not be the one it rounded with). Empty for
      one-level formats and for methods whose scales define their tensor
      scale that way (OmniQuant's learned scales).
    report: ``{"method", "seconds", "layers": {path: {"spec", "error",
      "rtn_error", "error_vs_rtn", "rows", "seconds"}}, "skipped",
      "unused_rules"}`` (a layer's ``seconds``: gptq/rtn only; ``unused_rules``
      the regexes of the rules that matched no site, a ``QuantConfig(strict=
      True)`` raising on them instead); ``error`` is the
      output error on the captured inputs, ``tr(dW^T H dW) / rows``.
    rules: "quarot" / "spinquant": the rules fake and real mode must run the
      rotated model with (``report["rotation"].rules(rules)``: the online
      Hadamard rules, then the given rules); None for the other methods (run
      with the given rules).
  """
  params: Any
  weight_scales: dict
  report: dict
  rules: Optional[tuple] = None
  weight_tensor_scales: Mapping[str, jax.Array] = types.MappingProxyType({})


def _split_batch(batch: Any) -> tuple:
  if isinstance(batch, (tuple, list)):
    return tuple(batch), {}
  if isinstance(batch, Mapping):
    return (), dict(batch)
  return (batch,), {}


def _front_end(model) -> str:
  try:
    from flax import nnx
    import flax.linen as nn
  except ImportError:   # flax is optional: only plain functions then
    return "function"
  if isinstance(model, nnx.Module):
    return "nnx"
  if isinstance(model, nn.Module):
    return "linen"
  if not callable(model):
    raise TypeError(f"expected a function fn(params, *batch), a Linen module or an "
                    f"NNX module, got {type(model).__name__}")
  return "function"


def _capture_rules(rules):
  """The rules with static ranges switched off (the capture records no ranges)."""
  if isinstance(rules, _rules.QuantConfig):
    rules = rules.rules
  out = []
  for r in _rules.as_rules(rules):
    out.append(dataclasses.replace(r, static=False) if r.static else r)
  return out


class _Recorder:
  """Accumulates each site's Hessian and row count inside one traced batch.

  ``acc`` holds the traced ``(hessian, count)`` per parameter path (outputs of
  the trace); ``meta`` the static layout data of ``SiteStats``; ``skipped``
  the matched sites that cannot be captured, with the reason.
  """

  def __init__(self):
    self.sites: dict = {}
    self.skipped: dict = {}
    self.meta: dict = {}
    self.row_shapes: set = set()   # the leading shapes a mask could have matched
    self.masked = False            # whether the mask matched one
    self.begin(None, None)

  def begin(self, mask, trace, key=None, keep: int = 0) -> None:
    """Starts one traced batch: its mask (traced), the trace it runs in, and
    (``keep`` > 0) the key choosing the ``keep`` rows of each input to retain."""
    self.acc: dict = {}
    self.mask = mask
    self.trace = trace
    self.key = key
    self.keep = keep

  def _experts(self, site, x, group_sizes, shape):
    """A grouped matmul: one Hessian and row count per expert (``_experts``)."""
    h, n = _experts.expert_hessians(x, group_sizes)
    extra = None
    if self.keep:   # AWQ/SmoothQuant: magnitudes over all routed rows, a sample
      xr, _, _, gid, valid = _experts.routed_rows(x, group_sizes)
      ax = jnp.abs(xr) * valid[:, None]
      score = jax.random.uniform(self.key, (xr.shape[0],)) + 2.0 * valid
      _, idx = lax.top_k(score, min(self.keep, xr.shape[0]))
      extra = (jnp.sum(ax, axis=0), jnp.max(ax, axis=0), xr[idx], valid[idx], gid[idx])
    self._add(site, ("ragged_dot", (1,), None, None, shape), h, n, extra)

  def _add(self, site, meta, h, n, extra) -> None:
    """Adds one use's Hessian and row count to its path (``extra``: the
    AWQ/SmoothQuant statistics, only with ``keep``)."""
    path = site.path
    if self.meta.get(path, meta) != meta or (
        path in self.acc and self.acc[path][0].shape != h.shape):
      raise ValueError(f"{path}: the weight is used by ops with different "
                       "contraction features; one Hessian cannot serve both")
    self.meta[path] = meta
    prev = self.acc.get(path)
    if prev is not None:
      if self.keep:
        raise ValueError(f"{path}: the weight is used by several ops; AWQ and "
                         "SmoothQuant need one input per weight")
      h, n = prev[0] + h, prev[1] + n
    self.acc[path] = (h, n) if extra is None else (h, n, extra)
    self.sites[path] = site

  def __call__(self, site, op, x, w, params):
    if site.weight is None:
      return
    path = site.path
    if isinstance(x, jax.core.Tracer) and getattr(x, "_trace", None) is not self.trace:
      raise ValueError(
          f"{path}: this site runs inside lax.scan, lax.cond, lax.while_loop, a "
          "nested jax.jit or a remat (nn.remat, nnx.remat, jax.checkpoint around "
          "a Linen or NNX layer), whose body cannot hand its Hessian back; capture "
          "a version of the model with the loop unrolled (a Python loop), without "
          "an inner jit and without remat (remat changes memory, not values); "
          "for remat, a function of the parameters (lambda p, *a: model.apply("
          "{'params': p}, *a)) also works: its front end follows remat")
    shape = _rules.logical_shape(w)
    view = params.get("weight_view", ())
    if view != ():
      if view != (1, 0) or op != "dot_general" or len(params["dimension_numbers"][0][1]) != 1:
        self.skipped[path] = (
            "the weight reaches this op through a reshape, slice or broadcast of "
            "the stored parameter, whose layout its input Hessian does not map "
            "onto: not captured (fake and real mode still round it per call). "
            "Store the parameter in the shape the op reads (reshape it once, "
            "outside the model) for GPTQ, AWQ or SmoothQuant on it")
        return
      shape = shape[::-1]   # the stored layout: the op reads its transpose
    if op == "ragged_dot":
      self._experts(site, x, params["group_sizes"], tuple(shape))
      return
    if op == "dot_general":
      (lc, rc), (lb, rb) = params["dimension_numbers"]
      if rb:
        self.skipped[path] = (f"the weight has batch axes {tuple(rb)} (one matrix "
                              "per batch index): not captured")
        return
      pairs = sorted(zip(lc, rc), key=lambda p: p[1])
      lcs, contract = tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
      if view == (1, 0):   # x @ w.T: the op's contraction axis is the stored one's other
        contract = (1 - contract[0],)
      nd = x.ndim
      free = tuple(i for i in range(nd) if i not in lcs)
      rows_shape = tuple(x.shape[i] for i in free)
      xm = jnp.transpose(x, free + lcs).reshape(math.prod(rows_shape), -1)
      st_extra = (contract, None, None)
    else:
      if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
        self.skipped[path] = ("grouped conv (feature_group_count or "
                              "batch_group_count > 1): not captured")
        return
      dn = lax.conv_dimension_numbers(x.shape, shape, params["dimension_numbers"])
      out_axis, in_axis = dn.rhs_spec[0], dn.rhs_spec[1]
      # Rows in (*window, cin) order, input features fastest whatever the
      # layout (OIHW too): the order group_size blocks run in, as real and fake
      # mode group a conv kernel along its input features (and as the Flax
      # capture's conv_matrix orders them).
      contract = tuple(i for i in range(len(shape))
                       if i not in (out_axis, in_axis)) + (in_axis,)
      k = math.prod(shape[i] for i in contract)
      # The identity kernel: output feature f is the one-hot of kernel entry f
      # (the non-output axes flattened in ``contract`` order), so the conv
      # gives each output position's patch in that row order.
      eye = jnp.eye(k, dtype=jnp.float32).reshape(
          tuple(shape[i] for i in contract) + (k,))
      order = contract + (out_axis,)
      eye = jnp.transpose(eye, [order.index(j) for j in range(len(shape))])
      patches = lax.conv_general_dilated(
          x.astype(jnp.float32), eye, params["window_strides"], params["padding"],
          params["lhs_dilation"], params["rhs_dilation"],
          params["dimension_numbers"], precision=_HI)
      fo = dn.out_spec[1]
      patches = jnp.moveaxis(patches, fo, -1)
      rows_shape = patches.shape[:-1]
      xm = patches.reshape(-1, k)
      st_extra = (contract, out_axis, in_axis)
    xm = xm.astype(jnp.float32)
    wts = None
    self.row_shapes.add(tuple(rows_shape))
    if self.mask is not None and tuple(self.mask.shape) == tuple(rows_shape):
      wts = jnp.asarray(self.mask, jnp.float32).reshape(-1)
      self.masked = True
    if wts is None:
      h = jnp.matmul(xm.T, xm, precision=_HI)
      n = jnp.float32(xm.shape[0])
    else:
      h = jnp.matmul((xm * wts[:, None]).T, xm, precision=_HI)
      n = jnp.sum(wts)
    extra = None
    if self.keep:   # AWQ/SmoothQuant: per-row magnitudes and a row sample
      valid = (jnp.ones((xm.shape[0],), bool) if wts is None else wts > 0)
      w_ = jnp.ones((xm.shape[0],), jnp.float32) if wts is None else wts
      ax = jnp.abs(xm)
      abs_sum = jnp.sum(ax * w_[:, None], axis=0)
      abs_max = jnp.max(jnp.where(valid[:, None], ax, 0.0), axis=0)
      score = jax.random.uniform(self.key, (xm.shape[0],)) + 2.0 * valid
      _, idx = lax.top_k(score, min(self.keep, xm.shape[0]))
      extra = (abs_sum, abs_max, xm[idx], valid[idx])
    self._add(site, (op, *st_extra, tuple(shape)), h, n, extra)


def _runner(model, params, rules, front: str):
  """``(run(args, kwargs), state, config)``: one calibrate-mode call of the
  model, to trace inside ``jax.jit`` (``state`` is what the call reads as an
  argument; ``config`` records which of the capture's rules matched)."""
  crules = _rules.QuantConfig(_capture_rules(rules))
  if front == "function":
    from lowbit_jax._function import quantize_function
    qf = quantize_function(model, crules, mode="calibrate")
    extras = {"stats": None, "scales": None, "state": None, "rng": None}

    def run(p, args, kwargs):
      qf._run(p, args, kwargs, extras)   # its un-jitted body: traced here
    return run, params, crules
  if front == "linen":
    from lowbit_jax.flax import quantize_linen
    variables = params if _is_variables(params, front) else {"params": params}
    fn = quantize_linen(crules, mode="calibrate")(model.apply)

    def run(v, args, kwargs):
      fn(v, *args, **kwargs, mutable=["quant_stats"])
    return run, variables, crules
  from flax import nnx
  from lowbit_jax.flax import quantize_nnx
  graph, state = nnx.split(quantize_nnx(model, crules, mode="calibrate"))

  def run(st, args, kwargs):
    m = nnx.merge(graph, st)
    m(*args, **kwargs)
  return run, state, crules


def capture_hessians(model, params, calib_batches: Sequence[Any], rules, *,
                     token_mask: Optional[Callable] = None, max_samples: int = 0,
                     seed: int = 0) -> Capture:
  """Input Hessians of every weight site the rules match, on any front end.

  Args:
    model: a function ``fn(params, *batch)`` (``quantize_function``'s front
      end), a Linen module (``params`` its params or variables) or an NNX
      module (``params`` None: the model holds them; not modified).
    params: the parameter pytree (function, Linen) or None (NNX).
    calib_batches: batches; a tuple/list is positional arguments, a dict
      keyword arguments, anything else one argument.
    rules: QuantRules (or a QuantConfig); sites whose rule has a weight spec
      are captured.
    token_mask: optional ``batch -> mask``: rows of a site whose leading
      (non-contraction) shape equals the mask's are weighted by it; other
      sites are not masked.
    max_samples: if > 0, also record each site's ``InputStats`` with up to
      this many rows retained (split evenly over the batches, chosen at
      random among the unmasked rows, as the Linen capture does).
    seed: the key of that choice.

  Returns:
    A ``Capture`` (``stats``, ``sites``, ``skipped``, ``inputs``).

  Raises:
    ValueError: no batches, or no weight site matched (naming the rules).
  """
  batches = list(calib_batches)
  if not batches:
    raise ValueError("calib_batches is empty; pass at least one batch")
  front = _front_end(model)
  if front == "nnx" and params is not None:
    raise ValueError("an NNX model holds its parameters: pass params=None")
  if front != "nnx" and params is None:
    raise ValueError("pass the parameter pytree as params (None is for NNX models)")
  if not isinstance(max_samples, int) or max_samples < 0:
    raise ValueError(f"max_samples must be an int >= 0, got {max_samples!r}")
  keep = -(-max_samples // len(batches)) if max_samples else 0
  run, state, config = _runner(model, params, rules, front)
  rec = _Recorder()

  @jax.jit
  def step(st, args, kwargs, mask, key):
    rec.begin(mask, getattr(jax.tree.leaves((st, args, kwargs))[0], "_trace", None),
              key, keep)
    with _rules.recording_inputs(rec):
      run(st, args, kwargs)
    return rec.acc

  total: dict = {}
  inputs: dict = {}
  for i, b in enumerate(batches):
    args, kwargs = _split_batch(b)
    mask = None if token_mask is None else jnp.asarray(token_mask(b))
    key = jax.random.fold_in(jax.random.key(seed), i)
    for path, (h, n, *extra) in step(state, args, kwargs, mask, key).items():
      if path in total:
        h, n = total[path][0] + h, total[path][1] + n
      total[path] = (h, n)
      if extra:
        a_sum, a_max, rows, valid, *grp = extra[0]   # grp: experts' row groups
        rows, grp = rows[np.asarray(valid)], [g[np.asarray(valid)] for g in grp]
        if path in inputs:
          s0, m0, r0, *g0 = inputs[path]
          a_sum, a_max, rows = s0 + a_sum, jnp.maximum(m0, a_max), jnp.concatenate(
              [r0, rows])
          grp = [jnp.concatenate([a, b]) for a, b in zip(g0, grp)]
        inputs[path] = (a_sum, a_max, rows, *grp)
  if not total:
    names = [r.path for r in _capture_rules(rules) if r.weight is not None]
    why = (f"; not captured: {rec.skipped}" if rec.skipped else "")
    raise ValueError(
        f"no weight site was captured: rules with a weight spec ({names or 'none'}) "
        f"matched no dot_general, einsum or conv with a parameter operand{why}. "
        "Rules match parameter paths such as 'layers_0/mlp/up/kernel' or their "
        "layer path ('layers_0/mlp/up'); give a rule a weight spec")
  if token_mask is not None and not rec.masked and rec.row_shapes:
    raise ValueError(
        f"token_mask returned a mask of shape {tuple(mask.shape)}, which matches the "
        f"rows of no captured site (their leading shapes: {sorted(rec.row_shapes)}): "
        "it would weight nothing. Return a mask of the activations' leading "
        "(non-contraction) shape, e.g. [batch, seq] for [batch, seq, features] inputs")
  bad = [p for p, (h, _) in total.items() if not bool(jnp.all(jnp.isfinite(h)))]
  if bad:
    raise calibration.non_finite_inputs_error(bad)
  stats = {p: SiteStats(h, n, *rec.meta[p]) for p, (h, n) in total.items()}
  inputs = {p: InputStats(a, m, r[:max_samples], *[g[:max_samples] for g in grp])
            for p, (a, m, r, *grp) in inputs.items()}
  return Capture(stats, {p: rec.sites[p] for p in stats}, dict(rec.skipped), inputs,
                 _unused(rules, config),
                 {p: _site_kinds(front, rec.sites[p].op) for p in stats})


def _unused(rules, config) -> tuple:
  """The caller's ``rules`` whose capture copies (``config``, same order)
  matched no site; raises as ``QuantConfig.check`` does for a strict config."""
  given = rules.rules if isinstance(rules, _rules.QuantConfig) else _rules.as_rules(rules)
  unused = {id(r) for r in config.unused_rules()}
  out = tuple(r for r, c in zip(given, config.rules) if id(c) in unused)
  _check_strict(rules, out)
  return out


def _check_strict(rules, unused: tuple) -> None:
  """Raises as ``QuantConfig.check`` does when ``rules`` is a strict config
  and some of them matched nothing."""
  if isinstance(rules, _rules.QuantConfig) and rules.strict and unused:
    _rules.QuantConfig(list(unused), strict=True).check()


def _plan(st: SiteStats, spec: QuantSpec) -> _rules.WeightPlan:
  if st.op == "conv":
    return _rules.plan_weight(spec, st.shape, "conv", out_axis=st.out_axis,
                              in_axis=st.in_axis)
  return _rules.plan_weight(spec, st.shape, "dot_general", contracting=st.contract)


def _matrix_spec(spec: QuantSpec, path: str) -> QuantSpec:
  if spec.axis is not None or spec.tile is not None:
    raise ValueError(
        f"{path}: ptq_params runs GPTQ on the weight as a [K, N] matrix and needs a "
        "weight spec with an unset axis (per output channel, or group_size groups "
        f"along the contraction), got axis={spec.axis!r}, tile={spec.tile!r}")
  return kernel_spec(spec)


def quantize_site(method: str, w: jax.Array, st: SiteStats, spec: QuantSpec, *,
                  path: str = "", blocksize: int = 128, percdamp: float = 0.01,
                  act_order: bool = False) -> "SiteResult":
  """One site's weight by ``method``: a pure ``(weight, stats, spec) -> SiteResult``.

  Args:
    method: "gptq" or "rtn".
    w: the float weight in its own layout.
    st: its ``SiteStats`` (MoE experts: each expert of the ``[E, K, N]``
      stack with its own Hessian; an expert without rows rounded to nearest).
    spec: the rule's weight spec.
    path: the parameter path (for errors).
    blocksize, percdamp, act_order: GPTQ's options (``algorithms.gptq``).

  Returns:
    ``SiteResult(weight, scale, tensor_scale)``: the fake-quantized weight
    (w's layout and dtype), the scale grid it was rounded with in the layout
    real mode stores (an asymmetric spec: a ``(scale, zero point)`` pair),
    and a two-level (NVFP4)
    spec's float32 tensor scale, else None (``quantize_weight(w_q, plan,
    scale, tensor_scale)`` reproduces its codes).

  Raises:
    ValueError: an unknown method, a spec GPTQ cannot take as a matrix, a
      weight holding NaN or inf, or scales that do not reproduce the codes
      (the spec's blocks straddle the weight's axes).
  """
  _check_finite_weight(w, path)
  wq, scale, tscale, exact, _, _ = _site(
      w, st.hessian, st.count, method=method, meta=tuple(st[2:]), spec=spec,
      path=path, opts=(blocksize, float(percdamp), bool(act_order)))
  if not bool(exact):
    raise ValueError(
        f"{path}: the scales GPTQ chose do not reproduce its codes in the weight's "
        f"layout (spec {spec}); the spec's blocks do not map onto the [K, N] matrix "
        "(a group_size must divide the last contraction axis)")
  return SiteResult(wq, scale, tscale)


def _check_finite_weight(w: jax.Array, path: str) -> None:
  """Raises for a weight holding NaN or inf (its scales then failed the
  exactness check, blamed on group_size, or NaNs came back silently)."""
  bad = int(jnp.sum(~jnp.isfinite(w)))
  if bad:
    raise ValueError(f"{path}: the weight holds {bad} NaN or inf value(s); PTQ "
                     "rounds finite weights: repair the checkpoint, or exclude "
                     "this layer with a float rule (QuantRule(path)) first")


class SiteResult(NamedTuple):
  """What ``quantize_site`` returns (see there)."""
  weight: jax.Array
  scale: Optional[jax.Array]
  tensor_scale: Optional[jax.Array]


def _site(w, hessian, count, *, method, meta, spec, path, opts):
  """``(w_q, scale, tensor scale, codes reproduced, error, RTN's error)`` of
  one site (the tensor scale: two-level specs, else None).

  GPTQ runs on its own (``algorithms.gptq`` compiles once per matrix shape and
  spec); what comes before and after it is jitted per site.
  """
  if method not in ROUNDING:
    raise ValueError(f"a site is rounded by one of {ROUNDING}, got {method!r} "
                     "(the other methods transform weights before rounding: "
                     "ptq_params)")
  try:
    if meta[0] == "ragged_dot":
      return _expert_site(w, hessian, count, method=method, meta=meta, spec=spec,
                          path=path, opts=opts)
    if method == "rtn":
      return _finish(w, None, None, hessian, count, meta=meta, spec=spec)
    blocksize, percdamp, act_order = opts
    res = gptq(_as_matrix(w, meta=meta), hessian, _matrix_spec(spec, path),
               blocksize=blocksize, percdamp=percdamp, act_order=act_order)
    return _finish(w, res.weight, res.amax, hessian, count, res.tensor_amax, res.amin,
                   meta=meta, spec=spec)
  except ValueError as e:
    msg = str(e)
    raise ValueError(msg if msg.startswith(f"{path}: ") else f"{path}: {msg}") from e


def _expert_site(w, hessian, count, *, method, meta, spec, path, opts):
  """``_site`` of a grouped matmul: each expert on its own Hessian.

  The errors are per expert, ``[E]``: ``tr(dW_e^T H_e dW_e) / rows_e`` (0
  for an expert without rows).
  """
  if method == "rtn":
    return _finish_experts(w, None, None, hessian, count, meta=meta, spec=spec)
  blocksize, percdamp, act_order = opts
  try:
    wq, amax, _, t_amax, amin = _experts.quantize_experts(
        w, hessian, count, _matrix_spec(spec, path), method, blocksize=blocksize,
        percdamp=percdamp, act_order=act_order)
  except ValueError as e:
    msg = str(e)
    raise ValueError(msg if msg.startswith(f"{path}: ") else f"{path}: {msg}") from e
  return _finish_experts(w, wq, amax, hessian, count, t_amax, amin, meta=meta,
                         spec=spec)


def _rtn_grids(w: jax.Array, spec: QuantSpec) -> tuple:
  """``(scale, tensor scale)`` RTN rounded ``w`` with; an asymmetric spec's
  scale is the ``(scale, zero point)`` pair. Real mode needs them: its own
  ranges, taken again from the rounded weight, differ from ``w``'s (an
  asymmetric block's ends move when rounded: 30 of 128 entries of an int4
  g8 weight stored differently in float32, up to 0.0078 in bfloat16)."""
  if spec.symmetric:
    return rtn_scales(w, spec)
  q = quantize(w, spec)
  return (q.scale.astype(jnp.float32), q.zero_point), None


def _scales_exact(wq, spec: QuantSpec, scale, tscale):
  """Whether re-quantizing ``wq`` with its scales reproduces it (as real mode
  stores it)."""
  if scale is None:
    return jnp.bool_(True)
  if isinstance(scale, tuple):   # an asymmetric spec's (scale, zero point)
    return jnp.array_equal(fake_quant(wq, spec, scale=scale[0], zero_point=scale[1]),
                           wq)
  return jnp.array_equal(fake_quant(wq, spec, scale=scale, tensor_scale=tscale), wq)


@functools.partial(jax.jit, static_argnames=("meta", "spec"))
def _finish_experts(w, wq, amax, hessian, count, t_amax=None, amin=None, *, meta,
                    spec):
  """``_finish`` of an expert stack ``[E, K, N]`` (jitted); per-expert errors.

  The stack is one tensor to the spec: a two-level format's experts share
  one tensor scale (``t_amax``: the stack's range GPTQ rounded under); an
  asymmetric spec's scale and zero point come from each block's range
  (``amax``/``amin``: GPTQ's, or an RTN-fallback expert's own) as a pair.
  """
  plan = _plan(SiteStats(hessian, count, *meta), spec)
  rtn_w = fake_quant(w, plan.spec)
  scale = tscale = None
  if wq is None:   # RTN
    wq = rtn_w
    scale, tscale = _rtn_grids(w, plan.spec)
  else:   # the range each block was rounded with (GPTQ's, or the weight's own)
    wq = wq.astype(w.dtype)
    if plan.spec.symmetric:
      scale, tscale = rtn_scales(amax, plan.spec, t_amax)
    else:
      scale = asym_pair(wq, amax, amin, plan.spec)
  exact = _scales_exact(wq, plan.spec, scale, tscale)
  rows = jnp.maximum(count, 1.0)
  err = jax.vmap(hessian_error)(hessian, w, wq) / rows
  rerr = jax.vmap(hessian_error)(hessian, w, rtn_w) / rows
  return wq, scale, tscale, exact, err, rerr


@functools.partial(jax.jit, static_argnames=("meta",))
def _as_matrix(w, *, meta):
  return SiteStats(None, None, *meta).as_matrix(w)


def _block_grid(full: jax.Array, spec: QuantSpec) -> jax.Array:
  """A per-block grid from an array constant within each block (``full``, in
  the layout ``spec`` quantizes): each block's first element."""
  bs = block_shape(spec, full.shape)
  return full[tuple(slice(None, None, b) for b in bs)]


def asym_pair(wq: jax.Array, hi_full: jax.Array, lo_full: jax.Array,
              spec: QuantSpec) -> tuple:
  """The ``(scale, zero point)`` grids an asymmetric ``spec`` stores ``wq``
  with, from GPTQ's block ranges spread over ``wq``'s layout (``block_ranges``
  of ``GPTQResult.amax`` / ``amin``)."""
  q = quantize(wq, spec, amax=_block_grid(hi_full.astype(jnp.float32), spec),
               amin=_block_grid(lo_full.astype(jnp.float32), spec))
  return q.scale.astype(jnp.float32), q.zero_point


@functools.partial(jax.jit, static_argnames=("meta", "spec"))
def _finish(w, wq_matrix, amax, hessian, count, t_amax=None, amin=None, *, meta, spec):
  """The quantized weight in its layout, its scales (and a two-level spec's
  tensor scale: the one GPTQ rounded under, from ``t_amax``; an asymmetric
  spec's scale and zero point, from GPTQ's block ranges ``amax``/``amin``, as
  a pair), whether they reproduce it, and the errors (jitted)."""
  st = SiteStats(hessian, count, *meta)
  plan = _plan(st, spec)
  rtn_w = fake_quant(w, plan.spec)
  scale = tscale = None
  if wq_matrix is None:   # RTN
    wq = rtn_w
    scale, tscale = _rtn_grids(w, plan.spec)
  else:
    wq = st.from_matrix(wq_matrix).astype(w.dtype)
    if plan.spec.symmetric:   # the range each block was rounded with
      full = block_ranges(amax, wq_matrix.shape, spec)
      scale, tscale = rtn_scales(st.from_matrix(full.astype(jnp.float32)), plan.spec,
                                 t_amax)
    else:   # the scale and zero point of those ranges
      scale = asym_pair(wq, *(st.from_matrix(block_ranges(a, wq_matrix.shape, spec))
                              for a in (amax, amin)), plan.spec)
  exact = _scales_exact(wq, plan.spec, scale, tscale)
  mw, rows = st.as_matrix(w), jnp.maximum(count, 1.0)
  err = hessian_error(hessian, mw, st.as_matrix(wq)) / rows
  rerr = hessian_error(hessian, mw, st.as_matrix(rtn_w)) / rows
  return wq, scale, tscale, exact, err, rerr


def _is_variables(params, front: str) -> bool:
  """Whether Linen ``params`` are variables (``{"params": ..., ...}``)."""
  return front == "linen" and isinstance(params, Mapping) and "params" in params


def _param_tree(model, params, front: str, unbox: bool = True):
  """The nested dict of parameters the sites' paths index (Linen's metadata
  boxes, ``nn.with_partitioning``'s, unboxed unless ``unbox`` is False)."""
  if front == "nnx":
    from flax import nnx
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tree = params["params"] if _is_variables(params, front) else params
  if front == "linen" and unbox:
    from flax.core import meta
    tree = meta.unbox(tree)
  return tree


def _get_path(tree, path: str):
  """The leaf at ``path`` (``_rules.path_str`` of its key path) in ``tree``."""
  node = tree
  try:   # nested dicts and lists: a walk
    for k in path.split("/"):
      node = node[int(k)] if isinstance(node, list) else node[k]
    if _rules.is_qarray(node) or isinstance(node, (jax.Array, np.ndarray)):
      return node
  except (KeyError, IndexError, TypeError, ValueError):
    pass
  # Any other pytree (integer dict keys of an NNX state, a NamedTuple, a
  # dataclass): its leaves by their path strings, as _write_back writes them.
  for kp, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_rules.is_qarray)[0]:
    if _rules.path_str(kp) == path:
      return leaf
  raise KeyError(f"no parameter at {path!r}")


def ptq_params(model, params, calib_batches: Sequence[Any], rules, *,
               method: str = "gptq", token_mask: Optional[Callable] = None,
               blocksize: int = 128, percdamp: float = 0.01,
               act_order: bool = False, capture: Optional[Capture] = None,
               alpha: float = 0.5, n_grid: int = 20, max_samples: int = 512,
               seed: int = 0, fold_rtol: float = 1e-3,
               awq_clip_skip: Optional[str] = AWQ_CLIP_SKIP,
               rotation_block_size: Optional[int] = None,
               omniquant: Optional[Any] = None, quantizer: str = "rtn",
               online: Optional[str] = None, heads: Optional[tuple] = None,
               spinquant: Optional[Any] = None) -> PTQResult:
  """Post-training quantization of every weight site the rules match, any front end.

  GPTQ (Frantar et al. 2023) or RTN per site, from the Hessians
  ``capture_hessians`` records through the rules machinery: the same sites and
  parameter paths fake and real mode use, on a plain function
  (``quantize_function``), a Linen module or an NNX module. Each weight is
  rounded on the grid of its rule's weight spec; activation specs are not
  applied during the capture (inputs are float).

  "awq" (Lin et al. 2024: scale search, then its clip search), "awq_noclip"
  and "smoothquant" (Xiao et al. 2023) first rescale each group of weights
  that read one producer's output, folding ``1/s`` into the producer where the
  model's jaxpr shows the fold is exact (``_fold.find_scaling_folds``: a norm
  gain, or the previous linear layer through views, attention's ``p @ v`` or
  a gated product); other sites are reported with the reason and only
  rounded. The float model is checked unchanged on the first batch, then each
  weight is rounded to nearest on its grid (see ``_ptq_scaling``). "rotation"
  (the per-layer randomized Hadamard of ``apply_ptq``) folds an orthogonal
  ``R`` instead, where the jaxpr shows it folds exactly: into a linear
  producer whose output reaches its readers only through views and bias
  additions (``ScalingFold.rotation_why`` says why not elsewhere).

  "quarot" (Ashkboos et al. 2024) and "spinquant" (Liu et al. 2024) rotate
  the whole model instead (``_ptq_rotation``, the driver ``apply_ptq``'s
  methods of the same names share): the residual stream is found in the jaxpr
  of the model as a function of its parameters, the RMS norm gains are fused
  into their readers, one randomized Hadamard (SpinQuant: learned with
  Cayley SGD on the quantized loss under ``rules``) is folded into every
  reader and writer of the stream, the ``online`` kernels are pre-rotated for
  an online Hadamard of their input and ``heads`` adds per-head rotations
  (``algorithms.rotate_model`` / ``spinquant_model``). The rotated float
  model is checked against the original on the first batch, then every
  weight site the rules match is rounded by ``quantizer`` (RTN or GPTQ on
  the Hessians of the inputs each op sees, online Hadamards included).
  Inference must run with ``PTQResult.rules`` (the online-Hadamard rules
  before ``rules``), in fake and in real mode (with ``real_mode_kwargs``).

  MoE experts (``jax.lax.ragged_dot`` with an ``[E, K, N]`` weight) are
  quantized per expert: GPTQ runs on each expert's ``[K, N]`` matrix with the
  Hessian of only the tokens routed to it (``capture_hessians``), RTN rounds
  each expert on its own grid, and ``weight_scales`` holds the ``[E, ...]``
  grid, so real mode stores exactly those codes. An expert that no
  calibration token reached is rounded to nearest and listed in
  ``report["skipped"]`` as ``"path[e]"`` (and in its layer's
  ``"rtn_fallback"``); an expert layer's report entry also has ``"experts"``,
  ``"calibration_tokens"`` (rows per expert), ``"expert_errors"`` and
  ``"expert_rtn_errors"`` (``tr(dW_e^T H_e dW_e) / rows_e``), its ``"error"``
  being their row-weighted mean. AWQ and SmoothQuant scale experts with one
  scale per input channel shared by all experts, folded into the producer
  every expert reads through the token gather (a per-expert scaling has no
  exact fold there; see ``_ptq_scaling``), then round each expert to nearest
  ("awq": after AWQ's clip search on each expert's own routed rows; an expert
  with none retained is rounded unclipped, in ``"clip_rtn_fallback"`` and
  ``report["skipped"]``); experts without such a fold are rounded unscaled,
  with the reason in their entry. The rotation rotates experts that read a
  linear producer through the token gather (one ``R`` for all experts,
  folded into that producer) and reports their errors in the original
  domain; other experts are rounded unrotated, with the reason.

  Args:
    model: ``fn(params, *batch)``, a Linen module, or an NNX module.
    params: the parameter pytree (function; Linen params or variables), or
      None for an NNX model (whose Params are updated in place).
    calib_batches: calibration batches (see ``capture_hessians``).
    rules: QuantRules or a QuantConfig (those with a weight spec are treated).
    method: "gptq", "rtn", "awq", "awq_noclip", "smoothquant", "rotation",
      "omniquant", "quarot" or "spinquant".
    token_mask: optional ``batch -> mask`` (see ``capture_hessians``).
    blocksize, percdamp, act_order: GPTQ's options.
    capture: a ``Capture`` from an earlier ``capture_hessians`` to reuse
      (gptq/rtn only; ``calib_batches`` and ``token_mask`` are then unused):
      its sites are rounded with the specs ``rules`` give them (e.g.
      ``mixed_precision_rules``' choice), the sites the rules leave float
      stay float; sites the capture did not record are not rounded (capture
      with rules that select every layer to round), and ``unused_rules``
      lists the rules with a weight spec that round no captured site.
    alpha: SmoothQuant's migration strength.
    n_grid: AWQ's grid size over its exponent.
    max_samples: input rows retained per site for AWQ's searches.
    seed: the key choosing those rows; "quarot": the randomized Hadamard's
      seed ("spinquant": that of its start, unless ``spinquant`` is given).
    fold_rtol: the largest relative change of the float model's output the
      folds (or the whole-model rotation: widened to a few epsilons of a
      16-bit compute dtype) may cause before an error is raised.
    awq_clip_skip: regex of layer paths (a parameter path without its last
      part) AWQ's clip search leaves alone; by default the query and key
      projections, as ``apply_ptq`` does (their error passes through q.k and
      a softmax); None: clip every site.
    rotation_block_size: "rotation": the block size of the block-diagonal
      randomized Hadamard (None: one block).
    omniquant: "omniquant": an ``algorithms.OmniQuantOptions`` (steps,
      learning rates, LWC/LET switches; None: defaults). OmniQuant (Shao et
      al. 2024) runs layer-wise here (``_ptq_omni``): LWC on every site, LET
      jointly with it where an exact fold exists.
    quantizer: "quarot"/"spinquant": how the rotated weights are rounded,
      "rtn" or "gptq".
    online: "quarot"/"spinquant": regex of kernel paths that take an online
      Hadamard of their input (QuaRot's down projection:
      ``".*/down_proj/kernel"``); None: none.
    heads: "quarot"/"spinquant": ``(value_regex, out_regex, head_dim)``, a
      per-head rotation of value and output projections
      (``algorithms.rotate_model``; SpinQuant learns them).
    spinquant: "spinquant": an ``algorithms.SpinQuantConfig`` (None:
      ``SpinQuantConfig(seed=seed)``); its calibration batches must be
      positional arguments, and the default loss (next-token cross entropy)
      needs tokens as the first.

  Returns:
    A ``PTQResult``; run real mode with ``real_mode_kwargs``'s scales so the
    stored codes equal these. For the scaling methods ``params`` also holds
    the folded producers, the report has ``"folds"`` (producer, readers,
    status, ``alpha``, ``scales``) and each layer its ``"fold"`` (producer or
    None, with a ``"reason"``). For "quarot"/"spinquant" ``params`` holds
    every rotated parameter, ``rules`` the rules to run with, and the report
    ``"quantizer"``, ``"rotation"`` (the ``RotatedModel``) and, for
    SpinQuant, ``"spinquant"`` (quantized loss before and after learning).

  Raises:
    ValueError: an unknown method, no weight site matched, a spec GPTQ
      cannot take, options of another method, or a model the whole-model
      rotation cannot handle (naming the layer, or saying the rotation
      changed the float output).
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if omniquant is not None and method != "omniquant":
    raise ValueError(f"omniquant= options apply to method='omniquant', not {method!r}")
  _check_rotation_options(method, quantizer, online, heads, spinquant, capture, seed)
  _check_method_options(method, quantizer, blocksize=blocksize, percdamp=percdamp,
                        act_order=act_order, alpha=alpha, n_grid=n_grid,
                        max_samples=max_samples, seed=seed, fold_rtol=fold_rtol,
                        awq_clip_skip=awq_clip_skip,
                        rotation_block_size=rotation_block_size)
  t0 = time.perf_counter()
  front = _front_end(model)
  if method in _ptq_rotation.METHODS:
    batches = list(calib_batches)
    if not batches:
      raise ValueError("calib_batches is empty; pass at least one batch")
    return _ptq_rotation.rotation_ptq(
        model, params, batches, rules, front=front, method=method, quantizer=quantizer,
        seed=seed, online=online, heads=heads, config=spinquant, fold_rtol=fold_rtol,
        token_mask=token_mask, blocksize=blocksize, percdamp=percdamp,
        act_order=act_order)
  if method == "omniquant" or method in _ptq_scaling.SCALING_METHODS:
    if capture is not None:
      raise ValueError(f"capture= is for gptq/rtn; {method} captures input samples "
                       "itself (max_samples=)")
    batches = list(calib_batches)
    if not batches:
      raise ValueError("calib_batches is empty; pass at least one batch")
    if method == "omniquant":
      from lowbit_jax import _ptq_omni   # pylint: disable=g-import-not-at-top
      changed, scales, tscales, report = _ptq_omni.omniquant_ptq(
          model, params, batches, rules, front=front, token_mask=token_mask,
          options=omniquant, max_samples=max_samples, seed=seed, fold_rtol=fold_rtol)
    else:
      changed, scales, tscales, report = _ptq_scaling.scaling_ptq(
          model, params, batches, rules, method=method, front=front,
          token_mask=token_mask, alpha=alpha, n_grid=n_grid, max_samples=max_samples,
          seed=seed, fold_rtol=fold_rtol, awq_clip_skip=awq_clip_skip,
          rotation_block_size=rotation_block_size)
    return PTQResult(_write_back(model, params, front, changed), scales, report,
                     weight_tensor_scales=tscales)
  if capture is not None:
    if token_mask is not None:
      raise ValueError("token_mask applies while capturing: pass it to "
                       "capture_hessians, not with capture=")
    cap = _respec(capture, rules)
  else:
    cap = capture_hessians(model, params, calib_batches, rules, token_mask=token_mask)
  tree = _param_tree(model, params, front)
  new_leaves, scales, tscales, layers = {}, {}, {}, {}
  skipped = dict(cap.skipped)
  opts = (blocksize, float(percdamp), bool(act_order))
  for path, st in cap.stats.items():
    t_site = time.perf_counter()
    spec = cap.sites[path].weight
    w = _rules.logical_value(_get_path(tree, path))
    _check_finite_weight(w, path)
    wq, scale, tscale, exact, err, rerr = _site(
        w, st.hessian, st.count, method=method, meta=tuple(st[2:]), spec=spec,
        path=path, opts=opts)
    if not bool(exact):
      raise ValueError(
          f"{path}: the scales {method} chose do not reproduce its codes in the "
          f"weight's layout (spec {spec}); the spec's blocks do not map onto the "
          "[K, N] matrix (a group_size must divide the last contraction axis)")
    new_leaves[path] = wq
    if scale is not None:
      scales[path] = scale
    if tscale is not None:
      tscales[path] = tscale
    extra = {}
    if st.op == "ragged_dot":
      err, rerr, extra = _expert_entry(path, st, err, rerr, method, skipped)
    err, rerr = float(err), float(rerr)
    layers[path] = {"spec": str(spec), "error": err, "rtn_error": rerr,
                    "error_vs_rtn": err / rerr if rerr > 0 else 1.0,
                    "rows": float(jnp.sum(st.count)), **extra,
                    "seconds": time.perf_counter() - t_site}
  report = {"method": method, "layers": layers, "skipped": skipped,
            "unused_rules": [r.path for r in cap.unused_rules],
            "seconds": time.perf_counter() - t0}
  return PTQResult(_write_back(model, params, front, new_leaves), scales, report,
                   weight_tensor_scales=tscales)


# ptq_params' per-method options: (default, the methods that read it). GPTQ's
# options also serve "quarot"/"spinquant" with quantizer="gptq"; "spinquant"
# reads seed only without a SpinQuantConfig (_check_rotation_options).
_GPTQ = ("gptq",)
_SAMPLED = _ptq_scaling.SCALING_METHODS + ("omniquant",)
_METHOD_OPTIONS = {
    "blocksize": (128, _GPTQ), "percdamp": (0.01, _GPTQ), "act_order": (False, _GPTQ),
    "alpha": (0.5, ("smoothquant",)), "n_grid": (20, ("awq", "awq_noclip")),
    "awq_clip_skip": (AWQ_CLIP_SKIP, ("awq",)),
    "rotation_block_size": (None, ("rotation",)),
    "max_samples": (512, _SAMPLED),
    "seed": (0, _SAMPLED + _ptq_rotation.METHODS),
    "fold_rtol": (1e-3, _SAMPLED + _ptq_rotation.METHODS),
}


def _check_method_options(method: str, quantizer: str, *, table: Optional[dict] = None,
                          quantizer_runs: Optional[bool] = None, **given) -> None:
  """Raises for an option set away from its default that ``method`` never
  reads (it would be silently ignored). ``table``: option -> (default, the
  methods that read it) (``_METHOD_OPTIONS``: ``ptq_params``'); the
  ``quantizer`` runs too where ``quantizer_runs`` (default: for the
  rotations)."""
  table = _METHOD_OPTIONS if table is None else table
  if quantizer_runs is None:
    quantizer_runs = method in _ptq_rotation.METHODS
  runs = {method} | ({quantizer} if quantizer_runs else set())
  unused = []
  for name, value in given.items():
    default, methods = table[name]
    if runs.isdisjoint(methods) and not (value is default or value == default):
      unused.append(f"{name}={value!r} (read by method "
                    f"{' / '.join(repr(m) for m in methods)})")
  if unused:
    raise ValueError(f"method={method!r}"
                     + (f" with quantizer={quantizer!r}" if quantizer_runs else "")
                     + f" does not use {', '.join(unused)}; leave "
                     + ("it" if len(unused) == 1 else "them")
                     + " at the default or choose a method that uses it")


def _check_rotation_options(method: str, quantizer: str, online, heads, spinquant,
                            capture, seed: int = 0) -> None:
  """Raises unless the whole-model rotation options fit ``method``."""
  if method not in _ptq_rotation.METHODS:
    given = [n for n, v in (("online", online), ("heads", heads),
                            ("spinquant", spinquant)) if v is not None]
    if quantizer != "rtn":
      given.append("quantizer")
    if given:
      raise ValueError(f"{'=, '.join(given)}= apply to method='quarot' or "
                       f"'spinquant', not {method!r}")
    return
  if quantizer not in ROUNDING:
    raise ValueError(f"quantizer must be one of {ROUNDING}, got "
                     f"{quantizer!r}")
  if spinquant is not None and method != "spinquant":
    raise ValueError(f"spinquant= applies to method='spinquant', not {method!r}")
  if spinquant is not None and seed != 0:
    raise ValueError("method='spinquant' with a SpinQuantConfig takes its seed from "
                     "the config (SpinQuantConfig(seed=...)); seed= is not used")
  if capture is not None:
    raise ValueError(f"capture= is for gptq/rtn; {method} captures the rotated "
                     "model itself")


def _site_kinds(front: str, op: str) -> tuple:
  """The op kinds a front end matches a weight site's rules with (a rule's
  ``ops``): the function front end's matmuls also match einsum rules (and its
  experts dot_general ones); a Linen/NNX layer matches its own op, experts
  also einsum rules."""
  if op == "conv":
    return ("conv",)
  if front == "function":
    return ("ragged_dot", "dot_general", "einsum") if op == "ragged_dot" else (
        "dot_general", "einsum")
  return ("ragged_dot", "einsum") if op == "ragged_dot" else (op,)


def _respec(cap: Capture, rules) -> Capture:
  """The captured sites under ``rules``: each with the weight spec of the first
  rule matching its parameter path or layer path (the op kinds as at
  capture), those the rules leave float (or match no rule) dropped, as a
  capture under ``rules`` would have them. ``unused_rules`` become the rules
  with a weight spec that round no captured site (a strict QuantConfig raises
  on them); rules with weight specs that round none raise (rules without any
  leave every site float). Sites the capture did not record are not known
  here: capture with rules that select every layer to round."""
  config = (rules if isinstance(rules, _rules.QuantConfig)
            else _rules.QuantConfig(_rules.as_rules(rules)))
  sites, used = {}, set()
  for p, site in cap.sites.items():
    i = config.find(_rules.candidates(p),
                    cap.kinds.get(p) or _site_kinds("function", site.op))
    if i is not None and config.rules[i].weight is not None:
      sites[p] = dataclasses.replace(site, rule=config.rules[i])
      used.add(i)
  skipped = {}
  for p, why in cap.skipped.items():   # matched, not capturable: still used
    i = config.find(_rules.candidates(p), _rules.OPS)
    if i is not None:
      used.add(i)
      skipped[p] = why
  unused = tuple(r for i, r in enumerate(config.rules)
                 if r.weight is not None and i not in used)
  if not sites and unused:   # a typo
    raise ValueError(
        f"the rules quantize none of the captured weights ({list(cap.sites)[:5]}"
        f"{' ...' if len(cap.sites) > 5 else ''}); give a rule with a weight spec "
        "that matches them, or capture with the rules you round with")
  _check_strict(config, unused)
  return cap._replace(stats={p: cap.stats[p] for p in sites}, sites=sites,
                      skipped=skipped, unused_rules=unused)


def _expert_entry(path: str, st: SiteStats, err, rerr, method: str,
                  skipped: dict) -> tuple:
  """``(error, RTN's error, report fields)`` of an expert layer from its
  per-expert errors; the experts GPTQ rounded to nearest for want of routed
  tokens go into ``skipped`` as ``path[e]``."""
  counts = np.asarray(st.count, np.float64)
  err, rerr = np.asarray(err, np.float64), np.asarray(rerr, np.float64)
  rows = max(float(counts.sum()), 1.0)
  empty = [e for e, c in enumerate(counts) if c == 0] if method == "gptq" else []
  for name, e in zip(_experts.expert_names(path, empty), empty):
    skipped[name] = (f"no calibration token was routed to expert {e}: it has no "
                     "Hessian and was rounded to nearest (RTN) instead of GPTQ")
  extra = {"experts": len(counts), "calibration_tokens": [int(c) for c in counts],
           "rtn_fallback": empty, "expert_errors": err.tolist(),
           "expert_rtn_errors": rerr.tolist()}
  return float((err * counts).sum() / rows), float((rerr * counts).sum() / rows), extra


def _write_back(model, params, front: str, new_leaves: dict):
  """The parameters with ``new_leaves`` (path -> value) in the front end's structure.

  An NNX model's Params are updated in place and its ``nnx.State`` returned.
  """
  if front == "nnx":
    from flax import nnx
    for path, wq in new_leaves.items():
      node = model
      for k in path.split("/"):
        node = node[int(k)] if k.isdigit() and not hasattr(node, k) else getattr(node, k)
      node.set_value(wq)
    return nnx.state(model, nnx.Param)
  new_tree = _ptq_scaling._put(_param_tree(model, params, front, unbox=False),   # pylint: disable=protected-access
                               new_leaves)
  return {**params, "params": new_tree} if _is_variables(params, front) else new_tree


def _layout_problem(w, st: SiteStats, spec: QuantSpec,
                    matrix_spec: QuantSpec) -> Optional[str]:
  """Why rounding ``w`` in its own layout (as fake and real mode do) differs
  from rounding its ``[K, N]`` matrix with ``matrix_spec`` (the
  sensitivities' view), or None."""
  if st.op == "ragged_dot":
    # The stack is the matrices: each expert's [K, N] must take the spec.
    try:
      jax.eval_shape(lambda a: fake_quant(a, _experts.expert_spec(matrix_spec)), w)
    except ValueError as e:
      return str(e)
    return None
  try:
    a = fake_quant(w, _plan(st, spec).spec)
    b = st.from_matrix(fake_quant(st.as_matrix(w), matrix_spec))
  except ValueError as e:
    return str(e)
  if not bool(jnp.array_equal(a, b)):
    return ("its blocks would span the weight's own axes in the [K, N] matrix "
            "(a block must fit the last contraction axis)")
  return None


def mixed_precision_rules(model, params, capture: Capture,
                          candidates: Mapping[str, Any], budget: float, *,
                          method: str = "auto", activation: Any = None,
                          float_bits: float = 16.0) -> tuple:
  """A per-layer format choice under a bits-per-weight budget, as rules for any front end.

  Each captured weight's sensitivity to each candidate is the output error of
  rounding it to nearest, ``tr(dW^T H dW)`` with the captured Hessian
  (``algorithms.mixed_precision.weight_sensitivity``); ``allocate_bits``
  picks one candidate per weight minimizing the summed error under the
  budget (an expert layer's error is the sum over its experts, each with its
  own Hessian; one format for all its experts); ``assignment_to_rules``
  turns the choice into QuantRules whose
  regexes name each parameter path exactly, which ``quantize_linen``,
  ``quantize_nnx``, ``quantize_function`` and ``ptq_params`` all accept.

  Args:
    model, params: as for ``capture_hessians`` (the weights are read there).
    capture: the ``capture_hessians`` result.
    candidates: name -> weight spec (unset axis) or None (keep float).
    budget: the largest average bits per weight (scales included).
    method: ``allocate_bits``'s method ("auto", "dp", "greedy").
    activation: an activation spec for every quantized layer, or None.
    float_bits: bits per weight of a float candidate.

  Returns:
    ``(rules, allocation)``: the QuantRules and the ``Allocation``
    (``assignment``, ``avg_bits``, ``cost``).

  A candidate that does not fit a weight (its blocks do not divide the axis
  they run along, or would span the weight's own axes in its ``[K, N]``
  matrix: fake and real mode could not round it as the sensitivity assumed)
  is left out for that weight.

  Raises:
    ValueError: no assignment fits the budget, no candidate fits a weight, or
      a candidate's spec has an axis set (see ``ptq_params``).
  """
  from lowbit_jax.algorithms import mixed_precision as mp
  if not isinstance(candidates, Mapping):
    raise TypeError(f"candidates must map a name to a weight spec (or None: float), "
                    f"e.g. {{'int4': QuantSpec('int4', group_size=128), 'int8': "
                    f"'int8'}}; got {type(candidates).__name__}")
  tree = _param_tree(model, params, _front_end(model))
  costs, sizes, bits = {}, {}, {}
  for path, st in capture.stats.items():
    w = _rules.logical_value(_get_path(tree, path))
    mat = st.as_matrix(w)
    specs, unfit = {}, {}
    for n, c in candidates.items():
      if c is None:
        specs[n] = None
        continue
      ms = _matrix_spec(as_spec(c), path)   # (an axis set raises)
      why = _layout_problem(w, st, as_spec(c), ms)
      if why is None:
        specs[n] = ms
      else:
        unfit[n] = why
    if not specs:
      raise ValueError(f"{path}: no candidate fits this weight of shape {w.shape} "
                       f"({unfit}); add one that does, or exclude the weight from "
                       "the capture's rules")
    try:
      if st.op == "ragged_dot":   # experts: each on its own Hessian, summed
        # (under the stack's tensor range, which real mode stores it with)
        t_amax = _experts.stack_tensor_amax(mat)
        per = [mp.weight_sensitivity(mat[e], st.hessian[e], specs, tensor_amax=t_amax)
               for e in range(mat.shape[0])]
        costs[path] = {n: sum(c[n] for c in per) for n in specs}
      else:
        costs[path] = mp.weight_sensitivity(mat, st.hessian, specs)
      sizes[path] = int(mat.size)
      bits[path] = {n: mp.spec_bits(sp, mat.shape[-2:], float_bits)
                    for n, sp in specs.items()}
    except ValueError as e:  # e.g. an expert's group does not divide K
      raise ValueError(f"{path} (a [K, N] = {tuple(mat.shape[-2:])} weight): a "
                       f"candidate does not fit it: {e}; give each layer "
                       "candidates that do, or exclude it from the rules") from e
  alloc = mp.allocate_bits(costs, sizes, bits, budget, method=method)
  return mp.assignment_to_rules(alloc.assignment, candidates,
                                activation=activation), alloc


def real_mode_kwargs(result: PTQResult, front: str) -> dict:
  """The keyword arguments that make real mode store exactly ``result``'s codes.

  Args:
    result: a ``PTQResult``.
    front: "function" (``QuantizedFunction.quantize_params(...,
      quant_scales=...)``), "linen" (the ``"quant_scales"`` collection to add
      to the variables passed to ``LinenQuantizer.quantize_params``) or "nnx"
      (``quantize_nnx(model, rules, mode="real", weight_scales=...)``).

  Returns:
    ``{"quant_scales": ...}`` (each weight's ``weight_scale``, and a
    two-level spec's ``weight_tensor_scale``) or ``{"weight_scales": ...,
    "weight_tensor_scales": ...}``.
  """
  tensor = dict(result.weight_tensor_scales)

  def entry(p, s):
    e = {"weight_scale": s}
    if p in tensor:
      e["weight_tensor_scale"] = tensor[p]
    return e
  if front == "function":
    return {"quant_scales": {p: entry(p, s) for p, s in result.weight_scales.items()}}
  if front == "linen":
    nested: dict = {}
    for p, s in result.weight_scales.items():
      node = nested
      for k in p.split("/")[:-1]:
        node = node.setdefault(k, {})
      node.update(entry(p, s))
    return {"quant_scales": nested}
  if front == "nnx":
    return {"weight_scales": dict(result.weight_scales),
            "weight_tensor_scales": tensor}
  raise ValueError(f"front must be 'function', 'linen' or 'nnx', got {front!r}")


__all__ = ["SiteStats", "InputStats", "Capture", "PTQResult", "SiteResult",
           "capture_hessians", "quantize_site",
           "ptq_params", "mixed_precision_rules", "real_mode_kwargs"]
