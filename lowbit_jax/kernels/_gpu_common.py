"""Shared pieces of the Mosaic GPU low-bit matmul kernels.

Three kinds of helpers live here:

* exact decoders of the stored codes (int4 / E2M1 nibbles, E8M0 and E4M3 scales)
  written in plain ``jnp`` so the kernel references run on any backend;
* small predicates used by every ``supports``: backend and device checks;
* register-level building blocks for Mosaic GPU kernels (per-row / per-group
  scaling of WGMMA-layout fragments, E2M1 -> bf16 conversion on Hopper, a masked
  transposed store of a WGMMA accumulator). These import the Mosaic GPU modules
  lazily, so importing this module never needs a GPU.

Layouts follow ``lowbit_jax.kernels._api``: weights K-major ``[N, K]``, 4-bit codes
packed two per byte along K with element ``2j`` in the low nibble.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax.core._qarray import from_code_order
from lowbit_jax.kernels._api import MatmulOperands, MatmulProblem

# E2M1 magnitudes indexed by the low three bits of a nibble (OCP MX spec v1.0).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


class ForcedDispatch:
  """Thread-local override of a kernel dispatcher (benchmarks and tests):
  within ``forced(kinds, configs)`` the dispatcher sends ``kinds`` (ids, or
  ``()`` for none) to its kernel instead of its measured ``ENABLED`` set, and
  ``configs`` (``{kind: Config}``) replaces its tiling where it fits."""

  def __init__(self):
    self._state = threading.local()

  @contextlib.contextmanager
  def forced(self, kinds, configs=None):
    st = self._state
    prev = getattr(st, "kinds", None), getattr(st, "configs", None)
    st.kinds = frozenset(kinds)
    st.configs = dict(configs or {})
    try:
      yield
    finally:
      st.kinds, st.configs = prev

  def kinds(self, enabled):
    """The forced kinds, else ``enabled``."""
    k = getattr(self._state, "kinds", None)
    return enabled if k is None else k

  def config(self, kind):
    """The forced tiling of ``kind``, or None."""
    return (getattr(self._state, "configs", None) or {}).get(kind)


# ----------------------------------------------------------------------------
# Exact decoders (pure jnp; used by the references and tests).
# ----------------------------------------------------------------------------

def unpack_nibbles(codes: jax.Array) -> jax.Array:
  """Splits packed 4-bit codes ``uint8 [..., K/2]`` into ``uint8 [..., K]``.

  Args:
    codes: bytes holding element ``2j`` in the low and ``2j+1`` in the high nibble.

  Returns:
    The nibbles (values 0..15) in element order.
  """
  codes = jnp.asarray(codes)
  if codes.dtype != jnp.uint8:
    raise TypeError(f"packed 4-bit codes must be uint8, got {codes.dtype}")
  lo = codes & jnp.uint8(0xF)
  hi = codes >> jnp.uint8(4)
  return jnp.stack([lo, hi], axis=-1).reshape(*codes.shape[:-1],
                                              codes.shape[-1] * 2)


def decode_int4(nibbles: jax.Array) -> jax.Array:
  """Two's-complement int4 nibbles (0..15) to float32 values in [-8, 7]."""
  v = nibbles.astype(jnp.int32)
  return jnp.where(v >= 8, v - 16, v).astype(jnp.float32)


def decode_e2m1(nibbles: jax.Array) -> jax.Array:
  """E2M1 nibbles (sign in bit 3) to float32 values (OCP MX spec, FP4 E2M1).

  Plain arithmetic, no table (``E2M1_VALUES`` lists the magnitudes), so it also
  runs inside a kernel body, which may not capture array constants.
  """
  nib = nibbles.astype(jnp.int32)
  e = (nib >> 1) & 3
  m = (nib & 1).astype(jnp.float32)
  # e == 0: 0.5 * m (zero or the subnormal 0.5); else 2**(e-1) * (1 + m / 2).
  pow2 = jnp.left_shift(1, jnp.maximum(e - 1, 0)).astype(jnp.float32)
  mag = jnp.where(e == 0, 0.5 * m, pow2 * (1.0 + 0.5 * m))
  return jnp.where((nib & 8) != 0, -mag, mag)


