r"""What XLA's GPU compiler makes of the primitives, on a machine without a GPU.

Compiles quantize / dequantize / fake_quant / fake_quant fwd+bwd of a bf16
``[K, N]`` tensor (scales along axis 0, the formats of
``experiments/bench_primitives.py``) and the non-kernel real-mode matmul for an
H100/H200-class target with XLA's deviceless (ahead-of-time) GPU compiler, and
reports for each program: the device ops it launches (fusions, copies, custom
calls), the bytes those ops read and write (operand and result sizes of each
top-level op of the optimized HLO: an upper bound of the traffic, since a
broadcast operand counts at its stored size) and that traffic's time at
``--bandwidth``, and the transposes anywhere in it. It shows where a
primitive writes an intermediate out and reads it back, before any GPU time
is spent; the times themselves come from bench_primitives on the GPU.

Needs the CUDA PJRT plugin of the installed jax (compile-only: no driver,
cuDNN or GPU), installed outside the project's environment, e.g.::

  pip download --no-deps -d /tmp/cuda_whl "jax-cuda13-pjrt==$(python3 -c \
      'import jax; print(jax.__version__)')" "jax-cuda13-plugin==$(python3 -c \
      'import jax; print(jax.__version__)')"
  pip install --no-deps --target /tmp/cuda_site /tmp/cuda_whl/*.whl
  PYTHONPATH=. python3 -m experiments.gpu_fusion_survey \
      --plugin_site=/tmp/cuda_site --out=/tmp/survey.md

``--qat`` also compiles the QAT training step of the decoder LM that
``experiments/bench_qat.py`` times (``experiments/_qat_step.py``'s variants),
and counts its ops and its tiny ones (scalars, whose GPU time is their launch):
in a step of small tensors those launches, not the bytes, are what a
format's fake quantization adds. With ``--baseline`` (a JSON of the same
command on another commit) the table shows before -> after::

  PYTHONPATH=. python3 -m experiments.gpu_fusion_survey --plugin_site=/tmp/cuda_site \
      --formats=nvfp4 --ops=fake_quant --matmul_m= \
      --qat="bf16 (no quantization),MXFP4 W+A,NVFP4 W+A"

Code that picks a path by backend (``jax.default_backend()``) is traced as on
the GPU: the script reports "gpu" for it while the process itself runs on CPU.
"""
from __future__ import annotations

import collections
import contextlib
import os
import re
import shlex
import sys

from absl import app
from absl import flags

_SITE = flags.DEFINE_string("plugin_site", "", "folder holding jax_plugins/xla_cuda*")
_FORMATS = flags.DEFINE_list("formats", [], "format ids (default: all of "
                             "bench_primitives.FORMATS)")
_OPS = flags.DEFINE_list("ops", ["quantize", "dequantize", "fake_quant", "fwd+bwd"],
                         "which primitives")
_SHAPE = flags.DEFINE_string("shape", "8192x8192", "K x N")
_MATMUL_M = flags.DEFINE_list("matmul_m", ["1", "16", "4096"], "M of the matmul "
                              "programs (x[M, K] @ a [K, N] weight); empty: none")
_MM_FMT = flags.DEFINE_list("matmul_formats", [], "matmul weight ids (default: "
                            "bench_primitives' four; as its --matmul_formats)")
_NATIVE4 = flags.DEFINE_list("native_4bit", [], "4-bit dtypes whose codes the "
                             "non-kernel dot takes (ops._NATIVE_4BIT_DTYPES; "
                             "default: the library's), e.g. "
                             "int4,uint4,float4_e2m1fn")
_BW = flags.DEFINE_float("bandwidth", 4.3e12, "bytes/s for the time column (the "
                         "H200's measured copy rate)")
_OUT = flags.DEFINE_string("out", "", "markdown file to write (default: print)")
_JSON = flags.DEFINE_string("json_out", "", "also write the rows as JSON there "
                            "(tests/core/test_fusion.py reads it)")
