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

* ``wo:<case>:<K>x<N>:<M>[:<tile_n>,<tile_k>,<tile_m>,<stages>,<split_k>]``: the
  weight-only kernel (``experiments/bench_kernels.WO_CASES`` names), with the
  tuned table's tiling unless one is given.
* ``q:<kind>:<K>x<N>`` / ``fq:<kind>:<K>x<N>``: ``lowbit_jax.quantize`` /
  ``fake_quant`` of a bf16 array with the kernel ``kind``'s spec
  (``gpu_quantize.spec_for``), through the GPU quantizer's dispatch with the
  kernel forced on.

Runs on a Hopper GPU only (the kernels are Mosaic GPU).
"""
from __future__ import annotations

import sys

from absl import app
from absl import flags

_CASES = flags.DEFINE_list("cases", [], "cases (module docstring)")


def _weight_only(spec: str):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from experiments import bench_kernels as bk  # pylint: disable=g-import-not-at-top
  from lowbit_jax.kernels import _api as api  # pylint: disable=g-import-not-at-top
  from lowbit_jax.kernels import gpu_weight_only as wo  # pylint: disable=g-import-not-at-top
  parts = spec.split(":")
  case, shape, m = parts[1], parts[2], int(parts[3])
  k, n = (int(v) for v in shape.split("x"))
  fmt, group = bk.WO_CASES[case]
  with jax.default_device(jax.devices("cpu")[0]):
    codes, scale, ts = bk.wo_weight(jax.random.key(0), fmt, group, n, k)
  cpu = lambda a: None if a is None else np.asarray(a)
  host = [cpu(codes), cpu(scale), cpu(ts)]
  x = np.random.default_rng(0).standard_normal((m, k)).astype(np.float32)
  dev = jax.device_put([x.astype(jax.numpy.bfloat16)] + host[:2] + (
      [host[2]] if host[2] is not None else []))
  ops = api.MatmulOperands(x=dev[0], w_codes=dev[1], w_scale=dev[2],
                           w_tensor_scale=dev[3] if len(dev) > 3 else None)
  prob = api.MatmulProblem(m=m, n=n, k=k, x_dtype="bfloat16", w_format=fmt,
                           w_block=group)
  cfg = None
  if len(parts) > 4:
    vals = [int(v) for v in parts[4].split(",")]
    cfg = wo.Config(*vals)
  fn = jax.jit(lambda o: wo.matmul(o, prob, config=cfg))
  return fn, (ops,), f"config={cfg or wo.tuned_config(prob)}"


def _quantizer(spec: str):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import lowbit_jax  # pylint: disable=g-import-not-at-top
  from lowbit_jax.kernels import gpu_quantize as gq  # pylint: disable=g-import-not-at-top
  op, kind, shape = spec.split(":")
  k, n = (int(v) for v in shape.split("x"))
  qs = gq.spec_for(kind)
  x = jax.device_put(np.random.default_rng(1).standard_normal(
      (k, n)).astype(np.float32).astype(jnp.bfloat16))
  if op == "q":
    f = lambda a: lowbit_jax.quantize(a, qs)
  else:
    f = lambda a: lowbit_jax.fake_quant(a, qs)
  fn = jax.jit(f)

  def run(a):
    with gq.forced([kind]):
      return fn(a)
  cfg = gq.heuristic_config(kind, k, n, jnp.bfloat16, values=op == "fq")
  return run, (x,), f"config={cfg}"


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != "gpu":
    raise app.UsageError("ncu_probe runs Mosaic GPU kernels for Nsight Compute: "
                         "it needs a Hopper GPU, and jax's default backend here "
                         f"is {jax.default_backend()!r}")
  if not _CASES.value:
    raise app.UsageError("give --cases (the module docstring lists the syntax)")
  built = []
  for spec in _CASES.value:
    maker = _weight_only if spec.startswith("wo:") else _quantizer
    fn, args, note = maker(spec)
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
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