def decode_e8m0(codes: jax.Array) -> jax.Array:
  """E8M0 scale codes (uint8) to float32: ``2 ** (code - 127)``, 255 is NaN.

  Built from the float32 bit pattern, so code 0 is the exact subnormal 2**-127.
  """
  c = codes.astype(jnp.uint32)
  bits = jnp.where(c == 0, jnp.uint32(0x00400000), c << 23)
  bits = jnp.where(c == 255, jnp.uint32(0x7FC00000), bits)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _pow2_f32(e: jax.Array) -> jax.Array:
  """``2**e`` as float32 from its bits, for int32 ``e`` in [-126, 127]."""
  return jax.lax.bitcast_convert_type(
      (e.astype(jnp.int32) + 127).astype(jnp.uint32) << 23, jnp.float32)


def e8m0_factors(codes: jax.Array) -> tuple[jax.Array, jax.Array]:
  """E8M0 scale codes as two normal float32 powers of two, ``f1 * f2 = 2**(c - 127)``.

  ``v * f1 * f2`` is ``v * 2**(c - 127)`` rounded once, and never forms a
  subnormal on the way where the result is normal: code 0 (2**-127) is a
  float32 subnormal itself, which XLA's CPU backend flushes to 0. The split is
  core's (``f1 = 2**floor(e / 2)``), so the values are core ``dequantize``'s
  bit for bit. Code 255 gives NaN in ``f1``.
  """
  c = codes.astype(jnp.int32)
  e = c - 127
  h = jnp.floor_divide(e, 2)
  f1 = jnp.where(c == 255, jnp.float32(jnp.nan), _pow2_f32(h))
  return f1, _pow2_f32(e - h)


