"""The quantizers compute along the scale axis where it lies (issue 12).

A ``[K, N]`` weight with scales along axis 0 (per output channel, groups of K,
MX/NVFP4 blocks of K) is reshaped to ``[K / g, g, N]`` and reduced over the
middle axis: no transpose and no full-size copy anywhere in the compiled
program. The CPU's optimized HLO is the proxy checked here (the GPU compiler
starts from the same HLO; experiments/bench_primitives.py records each GPU
program's kernel and transpose counts).
"""
import re

import jax
import jax.numpy as jnp
import pytest

import lowbit_jax as lb

K, N = 256, 128


def _moves(text: str, size: int) -> list:
  """Transposes anywhere, and top-level copies of at least half the tensor.

  (A copy inside a fusion is the fusion's output written in its layout, no
  separate pass: XLA's CPU writes a pre-reduction elementwise result so.)
  """
  bad = re.findall(r"= \S+ transpose\(", text)
  entry = text[text.index("\nENTRY"):]
  for dims in re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} copy\(", entry):
    n = 1
    for d in dims.split(","):
      n *= int(d) if d else 1
    if n * 2 >= size:
      bad.append(f"copy of [{dims}]")
  return bad


def _compiled(f, *args) -> str:
  return jax.jit(f).lower(*args).compile().as_text()


def test_detector_sees_a_transpose():
  x = jnp.zeros((K, N), jnp.bfloat16)
  assert _moves(_compiled(lambda v: v.T * 2, x), x.size)


_SLOW = pytest.mark.slow


@pytest.mark.parametrize("fmt,kw", [
    ("mxfp4", {}), ("mxfp8_e4m3", {}), ("nvfp4", {}), ("int4", dict(group_size=128)),
    pytest.param("mxfp6_e2m3", {}, marks=_SLOW), pytest.param("mxint8", {}, marks=_SLOW),
    pytest.param("int3", dict(group_size=128), marks=_SLOW),
    pytest.param("int8", {}, marks=_SLOW), pytest.param("fp8_e4m3", {}, marks=_SLOW)],
    ids=lambda v: v if isinstance(v, str) else "")
def test_no_transpose_along_axis0(fmt, kw):
  x = jnp.asarray(jax.random.normal(jax.random.key(0), (K, N)), jnp.bfloat16)
  spec = lb.QuantSpec(fmt, axis=0, **kw)
  q = lb.quantize(x, spec)
  # Codes pack along K in place: [K * bits / 8, N].
  assert q.codes.shape[1] == N and q.scale.shape[1] == N
  progs = {"quantize": _compiled(lambda v: lb.quantize(v, spec), x),
           "dequantize": _compiled(lb.dequantize, q),
           "fake_quant": _compiled(lambda v: lb.fake_quant(v, spec), x)}
  for op, text in progs.items():
    assert not _moves(text, x.size), (fmt, op, _moves(text, x.size))


# -- what the elementwise pass computes (issue 12) ----------------------------


def _computations(text: str) -> dict:
  out, cur = {}, None
  for line in text.split("\n"):
    m = re.match(r"^(?:ENTRY )?%([\w.\-]+) \(", line)
    if m:
      cur = m.group(1)
      out[cur] = []
    elif cur and line.strip() == "}":
      cur = None
    elif cur:
      out[cur].append(line)
  return out


def _elements(shape: str) -> int:
  n = 0
  for dims in re.findall(r"\w+\[([\d,]*)\]", shape):
    k = 1
    for d in dims.split(","):
      k *= int(d) if d else 1
    n = max(n, k)
  return n


def _full_size_ops(text: str, size: int) -> dict:
  """Opcode counts inside the top-level fusions that read or write at least
  half of ``size`` elements (the passes over the tensor), nested ones too."""
  comps = _computations(text)
  entry = text[text.index("\nENTRY"):]
  counts = {}
  for line in entry.split("\n")[1:]:
    m = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = (.+?) fusion\(.*calls=%([\w.\-]+)", line)
    if not m:
      continue
    body = comps.get(m.group(2), [])
    params = [ln.split(" = ")[1] for ln in body if " parameter(" in ln]
    if max([_elements(m.group(1))] + [_elements(p) for p in params]) * 2 < size:
      continue
    todo, seen = [m.group(2)], {m.group(2)}
    while todo:
      for ln in comps.get(todo.pop(), []):
        op = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = \S+ ([a-z\-]+)\(", ln)
        if op:
          counts[op.group(1)] = counts.get(op.group(1), 0) + 1
        for sub in re.findall(r"calls=%([\w.\-]+)", ln):
          if sub not in seen:
            seen.add(sub)
            todo.append(sub)
  return counts


# (format, keywords, most count-leading-zeros, most compares) in the passes
# over the tensor. Rounding onto FP4/FP6 grids and encoding their codes once
# normalized every element with a count-leading-zeros chain (the GPU kernels
# were compute-bound: MXFP4 quantize 402 us against int8's 134 on the H200);
# NF4 rounded with two table walks and a distance comparison (95 compares in
# quantize, 874 us). E8M0 scales take one per block (fused into the pass on
# CPU). ``jnp.ldexp`` (a ``power`` per element) is never there.
_PASS_BUDGET = [("fp4_e2m1", dict(group_size=32), 0, 12),
                ("fp6_e2m3", {}, 0, 12),
                ("nvfp4", {}, 0, 12),
                ("mxfp4", {}, 1, 16),
                ("fp8_e4m3", {}, 0, 12),
                ("nf4", {}, 0, 60)]


@pytest.mark.parametrize("fmt,kw,clz,cmp", _PASS_BUDGET,
                         ids=[f[0] for f in _PASS_BUDGET])
def test_elementwise_pass_stays_cheap(fmt, kw, clz, cmp):
  x = jnp.asarray(jax.random.normal(jax.random.key(0), (K, N)), jnp.bfloat16)
  spec = lb.QuantSpec(fmt, axis=0, **kw)
  for op, f in (("quantize", lambda v: lb.quantize(v, spec)),
                ("fake_quant", lambda v: lb.fake_quant(v, spec))):
    ops = _full_size_ops(_compiled(f, x), x.size)
    assert ops, (fmt, op, "no pass over the tensor found: the HLO parser is stale")
    assert ops.get("power", 0) == 0, (fmt, op, ops)
    assert ops.get("count-leading-zeros", 0) <= clz, (fmt, op, ops)
    assert ops.get("compare", 0) <= cmp, (fmt, op, ops)


def test_small_blocks_along_k_reduce_elementwise():
  """MX blocks of 32 along K: an elementwise max tree, not a reduce (XLA's GPU
  tiles a reduce of 32 rows; one of fewer rows runs as a loop at bandwidth)."""
  x = jnp.asarray(jax.random.normal(jax.random.key(0), (K, N)), jnp.bfloat16)
  text = jax.jit(lambda v: lb.quantize(v, lb.QuantSpec("mxfp4", axis=0))).lower(
      x).as_text(dialect="hlo")
  assert not re.search(r"= \w+\[\d+,32,\d+\]\S* reduce\(", text), "a reduce over 32"
  assert "maximum(" in text


# -- the GPU programs, from XLA's deviceless GPU compiler ---------------------


def _cuda_site():
  """The folder holding the CUDA PJRT plugin of this jax (compile-only), or None.

  ``LOWBIT_CUDA_PLUGIN_SITE``, else /tmp/cuda_site (how to make it:
  experiments/gpu_fusion_survey.py's docstring).
  """
  import glob  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  site = os.environ.get("LOWBIT_CUDA_PLUGIN_SITE", "/tmp/cuda_site")
  ok = glob.glob(os.path.join(site, f"jax_cuda*_plugin-{jax.__version__}.dist-info"))
  return site if ok else None


# (format, keywords, program) -> (most kernels, most MB moved by them) for a
# bf16 [8192, 8192] on the H200-like target of gpu_fusion_survey: a regression
# that splits a pass or writes an intermediate out shows here.
_GPU_BUDGET = {
    ("fp8_e4m3", "quantize"): (5, 340), ("fp8_e4m3", "fake_quant"): (5, 410),
    ("mxfp8_e4m3", "quantize"): (3, 382), ("mxfp8_e4m3", "fake_quant"): (3, 482),
    ("mxfp4", "quantize"): (3, 348), ("mxfp4", "fake_quant"): (3, 482),
    # NVFP4 fake_quant: 8 from 0864d49 (the tensor scale split into its
    # significand and a power of two for tiny ranges) to session 42, which put
    # the tensor scale's scalars into one kernel (core's _grid: one vector
    # behind one barrier); quantize keeps two scalar kernels, one of them its
    # tensor-scale output.
    ("nvfp4", "quantize"): (6, 400), ("nvfp4", "fake_quant"): (6, 498),
    ("fp4_e2m1_g32", "quantize"): (3, 346), ("fp4_e2m1_g32", "fake_quant"): (3, 456),
    ("nf4", "quantize"): (4, 330), ("nf4", "fake_quant"): (4, 435),
    ("int4_g128", "quantize"): (4, 317), ("int4_g128", "fake_quant"): (4, 420),
    ("mxfp6_e2m3", "quantize"): (3, 365), ("mxfp6_e2m3", "fake_quant"): (3, 482),
    # TWN: two passes for the scale (mean |x|, then the count and the sum of
    # the selected |x| in one reduction) and one for the codes; 575 / 693 MB
    # while the count was a reduction of its own.
    ("ternary", "quantize"): (10, 440), ("ternary", "fake_quant"): (10, 558),
}


def _survey(tmp_path, *flags) -> list:
  """The rows of ``experiments.gpu_fusion_survey`` with ``flags`` (skips
  without the CUDA plugin)."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  site = _cuda_site()
  if site is None:
    pytest.skip(f"no CUDA PJRT plugin {jax.__version__} (set LOWBIT_CUDA_PLUGIN_SITE)")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = tmp_path / "survey.json"
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-m", "experiments.gpu_fusion_survey",
                  f"--plugin_site={site}", "--matmul_m=", *flags, f"--json_out={out}",
                  f"--out={tmp_path / 'survey.md'}"], cwd=root, env=env, check=True,
                 capture_output=True, timeout=900)
  return json.loads(out.read_text())


@pytest.mark.slow
def test_gpu_programs_within_budget(tmp_path):
  fmts = sorted({f for f, _ in _GPU_BUDGET})
  rows = _survey(tmp_path, f"--formats={','.join(fmts)}", "--ops=quantize,fake_quant")
  assert len(rows) == len(_GPU_BUDGET)
  for r in rows:
    kernels, mb = _GPU_BUDGET[(r["format"], r["program"])]
    assert r["kernels"] <= kernels and r["MB"] <= mb, r
    assert r["transposes"] == 0, r
    if r["format"].startswith("mx") or r["format"].endswith("_g32"):
      # the block amax as a loop kernel, not the tiled column reduction
      assert not any(k.startswith("fusion:kInput") and "reduce" in k and b > 100
                     for k, b in r["ops"]), r


# variant -> (most kernels, most tiny ops) of the base LM's QAT step on the
# H200-like target, jitted as the training loop jits it (gpu_fusion_survey
# --qat; benchmarks/qat_step_programs_s45.md): a fake quantization that adds
# launches per quantized tensor, or a constant metric copied on the device
# (train.split_constant_metrics), shows here.
_QAT_BUDGET = {"NVFP4 W+A": (1453, 304), "int8 W+A (STE)": (1091, 107)}


@pytest.mark.slow
def test_gpu_qat_step_within_budget(tmp_path):
  rows = {(r["format"], r["program"]): r for r in _survey(
      tmp_path, "--formats=nvfp4", "--ops=fake_quant", f"--qat={','.join(_QAT_BUDGET)}")}
  for name, (kernels, tiny) in _QAT_BUDGET.items():
    r = rows[(name, "QAT step")]
    assert r["kernels"] <= kernels and r["tiny"] <= tiny, (name, r["kernels"], r["tiny"])
  assert rows[("nvfp4", "fake_quant")]["kernels"] <= _GPU_BUDGET[("nvfp4", "fake_quant")][0]


# (weight, M) -> most MB moved by the non-kernel real-mode matmul x[M, 8192] @
# a [8192, 8192] weight on the H200-like target: 4-bit per-channel codes go
# into the GEMM as XLA's int4 (ops._native_4bit_codes), a group-scaled weight
# at small M into a dot batched over its groups (ops._group_scaled_dot);
# before either, both wrote a dequantized bf16 copy of the weight (302-313 MB,
# benchmarks/matmul_programs.md).
_MATMUL_BUDGET = {("int4", 1): 40, ("int4", 16): 50, ("int4_g128", 1): 45,
                  ("int4_g128", 16): 115}


@pytest.mark.slow
def test_gpu_small_m_matmul_reads_the_codes_once(tmp_path):
  ms = sorted({m for _, m in _MATMUL_BUDGET})
  rows = {(r["format"], r["program"]): r for r in _survey(
      tmp_path, "--formats=int4", "--ops=dequantize",
      f"--matmul_m={','.join(map(str, ms))}")}
  for (fid, m), mb in _MATMUL_BUDGET.items():
    r = rows[(fid, f"matmul M={m}")]
    assert r["MB"] <= mb, (fid, m, r)
