"""The quantized ops every model path goes through: dot_general, einsum, conv,
ragged_dot (grouped matmuls: MoE experts).

Three modes:

* ``"fake"``: operands are fake-quantized (simulation; straight-through
  gradients for QAT, or LSQ/PACT gradients for learned ranges). A QArray
  operand is dequantized.
* ``"real"``: the weight is (or becomes) a packed QArray and activations are
  quantized per call; when a Pallas kernel ``supports`` the case (shapes,
  formats, backend) it runs, otherwise the reference: dequantize into the
  activation's dtype (bf16/f16 stay 16-bit off the CPU, anything else
  float32), then a float32-accumulating dot. Both equal fake quant to float rounding.

A spec whose ``axis`` is unset gets the op's contraction axes: per-token for
activations, per-output-channel (or groups along K) for weights
(``operand_spec``).

Low-bit training (fake mode): ``grad_spec`` quantizes the output cotangent
``dy`` before both backward matmuls, ``dx = q(dy) . W_q^T`` and
``dW = x_q^T . q(dy)``. Blocked specs (MX/NVFP4 block formats, any
``group_size``) are re-blocked along each backward matmul's own contraction
axes, as in the OCP Microscaling training recipe (Rouhani et al. 2023,
"Microscaling Data Formats for Deep Learning"):

* dx contracts over the rhs free axes (N): ``dy`` is blocked along N, and a
  blocked W is re-quantized from the float W with its blocks along N;
* dW contracts over the lhs free axes (tokens M): ``dy`` is blocked along M,
  and a blocked x is re-quantized from the float x with its blocks along M.

Blocks of several free axes run along the last of them. A tile spec keeps
its forward values when its tile is square (its tiles block both axes) and is
re-quantized with the transposed tile otherwise. Per-tensor / per-channel /
per-token operand specs reuse the forward's fake-quantized values. A
``grad_spec`` with an unset axis and no blocks quantizes ``dy`` per tensor,
once for both matmuls (the Transformer Engine FP8 recipe: E5M2 gradients with
a per-tensor scale); a ``grad_spec`` with an explicit axis quantizes ``dy``
once, with that axis, for both. The x and W cotangents then pass through the
forward quantizers' own gradients (straight-through / LSQ / PACT).

Delayed scaling: ``amax_history={"lhs": h1, "rhs": h2, "grad": h3}`` (any of
the keys; ``lowbit_jax.core.scaling``) quantizes each listed operand with the
per-tensor range taken from its history and records the operand's current
amax. The updated histories come back through the VJP, "overwrite with
gradient" style (as flax's fp8_ops): the gradient ``jax.grad`` returns for
each history IS the new history (rolled, this step's amax at index 0), so a
training step must replace those leaves with their gradient rather than let
an optimizer update them (and must not average them across devices with a
mean: take a max). A history must feed one op call per differentiated step:
autodiff sums the cotangents of a value used twice, so a history shared by
two calls (a layer applied twice, a ``lax.scan`` body, a ``vmap`` that
broadcasts it) comes back as the sum of their new histories, a range too
wide. Give each call its own history (map it along the vmapped or scanned
axis and reduce with a max afterwards), or use current scaling there (a max-
accumulating cotangent dtype, as flax's ``fp32_max_grad``, would change the
histories' dtype for every optimizer, checkpoint and sharding rule that
holds them). A history whose range is 0 (all zeros: the first step)
falls back to the current amax for that step. An unset axis of an operand
with a history means per tensor; other granularities are refused, except
formats with a tensor scale (NVFP4), whose tensor scale then follows the
history while the block scales stay dynamic.

Randomness: ``key`` is split in three, for the lhs, the rhs and the gradient
(the gradient's part is split again when dy is quantized twice); re-quantized
operands in the backward pass use their operand's key folded with 1.

Kernel dispatch is controlled by ``use_kernel``: "auto" (use one when it
supports the case), "never", or "always" (raise when none supports it).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from lowbit_jax.core import scaling
from lowbit_jax.core._cast import astype_holding
from lowbit_jax.core._qarray import (CODE_ORDERS, SPLIT_ORDERS, WGMMA_RUN_BYTES,
                                     QArray, block_shape, from_code_order,
                                     normalize_axis, to_code_order)
from lowbit_jax.core._quantize import (_as_key, _e8m0_factors, _fake_quant_impl,
                                       _key_ct, dequantize,
                                       dequantize_as,
                                       fake_quant, quantize)
from lowbit_jax.core._spec import TENSOR, QuantSpec, as_spec
from lowbit_jax.formats import BlockFormat, FloatFormat, IntFormat

MODES = ("fake", "real")
_KERNEL_CHOICES = ("auto", "never", "always")
_HISTORY_KEYS = ("lhs", "rhs", "grad")


def operand_spec(spec, contract_axes: Sequence[int], ndim: int) -> Optional[QuantSpec]:
  """The spec an operand is quantized with: an unset axis gets the contraction axes.

  One contraction axis becomes ``axis=that axis``; several become a tuple, or,
  with a group size, the last of them (groups run along one axis). A spec with
  an axis or a tile is returned as it is. Front ends use it to compute the
  scale grid of a learned scale: ``scale_shape(x.shape, operand_spec(spec,
  contract, x.ndim))``.

  Args:
    spec: a QuantSpec, a format name, or None.
    contract_axes: the operand's contraction axes (negative counts from the end).
    ndim: the operand's rank.

  Returns:
    The filled QuantSpec (None for None).
  """
  if spec is None:
    return None
  spec = as_spec(spec)
  if spec.axis is None and spec.tile is None:
    axes = tuple(a % ndim for a in contract_axes)
    if not axes:
      raise ValueError("the operand has no contraction axis to fill the spec's unset "
                       "axis with; give the spec an axis (e.g. axis='tensor')")
    axis = axes[0] if len(axes) == 1 else axes
    if spec.group_size is not None and isinstance(axis, tuple):
      # Groups run along the last contraction axis.
      axis = axes[-1]
    spec = spec.replace(axis=axis)
  return spec


_spec_for = operand_spec  # the name the rules front end used before


def _check_mode(mode: str, use_kernel: str):
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if use_kernel not in _KERNEL_CHOICES:
    raise ValueError(f"use_kernel must be one of {_KERNEL_CHOICES}, got {use_kernel!r}")


def _blocked(spec: Optional[QuantSpec]) -> bool:
  """Blocks or groups along an axis (block formats, group_size, tiles)."""
  return spec is not None and (spec.group_size is not None or spec.tile is not None)


def _per_tensor(spec: QuantSpec, ndim: int) -> bool:
  if spec.tile is not None or spec.group_size is not None:
    return False
  ax = spec.axis
  return ax == TENSOR or (isinstance(ax, tuple) and len(set(a % ndim for a in ax))
                          == ndim) or (isinstance(ax, int) and ndim == 1)


def _check_histories(amax_history, reduce: str, mode: str) -> dict:
  if amax_history is None:
    return {}
  if not isinstance(amax_history, dict) or not set(amax_history) <= set(_HISTORY_KEYS):
    raise ValueError(f"amax_history must be a dict with keys among {_HISTORY_KEYS}, "
                     f"got {amax_history!r}")
  if reduce not in scaling.REDUCTIONS:
    raise ValueError(f"history_reduce must be one of {scaling.REDUCTIONS}, got "
                     f"{reduce!r}")
  if mode != "fake":
    raise ValueError("amax_history (delayed scaling) is a training recipe: use "
                     "mode='fake'; for inference pass a static lhs_amax instead")
  out = {k: v for k, v in amax_history.items() if v is not None}  # None: no history
  for k, h in out.items():
    if jnp.ndim(h) != 1:
      raise ValueError(f"amax_history[{k!r}] must be a 1-d history "
                       f"(scaling.init_history(n)), got shape {jnp.shape(h)}")
  return out


def _resolve(spec, contract, ndim: int, has_history: bool, name: str):
  """An operand's spec: unset axis filled (per tensor with a history)."""
  if spec is None:
    if has_history:
      raise ValueError(f"amax_history[{name!r}] was given but {name} has no spec")
    return None
  spec = as_spec(spec)
  if (has_history and spec.axis is None and spec.tile is None
      and spec.group_size is None):
    spec = spec.replace(axis=TENSOR)
  elif spec.axis is None and spec.tile is None and not contract:
    spec = spec.with_axis(TENSOR) if spec.group_size is None else spec
  else:
    spec = operand_spec(spec, contract, ndim)
  if has_history:
    _check_history_spec(spec, ndim, name)
  return spec


def _check_history_spec(spec: QuantSpec, ndim: int, name: str):
  if not spec.symmetric:
    raise ValueError(f"amax_history[{name!r}]: delayed scaling takes a symmetric "
                     f"range; {spec.format.name!r} is asymmetric here")
  if not (spec.tensor_scale or _per_tensor(spec, ndim)):
    raise ValueError(f"amax_history[{name!r}] gives one per-tensor range, but the "
                     f"{name} spec has axis={spec.axis!r}, group_size="
                     f"{spec.group_size}, tile={spec.tile}; use axis='tensor' (or "
                     "leave it unset), or a format with a tensor scale (NVFP4)")


def _stoch(spec: Optional[QuantSpec]) -> bool:
  return spec is not None and spec.rounding == "stochastic"


def _split_keys(key, specs):
  """(lhs, rhs, grad) keys; checks that stochastic specs have one."""
  if key is None:
    for what, s in specs:
      if _stoch(s):
        raise ValueError(f"the {what} spec rounds stochastically: pass "
                         "key=jax.random.key(...) to the op")
    return None, None, None
  key = _as_key(key)
  k = jax.random.split(key, 3)
  return k[0], k[1], k[2]


# ---------------------------------------------------------------------------
# Delayed scaling: fake quant with a range from a history


def _history_range(history, reduce: str, x):
  # An empty operand (e.g. an empty batch) has no amax: it adds 0.
  cur = scaling.current_amax(x) if x.size else jnp.zeros((), jnp.float32)
  a = scaling.amax_from_history(history, reduce)
  return jnp.where(a > 0, a, cur), cur


