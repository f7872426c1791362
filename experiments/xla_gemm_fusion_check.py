r"""Compiles the XLA programs of bench_kernels for an H200 target, one per process.

XLA's GPU compiler can abort the whole process (a failed ``CHECK``) instead of
raising; ``experiments/bench_kernels.py`` lost a GPU call that way
(triton_tiling_propagation "Check failed: dst_dim_it != dst_dim_end" in
GemmFusion). This script compiles each XLA program the benchmark builds -- XLA
bf16 ``x @ w``, ``gpu_weight_only.xla_fused_matmul`` (``--decode``) and
``xla_dequant_matmul`` -- for every case / shape / M of the lists given, each
in its own subprocess with XLA's deviceless GPU compiler (no GPU needed), and
prints which ones abort. It needs the CUDA PJRT plugin of the installed jax in
``--plugin_site`` (see ``experiments/gpu_fusion_survey.py`` for the two
``pip download`` / ``pip install --target`` lines)::

  PYTHONPATH=. python3 experiments/xla_gemm_fusion_check.py \
      --plugin_site=/tmp/cuda_site --check_shapes=8192x8192 --check_batches=1,4,16

One compile takes ~3-10 s of this 2-core CPU.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import os
import subprocess
import sys

from absl import app
from absl import flags

from experiments import gpu_fusion_survey  # defines --plugin_site

_SITE = gpu_fusion_survey._SITE  # pylint: disable=protected-access

_SHAPES = flags.DEFINE_list("check_shapes", ["8192x8192"], "K x N")
_BATCHES = flags.DEFINE_list("check_batches", ["1", "4", "16"], "M values")
_KERNELS = flags.DEFINE_list(
    "check_kernels", ["int4_g128", "int4_pc", "int8_pc", "fp4_g32", "mxfp4", "nvfp4"],
    "weight cases (keys of bench_kernels.WO_CASES)")
_PROGRAMS = flags.DEFINE_list("programs", ["bf16", "fused", "dequant"],
                              "which XLA programs")
_DECODE = flags.DEFINE_string("decode", "native", "xla_fused_matmul's decode")
_JOBS = flags.DEFINE_integer("jobs", 2, "compiles at a time")
_ONE = flags.DEFINE_string("one", "", "internal: program,case,KxN,M to compile")


def compile_one(spec: str) -> str:
  """Compiles one program (``program,case,KxN,M``) for the H200 target."""
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
  sys.path.insert(0, _SITE.value)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from experiments.bench_kernels import WO_CASES  # pylint: disable=g-import-not-at-top
  from lowbit_jax.kernels import _api as api  # pylint: disable=g-import-not-at-top
  from lowbit_jax.kernels import gpu_weight_only as wo  # pylint: disable=g-import-not-at-top
  prog, case, shape, m = spec.split(",")
  m = int(m)
  k, n = (int(v) for v in shape.lower().split("x"))
  topo = topologies.get_topology_desc(platform="cuda", target_config=gpu_fusion_survey.TARGET,
                                      topology="1x1x1")
  sh = jax.sharding.SingleDeviceSharding(topo.devices[0])
  st = lambda s, d: jax.ShapeDtypeStruct(s, d, sharding=sh)
  x = st((m, k), jnp.bfloat16)
  if prog == "bf16":
    f, args = (lambda a, w: a @ w), (x, st((k, n), jnp.bfloat16))
  else:
    fmt, g = WO_CASES[case]
    codes = (st((n, k), jnp.int8) if fmt == "int8"
             else st((n, k // 2), jnp.uint8))
    sdt = {"mxfp4": jnp.uint8, "nvfp4": jnp.float8_e4m3fn}.get(fmt, jnp.bfloat16)
    scale = st((n, 1 if g is None else k // g), sdt)
    ts = st((), jnp.float32) if fmt == "nvfp4" else None
    prob = api.MatmulProblem(m=m, n=n, k=k, x_dtype="bfloat16", w_format=fmt,
                             w_block=g)
    if prog == "fused":
      fn = lambda o: wo.xla_fused_matmul(o, prob, decode=_DECODE.value)
    else:
      fn = lambda o: wo.xla_dequant_matmul(o, prob)
    f = lambda a, c, s, t: fn(api.MatmulOperands(x=a, w_codes=c, w_scale=s,
                                                 w_tensor_scale=t))
    args = (x, codes, scale, ts)
  jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).compile()
  return "ok"


def main(argv):
  del argv
  if _ONE.value:
    print(compile_one(_ONE.value))
    return
  specs = []
  for prog, shape, m in itertools.product(_PROGRAMS.value, _SHAPES.value,
                                          _BATCHES.value):
    for case in (["-"] if prog == "bf16" else _KERNELS.value):
      specs.append(f"{prog},{case},{shape},{m}")

  def run(spec):
    r = subprocess.run(
        [sys.executable, os.path.abspath(__file__), f"--one={spec}",
         f"--plugin_site={_SITE.value}", f"--decode={_DECODE.value}"],
        capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": os.getcwd()})
    check = [l for l in r.stderr.splitlines() if "Check failed" in l
             or l.startswith("F")]
    return spec, r.returncode, (check[0] if check else r.stderr[-300:].strip())

  bad = 0
  with concurrent.futures.ThreadPoolExecutor(_JOBS.value) as pool:
    for spec, rc, why in pool.map(run, specs):
      ok = rc == 0
      bad += not ok
      print(f"{'ok   ' if ok else 'ABORT'} rc={rc} {spec}"
            + ("" if ok else f": {why}"), flush=True)
  print(f"{len(specs) - bad}/{len(specs)} compiled; {bad} failed "
        f"(decode={_DECODE.value})")


if __name__ == "__main__":
  app.run(main)
