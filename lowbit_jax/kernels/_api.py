"""The contract between the quantized dot_general and the Pallas kernels.

A kernel computes ``y[M, N] = x[M, K] @ W[K, N]`` where the weight is stored
K-major (its physical array is ``[N, K]``, the contraction axis last), the layout
fp8/int8 tensor-core MMAs want and the layout ``lowbit_jax`` real-quantization
stores weights in. Every kernel module exposes

* ``supports(problem: MatmulProblem) -> bool``: whether it handles the case (and is
  at least as fast as the XLA path it replaces there);
* ``reference(operands: MatmulOperands, problem) -> Array``: the pure-jnp definition;
* ``matmul(operands: MatmulOperands, problem, *, interpret=False) -> Array``.

Physical storage (the same as ``lowbit_jax.QArray`` of the transposed weight
quantized along its last axis):

* int8 codes: ``int8 [N, K]``.
* int4 / fp4_e2m1 codes: ``uint8 [N, K // 2]``; byte ``j`` holds element ``2j`` in the
  low nibble and ``2j + 1`` in the high nibble. int4 nibbles are two's complement;
  fp4 nibbles are the E2M1 bit patterns (sign in bit 3).
* fp8 codes: ``float8_e4m3fn [N, K]`` (or ``float8_e5m2``).
* 4-bit codes may instead be stored in the ``"wgmma"`` order
  (``MatmulProblem.w_order``; ``lowbit_jax.core._qarray.wgmma_byte_order``:
  the bytes of each 16-byte run along K transposed as a 4 x 4 grid), or E2M1
  codes in ``"wgmma_e2m1"`` and signed int4 codes in ``"wgmma_int4"`` (that
  order with the bits of each 32-bit word permuted: ``_qarray.split_bits``),
  which only ``gpu_weight_only`` reads; every other kernel's ``supports``
  says no.
* Weight scales: per channel ``[N, 1]``; groups of ``g`` along K ``[N, K // g]``;
  2-D tiles ``[N // tn, K // tk]``. float32 or bfloat16, except MX (E8M0 codes as
  ``uint8``: scale ``2 ** (code - 127)``, 255 is NaN) and NVFP4 (``float8_e4m3fn``
  block scales plus a float32 scalar ``w_tensor_scale``: ``w = e2m1 * (t * s)``).
* Quantized activations (W8A8): codes ``[M, K]``; scales per token ``[M, 1]`` or per
  1 x g group ``[M, K // g]`` (MX: uint8 E8M0 ``[M, K // 32]``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax

from lowbit_jax.core._qarray import CODE_ORDERS

WEIGHT_FORMATS = ("int8", "int4", "fp4_e2m1", "mxfp4", "nvfp4", "fp8_e4m3",
                  "fp8_e5m2", "mxfp8_e4m3")
ACT_FORMATS = (None, "int8", "fp8_e4m3", "fp8_e5m2", "mxfp8_e4m3")


@dataclasses.dataclass(frozen=True)
class MatmulProblem:
  """Static description of one quantized matmul, used by ``supports``.

  Attributes:
    m, n, k: the matmul shape, ``[M, K] x [K, N]``.
    x_dtype: dtype name of the activation as the kernel receives it: "bfloat16",
      "float16", "float32" (weight-only), or the code dtype for W8A8.
    w_format: one of ``WEIGHT_FORMATS``.
    w_block: ``None`` for one scale per output channel; ``g`` for groups of ``g``
      along K; ``(tn, tk)`` for 2-D tiles of the ``[N, K]`` weight.
    x_format: ``None`` for weight-only, else one of ``ACT_FORMATS``.
    x_block: ``None`` for per-token scales, ``g`` for 1 x g groups along K.
    out_dtype: dtype name of the result.
    backend: "gpu", "tpu" or "cpu".
    w_order: the order of the weight's packed codes (``QArray.code_order``,
      one of ``CODE_ORDERS``).
  """
  m: int
  n: int
  k: int
  x_dtype: str
  w_format: str
  w_block: Optional[int | tuple[int, int]] = None
  x_format: Optional[str] = None
  x_block: Optional[int] = None
  out_dtype: str = "bfloat16"
  backend: str = "gpu"
  w_order: str = "natural"

  def __post_init__(self):
    if self.w_order not in CODE_ORDERS:
      raise ValueError(f"w_order must be one of {CODE_ORDERS}, got {self.w_order!r}")
    if self.w_format not in WEIGHT_FORMATS:
      raise ValueError(f"w_format {self.w_format!r} is not one of {WEIGHT_FORMATS}")
    if self.x_format not in ACT_FORMATS:
      raise ValueError(f"x_format {self.x_format!r} is not one of {ACT_FORMATS}")
    if min(self.m, self.n, self.k) <= 0:
      raise ValueError(f"matmul dims must be positive, got m={self.m} n={self.n} "
                       f"k={self.k}")


@dataclasses.dataclass(frozen=True)
class MatmulOperands:
  """The arrays of one quantized matmul (see the module docstring for layouts).

  Attributes:
    x: ``[M, K]`` activation (float for weight-only, codes for W8A8).
    w_codes: the stored weight, ``[N, K]`` or ``[N, K // 2]`` for 4-bit.
    w_scale: weight scales.
    x_scale: activation scales (W8A8 only).
    w_tensor_scale: NVFP4's float32 scalar above the block scales.
  """
  x: jax.Array
  w_codes: jax.Array
  w_scale: jax.Array
  x_scale: Optional[jax.Array] = None
  w_tensor_scale: Optional[jax.Array] = None


jax.tree_util.register_dataclass(
    MatmulOperands,
    data_fields=["x", "w_codes", "w_scale", "x_scale", "w_tensor_scale"],
    meta_fields=[])


# The scale dtypes the kernels read for each weight format (see the layouts
# above): E8M0 codes as uint8 for MX, E4M3 for NVFP4, else float scales.
_BLOCK_SCALE_DTYPES = {"mxfp4": ("uint8",), "mxfp8_e4m3": ("uint8",),
                       "nvfp4": ("float8_e4m3fn",)}


def check_scale_dtypes(operands: MatmulOperands, problem: MatmulProblem,
                       kernel: str) -> None:
  """Raises unless the operands' scales have the dtypes ``kernel`` decodes
  for ``problem``'s formats (it would read other scales as the wrong codes).
  """
  pairs = [("w_scale", operands.w_scale, problem.w_format)]
  if problem.x_format is not None:
    pairs.append(("x_scale", operands.x_scale, problem.x_format))
  for name, arr, fmt in pairs:
    want = _BLOCK_SCALE_DTYPES.get(fmt, ("float32", "bfloat16"))
    got = getattr(arr, "dtype", None)
    got = None if got is None else jax.numpy.dtype(got).name
    if got not in want:
      raise ValueError(
          f"{kernel}: {name} of a {fmt} operand must be {' or '.join(want)}, got "
          f"{got}; quantize with the format's own scale dtype, or run the XLA "
          "path (use_kernel='never')")