def split_tensor_scale(t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(tn, 2**p)`` with ``t = tn * 2**p`` and ``tn`` in [1, 2) (exact).

  NVFP4's float32 tensor scale can be as small as 2**-126; its product with an
  E4M3 block scale is then a float32 subnormal (flushed to 0 by XLA on CPU)
  though the weights it scales are normal numbers. Multiplying by ``tn *
  block scale`` first and by ``2**p`` last is exact there, and equals core
  ``dequantize``'s arithmetic bit for bit. NaN and inf stay in ``tn``.
  """
  t = jnp.asarray(t, jnp.float32)
  u = jax.lax.bitcast_convert_type(t, jnp.uint32)
  p = jnp.clip(((u >> 23) & 0xFF).astype(jnp.int32) - 127, -126, 126)
  return t * _pow2_f32(-p), _pow2_f32(p)


def decode_e4m3_scale(scale: jax.Array) -> jax.Array:
  """float8_e4m3fn scales to float32 (exact)."""
  return scale.astype(jnp.float32)


def expand_groups(scale: jax.Array, k: int) -> jax.Array:
  """Repeats ``[R, K // g]`` group scales along the last axis to ``[R, K]``."""
  groups = scale.shape[-1]
  if k % groups:
    raise ValueError(f"K={k} is not a multiple of the {groups} scale groups")
  return jnp.repeat(scale, k // groups, axis=-1)


def weight_group(problem: MatmulProblem) -> Optional[int]:
  """The K group size of a weight's scales, ``None`` for per-channel.

  Raises:
    ValueError: for 2-D tile blocks (those are a W8A8 layout).
  """
  b = problem.w_block
  if b is None or isinstance(b, int):
    return b
  raise ValueError(f"weight-only kernels take per-channel or 1-D groups, got "
                   f"w_block={b}")


def dequantize_weight(ops: MatmulOperands, problem: MatmulProblem) -> jax.Array:
  """Float32 ``[N, K]`` weight decoded from its codes and scales (exact).

  Args:
    ops: the operands; ``w_codes`` in the storage layout of ``_api``.
    problem: the static description (format and block).

  Returns:
    The dequantized weight in float32.
  """
  n, k = problem.n, problem.k
  fmt = problem.w_format
  codes = ops.w_codes
  codes = from_code_order(codes, problem.w_order)
  if fmt in ("int4", "fp4_e2m1", "mxfp4", "nvfp4"):
    nib = unpack_nibbles(codes)
    vals = decode_int4(nib) if fmt == "int4" else decode_e2m1(nib)
  elif fmt == "int8":
    vals = codes.astype(jnp.float32)
  elif fmt in ("fp8_e4m3", "fp8_e5m2", "mxfp8_e4m3"):
    vals = codes.astype(jnp.float32)
  else:
    raise ValueError(f"unknown weight format {fmt!r}")
  if vals.shape != (n, k):
    raise ValueError(f"weight codes decode to {vals.shape}, expected {(n, k)}")
  # Scales as factors applied one after the other (exact: see e8m0_factors
  # and split_tensor_scale), as core dequantize applies them.
  if fmt in ("mxfp4", "mxfp8_e4m3"):
    factors = e8m0_factors(ops.w_scale)
  elif fmt == "nvfp4":
    s = decode_e4m3_scale(ops.w_scale)
    factors = (s,)
    if ops.w_tensor_scale is not None:
      tn, p_up = split_tensor_scale(ops.w_tensor_scale)
      factors = (tn * s, jnp.broadcast_to(p_up, s.shape))
  else:
    factors = (ops.w_scale.astype(jnp.float32),)
  b = problem.w_block
  out = vals
  for s in factors:
    if b is None:
      s = jnp.broadcast_to(s.reshape(n, 1), (n, k))
    elif isinstance(b, int):
      s = expand_groups(s.reshape(n, k // b), k)
    else:
      bn, bk = b
      s = jnp.repeat(jnp.repeat(s.reshape(n // bn, k // bk), bn, axis=0), bk, axis=1)
    out = out * s
  return out


def dequantize_activation(ops: MatmulOperands,
                          problem: MatmulProblem) -> jax.Array:
  """Float32 ``[M, K]`` activation decoded from its codes and scales (exact)."""
  m, k = problem.m, problem.k
  vals = ops.x.astype(jnp.float32)
  if problem.x_format == "mxfp8_e4m3":
    factors = e8m0_factors(ops.x_scale)  # exact at code 0 (2**-127)
  else:
    factors = (ops.x_scale.astype(jnp.float32),)
  for s in factors:
    if problem.x_block is None:
      s = jnp.broadcast_to(s.reshape(m, 1), (m, k))
    else:
      s = expand_groups(s.reshape(m, k // problem.x_block), k)
    vals = vals * s
  return vals


# ----------------------------------------------------------------------------
# Predicates.
# ----------------------------------------------------------------------------

def config_from_json(cls, value, where: str):
  """A tiling dataclass ``cls`` from a tuned table's JSON (a dict of fields
  or a list in field order), checked: int fields positive ints, bool fields
  bools, str fields strings, an Optional int None or positive.

  Raises:
    ValueError: naming ``where`` (the file and entry) and the bad field.
  """
  try:
    cfg = cls(**value) if isinstance(value, dict) else cls(*value)
  except TypeError as e:
    name = f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"
    raise ValueError(f"{where}: config {value!r} is not a {name} ({e})") from None
  for f in dataclasses.fields(cls):
    v, d = getattr(cfg, f.name), f.default
    if isinstance(d, bool):
      ok, want = isinstance(v, bool), "true or false"
    elif isinstance(d, int) or d is None:
      ok = (isinstance(v, int) and not isinstance(v, bool) and v >= 1) or (
          d is None and v is None)
      want = "a positive int" + (" or null" if d is None else "")
    elif isinstance(d, str):
      ok, want = isinstance(v, str), "a string"
    else:
      ok, want = True, ""
    if not ok:
      raise ValueError(f"{where}: config field {f.name}={v!r} must be {want}")
  return cfg


def on_hopper_gpu(problem: MatmulProblem) -> bool:
  """Whether the problem targets a GPU and the default device is a Hopper GPU."""
  if problem.backend != "gpu":
    return False
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return False
  if dev.platform != "gpu":
    return False
  cc = getattr(dev, "compute_capability", None)
  return cc is not None and str(cc).startswith("9.")


def num_sms() -> int:
  """Streaming multiprocessors of the default GPU (132 on an H100 SXM)."""
  dev = jax.devices()[0]
  return int(getattr(dev, "core_count", 132) or 132)


# ----------------------------------------------------------------------------
# Mosaic GPU interpret mode (the kernels on CPU).
# ----------------------------------------------------------------------------

def interpret_params(interpret, **overrides):
  """Mosaic GPU interpret-mode parameters for a kernel's ``interpret`` argument.

  Pallas runs a Mosaic GPU kernel on the CPU when ``plgpu.kernel`` gets
  ``InterpretGPUParams``: warpgroups become threads, shared memory, TMA copies
  and barriers are simulated (uninitialised memory reads as NaN, and an optional
  happens-before race detector watches every access).

  Args:
    interpret: False (compile for the GPU), True (default parameters plus
      ``overrides``), or an ``InterpretGPUParams`` instance used as given.
    **overrides: fields of ``InterpretGPUParams`` for ``interpret=True``, for
      example ``detect_races=True``.

  Returns:
    None for False, else the parameters.

  Raises:
    RuntimeError: if this jax has no Mosaic GPU interpreter (jax < 0.10.2).
  """
  if interpret is False or interpret is None:
    return None
  import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  cls = getattr(plgpu, "InterpretGPUParams", None)
  if cls is None:
    try:
      from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as cls  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise RuntimeError(
          f"jax {jax.__version__} has no Mosaic GPU interpreter; interpret mode "
          "needs jax >= 0.10.2 (or run the kernel on a Hopper GPU)") from e
  if interpret is True:
    return cls(**overrides)
  if not isinstance(interpret, cls):
    raise TypeError(f"interpret must be a bool or {cls.__name__}, got "
                    f"{type(interpret).__name__}")
  return interpret


# The interpreter runs each warpgroup as its own XLA CPU computation on its own
# thread. On 2 cores (jax 0.10.2) the three-warpgroup W8A8 block/MX kernels
# hung once a CTA walked a second tile: the two compute warpgroups sat in
# barrier waits, on XLA's worker threads rather than their own, and the TMA
# warpgroup never made its first callback. With XLA's concurrency-optimized
# CPU scheduler off, every case passes (tests/kernels/test_gpu_interpret.py).
# The likely cause is blocked callbacks holding the CPU runtime's per-core
# worker threads; that was inferred from the stacks, not proven.
INTERPRETER_XLA_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def check_interpreter_threads(num_threads: int) -> None:
  """Refuses to interpret a multi-warpgroup kernel that could hang.

  Args:
    num_threads: warpgroups of the kernel.

  Raises:
    RuntimeError: for more than one warpgroup when ``XLA_FLAGS`` lacks
      ``INTERPRETER_XLA_FLAG``. (Whether the hang needs few cores was not
      established, so the flag is asked for on every machine.)
  """
  if num_threads <= 1 or INTERPRETER_XLA_FLAG in os.environ.get("XLA_FLAGS", ""):
    return
  raise RuntimeError(
      f"interpreting a kernel of {num_threads} warpgroups can deadlock in XLA's "
      "CPU runtime (seen on 2 cores). Start the process with "
      f"XLA_FLAGS='{INTERPRETER_XLA_FLAG}' (set before jax initialises its "
      "backend), as tests/conftest.py does.")


def races_found() -> bool:
  """Whether the Mosaic GPU interpreter's race detector saw a data race.

  Meaningful after a kernel ran with ``detect_races=True``; the detector's
  state lives until the next interpreted kernel starts.
  """
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc  # pylint: disable=g-import-not-at-top
  try:
    races = ipc.get_races()
  except AssertionError:  # no kernel ran with race detection yet
    return False
  return bool(races.races_found)


def run_interpreted(fn, *args):
  """Calls an interpreted kernel; on error resets the interpreter's state.

  The interpreter keeps global state (simulated shared memory) that an
  exception leaves behind, which would break every later interpreted kernel
  in the process.
  """
  try:
    return fn(*args)
  except Exception:
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc  # pylint: disable=g-import-not-at-top
    ipc.reset_gpu_interpret_mode_state()
    raise


def interpret_wgmma(acc_ref, a: jax.Array, b_t: jax.Array, stage=None) -> None:
  """``acc_ref += a @ b_t.T`` through ``plgpu.wgmma``, for the interpreter.

  The interpreter's wgmma reads both operands from memory and takes no
  transposed views, while the kernels feed A from registers and B as the
  transpose of a K-major tile. In interpret mode the two values are staged
  through SMEM refs (``b`` untransposed) and the same wgmma is issued.

  Args:
    acc_ref: the ``plgpu.ACC`` accumulator ref.
    a: ``[M, K]`` value (a register tile, or a tile read from SMEM).
    b_t: ``[N, K]`` value, K-major.
    stage: ``(a_smem [M, K], b_smem [K, N])`` refs to stage through. Kernels
      with several warpgroups must pass them (allocated collectively, one slot
      per warpgroup): the interpreter allows only collective SMEM allocations
      there. None allocates scratch refs here (single-warpgroup kernels).
  """
  import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
  import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  b = b_t.T

  def body(a_smem, b_smem):
    a_smem[...] = a
    b_smem[...] = b
    plgpu.wgmma(acc_ref, a_smem, b_smem)

  if stage is not None:
    body(*stage)
  else:
    pl.run_scoped(body, plgpu.SMEM(a.shape, a.dtype),
                  plgpu.SMEM(b.shape, b.dtype))


def bf16_from_e8m0(codes: jax.Array) -> jax.Array:
  """E8M0 codes (uint8) to bfloat16 by bit construction, as the kernels do.

  ``2**(c - 127)`` is bf16 bits ``c << 7``; code 0 is the bf16 subnormal
  ``0x0040`` and 255 is NaN. Built from bits so that no backend's flush of
  subnormals touches code 0.
  """
  c = codes.astype(jnp.uint16)
  bits = jnp.where(c == 0, jnp.uint16(0x0040), c << 7)
  bits = jnp.where(c == 255, jnp.uint16(0x7FC0), bits)
  return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)


def e2m1_from_int4(vals: jax.Array) -> jax.Array:
  """E2M1 values (float32) from int4-typed codes, as the kernels move them.

  The nibble is the code's two's-complement bits, ``v & 0xF``.
  """
  return decode_e2m1(vals.astype(jnp.int32) & 0xF)


# ----------------------------------------------------------------------------
# Register-level helpers for Mosaic GPU (lazy imports).
# ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _mlir():
  """Imports the MLIR / Mosaic GPU python modules on first use."""
  from jax.experimental.mosaic import gpu as mgpu  # pylint: disable=g-import-not-at-top
  from jax.experimental.mosaic.gpu import fragmented_array as fa  # pylint: disable=g-import-not-at-top
  from jax._src.lib.mlir import ir  # pylint: disable=g-import-not-at-top
  from jax._src.lib.mlir.dialects import arith, llvm, memref, vector  # pylint: disable=g-import-not-at-top
  return mgpu, fa, ir, arith, llvm, memref, vector


def wgmma_reg_rows_cols(shape: tuple[int, int]):
  """For the WGMMA register layout, maps each register to (row key, col tile).

  The WGMMA layout of a ``[64a, 8b]`` array has a register array of shape
  ``(a, b, 1, 1, 2, 1, 1, 1, 1)``: index 0 picks the 64-row block, index 1 the
  8-column tile and index 4 the 8-row half inside a warp's 16 rows. Each register
  holds two adjacent columns of one row.

  Args:
    shape: the 2-D array shape.

  Returns:
    A list of ``(reg_index, row_key, col_tile)``; registers with equal
    ``row_key`` hold the same row.
  """
  mgpu, _, _, _, _, _, _ = _mlir()
  rs = mgpu.WGMMA_LAYOUT.registers_shape(shape)
  expect = (shape[0] // 64, shape[1] // 8, 1, 1, 2, 1, 1, 1, 1)
  if tuple(rs) != expect:
    raise NotImplementedError(f"unexpected WGMMA register shape {rs} for {shape}")
  return [(idx, (idx[0], idx[4]), idx[1]) for idx in np.ndindex(*rs)]


def wgmma_row_index(shape: tuple[int, int]):
  """MLIR index values of the rows held by this thread, keyed by row key."""
  mgpu, _, _, _, _, _, _ = _mlir()
  rows = {}
  for (idx, key, _), mlir_idx in zip(wgmma_reg_rows_cols(shape),
                                     mgpu.WGMMA_LAYOUT.thread_idxs(shape)):
    rows.setdefault(key, mlir_idx[0])
  return rows


def thread_col_base(shape: tuple[int, int]):
  """MLIR index of each register's first column, keyed by register index."""
  mgpu, _, _, _, _, _, _ = _mlir()
  out = {}
  for (idx, _, _), mlir_idx in zip(wgmma_reg_rows_cols(shape),
                                   mgpu.WGMMA_LAYOUT.thread_idxs(shape)):
    out[idx] = (mlir_idx[0], mlir_idx[1])
  return out


def device_slug(device_kind: str) -> str:
  """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia_h100_80gb_hbm3"``: how a table
  measured on a device is named."""
  import re  # pylint: disable=g-import-not-at-top
  slug = re.sub(r"[^a-z0-9]+", "_", device_kind.lower()).strip("_")
  if not slug:
    raise ValueError(f"device kind {device_kind!r} has no letters or digits "
                     "to name a table file by")
  return slug


def current_gpu_kind():
  """The default device's kind (``"NVIDIA H200"``) where it is a GPU, else
  None: what picks a measured table."""
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return None
  return dev.device_kind if dev.platform == "gpu" else None


def tma_stream(steps: int, stages: int, bar, fetch, body) -> None:
  """The streaming loop of the quantizer and dequantizer kernels.

  Issues ``fetch(i, slot)`` (a TMA copy into shared-memory slot ``slot``
  arriving on ``bar.at[slot]``) for the first ``stages`` steps, then for each
  step waits for its slot, waits until at most ``stages - 1`` earlier TMA
  stores still read shared memory (so the step may overwrite the output slot
  it shares with step ``i - stages``), runs ``body(i, slot)`` (the compute,
  ``commit_smem`` and the step's ``copy_smem_to_gmem(..., commit_group=False)``
  calls), commits those stores as one group and refills the slot with step
  ``i + stages``; at the end waits for every store.
  """
  import jax.experimental.pallas as pl  # pylint: disable=g-import-not-at-top
  import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  for i in range(min(stages, steps)):
    fetch(i, i)

  def step(i, carry):
    slot = jax.lax.rem(i, stages)
    plgpu.barrier_wait(bar.at[slot])
    plgpu.wait_smem_to_gmem(stages - 1, wait_read_only=True)
    body(i, slot)
    plgpu.commit_smem_to_gmem_group()

    @pl.when(i + stages < steps)
    def _():
      fetch(i + stages, slot)
    return carry

  jax.lax.fori_loop(0, steps, step, 0)
  plgpu.wait_smem_to_gmem(0)


def plgpu_load(ref, layout):
  """``plgpu.load(ref, layout=...)`` on jax 0.10 (positional index) and 0.11."""
  import inspect  # pylint: disable=g-import-not-at-top
  import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  idx_param = inspect.signature(plgpu.load).parameters.get("idx")
  if idx_param is not None and idx_param.default is inspect.Parameter.empty:
    return plgpu.load(ref, None, layout=layout)
  return plgpu.load(ref, layout=layout)


def transpose_ref(ref):
  """A transposed view of a 2-D Pallas ref (``ref.T``; works on jax 0.10 and 0.11)."""
  return ref.T


def config_from_entry(cls, entry: dict):
  """A tiling dataclass ``cls`` from a measured table's entry: every field of
  ``cls`` the entry holds (older entries lack the newer fields, which keep
  their defaults); the entry's other keys (its timings) are not fields."""
  return cls(**{f.name: entry[f.name] for f in dataclasses.fields(cls)
                if f.name in entry})


def smem_gather(ref, idx, dtype, tn: int, interp: bool = False):
  """``ref[idx]`` for an int32 ``[tn]`` row (the warpgroup-strided layout
  of a row of ``tn`` columns) of in-range indices into a 1-D shared-memory
  table: one load an element (Mosaic GPU has no vector gather; each lane
  loads its own address). A table of at most 32 4-byte words has no bank
  conflicts. With ``interp`` (the Mosaic GPU interpreter, which runs no
  raw MLIR) a ``jnp.take`` of the whole table."""
  if interp:
    return jnp.take(ref[...], idx, mode="clip").astype(dtype)
  import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  lay = plgpu.Layout.WG_STRIDED((tn,), vec_size=tn // 128)

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), lay),
                     return_type=plgpu.ShapeDtypeStruct((tn,), dtype, lay))
  def gather(_, table, ids):
    _, fa, ir, arith, llvm, memref, _ = _mlir()
    i32 = ir.IntegerType.get_signless(32)
    index = ir.IndexType.get()
    el = ir.MemRefType(table.type).element_type
    new = np.empty_like(ids.registers)
    for i, reg in np.ndenumerate(ids.registers):
      n_el = ir.VectorType(reg.type).shape[0]
      out = llvm.mlir_undef(ir.VectorType.get((n_el,), el))
      for j in range(n_el):
        pos = llvm.ConstantOp(i32, ir.IntegerAttr.get(i32, j)).result
        v = memref.load(table, [arith.index_cast(index, llvm.extractelement(reg, pos))])
        out = llvm.insertelement(out, v, pos)
      new[i] = out
    return fa.FragmentedArray(_registers=new, _layout=ids.layout,
                              _is_signed=True if dtype == jnp.int32 else None)
  return gather(ref, idx)