def _fq_values(x, spec: QuantSpec, key, amax=None):
  """Fake-quantized values only (no gradient rule: used inside backward rules)."""
  if x.size == 0:
    return x  # an empty cotangent or operand (an empty batch): nothing to quantize
  if spec.tensor_scale and amax is not None:
    return _fake_quant_impl(x, spec, key, None, None, amax)[0]
  return _fake_quant_impl(x, spec, key, amax, None, None)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fq_history(spec, reduce, x, history, key):
  return _fq_history_fwd(spec, reduce, x, history, key)[0]


def _fq_history_fwd(spec, reduce, x, history, key):
  a, cur = _history_range(history, reduce, x)
  if spec.tensor_scale:
    y, clipped = _fake_quant_impl(x, spec, key, None, None, a)
  else:
    y, clipped = _fake_quant_impl(x, spec, key, a, None, None)
  return y, (clipped, key, scaling.update_history(history, cur))


def _fq_history_bwd(spec, reduce, res, g):
  del spec, reduce
  _, key, new_history = res
  # The history's "gradient" is its update (overwrite-with-gradient). The
  # value's is straight through, saturated elements too, as Transformer
  # Engine's and flax's fp8 casts pass it: a delayed range is only stale (the
  # history catches up next step), unlike a calibrated static range, whose
  # clip is part of the model (clipped STE). Masking it zeroed the gradient
  # of a weight growing past its history on every other step.
  return g, new_history, _key_ct(key)


_fq_history.defvjp(_fq_history_fwd, _fq_history_bwd)


def _qdq_operands(lhs, rhs, ls, rs, k_l, k_r, mode: str, lhs_amax, lhs_tensor_amax,
                  lhs_scale, lhs_clip, rhs_scale, hist: dict, history_reduce):
  """Both operands of a matmul through ``_qdq_operand``: the activation (lhs)
  with its static range, learned scale, clip and history; the weight (rhs)
  with its learned scale and history."""
  lv = _qdq_operand(lhs, ls, k_l, mode, lhs_amax, lhs_tensor_amax, lhs_scale,
                    lhs_clip, hist.get("lhs"), history_reduce, "lhs")
  rv = _qdq_operand(rhs, rs, k_r, mode, None, None, rhs_scale, None,
                    hist.get("rhs"), history_reduce, "rhs")
  return lv, rv


def _qdq_operand(x, spec: Optional[QuantSpec], key, mode: str, amax=None,
                 tensor_amax=None, scale=None, clip=None, history=None,
                 reduce: str = "max", name: str = "lhs"):
  """An operand as the op sees it: dequantized QArray, float, or quantized
  (fake: fake_quant with its gradients; real: dequantize(quantize(x)))."""
  learned = scale is not None or clip is not None
  if isinstance(x, QArray):
    _check_qarray_operand(name, amax, tensor_amax, scale, clip, history)
    return dequantize(x)
  if spec is None:
    if learned:
      raise ValueError(f"{name}_scale / {name}_clip need a {name}_spec")
    return x
  if x.size == 0:
    return x  # an empty operand (e.g. an empty batch): nothing to quantize
  k = key if _stoch(spec) else None
  if history is not None:
    if learned or amax is not None or tensor_amax is not None:
      raise ValueError(f"{name}: an amax history sets the range; do not also pass "
                       f"{name}_amax, {name}_tensor_amax, {name}_scale or {name}_clip")
    return _fq_history(spec, reduce, x, history, k)
  if mode == "fake":
    return fake_quant(x, spec, key=k, amax=amax, tensor_amax=tensor_amax, scale=scale,
                      clip=clip)
  return dequantize(quantize(_real_mode_input(name, x), spec, key=k, amax=amax,
                             tensor_amax=tensor_amax, scale=scale, clip=clip))


def _check_qarray_operand(name: str, amax=None, tensor_amax=None, scale=None,
                          clip=None, history=None) -> None:
  """Refuses range keywords for an operand quantized ahead of time (its codes
  and scales are fixed: a range would be silently ignored)."""
  given = [f"{name}_{k}" for k, v in (("amax", amax), ("tensor_amax", tensor_amax),
                                      ("scale", scale), ("clip", clip)) if v is not None]
  if history is not None:
    given.append("an amax history")
  if given:
    raise ValueError(f"{name} is a QArray (quantized ahead of time), whose codes and "
                     f"scales are fixed: it takes no range keywords (got "
                     f"{', '.join(given)}); pass the float array to quantize it with "
                     "those, or drop them")


# ---------------------------------------------------------------------------
# Quantized gradients (low-bit training)


class _GradConfig(NamedTuple):
  dn: tuple
  precision: object
  pet: object
  g_dx: QuantSpec            # dy as the dx matmul reads it
  g_dw: Optional[QuantSpec]  # dy as the dW matmul reads it (None: same as g_dx)
  l_bwd: Optional[QuantSpec]  # lhs re-quantized for dW (None: forward values)
  r_bwd: Optional[QuantSpec]  # rhs re-quantized for dx (None: forward values)
  reduce: str


def _check_fits(shape, spec: QuantSpec, what: str):
  ax = normalize_axis(spec.axis, len(shape))
  bs = block_shape(spec if ax == spec.axis else spec.replace(axis=ax), tuple(shape))
  for i, (d, b) in enumerate(zip(shape, bs)):
    if d and d % b and not spec.pad:  # an empty axis: nothing to quantize
      raise ValueError(f"{what}: axis {i} has length {d}, not a multiple of the "
                       f"block size {b} the backward pass quantizes along; pass "
                       "pad=True in that spec, or pick a block size that divides it")


def _fill_bwd(spec: QuantSpec, axes, ndim: int, what: str) -> QuantSpec:
  if not axes:
    raise ValueError(f"{what}: this backward matmul contracts no axis, so a blocked "
                     "spec has nothing to block along; use a per-tensor spec")
  return operand_spec(spec, axes, ndim)


def _bwd_operand_spec(spec: Optional[QuantSpec], free, ndim, what):
  """How a forward operand is re-quantized for the backward matmul that
  contracts over its free axes (None: reuse the forward's values)."""
  if not _blocked(spec):
    return None
  if spec.tile is not None:
    a, b = spec.tile
    return None if a == b else spec.replace(tile=(b, a))
  return _fill_bwd(spec.replace(axis=None), free, ndim, what)


def _grad_config(dn, lhs_shape, rhs_shape, gs: QuantSpec, ls, rs, precision, pet,
                 reduce, has_grad_history: bool, lhs_is_q: bool, rhs_is_q: bool):
  (lc, rc), (lb, rb) = dn
  lnd, rnd = len(lhs_shape), len(rhs_shape)
  lf = tuple(i for i in range(lnd) if i not in lc and i not in lb)
  rf = tuple(i for i in range(rnd) if i not in rc and i not in rb)
  nb = len(lb)
  out_nd = nb + len(lf) + len(rf)
  out_shape = (tuple(lhs_shape[i] for i in lb) + tuple(lhs_shape[i] for i in lf)
               + tuple(rhs_shape[i] for i in rf))
  out_lf = tuple(range(nb, nb + len(lf)))
  out_rf = tuple(range(nb + len(lf), out_nd))
  g_dw = None
  if gs.axis is None and gs.tile is None:
    if gs.group_size is not None:
      g_dx = _fill_bwd(gs, out_rf, out_nd, "grad_spec (dx = dy . W^T)")
      g_dw = _fill_bwd(gs, out_lf, out_nd, "grad_spec (dW = x^T . dy)")
    else:
      g_dx = gs.replace(axis=TENSOR)
  else:
    g_dx = gs
  if has_grad_history:
    _check_history_spec(g_dx, out_nd, "grad")
  for s, what in ((g_dx, "grad_spec (dx)"), (g_dw, "grad_spec (dW)")):
    if s is not None:
      _check_fits(out_shape, s, what)
  l_bwd = None if lhs_is_q else _bwd_operand_spec(ls, lf, lnd, "lhs (dW = x^T . dy)")
  r_bwd = None if rhs_is_q else _bwd_operand_spec(rs, rf, rnd, "rhs (dx = dy . W^T)")
  if l_bwd is not None:
    _check_fits(lhs_shape, l_bwd, "lhs re-quantized for dW")
  if r_bwd is not None:
    _check_fits(rhs_shape, r_bwd, "rhs re-quantized for dx")
  return _GradConfig(dn=dn, precision=precision, pet=pet, g_dx=g_dx, g_dw=g_dw,
                     l_bwd=l_bwd, r_bwd=r_bwd, reduce=reduce)


