"""Runs chosen GPU kernels once each, for a profiler (Nsight Compute) to read.

Hardware counters answer what CUPTI's time cannot: registers per thread, CTAs
resident per SM, where warps stall. This script compiles and runs each case
once, then launches each once more between ``cuProfilerStart`` and
``cuProfilerStop`` (the case names are printed before each launch), so that

    XLA_PYTHON_CLIENT_PREALLOCATE=false \
    ncu --clock-control none --target-processes all --profile-from-start off \
        --section LaunchStats --section Occupancy --section SpeedOfLight \
        --section WarpStateStats --section SchedulerStats \
        --section MemoryWorkloadAnalysis \
        python3 -m experiments.ncu_probe --cases=wo:int4_g128:8192x28672:1

profiles only the kernels of those launches (operands are made on the host).
On the H200 this took 46 s for seven cases with nine sections. A first
attempt with XLA's default preallocated memory pool and every launch of the
process profiled (random-number kernels included) got through five
two-microsecond kernels in 330 s and left the process holding the GPU (which
of the two changes fixed it was not isolated; a likely cause is the kernel
replay's save and restore of the memory a kernel may touch, with the pool
all of it). Case syntax:

* ``wo:<case>[@wgmma]:<K>x<N>:<M>[:<tile_n>,<tile_k>,<tile_m>,<stages>,<split_k>,...]``:
  the weight-only kernel (``experiments/bench_kernels.WO_CASES`` names), with
  the tuned table's tiling unless one is given (the ``Config`` fields in order,
  booleans as 0/1). ``@wgmma`` stores the 4-bit codes in the kernel's register
  order (``QArray.code_order``), as the table's ``<case>@wgmma`` rows do.
* ``q:<kind>:<K>x<N>`` / ``fq:<kind>:<K>x<N>``: ``lowbit_jax.quantize`` /
  ``fake_quant`` of a bf16 array with the kernel ``kind``'s spec
  (``gpu_quantize.spec_for``), through the GPU quantizer's dispatch with the
  kernel forced on.

Runs on a Hopper GPU only (the kernels are Mosaic GPU).
"""
from __future__ import annotations

from absl import app
from absl import flags

_CASES = flags.DEFINE_list("cases", [], "cases (module docstring)")
_SYNTAX = ("wo:<case>[@wgmma]:<K>x<N>:<M>[:<tile_n>,<tile_k>,<tile_m>,<stages>,<split_k>,...], "
           "q:<kind>:<K>x<N> or fq:<kind>:<K>x<N>")


def case_list(values) -> list[str]:
  """The cases of ``--cases``: absl splits a list flag at every comma, which
  also splits a case's ``Config`` fields; a piece that does not start a case
  (``wo:``, ``q:``, ``fq:``) is joined back onto the case before it."""
  out = []
  for v in values:
    if out and not v.startswith(("wo:", "q:", "fq:")):
      out[-1] += "," + v
    else:
      out.append(v)
  return out


def _parse(spec: str):
  """(op, name, k, n, rest) of one case, or a UsageError saying what is wrong."""
  parts = spec.split(":")
  op = parts[0]
  want = {"wo": (4, 5), "q": (3,), "fq": (3,)}.get(op)
  if want is None or len(parts) not in want:
    raise app.UsageError(f"--cases: {spec!r} is not {_SYNTAX}")
  try:
    k, n = (int(v) for v in parts[2].split("x"))
    rest = [int(v) for v in parts[3:4]] + [
        [int(v) for v in p.split(",")] for p in parts[4:]]
  except ValueError as e:
    raise app.UsageError(f"--cases: {spec!r}: {e}; the syntax is {_SYNTAX}") from e
  return op, parts[1], k, n, rest


