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