def _aval(x):
  return jax.ShapeDtypeStruct(x.shape, x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qgrad_dot(cfg: _GradConfig, lv, rv, lsrc, rsrc, keys, g_history):
  del lsrc, rsrc, keys, g_history
  return lax.dot_general(lv, rv, cfg.dn, cfg.precision, cfg.pet)


def _qgrad_dot_fwd(cfg, lv, rv, lsrc, rsrc, keys, g_history):
  y = lax.dot_general(lv, rv, cfg.dn, cfg.precision, cfg.pet)
  return y, (lv, rv, lsrc, rsrc, keys, g_history)


def _quantize_cotangent(g, cfg, keys, g_history):
  """q(dy) for the dx and dW matmuls, and the updated grad history."""
  k_g, _, _ = keys
  amax = new_history = None
  if g_history is not None:
    amax, cur = _history_range(g_history, cfg.reduce, g)
    new_history = scaling.update_history(g_history, cur)
  k_dx = k_dw = None
  if k_g is not None:
    if cfg.g_dw is not None:
      k_dx, k_dw = jax.random.split(k_g)
    else:
      k_dx = k_g
  g_dx = _fq_values(g, cfg.g_dx, k_dx if _stoch(cfg.g_dx) else None, amax)
  g_dw = g_dx if cfg.g_dw is None else _fq_values(
      g, cfg.g_dw, k_dw if _stoch(cfg.g_dw) else None, amax)
  return g_dx, g_dw, new_history


def _qgrad_dot_bwd(cfg, res, g):
  lv, rv, lsrc, rsrc, keys, g_history = res
  _, k_l, k_r = keys
  g_dx, g_dw, new_history = _quantize_cotangent(g, cfg, keys, g_history)
  w = rv
  if cfg.r_bwd is not None:
    k = jax.random.fold_in(k_r, 1) if _stoch(cfg.r_bwd) else None
    w = astype_holding(_fq_values(rsrc, cfg.r_bwd, k), rv.dtype)
  x = lv
  if cfg.l_bwd is not None:
    k = jax.random.fold_in(k_l, 1) if _stoch(cfg.l_bwd) else None
    x = astype_holding(_fq_values(lsrc, cfg.l_bwd, k), lv.dtype)
  dot = functools.partial(lax.dot_general, dimension_numbers=cfg.dn,
                          precision=cfg.precision, preferred_element_type=cfg.pet)
  # Transposes of the linear maps (no forward recomputed): dx = q(dy) . W^T,
  # dW = x^T . q(dy).
  dl, = jax.linear_transpose(lambda a: dot(a, w), _aval(lv))(g_dx.astype(g.dtype))
  dr, = jax.linear_transpose(lambda b: dot(x, b), _aval(rv))(g_dw.astype(g.dtype))
  return dl, dr, None, None, tuple(None for _ in keys), new_history


_qgrad_dot.defvjp(_qgrad_dot_fwd, _qgrad_dot_bwd)


# ---------------------------------------------------------------------------
# Kernel dispatch


def _weight_format_name(spec: QuantSpec) -> Optional[str]:
  f = spec.format
  if not spec.symmetric:
    return None
  if isinstance(f, BlockFormat):
    # The kernels decode the format's own scale codes (E8M0 / E4M3); a block
    # format stored with float scales (scale_dtype=) goes to the XLA path.
    if spec.scale_dtype != f.scale:
      return None
    return {"mxfp4": "mxfp4", "nvfp4": "nvfp4", "mxfp8_e4m3": "mxfp8_e4m3"}.get(f.name)
  if isinstance(f, IntFormat) and f.signed and f.frac_bits == 0 and f.bits in (4, 8):
    return f"int{f.bits}" if spec.scale_dtype in ("float32", "bfloat16") else None
  if isinstance(f, FloatFormat) and f.name in ("fp8_e4m3", "fp8_e5m2", "fp4_e2m1"):
    return f.name if spec.scale_dtype in ("float32", "bfloat16") else None
  return None


def kernel_problem(lhs, rhs: QArray, dimension_numbers, backend: Optional[str] = None,
                   out_dtype=None):
  """The kernel MatmulProblem for ``lhs x rhs``, or (None, reason).

  ``out_dtype``: the result's dtype (``preferred_element_type``); None: the
  activation's (a quantized activation's logical dtype).
  """
  from lowbit_jax.kernels._api import MatmulProblem  # pylint: disable=g-import-not-at-top
  (lc, rc), (lb, rb) = dimension_numbers
  if lb or rb:
    return None, "batched dot_general"
  if rhs.ndim != 2 or tuple(rc) != (1,) or rhs.pack_axis != 1:
    return None, "weight is not a K-major [N, K] QArray (see ops.prepare_weight)"
  lhs_shape = lhs.shape if not isinstance(lhs, QArray) else lhs.shape
  if tuple(lc) != (len(lhs_shape) - 1,):
    return None, "activation contraction is not its last axis"
  wf = _weight_format_name(rhs.spec)
  if wf is None:
    return None, f"no kernel for weight format {rhs.spec.format.name}"
  n, k = rhs.shape
  sp = rhs.spec
  if sp.tile is not None:
    w_block = sp.tile
  elif isinstance(sp.axis, int) and sp.axis == 1:
    w_block = None if sp.group_size in (None, k) else sp.group_size
  else:
    return None, "weight scales are not along K"
  x_format, x_block, x_dtype = None, None, str(jnp.dtype(lhs.dtype))
  if isinstance(lhs, QArray):
    x_format = _weight_format_name(lhs.spec)
    if x_format not in ("int8", "fp8_e4m3", "fp8_e5m2", "mxfp8_e4m3"):
      return None, f"no kernel for activation format {lhs.spec.format.name}"
    ax = lhs.spec.axis
    if ax != lhs.ndim - 1 or lhs.spec.tile is not None:
      return None, "activation scales are not per token / along K"
    g = lhs.spec.group_size
    x_block = None if g in (None, k) else g
    x_dtype = str(lhs.codes.dtype)
    out_dtype = lhs.dtype if out_dtype is None else str(jnp.dtype(out_dtype))
  else:
    out_dtype = str(jnp.dtype(lhs.dtype if out_dtype is None else out_dtype))
  m = 1
  for d in lhs_shape[:-1]:
    m *= d
  try:
    prob = MatmulProblem(m=m, n=n, k=k, x_dtype=x_dtype, w_format=wf, w_block=w_block,
                         x_format=x_format, x_block=x_block, out_dtype=str(out_dtype),
                         backend=backend or jax.default_backend(),
                         w_order=rhs.code_order)
  except ValueError as e:
    return None, str(e)
  return prob, ""


def _run_kernel(lhs, rhs: QArray, prob, use_kernel: str):
  from lowbit_jax import kernels  # pylint: disable=g-import-not-at-top
  kern = kernels.find(prob)
  if kern is None:
    if use_kernel == "always":
      where = (" (the Pallas kernels run on GPU and TPU backends, not the CPU)"
               if prob.backend == "cpu" else "")
      raise ValueError(f"use_kernel='always' but no kernel supports {prob}{where}; "
                       "use_kernel='auto' falls back to the reference")
    return None
  if isinstance(lhs, QArray):
    return _kernel_call(lhs, rhs, prob, kern)
  return _kernel_dot(lhs, rhs, prob, kern)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _kernel_dot(x: jax.Array, rhs: QArray, prob, kern) -> jax.Array:
  """A Pallas kernel's ``x . W^T`` with a gradient for the float activation
  (a frozen quantized weight in training, e.g. QLoRA's base): the kernels
  have no differentiation rule of their own."""
  return _kernel_call(x, rhs, prob, kern)


def _kernel_dot_fwd(x, rhs, prob, kern):
  return _kernel_call(x, rhs, prob, kern), (rhs, jnp.zeros((0,), x.dtype))


def _kernel_dot_bwd(prob, kern, res, g):
  del prob, kern
  rhs, x_like = res
  w = dequantize_as(rhs, jnp.float32)   # [N, K]
  dx = jnp.einsum("...n,nk->...k", g.astype(jnp.float32), w,
                  precision=lax.Precision.HIGHEST)
  # (The codes and scales of a stored weight take no gradient.)
  return dx.astype(x_like.dtype), jax.tree.map(lambda _: None, rhs)


_kernel_dot.defvjp(_kernel_dot_fwd, _kernel_dot_bwd)


def _kernel_call(lhs, rhs: QArray, prob, kern):
  """``kern`` (a kernel module ``kernels.find`` gave for ``prob``) on the operands."""
  from lowbit_jax.kernels._api import MatmulOperands  # pylint: disable=g-import-not-at-top
  if isinstance(lhs, QArray):
    x = lhs.codes.reshape(-1, lhs.codes.shape[-1])
    x_scale = lhs.scale.reshape(-1, lhs.scale.shape[-1])
    lead = lhs.shape[:-1]
  else:
    x = lhs.reshape(-1, lhs.shape[-1])
    x_scale = None
    lead = lhs.shape[:-1]
  ops = MatmulOperands(x=x, w_codes=rhs.codes, w_scale=rhs.scale, x_scale=x_scale,
                       w_tensor_scale=rhs.tensor_scale)
  y = kern.matmul(ops, prob)
  return y.reshape(tuple(lead) + (rhs.shape[0],))


# ---------------------------------------------------------------------------
# Public ops


def _grad_spec(grad_spec, mode: str) -> Optional[QuantSpec]:
  if grad_spec is None:
    return None
  if mode != "fake":
    raise ValueError("grad_spec quantizes gradients for low-bit training; it needs "
                     "mode='fake' (mode='real' is the inference path and has no "
                     "backward pass)")
  return as_spec(grad_spec)


def _norm_dn(dimension_numbers):
  (lc, rc), (lb, rb) = dimension_numbers
  t = lambda v: tuple(int(a) for a in v)  # noqa: E731
  return ((t(lc), t(rc)), (t(lb), t(rb)))


def _norm_precision(precision):
  return tuple(precision) if isinstance(precision, list) else precision


def dot_general(lhs, rhs, dimension_numbers, precision=None,
                preferred_element_type=None, *, lhs_spec=None, rhs_spec=None,
                grad_spec=None, mode: str = "fake", key: Optional[jax.Array] = None,
                lhs_amax=None, lhs_tensor_amax=None, lhs_scale=None, rhs_scale=None,
                lhs_clip=None, amax_history: Optional[dict] = None,
                history_reduce: str = "max", use_kernel: str = "auto"):
  """Quantized ``lax.dot_general``.

  Args:
    lhs, rhs: arrays or QArrays (a QArray rhs is a weight quantized ahead of
      time; its dims are its logical dims).
    dimension_numbers, precision, preferred_element_type: as lax.dot_general.
    lhs_spec, rhs_spec: QuantSpec or format name per operand (None: leave it in
      float). An unset axis is filled with the operand's contraction axes
      (``operand_spec``); with an amax history, an unset axis means per tensor.
    grad_spec: fake mode only: quantize the output's cotangent before both
      backward matmuls (module docstring: blocking, unset axes).
    mode: "fake" or "real" (module docstring).
    key: PRNG key for stochastically rounded specs, split in three (lhs, rhs,
      gradient).
    lhs_amax: static activation range from calibration (None: dynamic).
    lhs_tensor_amax: static per-tensor range of a two-level block activation
      (NVFP4): fixes its tensor scale, block scales stay dynamic.
    lhs_scale, rhs_scale: learned (LSQ) scales, ``fake_quant``'s ``scale``:
      shaped ``scale_shape(operand.shape, operand_spec(spec, contract, ndim))``.
    lhs_clip: learned PACT clipping level of the activation (``fake_quant``'s
      ``clip``).
    amax_history: delayed scaling, a dict with any of "lhs", "rhs", "grad"
      mapping to a ``scaling.init_history(n)`` array; the gradient jax.grad
      returns for each is the updated history (module docstring).
    history_reduce: "max" or "most_recent": how a history gives the range.
    use_kernel: "auto", "never" or "always".

  Returns:
    The product, in lhs's float dtype unless preferred_element_type is given.

  Raises:
    ValueError: grad_spec or amax_history in real mode, a stochastic spec
      without a key, conflicting or ill-shaped ranges, a blocked backward
      quantization along an axis its block size does not divide.
  """
  _check_mode(mode, use_kernel)
  hist = _check_histories(amax_history, history_reduce, mode)
  gs = _grad_spec(grad_spec, mode)
  dn = _norm_dn(dimension_numbers)
  (lc, rc), _ = dn
  lhs_nd, rhs_nd = len(lhs.shape), len(rhs.shape)
  l_is_q, r_is_q = isinstance(lhs, QArray), isinstance(rhs, QArray)
  ls = None if l_is_q else _resolve(lhs_spec, lc, lhs_nd, "lhs" in hist, "lhs")
  rs = None if r_is_q else _resolve(rhs_spec, rc, rhs_nd, "rhs" in hist, "rhs")
  if "grad" in hist and gs is None:
    raise ValueError("amax_history['grad'] needs a grad_spec")
  k_l, k_r, k_g = _split_keys(key, (("lhs", ls), ("rhs", rs), ("grad", gs)))
  out_dtype = _common_dtype(lhs.dtype, rhs.dtype)
  cfg = None
  if gs is not None:  # validated before any work
    pet = None if preferred_element_type is None else jnp.dtype(preferred_element_type)
    cfg = _grad_config(dn, tuple(lhs.shape), tuple(rhs.shape), gs, ls, rs,
                       _norm_precision(precision), pet, history_reduce,
                       "grad" in hist, l_is_q, r_is_q)
  if mode == "fake":
    lv, rv = _qdq_operands(lhs, rhs, ls, rs, k_l, k_r, mode, lhs_amax,
                            lhs_tensor_amax, lhs_scale, lhs_clip, rhs_scale,
                            hist, history_reduce)
    lv, rv = astype_holding(lv, out_dtype), astype_holding(rv, out_dtype)
    if cfg is None:
      return lax.dot_general(lv, rv, dn, precision, preferred_element_type)
    lsrc = lhs if cfg.l_bwd is not None else None
    rsrc = rhs if cfg.r_bwd is not None else None
    return _qgrad_dot(cfg, lv, rv, lsrc, rsrc, (k_g, k_l, k_r), hist.get("grad"))
  # real
  if r_is_q:   # (histories are fake mode only: _check_histories)
    _check_qarray_operand("rhs", scale=rhs_scale)
  if l_is_q:
    _check_qarray_operand("lhs", lhs_amax, lhs_tensor_amax, lhs_scale, lhs_clip)
  rq = rhs if r_is_q else (
      quantize(_real_mode_input("rhs", rhs), rs, key=k_r if _stoch(rs) else None,
               scale=rhs_scale)
      if rs is not None and rhs.size else rhs)
  lq = lhs if l_is_q else (
      quantize(_real_mode_input("lhs", lhs), ls, key=k_l if _stoch(ls) else None,
               amax=lhs_amax, tensor_amax=lhs_tensor_amax, scale=lhs_scale,
               clip=lhs_clip)
      if ls is not None and lhs.size else lhs)  # empty: nothing to quantize
  if isinstance(rq, QArray) and use_kernel != "never":
    prob, why = kernel_problem(lq, rq, dn, out_dtype=preferred_element_type)
    if prob is not None:
      y = _run_kernel(lq, rq, prob, use_kernel)
      if y is not None:
        return y.astype(preferred_element_type or out_dtype)
    elif use_kernel == "always":
      raise ValueError(f"use_kernel='always' but this matmul cannot use a kernel: {why}")
  elif use_kernel == "always":
    raise ValueError("use_kernel='always' but the weight (rhs) is neither a QArray nor "
                     "given an rhs_spec, so no kernel can take this matmul; quantize "
                     "it (ops.prepare_weight) or use use_kernel='auto'")
  if isinstance(rq, QArray) and rq.code_order != "natural":
    # The XLA paths read natural order: the bytes are reordered back first
    # (one pass over the packed codes), so every order takes the same path and
    # gives the same bits (a kernel-ordered weight went to the bf16 dequantize
    # path instead of the group-batched dot on its 4-bit codes).
    rq = set_code_order(rq, "natural")
  lv = dequantize(lq) if isinstance(lq, QArray) else lq
  ct = _compute_dtype(out_dtype)
  rows = lv.size // max(1, _prod(lv.shape[a] for a in dn[0][0]))
  post = (_scale_after_dot(rq, dn, ct)
          if isinstance(rq, QArray) and rows <= _CODES_IN_DOT_MAX_ROWS else None)
  materialize = (post is None and isinstance(rq, QArray) and ct != jnp.float32
                 and rows >= _MATERIALIZE_MIN_ROWS)
  if post is not None:
    # Codes converted straight into the dot (XLA fuses the convert into the
    # GEMM's operand load), the per-channel scales applied to its output.
    codes, scale, shift = post
    xc = lv.astype(ct)
    y = lax.dot_general(xc, codes.astype(ct), dn, precision,
                        preferred_element_type=jnp.float32) * scale
    if shift is not None:
      # x . ((c - z) s) = (x . c) s - (sum of x) (z s), per output channel.
      xsum = jnp.sum(astype_holding(xc, jnp.float32), axis=dn[0][0])
      y = y - xsum.reshape(xsum.shape + (1,) * shift.ndim) * shift
    return y.astype(preferred_element_type or out_dtype)
  if isinstance(rq, QArray):
    y = _group_scaled_dot(lv, rq, dn, ct, rows, precision)
    if y is not None:
      return y.astype(preferred_element_type or out_dtype)
  rv = dequantize_as(rq, out_dtype) if isinstance(rq, QArray) else rq
  # Dequantized operands round to the activation's dtype first, as fake mode's
  # operands do, so a bf16 model's real mode equals its fake mode also where
  # the dot itself runs in float32 (CPU).
  rv = rv.astype(out_dtype).astype(ct)
  if materialize:
    # Write the dequantized weight once and run the library GEMM on it: at
    # large M a dequantize fused into the GEMM's operand load (XLA's Triton
    # GEMM fusion) is slower than the plain 16-bit GEMM by more than the cost
    # of the extra pass (_MATERIALIZE_MIN_ROWS).
    rv = lax.optimization_barrier(rv)
  res = jnp.dtype(preferred_element_type or out_dtype)
  y = lax.dot_general(lv.astype(out_dtype).astype(ct), rv,
                      dn, precision, preferred_element_type=_dot_dtype(ct, res))
  return y.astype(res)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _real_mode_input(name: str, x):
  """A float operand (``name``: "lhs" or "rhs") real mode quantizes in the
  call: identity, but differentiating through it raises (rounding to codes has
  no derivative, so the gradient would be silently zero)."""
  del name
  return x


@_real_mode_input.defjvp
def _real_mode_input_jvp(name, primals, tangents):
  del primals, tangents
  fix = ("drop its activation spec, or differentiate mode='fake' "
         "(straight-through gradients)" if name == "lhs" else
         "differentiate mode='fake' (straight-through gradients), or quantize "
         "the weight ahead of time (a QArray / QWeight: real mode is then "
         "differentiable with respect to a float activation)")
  raise ValueError(
      f"mode='real' quantizes this float {'activation' if name == 'lhs' else 'weight'}"
      f" ({name}) to codes in the call, which has no derivative (the gradient "
      f"would be silently zero): {fix}")


def _dot_dtype(ct, result_dtype):
  """The dtype the reference dot writes its product in.

  The dot accumulates in float32 in every case. With 16-bit operands whose
  result is wanted in that same 16-bit dtype (a bf16 model on GPU or TPU), the
  dot writes it directly: XLA's GPU GEMMs (cuBLAS with a float32 compute type,
  its Triton GEMMs) and the TPU's MXU accumulate a 16-bit dot in float32 and
  round once to the output, the value a float32 product converted to 16 bits
  has, without writing the float32 product and converting it in a second pass
  (on the H200, x[4096, 8192] @ W[8192, 8192]: a 49 us convert and a slower
  GEMM writing 128 MB instead of 64, benchmarks/primitives_h200_20261203_2239.json's
  ``top_kernels``). Otherwise (float32 compute, a float32 result asked for) the
  product is float32.
  """
  ct, result_dtype = jnp.dtype(ct), jnp.dtype(result_dtype)
  return ct if ct.itemsize == 2 and result_dtype == ct else jnp.dtype(jnp.float32)


# From this many activation rows on (16-bit compute only), a weight whose codes
# cannot go into the dot directly is dequantized in its own pass and the GEMM
# runs on the result (``optimization_barrier`` keeps XLA from fusing the
# dequantize into the GEMM's operand load). Off: at the M where it could pay,
# XLA already writes the dequantized weight in its own fusion and runs the
# library GEMM on it. H200, x[M, 8192] @ W[8192, 8192] int4 g128, the dot
# writing bf16 (benchmarks/primitives_h200_mm_s24.md): fused 225 / 735 us,
# materialized 225 / 736 us at M = 1024 / 4096. The benchmark times every
# order at every M.
_MATERIALIZE_MIN_ROWS = 1 << 62


# Up to this many activation rows the reference dot takes per-channel 8-bit
# codes directly (_scale_after_dot): XLA then fuses their convert into one
# GEMM kernel that reads the weight once (a GEMV at decode reads 1 byte per
# weight instead of 1 + 2 + 2); above it the weight is dequantized first and
# the GEMM writes the 16-bit result directly (``_dot_dtype``). H200,
# x[M, 8192] @ W[8192, 8192] (benchmarks/primitives_h200_mm_s24.md), codes
# against dequantize-first: int8 29 / 26 / 99 / 251 / 799 us against
# 121 / 123 / 129 / 251 / 760 at M = 1, 16, 256, 1024, 4096; fp8 24 / 23 /
# 69 / 224 / 777 against 122 / 123 / 130 / 252 / 758. At M = 4096 XLA converts
# the codes in a pass of their own (81 us) and the GEMM writes float32 for the
# scale to multiply. Packed int4 codes (``_native_4bit_codes``) share the
# threshold; on an H100 (benchmarks/kernels_h100_runs/
# primitives_codes_h100_s45.md, codes against dequantize-first) int4 takes
# 118 / 149 us at M = 512, 232 / 236 at 1024 and 439 / 407 at 2048, int8
# 127 / 171, 253 / 256 and 451 / 425.
_CODES_IN_DOT_MAX_ROWS = 1024


def _prod(v) -> int:
  n = 1
  for d in v:
    n *= int(d)
  return n


def _holds(ct, fmt: FloatFormat) -> bool:
  """Whether every finite value of ``fmt`` is exactly a value of ``ct``."""
  fi = jnp.finfo(ct)
  return (fmt.man_bits <= fi.nmant and float(fmt.max) <= float(fi.max)
          and float(fmt.min_subnormal) >= float(fi.smallest_subnormal))


def _scale_after_dot(rq: QArray, dn, ct):
  """(codes, output scale) when a 16-bit dot can take ``rq``'s codes directly.

  ``x . (codes * s) == (x . codes) * s`` when ``s`` is constant along the
  contraction (per output channel or per tensor): the codes then go into the
  dot as they are stored, and XLA fuses their convert into the GEMM instead of
  writing a dequantized copy of the weight first. Only for 8-bit codes stored
  one per byte whose value is the code itself (integers without fraction
  bits, float8 types: exact in bfloat16 and float16) or 4-bit integer codes
  packed along the contracted last axis (``_native_4bit_codes``; E2M1 codes
  where ``_NATIVE_4BIT_DTYPES`` lists them),
  float scales (a zero point ``z`` comes off the output as ``(sum of x) *
  z * s``), no tensor scale or padding, and a 16-bit compute dtype: the product then
  rounds like the dequantize-first path does (one rounding of each product
  to float32 accumulation, then one to the output), not bit for bit. Float32
  compute keeps the dequantize-first order: the products fake quantization
  forms, summed by a dot whose order can depend on the layout the weight is
  stored in (a few ulp apart from fake mode on some CPUs).

  Returns:
    None, or (codes, scale broadcastable to the dot's output, ``z * s``
    likewise or None).
  """
  if jnp.dtype(ct).itemsize != 2:
    return None
  spec = rq.spec
  fmt = spec.storage_format
  (_, rc), (_, rb) = dn
  if (rb or rq.tensor_scale is not None or spec.scale_dtype == "e8m0"
      or not _scales_along(rq, rc, 1)):
    return None
  codes = _codes_for_dot(rq, fmt, rc, ct)
  if codes is None:
    return None
  zp = rq.zero_point
  free = tuple(i for i in range(rq.ndim) if i not in rc)
  fshape = tuple(rq.scale.shape[i] for i in free)
  s = rq.scale.astype(jnp.float32).reshape(fshape)
  shift = None if zp is None else s * zp.astype(jnp.float32).reshape(fshape)
  return codes, s, shift


# A weight with group scales along the contraction goes into the dot one
# group at a time (``_group_scaled_dot``) while ``rows * this <= group``: its
# float32 partial sums (``rows x groups x N``, 2 * rows / group of the bytes
# of a bf16 copy of the weight; each written and read once) then move at
# most half of what the dequantize-first order's copy does. Measured on an
# H100 (jax 0.11.2, x[M, 8192] @ W[8192, 8192], group dot against the fused
# dequantize-first order, us; benchmarks/kernels_h100_runs/
# primitives_groups_h100_s45.md): rows * 8 = group wins (int4 g128 at
# M = 16: 51 / 114), rows * 4 = group wins (int4 g128 at M = 32: 80 / 118,
# int8 g128 86 / 142, int4 g64 at M = 16: 79 / 115), rows * 2 = group loses
# (int4 g128 at M = 64: 139 / 118, int4 g64 at M = 32: 127 / 119, int4 g32
# at M = 16: 139 / 117).
_GROUP_DOT_ROWS_PER_GROUP = 4
# Where 4-bit codes go into the dot as XLA's 4-bit dtypes and group-scaled
# weights as a dot batched over their groups: measured on GPU only (TPU keeps
# the dequantize-first order until timed there).
_NATIVE_CODE_BACKENDS = ("gpu",)
# The 4-bit dtypes whose codes go into the dot (``_native_4bit_codes``). Not
# E2M1 (``float4_e2m1fn``): on an H100 (jax 0.11.2, the public path of
# benchmarks/kernels_h100_runs/run_fb_s45.md against run_fb_h100.md, before
# the change) its group-batched dot took fp4 g32 on 8192x8192 at M = 4 from
# 114 to 212 us and MXFP4 from 129 to 222, 28672x8192 at M = 1 from 393 to
# 476 (MXFP4 420 -> 497, NVFP4 379 -> 444), where int4 codes gained 2-4x
# (int4 g128 on 8192x8192 at M = 1: 110 -> 33 us; per channel 108 -> 33).
# Per-channel E2M1 codes go through the same 4-bit convert, so they keep the
# dequantize-first order as well until timed.
_NATIVE_4BIT_DTYPES = (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4))