_PTX = flags.DEFINE_bool("ptx", False, "also count the PTX instructions of each "
                         "kernel (XLA's dump of the compile, in a temporary "
                         "folder): where a kernel is compute-bound, not memory-bound")
_BASE = flags.DEFINE_string("baseline", "", "--json_out of an earlier run (e.g. "
                            "an older commit): adds a before -> after table")
_BASE_LABEL = flags.DEFINE_string("baseline_label", "", "what the baseline is "
                                  "(default: its file name)")
_DUMP = flags.DEFINE_string("dump_dir", "", "also write each program's optimized "
                            "HLO there, as <format>_<program>.txt")
_QAT = flags.DEFINE_list("qat", [], "also compile the QAT training step of the "
                         "decoder LM (LlamaConfig.base, --qat_tokens) for these "
                         "variants of experiments/_qat_step.py (e.g. 'bf16 (no "
                         "quantization)','NVFP4 W+A'; 'all': each of them): the "
                         "step experiments/bench_qat.py times")
_QAT_PLAIN = flags.DEFINE_bool("qat_plain_jit", False, "compile the QAT step "
                                "under a plain jax.jit, its metrics known at "
                                "trace time copied into outputs on the device "
                                "(as before session 45), instead of as the "
                                "training loop jits it (split_constant_metrics)")
_QAT_TOKENS = flags.DEFINE_string("qat_tokens", "16x512", "sequences x tokens "
                                  "of the QAT step's batch (bench_qat's default)")

# The 4-bit dtypes --native_4bit may name (jax.numpy's names).
NATIVE_4BIT_NAMES = ("int4", "uint4", "float4_e2m1fn")

# An H200-like compile target (HBM3e bandwidth, 132 SMs, sm_90).
TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32
  shared_memory_per_block: 49152 shared_memory_per_core: 233472
  threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 150000000000 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
