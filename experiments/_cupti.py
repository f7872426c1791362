"""Device time per call from CUPTI, robust to programs whose launches vary.

``jax.experimental.mosaic.gpu.profiler.measure(fn, iterations=n)`` matches the
kernels of ``n`` calls by name and count; it raises when they differ between
calls ("Kernel names are not consistent", "The number of kernel launches is not
divisible by the number of iterations": seen on the H200 for the base model's
decode loop and for XLA's per-channel int8 quantize). Such a program is then
timed one call per ``measure`` and the calls' times are returned the same way.
"""
import statistics

_MISMATCH = ("not consistent", "not divisible")


def call_times_ms(fn, *args, iters: int) -> list:
  """Device milliseconds of each of ``iters`` calls of ``fn(*args)`` (GPU only).

  ``fn`` should have run once already (compiled, warm).

  Raises:
    RuntimeError: CUPTI recorded no kernel launch, or failed for another reason.
  """
  from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top
  try:
    _, ts = profiler.measure(fn, iterations=iters)(*args)
  except RuntimeError as e:
    if not any(m in str(e) for m in _MISMATCH):
      raise
    ts = []
    for _ in range(iters):
      t = profiler.measure(fn, iterations=1)(*args)[1]
      ts.append(t[0] if isinstance(t, (list, tuple)) else t)
  if ts is None or (isinstance(ts, (list, tuple)) and any(t is None for t in ts)):
    raise RuntimeError("CUPTI recorded no kernel launch")
  return [float(t) for t in ts] if isinstance(ts, (list, tuple)) else [float(ts)]


def median_ms(fn, *args, iters: int) -> float:
  """The median of ``call_times_ms``."""
  return statistics.median(call_times_ms(fn, *args, iters=iters))