def _weight_only(name, k, n, rest):
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from experiments import bench_kernels as bk  # pylint: disable=g-import-not-at-top
  from lowbit_jax.kernels import _api as api  # pylint: disable=g-import-not-at-top
  from lowbit_jax.kernels import gpu_weight_only as wo  # pylint: disable=g-import-not-at-top
  name, _, order = name.partition("@")
  order = order or "natural"
  if order not in api.CODE_ORDERS:
    raise app.UsageError(f"--cases: unknown code order {order!r}; one of "
                         f"{api.CODE_ORDERS}")
  if name not in bk.WO_CASES:
    raise app.UsageError(f"--cases: unknown weight case {name!r}; one of "
                         f"{sorted(bk.WO_CASES)}")
  m = rest[0]
  fmt, group = bk.WO_CASES[name]
  with jax.default_device(jax.devices("cpu")[0]):
    codes, scale, ts = bk.wo_weight(jax.random.key(0), fmt, group, n, k)
    if order != "natural":
      from lowbit_jax.core._qarray import to_code_order  # pylint: disable=g-import-not-at-top
      codes = to_code_order(codes, order)
  x = np.random.default_rng(0).standard_normal((m, k)).astype(jax.numpy.bfloat16)
  ops = jax.device_put(api.MatmulOperands(x=x, w_codes=codes, w_scale=scale,
                                          w_tensor_scale=ts), jax.devices()[0])
  prob = api.MatmulProblem(m=m, n=n, k=k, x_dtype="bfloat16", w_format=fmt,
                           w_block=group, w_order=order)
  fields = [f.type for f in dataclasses.fields(wo.Config)]
  if len(rest) > 1 and len(rest[1]) > len(fields):
    raise app.UsageError(f"--cases: a config has at most {len(fields)} fields "
                         f"({[f.name for f in dataclasses.fields(wo.Config)]})")
  cfg = (wo.Config(*(bool(v) if t in (bool, "bool") else v
                     for v, t in zip(rest[1], fields)))
         if len(rest) > 1 else None)
  fn = jax.jit(lambda o: wo.matmul(o, prob, config=cfg))
  return fn, (ops,), f"config={cfg or wo.tuned_config(prob)}"


def _quantizer(op, kind, k, n):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import lowbit_jax  # pylint: disable=g-import-not-at-top
  from lowbit_jax.kernels import gpu_quantize as gq  # pylint: disable=g-import-not-at-top
  if kind not in gq.supported_kinds():
    raise app.UsageError(f"--cases: unknown quantizer kind {kind!r}; one of "
                         f"{sorted(gq.supported_kinds())}")
  qs = gq.spec_for(kind)
  x = jax.device_put(np.random.default_rng(1).standard_normal(
      (k, n)).astype(jnp.bfloat16))
  fn = jax.jit(lambda a: (lowbit_jax.quantize if op == "q" else
                          lowbit_jax.fake_quant)(a, qs))

  def run(a):
    with gq.forced([kind]):  # the kernel, with the tiling dispatch would use
      return fn(a)
  cfg = gq.default_config(kind, k, n, jnp.bfloat16, values=op == "fq")
  return run, (x,), f"config={cfg}"


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != "gpu":
    raise app.UsageError("ncu_probe runs Mosaic GPU kernels for Nsight Compute: "
                         "it needs a Hopper GPU, and jax's default backend here "
                         f"is {jax.default_backend()!r}")
  if not _CASES.value:
    raise app.UsageError(f"give --cases: {_SYNTAX}")
  built = []
  for spec in case_list(_CASES.value):
    op, name, k, n, rest = _parse(spec)
    fn, args, note = (_weight_only(name, k, n, rest) if op == "wo"
                      else _quantizer(op, name, k, n))
    jax.block_until_ready(fn(*args))  # compile + first launch
    built.append((spec, fn, args, note))
  import ctypes  # pylint: disable=g-import-not-at-top
  cuda = ctypes.CDLL("libcuda.so.1")
  cuda.cuProfilerStart()
  for spec, fn, args, note in built:
    print(f"=== case {spec} {note}", flush=True)
    jax.block_until_ready(fn(*args))
  cuda.cuProfilerStop()
  print("done", flush=True)


if __name__ == "__main__":
  app.run(main)
