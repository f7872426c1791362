"""The quantized ops every model path goes through: dot_general, einsum, conv.

Three modes:

* ``"fake"``: operands are fake-quantized (simulation; straight-through
  gradients for QAT). A QArray operand is dequantized.
* ``"real"``: the weight is (or becomes) a packed QArray and activations are
  quantized per call; when a Pallas kernel ``supports`` the case (shapes,
  formats, backend) it runs, otherwise the reference: dequantize into the
  activation's dtype (bf16/f16 stay 16-bit off the CPU, anything else
  float32), then a float32-accumulating dot. Both equal fake quant to float rounding.

A spec whose ``axis`` is unset gets the op's contraction axes: per-token for
activations, per-output-channel (or groups along K) for weights.

Kernel dispatch is controlled by ``use_kernel``: "auto" (use one when it
supports the case), "never", or "always" (raise when none supports it).
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from lowbit_jax.core._qarray import QArray
from lowbit_jax.core._quantize import dequantize, fake_quant, quantize
from lowbit_jax.core._spec import QuantSpec, as_spec
from lowbit_jax.formats import BlockFormat, FloatFormat, IntFormat

MODES = ("fake", "real")
_KERNEL_CHOICES = ("auto", "never", "always")


def _spec_for(spec, contract: Sequence[int], ndim: int) -> Optional[QuantSpec]:
  if spec is None:
    return None
  spec = as_spec(spec)
  if spec.axis is None and spec.tile is None:
    axes = tuple(a % ndim for a in contract)
    axis = axes[0] if len(axes) == 1 else axes
    if spec.group_size is not None and isinstance(axis, tuple):
      # Groups run along the last contraction axis.
      axis = axes[-1]
    spec = spec.replace(axis=axis)
  return spec


def _check_mode(mode: str, use_kernel: str):
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if use_kernel not in _KERNEL_CHOICES:
    raise ValueError(f"use_kernel must be one of {_KERNEL_CHOICES}, got {use_kernel!r}")


# ---------------------------------------------------------------------------
# Kernel dispatch


def _weight_format_name(spec: QuantSpec) -> Optional[str]:
  f = spec.format
  if not spec.symmetric:
    return None
  if isinstance(f, BlockFormat):
    return {"mxfp4": "mxfp4", "nvfp4": "nvfp4", "mxfp8_e4m3": "mxfp8_e4m3"}.get(f.name)
  if isinstance(f, IntFormat) and f.signed and f.frac_bits == 0 and f.bits in (4, 8):
    return f"int{f.bits}" if spec.scale_dtype in ("float32", "bfloat16") else None
  if isinstance(f, FloatFormat) and f.name in ("fp8_e4m3", "fp8_e5m2", "fp4_e2m1"):
    return f.name if spec.scale_dtype in ("float32", "bfloat16") else None
  return None


def kernel_problem(lhs, rhs: QArray, dimension_numbers, backend: Optional[str] = None):
  """The kernel MatmulProblem for ``lhs x rhs``, or (None, reason)."""
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
    out_dtype = lhs.dtype
  else:
    out_dtype = str(jnp.dtype(lhs.dtype))
  m = 1
  for d in lhs_shape[:-1]:
    m *= d
  try:
    prob = MatmulProblem(m=m, n=n, k=k, x_dtype=x_dtype, w_format=wf, w_block=w_block,
                         x_format=x_format, x_block=x_block, out_dtype=str(out_dtype),
                         backend=backend or jax.default_backend())
  except ValueError as e:
    return None, str(e)
  return prob, ""


def _run_kernel(lhs, rhs: QArray, prob, use_kernel: str):
  from lowbit_jax import kernels  # pylint: disable=g-import-not-at-top
  from lowbit_jax.kernels._api import MatmulOperands  # pylint: disable=g-import-not-at-top
  kern = kernels.find(prob)
  if kern is None:
    if use_kernel == "always":
      raise ValueError(f"use_kernel='always' but no kernel supports {prob}; "
                       "use_kernel='auto' falls back to the reference")
    return None
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


def dot_general(lhs, rhs, dimension_numbers, precision=None,
                preferred_element_type=None, *, lhs_spec=None, rhs_spec=None,
                mode: str = "fake", key: Optional[jax.Array] = None,
                lhs_amax=None, lhs_tensor_amax=None, use_kernel: str = "auto"):
  """Quantized ``lax.dot_general``.

  Args:
    lhs, rhs: arrays or QArrays (a QArray rhs is a weight quantized ahead of
      time; its dims are its logical dims).
    dimension_numbers, precision, preferred_element_type: as lax.dot_general.
    lhs_spec, rhs_spec: QuantSpec or format name per operand (None: leave it in
      float). An unset axis is filled with the operand's contraction axes.
    mode: "fake" or "real" (module docstring).
    key: PRNG key for stochastically rounded specs (split between operands).
    lhs_amax: static activation range from calibration (None: dynamic).
    lhs_tensor_amax: static per-tensor range of a two-level block activation
      (NVFP4): fixes its tensor scale, block scales stay dynamic.
    use_kernel: "auto", "never" or "always".

  Returns:
    The product, in lhs's float dtype unless preferred_element_type is given.
  """
  _check_mode(mode, use_kernel)
  (lc, rc), _ = dimension_numbers
  lhs_nd = len(lhs.shape)
  rhs_nd = len(rhs.shape)
  ls = _spec_for(lhs_spec, lc, lhs_nd) if not isinstance(lhs, QArray) else None
  rs = _spec_for(rhs_spec, rc, rhs_nd) if not isinstance(rhs, QArray) else None
  k_l = k_r = None
  if key is not None:
    k_l, k_r = jax.random.split(key)
  out_dtype = (lhs.dtype if not isinstance(lhs, QArray) else jnp.dtype(lhs.dtype))
  if mode == "fake":
    lv = dequantize(lhs) if isinstance(lhs, QArray) else (
        fake_quant(lhs, ls, key=k_l if _stoch(ls) else None, amax=lhs_amax,
                   tensor_amax=lhs_tensor_amax)
        if ls is not None else lhs)
    rv = dequantize(rhs) if isinstance(rhs, QArray) else (
        fake_quant(rhs, rs, key=k_r if _stoch(rs) else None) if rs is not None else rhs)
    return lax.dot_general(lv, rv.astype(lv.dtype), dimension_numbers, precision,
                           preferred_element_type)
  # real
  rq = rhs if isinstance(rhs, QArray) else (
      quantize(rhs, rs, key=k_r if _stoch(rs) else None) if rs is not None else rhs)
  lq = lhs if isinstance(lhs, QArray) else (
      quantize(lhs, ls, key=k_l if _stoch(ls) else None, amax=lhs_amax,
               tensor_amax=lhs_tensor_amax)
      if ls is not None else lhs)
  if isinstance(rq, QArray) and use_kernel != "never":
    prob, why = kernel_problem(lq, rq, dimension_numbers)
    if prob is not None:
      y = _run_kernel(lq, rq, prob, use_kernel)
      if y is not None:
        return y.astype(preferred_element_type or out_dtype)
    elif use_kernel == "always":
      raise ValueError(f"use_kernel='always' but this matmul cannot use a kernel: {why}")
  lv = dequantize(lq) if isinstance(lq, QArray) else lq
  rv = dequantize(rq) if isinstance(rq, QArray) else rq
  ct = _compute_dtype(out_dtype)
  y = lax.dot_general(lv.astype(ct), rv.astype(ct), dimension_numbers,
                      precision, preferred_element_type=jnp.float32)
  return y.astype(preferred_element_type or out_dtype)


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


def _stoch(spec: Optional[QuantSpec]) -> bool:
  return spec is not None and spec.rounding == "stochastic"


def _qdq_operand(x, spec: Optional[QuantSpec], key, mode: str, amax=None,
                 tensor_amax=None):
  """An operand as the op sees it: dequantized QArray, float, or quantized
  (fake: STE fake_quant; real: dequantize(quantize(x)))."""
  if isinstance(x, QArray):
    return dequantize(x)
  if spec is None:
    return x
  k = key if _stoch(spec) else None
  if mode == "fake":
    return fake_quant(x, spec, key=k, amax=amax, tensor_amax=tensor_amax)
  return dequantize(quantize(x, spec, key=k, amax=amax, tensor_amax=tensor_amax))


def _einsum_contracted(subscripts: str, lhs_nd: int, rhs_nd: int):
  """Contraction axes of each operand of a two-operand einsum."""
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
  contracted = set(a) & set(b) - set(out)
  return (tuple(i for i, c in enumerate(a) if c in contracted),
          tuple(i for i, c in enumerate(b) if c in contracted))


def einsum(subscripts: str, lhs, rhs, *, lhs_spec=None, rhs_spec=None,
           mode: str = "fake", key=None, lhs_amax=None, lhs_tensor_amax=None,
           use_kernel: str = "auto", precision=None, preferred_element_type=None):
  """Quantized two-operand ``jnp.einsum``.

  Each operand is quantized on its own (an unset spec axis becomes that
  operand's contracted labels) before ``jnp.einsum`` runs, so the specs stay
  with their operands whatever order einsum contracts them in. Real mode runs
  the reference (quantize, dequantize, float32-accumulating einsum); kernels
  are reached through ``dot_general``.
  """
  _check_mode(mode, use_kernel)
  lhs_nd, rhs_nd = len(lhs.shape), len(rhs.shape)
  lc, rc = _einsum_contracted(subscripts, lhs_nd, rhs_nd)
  k_l = k_r = None
  if key is not None:
    k_l, k_r = jax.random.split(key)

  def spec(s, contract, nd):
    if s is None:
      return None
    return _spec_for(s, contract, nd) if contract else as_spec(s).with_axis("tensor")

  out_dtype = jnp.dtype(lhs.dtype)
  lv = _qdq_operand(lhs, spec(lhs_spec, lc, lhs_nd), k_l, mode, lhs_amax,
                    lhs_tensor_amax)
  rv = _qdq_operand(rhs, spec(rhs_spec, rc, rhs_nd), k_r, mode)
  if mode == "real":
    ct = _compute_dtype(out_dtype)
    y = jnp.einsum(subscripts, lv.astype(ct), rv.astype(ct),
                   precision=precision, preferred_element_type=jnp.float32)
    return y.astype(preferred_element_type or out_dtype)
  return jnp.einsum(subscripts, lv, rv.astype(lv.dtype), precision=precision,
                    preferred_element_type=preferred_element_type)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None, *, lhs_spec=None, rhs_spec=None,
                         mode: str = "fake", key=None, lhs_amax=None,
                         lhs_tensor_amax=None):
  """Quantized ``lax.conv_general_dilated``.

  An unset weight axis means per-output-channel (all kernel dims but the output
  feature dim share a scale); an unset activation axis means one scale per
  spatial position (its input-feature dim). Real mode runs the reference
  (dequantize, then conv); no conv kernel exists yet.
  """
  _check_mode(mode, "auto")
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
  k_l = k_r = None
  if key is not None:
    k_l, k_r = jax.random.split(key)
  lv = _qdq_operand(lhs, ls, k_l, mode, lhs_amax, lhs_tensor_amax)
  rv = _qdq_operand(rhs, rs, k_r, mode)
  return lax.conv_general_dilated(lv, rv.astype(lv.dtype), window_strides, padding,
                                  lhs_dilation, rhs_dilation, dimension_numbers,
                                  feature_group_count, batch_group_count, precision,
                                  preferred_element_type)


def prepare_weight(w: jax.Array, spec, contracting: int | Sequence[int] = 0) -> QArray:
  """Quantizes a 2-D weight K-major for kernels: ``[K, N]`` -> QArray ``[N, K]``.

  Use the result with ``dot_general(x, qw, (((x.ndim - 1,), (1,)), ((), ())))``.
  An unset spec axis becomes the contraction axis (now axis 1).
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
  return quantize(wt, spec)