runtime_version { major: 13 }
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 }
device_description_str: "NVIDIA H200"
"""

_BYTES = dict(bf16=2, f16=2, f32=4, f64=8, s8=1, u8=1, s16=2, u16=2, s32=4, u32=4,
              s64=8, u64=8, pred=1, f8e4m3fn=1, f8e5m2=1, s4=0.5, u4=0.5)
_FREE = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast")
# An op that reads and writes less than this works on scalars or a few
# vectors: its time on the GPU is its launch (a QAT step of small tensors has
# hundreds of them).
_TINY = 10_000


def _size(shape: str) -> float:
  total = 0.0
  for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape):
    n = 1
    for d in dims.split(","):
      n *= int(d) if d else 1
    total += n * _BYTES.get(dt, 0)
  return total


def program_stats(text: str) -> dict:
  """Device ops, bytes they move and transposes of an optimized HLO module."""
  entry = text[text.index("\nENTRY"):]
  shapes, ops = {}, []
  for line in entry.split("\n")[1:]:
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$", line)
    if not m:
      continue
    name, shape, op, rest = m.groups()
    shapes[name] = shape
    if op in _FREE:
      continue
    args = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
    kind = re.search(r"kind=(k\w+)", rest)
    ops.append((op + (":" + kind.group(1) if kind else "") + ":" + name,
                sum(_size(shapes.get(a, "")) for a in args) + _size(shape)))
  moved = sum(b for _, b in ops)
  return dict(kernels=len(ops), tiny=sum(1 for _, b in ops if b < _TINY),
              MB=round(moved / 1e6, 1),
              est_us=round(moved / _BW.value * 1e6, 1),
              transposes=len(re.findall(r"\btranspose\(", text)),
              ops=[(k, round(b / 1e6, 1)) for k, b in ops])


def _by_kind(ops: list) -> list:
  """``[(kind, count)]`` of ``program_stats``' ops, the most frequent first
  (a kind: the op's name without its numeric suffix)."""
  kinds = collections.Counter(re.sub(r"[.\d]+$", "", o.split(":")[-1]) for o, _ in ops)
  return [list(kc) for kc in kinds.most_common()]


def ptx_instructions(text: str) -> dict:
  """Kernel name -> instructions in its body, for a PTX module.

  A loop kernel handles a few elements per thread (its vector width), so
  compare kernels of the same shape, or per element with that in mind.
  """
  out = {}
  for m in re.finditer(r"\.entry (\w+)\((?:.*?)\n\{(.*?)\n\}", text, re.S):
    body = [ln.strip() for ln in m.group(2).split("\n")]
    out[m.group(1)] = sum(1 for ln in body if ln.endswith(";")
                          and not ln.startswith((".reg", ".shared", ".local", "//")))
  return out


def _kname(op_label: str) -> str:
  """The PTX kernel name of an HLO fusion (``a_fusion.1`` -> ``a_fusion_1``)."""
  return op_label.split(":")[-1].replace(".", "_")


def _main_ptx(row: dict):
  """PTX instructions of the kernel that moves the most bytes, or None."""
  if not row.get("ops") or not row.get("ptx"):
    return None
  label = max(row["ops"], key=lambda ob: ob[1])[0]
  return row["ptx"].get(_kname(label))


def _dump(name: str, text: str):
  if _DUMP.value:
    os.makedirs(_DUMP.value, exist_ok=True)
    with open(os.path.join(_DUMP.value, re.sub(r"[^\w.+-]", "_", name) + ".txt"),
              "w") as f:
      f.write(text)


def _qat_plan() -> tuple:
  """``(variant names, (sequences, tokens))`` of ``--qat`` / ``--qat_tokens``,
  checked before anything compiles."""
  from experiments import _qat_step  # pylint: disable=g-import-not-at-top
  names = ([_qat_step.BASELINE, *_qat_step.OURS] if _QAT.value == ["all"]
           else _QAT.value)
  for name in names:
    try:
      _qat_step.variant(name)
    except ValueError as e:
      raise app.UsageError(f"--qat: {e}") from e
  m = re.fullmatch(r"(\d+)x(\d+)", _QAT_TOKENS.value.lower())
  if not m or not all(int(v) > 0 for v in m.groups()):
    raise app.UsageError(f"--qat_tokens={_QAT_TOKENS.value!r}: give "
                         "<sequences>x<tokens per sequence>, both positive, "
                         "e.g. 16x512")
  return names, tuple(int(v) for v in m.groups())


def main(argv):
  del argv
  qat_plan = _qat_plan()
  # The matmul flags, checked before anything compiles.
  from experiments._primitive_formats import matmul_formats  # pylint: disable=g-import-not-at-top
  try:
    mm_formats = matmul_formats(_MM_FMT.value)
  except ValueError as e:
    raise app.UsageError(f"--matmul_formats: {e}") from None
  bad = sorted(set(_NATIVE4.value) - set(NATIVE_4BIT_NAMES))
  if bad:
    raise app.UsageError(f"--native_4bit: unknown {bad}; use some of "
                         f"{','.join(NATIVE_4BIT_NAMES)}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  if _SITE.value:
    sys.path.insert(0, _SITE.value)
  ptx_dir = None
  if _PTX.value:
    import tempfile  # pylint: disable=g-import-not-at-top
    ptx_dir = tempfile.mkdtemp(prefix="survey_ptx_")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_dump_to={ptx_dir}").strip()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    topo = topologies.get_topology_desc(platform="cuda", target_config=TARGET,
                                        topology="1x1x1")
  except (NotImplementedError, RuntimeError) as e:
    raise app.UsageError(f"no CUDA compiler plugin found ({e}); install "
                         "jax-cuda13-pjrt/-plugin of jax's version into a folder "
                         "and pass it as --plugin_site (module docstring)") from e
  cpu_backend = jax.default_backend
  jax.default_backend = lambda: "gpu"  # trace the GPU paths of lowbit_jax
  import lowbit_jax as lb  # pylint: disable=g-import-not-at-top
  from experiments._primitive_formats import FORMATS, fake_quant_fwd_bwd  # pylint: disable=g-import-not-at-top
  if _NATIVE4.value:
    lb.ops._NATIVE_4BIT_DTYPES = tuple(  # pylint: disable=protected-access
        jnp.dtype(getattr(jnp, d)) for d in _NATIVE4.value)
  sh = jax.sharding.SingleDeviceSharding(topo.devices[0])

  def compiled(f, *args):
    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        list(args))
    before = set(os.listdir(ptx_dir)) if ptx_dir else set()
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).compile().as_text()
    if ptx_dir:
      counts = {}
      for fn in sorted(set(os.listdir(ptx_dir)) - before):
        if fn.endswith(".ptx"):
          with open(os.path.join(ptx_dir, fn)) as fh:
            counts.update(ptx_instructions(fh.read()))
      last_ptx.clear()
      last_ptx.update(counts)
    return text

  last_ptx = {}

  k, n = (int(v) for v in _SHAPE.value.lower().split("x"))
  x = jax.ShapeDtypeStruct((k, n), jnp.bfloat16)
  rows = []
  for fid in _FORMATS.value or list(FORMATS):
    fmt, kw = FORMATS[fid]
    spec = lb.QuantSpec(fmt, axis=0, **kw)
    for op in _OPS.value:
      if op == "quantize":
        text = compiled(lambda v, s=spec: lb.quantize(v, s), x)
      elif op == "dequantize":
        q = jax.eval_shape(lambda v, s=spec: lb.quantize(v, s), x)
        text = compiled(lb.dequantize, q)
      elif op == "fake_quant":
        text = compiled(lambda v, s=spec: lb.fake_quant(v, s), x)
      else:
        text = compiled(fake_quant_fwd_bwd(lb.fake_quant, spec), x, x)
      rows.append((fid, op, dict(program_stats(text), ptx=dict(last_ptx))))
      _dump(f"{fid}_{op}", text)
      print(fid, op, rows[-1][2], flush=True)
  dn = (((1,), (1,)), ((), ()))
  for fid, (fmt, kw) in mm_formats.items():
    if not _MATMUL_M.value:
      break
    spec = lb.QuantSpec(fmt, **kw)
    qw = jax.eval_shape(lambda v, s=spec: lb.ops.prepare_weight(v, s, 0), x)
    for m in _MATMUL_M.value:
      a = jax.ShapeDtypeStruct((int(m), k), jnp.bfloat16)
      text = compiled(lambda a_, q_: lb.ops.dot_general(
          a_, q_, dn, mode="real", use_kernel="never"), a, qw)
      rows.append((fid, f"matmul M={m}", dict(program_stats(text), ptx=dict(last_ptx))))
      _dump(f"{fid}_matmul_M{m}", text)
      print(fid, m, rows[-1][2], flush=True)
  if _QAT.value:
    from experiments import _qat_step  # pylint: disable=g-import-not-at-top
    from lowbit_jax.models.llama import Llama, LlamaConfig  # pylint: disable=g-import-not-at-top
    from lowbit_jax.train import loop, state as state_lib  # pylint: disable=g-import-not-at-top
    names, (b, t) = qat_plan
    model = Llama(LlamaConfig.base())
    batch = jnp.zeros((b, t + 1), jnp.int32)

    @contextlib.contextmanager
    def on_cpu():
      # parameters and states are built by running code on this process's
      # CPU: its paths
      jax.default_backend = cpu_backend
      try:
        yield
      finally:
        jax.default_backend = lambda: "gpu"

    with on_cpu():
      params = state_lib.init_params(model, jax.random.key(0))
    for name in names:
      with on_cpu():
        step, state = _qat_step.make_step(model, params, batch,
                                          *_qat_step.variant(name),
                                          init_from_data=False)
      # As the training loop jits it (train.ShardedStep), or plainly.
      text = compiled(step if _QAT_PLAIN.value
                      else loop.split_constant_metrics(step)[0], state, batch)
      st = program_stats(text)
      # a step is some thousand ops: kept as counts by kind, the most frequent
      # first
      st["ops"] = _by_kind(st["ops"])
      rows.append((name, "QAT step", dict(st, ptx=dict(last_ptx))))
      _dump(f"qat_{name}", text)
      print(name, {k: v for k, v in rows[-1][2].items() if k != "ops"}, flush=True)
  out = [f"# XLA GPU programs of the primitives (deviceless compile, jax "
         f"{jax.__version__}, H200-like target)", "",
         f"Command: `python3 -m experiments.gpu_fusion_survey {shlex.join(sys.argv[1:])}`",
         "", f"bf16 [{k}, {n}], scales along axis 0. MB: bytes the top-level ops "
         f"read and write; us: that traffic at {_BW.value / 1e12:.1f} TB/s."
         + (" `(N ins)`: the kernel's PTX instructions (a loop kernel handles "
            "2 to 8 elements per thread; about 100 per 4 bf16 elements is where "
            "the H200 turns compute-bound: int8 fake_quant's 61 runs at the copy "
            "rate, fp8's 150 at 60% of it)." if _PTX.value else "")
         + (f" QAT step: the training step of experiments/bench_qat.py "
            f"(LlamaConfig.base, {_QAT_TOKENS.value} tokens), its ops by kind "
            "(the most frequent first)." if _QAT.value else "")
         + f" tiny: ops that move less than {_TINY // 1000} kB (scalars; on the "
         "GPU their time is their launch).", "",
         "| format | program | kernels | tiny | MB | us | transposes | ops (MB each) |",
         "|---|---|---|---|---|---|---|---|"]
  for fid, op, r in rows:
    ptx = r.get("ptx") or {}
    if op == "QAT step":
      ops = ", ".join(f"{k} x{c}" for k, c in r["ops"][:12])
    else:
      ops = ", ".join(f"{o.split(':')[-1]} {b}"
                      + (f" ({ptx[_kname(o)]} ins)" if _kname(o) in ptx else "")
                      for o, b in r["ops"])
    out.append(f"| {fid} | {op} | {r['kernels']} | {r['tiny']} | {r['MB']} | "
               f"{r['est_us']} | {r['transposes']} | {ops} |")
  if _BASE.value:
    import json  # pylint: disable=g-import-not-at-top
    with open(_BASE.value) as f:
      old = {(r["format"], r["program"]): r for r in json.load(f)}
    out += ["", f"Against `{os.path.basename(_BASE.value)}` "
            f"({_BASE_LABEL.value or 'an earlier run of this command'}): before -> "
            "after. PTX: the instructions of the kernel that "
            "moves the most bytes (the elementwise pass, as a rule).", "",
            "| format | program | kernels | tiny | MB | PTX of the main kernel |",
            "|---|---|---|---|---|---|"]
    for fid, op, r in rows:
      o = old.get((fid, op))
      if o is None:
        continue
      px_new, px_old = _main_ptx(r), _main_ptx(o)
      out.append(f"| {fid} | {op} | {o['kernels']} -> {r['kernels']} | "
                 f"{o.get('tiny', '?')} -> {r['tiny']} | "
                 f"{o['MB']} -> {r['MB']} | "
                 + (f"{px_old} -> {px_new} |" if px_new and px_old else " |"))
  text = "\n".join(out) + "\n"
  if _JSON.value:
    import json  # pylint: disable=g-import-not-at-top
    with open(_JSON.value, "w") as f:
      json.dump([dict(format=fid, program=op, kernels=r["kernels"], tiny=r["tiny"],
                      MB=r["MB"],
                      transposes=r["transposes"], ops=r["ops"], ptx=r.get("ptx"))
                 for fid, op, r in rows], f, indent=1)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text)
  else:
    print(text)


if __name__ == "__main__":
  app.run(main)