def _group_scaled_dot(lv, rq: QArray, dn, ct, rows: int, precision):
  """``lv . rq`` for a weight with group scales along the contraction, its
  codes converted inside the dot, or None where it does not apply.

  ``x . W = sum_g s_g (x_g . c_g)``: the contraction splits into its groups
  (a reshape), one batched dot over the groups takes the codes as they are
  stored (8-bit codes, or packed int4 as XLA's 4-bit dtype,
  ``_native_4bit_codes``) and writes each group's float32 partial sum, and
  the group scales (E8M0 as ``_e8m0_factors``' two factors, NVFP4's tensor
  scale after the sum) multiply the partials as they are summed; a zero
  point comes off as ``sum_g (sum of x_g) z_g s_g``. The
  dequantize-first order writes a 16-bit copy of the whole weight and reads
  it back; at decode that is most of the time (int4 g128 on the H200,
  x[1, 8192] @ W[8192, 8192]: 84 us against bf16's 34, the matmul table of
  ``benchmarks/primitives_h200.md``). The sums are more exact than that
  order's (no 16-bit rounding of ``code * scale``), as the Mosaic kernel's
  ``Config.acc_scale`` is, so not its bits. A 16-bit dot, small M
  (``_GROUP_DOT_ROWS_PER_GROUP``), ``_NATIVE_CODE_BACKENDS``.
  """
  if (jnp.dtype(ct).itemsize != 2
      or jax.default_backend() not in _NATIVE_CODE_BACKENDS):
    return None
  (lc, rc), (lb, rb) = dn
  spec = rq.spec
  fmt = spec.storage_format
  zp = rq.zero_point
  if (lb or rb or len(lc) != 1 or len(rc) != 1 or spec.tile is not None
      or not isinstance(spec.axis, int) or spec.group_size is None
      or (zp is not None and (spec.scale_dtype == "e8m0"
                              or rq.tensor_scale is not None))):
    return None
  la, ra = lc[0], rc[0]
  k, g = rq.shape[ra], spec.group_size
  if (spec.axis != ra or k % g or k == g or rows * _GROUP_DOT_ROWS_PER_GROUP > g
      or not _scales_along(rq, rc, k // g)):
    return None
  n_groups = k // g
  codes = _codes_for_dot(rq, fmt, rc, ct)
  if codes is None:
    return None
  split = lambda a, ax: a.reshape(  # noqa: E731
      a.shape[:ax] + (n_groups, g) + a.shape[ax + 1:])
  xg = split(lv.astype(ct), la)
  # [groups, lhs free..., rhs free...]: the groups are the dot's batch.
  part = lax.dot_general(
      xg, split(codes.astype(ct), ra),
      (((la + 1,), (ra + 1,)), ((la,), (ra,))), precision,
      preferred_element_type=jnp.float32)
  # The scales as [groups, 1 (lhs free)..., rhs free...].
  n_free_l = lv.ndim - 1
  if spec.scale_dtype == "e8m0":
    factors = list(_e8m0_factors(rq.scale))
  else:
    factors = [rq.scale.astype(jnp.float32)]
  for f in factors:
    f = jnp.moveaxis(f, ra, 0)
    part = part * f.reshape(f.shape[:1] + (1,) * n_free_l + f.shape[1:])
  y = jnp.sum(part, axis=0)
  if zp is not None:
    # Less sum_g (sum of x_g) z_g s_g: a small float32 dot at full precision
    # (not TF32: the two terms can nearly cancel).
    xs = jnp.sum(xg.astype(jnp.float32), axis=la + 1)
    zs = rq.scale.astype(jnp.float32) * zp.astype(jnp.float32)
    y = y - lax.dot_general(xs, zs, (((la,), (ra,)), ((), ())),
                            precision=lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)
  if rq.tensor_scale is not None:
    y = y * rq.tensor_scale
  return y


def _scales_along(rq: QArray, rc, n_groups: int) -> bool:
  """Whether ``rq``'s scales (and its zero points, same shape) number
  ``n_groups`` along each contracted axis in ``rc`` and, along every other
  axis, one per element or one shared."""
  sshape = tuple(rq.scale.shape)
  zp = rq.zero_point
  return (len(sshape) == rq.ndim and all(sshape[i] == n_groups for i in rc)
          and all(n in (1, d) for i, (n, d) in enumerate(zip(sshape, rq.shape))
                  if i not in rc)
          and (zp is None or tuple(zp.shape) == sshape))


def _codes_for_dot(rq: QArray, fmt, rc, ct):
  """``rq``'s codes as a ``ct`` dot can convert them while it loads them (each
  code's value exact in ``ct``), or None: 8-bit codes stored one per byte
  whose value is the code itself (integers without fraction bits, float8
  types), or packed 4-bit ones (``_native_4bit_codes``)."""
  if fmt.bits == 4:
    return _native_4bit_codes(rq, fmt, rc)
  if (fmt.bits != 8 or tuple(rq.codes.shape) != tuple(rq.shape)
      or rq.codes.dtype.itemsize != 1):
    return None
  if isinstance(fmt, IntFormat):
    ok = not fmt.frac_bits and rq.codes.dtype == (jnp.int8 if fmt.signed else jnp.uint8)
  else:
    ok = (isinstance(fmt, FloatFormat) and jnp.issubdtype(rq.codes.dtype, jnp.floating)
          and _holds(ct, fmt))
  return rq.codes if ok else None


def _native_4bit_codes(rq: QArray, fmt, rc):
  """Packed 4-bit codes as XLA's own 4-bit dtype (``int4`` / ``uint4``; and
  ``float4_e2m1fn`` where ``_NATIVE_4BIT_DTYPES`` lists it, which it does not
  by default), ``rq.shape``, for the dot to convert as it loads them.

  Only for codes packed two to a byte along the last axis, that axis
  contracted, in natural order and without padding: a bitcast of the bytes
  is then the array itself (the first code in the low nibble, as ``pack``
  stores it). Without it the weight was dequantized to 16 bits in memory
  before the dot (int4 per channel, x[1, 8192] @ W[8192, 8192]: 108 us on
  an H100 against the bf16 weight's 46, ``benchmarks/kernels_h100_runs/
  run_fb_h100.md``; ``gpu_weight_only.xla_fused_matmul``, which converts the
  4-bit codes inside the GEMM, took 27 us on the H200 against bf16's 34,
  ``benchmarks/kernels_h200.md``). The optimization barrier keeps
  the bitcast out of the GEMM's fusion: XLA's GPU GemmFusion aborts the
  process when it traces the convert back through the element-count-changing
  bitcast (``gpu_weight_only._codes_to_bf16``); behind it the GEMM still
  reads the 4-bit array in its stored width.
  """
  last = rq.ndim - 1
  if (jax.default_backend() not in _NATIVE_CODE_BACKENDS
      or rq.code_order != "natural" or rq.pack_axis != last or last not in rc
      or rq.codes.dtype != jnp.uint8 or rq.codes.shape[:-1] != rq.shape[:-1]
      or 2 * rq.codes.shape[-1] != rq.shape[-1]):
    return None
  if isinstance(fmt, IntFormat):
    if fmt.frac_bits:
      return None
    narrow = jnp.int4 if fmt.signed else jnp.uint4
  elif (isinstance(fmt, FloatFormat) and fmt.ml_dtype is not None
        and jnp.dtype(fmt.ml_dtype) == jnp.dtype(jnp.float4_e2m1fn)):
    narrow = jnp.float4_e2m1fn
  else:
    return None
  if jnp.dtype(narrow) not in _NATIVE_4BIT_DTYPES:
    return None
  w4 = lax.bitcast_convert_type(rq.codes, narrow).reshape(rq.shape)
  return lax.optimization_barrier(w4)


def _common_dtype(lhs_dtype, rhs_dtype):
  """The dtype both operands of a quantized op are cast to: lhs's float dtype.

  An integer lhs (token ids, masks) never pulls a float weight down to
  integers: the two are promoted as ``jnp.dot`` would.
  """
  lt = jnp.dtype(lhs_dtype)
  if jnp.issubdtype(lt, jnp.inexact):
    return lt
  return jnp.promote_types(lt, jnp.dtype(rhs_dtype))


def _compute_dtype(activation_dtype):
  """The dtype the reference dot runs in (it accumulates in float32).

  On GPU and TPU, the activation's 16-bit float dtype: dequantized weights are
  cast into it, as a bf16 model's own dot would, and XLA fuses the dequantize
  into the dot. Float32 activations, and every dot on CPU, run in float32: XLA's
  CPU dot is slower in bf16 than in float32 (1.2 to 1.4x at M >= 256 on
  2048x2048, benchmarks/primitives_cpu.md's command).
  """
  dt = jnp.dtype(activation_dtype)
  if jax.default_backend() == "cpu":
    return jnp.float32
  return dt if dt in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else jnp.float32


def _einsum_parts(subscripts: str, lhs_nd: int, rhs_nd: int):
  if "->" not in subscripts:
    raise ValueError(f"einsum needs an explicit output ('ab,bc->ac'), got "
                     f"{subscripts!r}")
  ins, out = subscripts.replace(" ", "").split("->")
  parts = ins.split(",")
  if len(parts) != 2 or "." in subscripts:
    raise ValueError(f"quantized einsum takes two operands without ellipses, got "
                     f"{subscripts!r}")
  a, b = parts
  if len(a) != lhs_nd or len(b) != rhs_nd:
    raise ValueError(f"einsum {subscripts!r} does not fit operands of rank {lhs_nd} "
                     f"and {rhs_nd}")
  return a, b, out


def _einsum_contracted(subscripts: str, lhs_nd: int, rhs_nd: int):
  """Contraction axes of each operand of a two-operand einsum."""
  a, b, out = _einsum_parts(subscripts, lhs_nd, rhs_nd)
  contracted = set(a) & set(b) - set(out)
  return (tuple(i for i, c in enumerate(a) if c in contracted),
          tuple(i for i, c in enumerate(b) if c in contracted))


def _einsum_dot(subscripts: str, lhs_nd: int, rhs_nd: int):
  """(dimension_numbers, output permutation) of an einsum as one dot_general."""
  a, b, out = _einsum_parts(subscripts, lhs_nd, rhs_nd)
  if len(set(a)) != len(a) or len(set(b)) != len(b) or len(set(out)) != len(out):
    raise ValueError(f"einsum with grad_spec takes no repeated label within an "
                     f"operand (traces, diagonals): {subscripts!r}")
  for c in a + b:
    if c not in out and not (c in a and c in b):
      raise ValueError(f"einsum with grad_spec: label {c!r} of {subscripts!r} is "
                       "summed inside one operand; sum it before the op")
  for c in out:
    if c not in a and c not in b:
      raise ValueError(f"einsum output label {c!r} appears in no operand")
  batch = [c for c in a if c in b and c in out]
  contract = [c for c in a if c in b and c not in out]
  dn = ((tuple(a.index(c) for c in contract), tuple(b.index(c) for c in contract)),
        (tuple(a.index(c) for c in batch), tuple(b.index(c) for c in batch)))
  dot_out = batch + [c for c in a if c not in b] + [c for c in b if c not in a]
  perm = tuple(dot_out.index(c) for c in out)
  return dn, perm


def _grad_spec_through(gs: QuantSpec, perm: tuple) -> QuantSpec:
  """An einsum's ``grad_spec`` (axes of its output) for the ``dot_general``
  whose output ``transpose(perm)`` gives it: output axis ``i`` is axis
  ``perm[i]`` there."""
  n = len(perm)
  if perm == tuple(range(n)):
    return gs
  ax = gs.axis
  if isinstance(ax, int):
    gs = gs.replace(axis=perm[ax % n])
  elif isinstance(ax, tuple):
    gs = gs.replace(axis=tuple(perm[a % n] for a in ax))
  if gs.tile is not None:
    last = tuple(perm[-2:])
    if last == (n - 1, n - 2):
      gs = gs.replace(tile=tuple(gs.tile[::-1]))
    elif last != (n - 2, n - 1):
      raise ValueError(f"grad_spec tiles the output's last two axes, which this "
                       f"einsum computes as axes {last} of its dot_general: give "
                       "the output labels in (batch, lhs-free, rhs-free) order, or "
                       "use a per-axis grad_spec")
  return gs


def einsum(subscripts: str, lhs, rhs, *, lhs_spec=None, rhs_spec=None, grad_spec=None,
           mode: str = "fake", key=None, lhs_amax=None, lhs_tensor_amax=None,
           lhs_scale=None, rhs_scale=None, lhs_clip=None,
           amax_history: Optional[dict] = None, history_reduce: str = "max",
           use_kernel: str = "auto", precision=None, preferred_element_type=None):
  """Quantized two-operand ``jnp.einsum``.

  Each operand is quantized on its own (an unset spec axis becomes that
  operand's contracted labels; per tensor when it has none, or when it has an
  amax history) before the contraction, so the specs stay with their
  operands whatever order einsum contracts them in; both operands may be
  activations (attention's ``q.k`` and ``p.v``). With ``grad_spec`` the
  einsum runs as one ``dot_general`` (batch, lhs-free, rhs-free) and a
  transpose to the output's labels, and takes ``dot_general``'s backward
  quantization. Real mode runs the reference (quantize, dequantize,
  float32-accumulating einsum); kernels are reached through ``dot_general``.

  Args: as ``dot_general``, with ``subscripts`` an explicit two-operand
  einsum string ('bqhd,bkhd->bhqk').

  Returns:
    The einsum, in lhs's dtype unless preferred_element_type is given.

  Raises:
    ValueError: as ``dot_general``; with grad_spec also repeated labels
      within an operand or labels summed inside one operand.
  """
  _check_mode(mode, use_kernel)
  hist = _check_histories(amax_history, history_reduce, mode)
  gs = _grad_spec(grad_spec, mode)
  lhs_nd, rhs_nd = len(lhs.shape), len(rhs.shape)
  lc, rc = _einsum_contracted(subscripts, lhs_nd, rhs_nd)
  ls = None if isinstance(lhs, QArray) else _resolve(lhs_spec, lc, lhs_nd,
                                                     "lhs" in hist, "lhs")
  rs = None if isinstance(rhs, QArray) else _resolve(rhs_spec, rc, rhs_nd,
                                                     "rhs" in hist, "rhs")
  if gs is not None:
    dn, perm = _einsum_dot(subscripts, lhs_nd, rhs_nd)
    gs = _grad_spec_through(gs, perm)
    y = dot_general(lhs, rhs, dn, precision, preferred_element_type, lhs_spec=ls,
                    rhs_spec=rs, grad_spec=gs, mode=mode, key=key, lhs_amax=lhs_amax,
                    lhs_tensor_amax=lhs_tensor_amax, lhs_scale=lhs_scale,
                    rhs_scale=rhs_scale, lhs_clip=lhs_clip,
                    amax_history=amax_history, history_reduce=history_reduce,
                    use_kernel=use_kernel)
    return y if perm == tuple(range(len(perm))) else jnp.transpose(y, perm)
  if "grad" in hist:
    raise ValueError("amax_history['grad'] needs a grad_spec")
  if mode == "real" and use_kernel == "always":
    raise ValueError("use_kernel='always': einsum runs XLA's einsum and never a "
                     "kernel; write the matmul as dot_general with a K-major weight "
                     "(ops.prepare_weight), or use use_kernel='auto'")
  k_l, k_r, _ = _split_keys(key, (("lhs", ls), ("rhs", rs)))
  out_dtype = _common_dtype(lhs.dtype, rhs.dtype)
  lv, rv = _qdq_operands(lhs, rhs, ls, rs, k_l, k_r, mode, lhs_amax,
                          lhs_tensor_amax, lhs_scale, lhs_clip, rhs_scale,
                          hist, history_reduce)
  if mode == "real":
    ct = _compute_dtype(out_dtype)
    res = jnp.dtype(preferred_element_type or out_dtype)
    y = jnp.einsum(subscripts, astype_holding(lv, ct), astype_holding(rv, ct),
                   precision=precision, preferred_element_type=_dot_dtype(ct, res))
    return y.astype(res)
  return jnp.einsum(subscripts, astype_holding(lv, out_dtype), astype_holding(rv, out_dtype),
                    precision=precision, preferred_element_type=preferred_element_type)


class _RaggedGradConfig(NamedTuple):
  """Backward quantization of ``ragged_dot`` (the fields ``_quantize_cotangent`` reads)."""
  precision: object
  pet: object
  g_dx: QuantSpec
  g_dw: Optional[QuantSpec]
  reduce: str


def _ragged(lv, rv, group_sizes, precision, pet):
  return lax.ragged_dot(lv, rv, group_sizes, precision=precision,
                        preferred_element_type=pet)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qgrad_ragged(cfg: _RaggedGradConfig, lv, rv, group_sizes, keys, g_history):
  del keys, g_history
  return _ragged(lv, rv, group_sizes, cfg.precision, cfg.pet)


def _qgrad_ragged_fwd(cfg, lv, rv, group_sizes, keys, g_history):
  y = _ragged(lv, rv, group_sizes, cfg.precision, cfg.pet)
  return y, (lv, rv, group_sizes, keys, g_history)


def _qgrad_ragged_bwd(cfg, res, g):
  lv, rv, group_sizes, keys, g_history = res
  g_dx, g_dw, new_history = _quantize_cotangent(g, cfg, keys, g_history)
  dot = functools.partial(_ragged, group_sizes=group_sizes, precision=cfg.precision,
                          pet=cfg.pet)
  dl, = jax.linear_transpose(lambda a: dot(a, rv), _aval(lv))(g_dx.astype(g.dtype))
  dr, = jax.linear_transpose(lambda b: dot(lv, b), _aval(rv))(g_dw.astype(g.dtype))
  return dl, dr, None, tuple(None for _ in keys), new_history


_qgrad_ragged.defvjp(_qgrad_ragged_fwd, _qgrad_ragged_bwd)


def routed_rows_only(x: jax.Array, group_sizes, fill=0) -> jax.Array:
  """``x`` ``[M, K]`` with its rows at or past ``sum(group_sizes)`` (rows of no
  group, e.g. an MoE's padding) set to ``fill``.

  Zero (the default) leaves a max-based scale as the routed rows give it;
  calibration passes NaN, which every observer skips, so that a min,
  percentile or histogram sees the routed rows alone."""
  keep = jnp.arange(x.shape[0]) < jnp.sum(group_sizes)
  return jnp.where(keep[:, None], x, jnp.asarray(fill, x.dtype))


def ragged_dot(lhs, rhs, group_sizes, precision=None, preferred_element_type=None, *,
               lhs_spec=None, rhs_spec=None, grad_spec=None, mode: str = "fake",
               key=None, lhs_amax=None, lhs_tensor_amax=None, lhs_scale=None,
               rhs_scale=None, lhs_clip=None, amax_history: Optional[dict] = None,
               history_reduce: str = "max"):
  """Quantized ``jax.lax.ragged_dot``: a grouped matmul (MoE experts).

  ``lhs [M, K]`` holds rows sorted by group (tokens sorted by expert),
  ``group_sizes [G]`` how many rows each group has (their sum at most M; rows
  past it give zeros), and ``rhs [G, K, N]`` one weight per group: row ``m``
  of group ``g`` gives ``lhs[m] @ rhs[g]``.

  The weight is quantized per group: an unset ``rhs_spec`` axis becomes K
  (axis 1), i.e. one scale per group and output channel, or groups of
  ``group_size`` along K, exactly as each ``rhs[g]`` would be quantized as a
  ``[K, N]`` weight of ``dot_general``; a QArray ``rhs`` (real mode, stored
  ahead of time) is used as it is. An unset ``lhs_spec`` axis means per token
  (axis 1). Fake mode fake-quantizes both operands (straight-through, LSQ or
  PACT gradients as ``dot_general``); real mode quantizes, dequantizes into
  the compute dtype and runs a float32-accumulating ``ragged_dot`` (no Pallas
  kernel reaches grouped matmuls yet).

  ``grad_spec`` (fake mode) quantizes the output cotangent once, per tensor
  when its axis is unset, before both backward grouped matmuls, which read
  the forward's quantized operands; grouped and block gradient formats are
  refused (their blocks would cross expert boundaries along M). Amax
  histories (``"lhs"``, ``"rhs"``, ``"grad"``) work as in ``dot_general``.

  Args:
    lhs: ``[M, K]`` activations, rows sorted by group.
    rhs: ``[G, K, N]`` float weights or a QArray of that shape.
    group_sizes: ``[G]`` integer row counts.
    precision, preferred_element_type: as ``jax.lax.ragged_dot``.
    lhs_spec, rhs_spec, grad_spec, mode, key, lhs_amax, lhs_tensor_amax,
      lhs_scale, rhs_scale, lhs_clip, amax_history, history_reduce: as
      ``dot_general`` (a learned ``rhs_scale`` has the weight spec's grid over
      ``[G, K, N]``).

  Returns:
    ``[M, N]``, in lhs's float dtype unless preferred_element_type is given.

  Raises:
    ValueError: operands of the wrong rank or shape, a blocked grad_spec, or
      as ``dot_general``.
  """
  _check_mode(mode, "auto")
  hist = _check_histories(amax_history, history_reduce, mode)
  gs = _grad_spec(grad_spec, mode)
  rshape = tuple(rhs.shape)
  if len(lhs.shape) != 2 or len(rshape) != 3 or lhs.shape[1] != rshape[1]:
    raise ValueError(f"ragged_dot takes lhs [M, K] and rhs [G, K, N]; got lhs "
                     f"{tuple(lhs.shape)} and rhs {rshape}")
  if tuple(jnp.shape(group_sizes)) != (rshape[0],):
    raise ValueError(f"group_sizes must have shape ({rshape[0]},) (one count per "
                     f"group of rhs), got {tuple(jnp.shape(group_sizes))}")
  l_is_q, r_is_q = isinstance(lhs, QArray), isinstance(rhs, QArray)
  ls = None if l_is_q else _resolve(lhs_spec, (1,), 2, "lhs" in hist, "lhs")
  rs = None if r_is_q else _resolve(rhs_spec, (1,), 3, "rhs" in hist, "rhs")
  if ls is not None:
    # Rows past sum(group_sizes) belong to no group (their outputs are zero):
    # they must not enter the activation's range (a per-tensor scale, an
    # amax history), so they are zeroed first.
    lhs = routed_rows_only(lhs, group_sizes)
  if "grad" in hist and gs is None:
    raise ValueError("amax_history['grad'] needs a grad_spec")
  if gs is not None:
    if _blocked(gs):
      raise ValueError(f"ragged_dot takes a per-tensor or per-axis grad_spec; "
                       f"{gs.format.name!r} with group_size={gs.group_size}, tile="
                       f"{gs.tile} blocks along an axis, whose blocks would cross "
                       "group (expert) boundaries in the weight gradient")
    if gs.axis is None:
      gs = gs.replace(axis=TENSOR)
    if "grad" in hist:
      _check_history_spec(gs, 2, "grad")
  k_l, k_r, k_g = _split_keys(key, (("lhs", ls), ("rhs", rs), ("grad", gs)))
  out_dtype = _common_dtype(lhs.dtype, rhs.dtype)
  group_sizes = jnp.asarray(group_sizes, jnp.int32)
  if mode == "fake":
    lv, rv = _qdq_operands(lhs, rhs, ls, rs, k_l, k_r, mode, lhs_amax,
                            lhs_tensor_amax, lhs_scale, lhs_clip, rhs_scale,
                            hist, history_reduce)
    lv, rv = astype_holding(lv, out_dtype), astype_holding(rv, out_dtype)
    if gs is None:
      return _ragged(lv, rv, group_sizes, precision, preferred_element_type)
    cfg = _RaggedGradConfig(_norm_precision(precision),
                            None if preferred_element_type is None
                            else jnp.dtype(preferred_element_type),
                            gs, None, history_reduce)
    return _qgrad_ragged(cfg, lv, rv, group_sizes, (k_g, k_l, k_r), hist.get("grad"))
  lv = _qdq_operand(lhs, ls, k_l, mode, lhs_amax, lhs_tensor_amax, lhs_scale, lhs_clip,
                    name="lhs")
  rv = _qdq_operand(rhs, rs, k_r, mode, None, None, rhs_scale, name="rhs")
  ct = _compute_dtype(out_dtype)
  res = jnp.dtype(preferred_element_type or out_dtype)
  y = _ragged(astype_holding(lv, ct), astype_holding(rv, ct), group_sizes, precision,
              _dot_dtype(ct, res))
  return y.astype(res)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _qgrad_conv(conv, g_spec, lv, rv, k_g):
  del g_spec, k_g
  return conv(lv, rv)


def _qgrad_conv_fwd(conv, g_spec, lv, rv, k_g):
  del g_spec
  return conv(lv, rv), (lv, rv, k_g)


def _qgrad_conv_bwd(conv, g_spec, res, g):
  lv, rv, k_g = res
  gq = _fq_values(g, g_spec, k_g if _stoch(g_spec) else None).astype(g.dtype)
  dl, = jax.linear_transpose(lambda a: conv(a, rv), _aval(lv))(gq)
  dr, = jax.linear_transpose(lambda b: conv(lv, b), _aval(rv))(gq)
  return dl, dr, None


_qgrad_conv.defvjp(_qgrad_conv_fwd, _qgrad_conv_bwd)


class _Conv(NamedTuple):
  """lax.conv_general_dilated with its static arguments bound (hashable)."""
  window_strides: tuple
  padding: object
  lhs_dilation: object
  rhs_dilation: object
  dimension_numbers: object
  feature_group_count: int
  batch_group_count: int
  precision: object
  preferred_element_type: object

  def __call__(self, lhs, rhs):
    return lax.conv_general_dilated(lhs, rhs, *self)


def _tuplify(v):
  if isinstance(v, (list, tuple)):
    return tuple(_tuplify(a) for a in v)
  return v


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None, *, lhs_spec=None, rhs_spec=None,
                         grad_spec=None, mode: str = "fake", key=None, lhs_amax=None,
                         lhs_tensor_amax=None):
  """Quantized ``lax.conv_general_dilated``.

  An unset weight axis means per-output-channel (all kernel dims but the output
  feature dim share a scale); an unset activation axis means one scale per
  spatial position (its input-feature dim). Real mode runs the reference
  (dequantize, then conv); no conv kernel exists yet. ``grad_spec`` (fake
  mode) quantizes the output cotangent once, per tensor when its axis is
  unset, before both backward convolutions, which use the forward's
  fake-quantized operands; blocked grad specs (block formats, groups, tiles)
  are refused. ``key`` is split in three (lhs, rhs, gradient).
  """
  _check_mode(mode, "auto")
  gs = _grad_spec(grad_spec, mode)
  if gs is not None and _blocked(gs):
    raise ValueError(f"conv_general_dilated takes a per-tensor or per-axis "
                     f"grad_spec; {gs.format.name!r} with group_size="
                     f"{gs.group_size}, tile={gs.tile} blocks along an axis, which a "
                     "convolution's backward pass does not contract along")
  if gs is not None:
    gs = gs.with_axis(TENSOR)
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  lhs_feat = dn.lhs_spec[1]
  rhs_out = dn.rhs_spec[0]
  rs = None
  if rhs_spec is not None and not isinstance(rhs, QArray):
    rs = as_spec(rhs_spec)
    if rs.axis is None and rs.tile is None:
      rs = rs.replace(axis=tuple(i for i in range(rhs.ndim) if i != rhs_out))
  ls = None
  if lhs_spec is not None and not isinstance(lhs, QArray):
    ls = as_spec(lhs_spec)
    if ls.axis is None and ls.tile is None:
      ls = ls.replace(axis=lhs_feat)
  k_l, k_r, k_g = _split_keys(key, (("lhs", ls), ("rhs", rs), ("grad", gs)))
  lv = _qdq_operand(lhs, ls, k_l, mode, lhs_amax, lhs_tensor_amax)
  rv = _qdq_operand(rhs, rs, k_r, mode, name="rhs")
  ct = _common_dtype(lhs.dtype, rhs.dtype)
  lv, rv = astype_holding(lv, ct), astype_holding(rv, ct)
  if gs is None:
    return lax.conv_general_dilated(lv, rv, window_strides, padding,
                                    lhs_dilation, rhs_dilation, dimension_numbers,
                                    feature_group_count, batch_group_count, precision,
                                    preferred_element_type)
  conv = _Conv(_tuplify(window_strides), _tuplify(padding), _tuplify(lhs_dilation),
               _tuplify(rhs_dilation), dn, feature_group_count, batch_group_count,
               _norm_precision(precision),
               None if preferred_element_type is None
               else jnp.dtype(preferred_element_type))
  return _qgrad_conv(conv, gs, lv, rv, k_g)


def _is_e2m1(fmt) -> bool:
  """Whether ``fmt`` is the standard E2M1 (exponent bias 1, no inf or NaN),
  whose codes the ``"wgmma_e2m1"`` decode reads."""
  return (isinstance(fmt, FloatFormat) and fmt.exp_bits == 2
          and fmt.man_bits == 1 and fmt.special == "none"
          and (fmt.bias is None or fmt.bias == 1))


def _code_order_problem(q: QArray, order: str = "wgmma") -> Optional[str]:
  """Why ``q``'s codes cannot take ``order`` (a ``"wgmma"`` order), or None."""
  bits = q.spec.storage_format.bits
  if bits != 4:
    return f"its codes are {bits}-bit (the order is for 4-bit codes)"
  fmt = q.spec.storage_format
  if order == "wgmma_e2m1" and not _is_e2m1(fmt):
    return (f"its element format is {fmt.name}, not E2M1 "
            "(the order is for fp4_e2m1, MXFP4 and NVFP4 codes; use 'wgmma')")
  if order == "wgmma_int4" and not (isinstance(fmt, IntFormat) and fmt.signed):
    return (f"its codes are {fmt.name}, not signed int4 (the order is for "
            "two's-complement int4 codes; use 'wgmma')")
  if q.pack_axis != q.ndim - 1:
    return (f"its codes are packed along axis {q.pack_axis}, not the last "
            "(quantize the K-major [N, K] weight: ops.prepare_weight)")
  if q.codes.shape[-1] % WGMMA_RUN_BYTES:
    return (f"its last axis holds {q.codes.shape[-1]} bytes, not a multiple of "
            f"{WGMMA_RUN_BYTES} (K a multiple of {2 * WGMMA_RUN_BYTES})")
  return None


def set_code_order(tree, order: str, *, strict: bool = True):
  """Puts the packed codes of every QArray in ``tree`` in ``order``.

  ``"wgmma"`` stores 4-bit codes (int4, fp4, MXFP4, NVFP4 weights) in the order
  the Hopper weight-only kernel's threads read their WGMMA fragments in, which
  saves the kernel a relayout in registers; ``"wgmma_e2m1"`` (E2M1 codes:
  fp4_e2m1, MXFP4, NVFP4) is that order with the bits of each 32-bit word
  permuted so that the kernel decodes a pair of codes with a rotate and a
  mask (``_qarray.E2M1_SPLIT_POS``); ``"wgmma_int4"`` (signed int4 codes)
  puts each code pair of a word a shift away from the int4 conversion's
  input (``_qarray.INT4_SPLIT_POS``); ``"natural"`` converts back. The
  values are unchanged: ``dequantize`` and the non-kernel matmul paths read
  any order (the XLA fallback then reorders the bytes first, one pass
  over the codes), and the GPU kernel gives the same bits. Convert once after
  ``quantize_params`` (or on a restored checkpoint, which keeps the order).
  ``order="kernel"`` gives each QArray the fastest order its format takes
  (``"wgmma_e2m1"`` for E2M1 codes, ``"wgmma_int4"`` for signed int4,
  ``"wgmma"`` for the other 4-bit ones, natural for the rest), so a model
  mixing formats needs one call.

  Args:
    tree: a QArray or a pytree holding QArrays (and other leaves, kept).
    order: one of ``CODE_ORDERS``, or ``"kernel"``.
    strict: raise for a QArray that cannot take the order (the ``"wgmma"``
      orders need 4-bit codes packed along the last axis, which holds a
      multiple of 32 elements; ``"wgmma_e2m1"`` E2M1 codes as well);
      False leaves such QArrays as they are.

  Returns:
    The tree with reordered QArrays (QWeights stay QWeights).

  Raises:
    ValueError: an unknown order, or (``strict``) a QArray it cannot apply to.
  """
  if order not in CODE_ORDERS + ("kernel",):
    raise ValueError(f"order must be one of {CODE_ORDERS} or 'kernel', got "
                     f"{order!r}")
  request = order

  def one(path, q):
    if not isinstance(q, QArray):
      return q
    order = request
    if request == "kernel":
      order = next((o for o in SPLIT_ORDERS + ("wgmma",)
                    if _code_order_problem(q, o) is None), "natural")
    if q.code_order == order:
      return q
    if order != "natural":
      why = _code_order_problem(q, order)
      if why is not None:
        if strict:
          where = jax.tree_util.keystr(path) or "the QArray"
          raise ValueError(f"{where} cannot take the {order!r} code order: "
                           f"{why}. Pass strict=False to leave such arrays "
                           "as they are")
        return q
    codes = to_code_order(from_code_order(q.codes, q.code_order), order)
    return dataclasses.replace(q, codes=codes, code_order=order)

  return jax.tree_util.tree_map_with_path(
      one, tree, is_leaf=lambda x: isinstance(x, QArray))


def transpose_spec(spec: QuantSpec) -> QuantSpec:
  """The spec of a 2-D weight's transpose (axes and tiles swapped)."""
  ax = spec.axis
  if isinstance(ax, int):
    spec = spec.replace(axis=1 - ax % 2)
  elif isinstance(ax, tuple):
    spec = spec.replace(axis=tuple(1 - a % 2 for a in ax))
  if spec.tile is not None:
    spec = spec.replace(tile=spec.tile[::-1])
  return spec


def prepare_weight(w: jax.Array, spec, contracting: int | Sequence[int] = 0) -> QArray:
  """Quantizes a 2-D weight K-major for kernels: ``[K, N]`` -> QArray ``[N, K]``.

  Use the result with ``dot_general(x, qw, (((x.ndim - 1,), (1,)), ((), ())))``.
  A spec's axis and tile refer to ``w`` as given (``axis=0`` with
  ``contracting=0``: groups along K, as ``quantize(w, spec)``); they are
  swapped for the stored transpose. An unset axis becomes the contraction
  axis.
  """
  if isinstance(contracting, int):
    contracting = (contracting,)
  if w.ndim != 2 or len(contracting) != 1:
    raise ValueError(f"prepare_weight takes a 2-d weight with one contraction axis; "
                     f"got shape {w.shape}, contracting={contracting}. Reshape it "
                     "first, or use dot_general with a spec directly")
  c = contracting[0] % 2
  wt = w.T if c == 0 else w
  spec = as_spec(spec)
  if spec.axis is None and spec.tile is None:
    spec = spec.replace(axis=1)
  elif c == 0:
    spec = transpose_spec(spec)
  return quantize(wt, spec)
