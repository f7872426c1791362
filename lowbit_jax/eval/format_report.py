"""Format report: storage and error of every registered number format.

For each format, a ``[rows, 1024]`` tensor is quantized along its last axis (the
format's own granularity there: one scale per row for plain integer and float
formats, the standard block for MX, NVFP4 and NF4) and read back. The report
gives the true storage in bits per element, measured from ``QArray.nbytes``
(codes, scales, zero points and the tensor scale), and the signal to
quantization noise ratio

  SQNR = 10 * log10(sum(x**2) / sum((x - dequantize(quantize(x)))**2))  [dB]

on standard-normal values and on heavy-tailed Student-t values (3 degrees of
freedom). Run it with ``python -m experiments.format_report``.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import platform
from typing import Callable, Optional, Sequence

import jax
import ml_dtypes
import numpy as np

from lowbit_jax import formats
from lowbit_jax.algorithms.rtn import sqnr_db
from lowbit_jax.core import QuantSpec, dequantize, quantize

ROW = 1024  # elements per row: the quantized (last) axis
DISTRIBUTIONS = ("normal", "student_t3")
# Integer and fp4 formats are also shown with groups of 128 along the row.
GROUPED = ("int8", "int4", "int3", "int2", "uint4", "fp4_e2m1")


@dataclasses.dataclass(frozen=True)
class FormatCase:
  """One row of the report.

  Attributes:
    label: the row's name.
    spec: how the tensor is quantized; None for a format that has no elements
      to quantize (the E8M0 scale format).
    note: shown in the table's last column.
  """
  label: str
  spec: Optional[QuantSpec]
  note: str = ""


def default_cases() -> list[FormatCase]:
  """Every registered format (aliases once), then grouped integer variants."""
  cases = []
  for name in formats.names():
    fmt = formats.get(name)
    if fmt.name != name:  # an alias (e4m3 -> fp8_e4m3): listed under its own name
      continue
    if isinstance(fmt, formats.FloatFormat) and fmt.special == "e8m0":
      cases.append(FormatCase(name, None, "scale format only (scale_dtype='e8m0')"))
      continue
    spec = QuantSpec(name, axis=-1)
    cases.append(FormatCase(name, spec, _granularity(spec)))
  for name in GROUPED:
    spec = QuantSpec(name, axis=-1, group_size=128)
    cases.append(FormatCase(f"{name} g128", spec, _granularity(spec)))
  return cases


def _granularity(spec: QuantSpec) -> str:
  scale = spec.scale_dtype
  extra = "" if spec.symmetric else ", uint8 zero point"
  if spec.tensor_scale:
    extra += ", fp32 tensor scale"
  if spec.group_size is None:
    return f"one {scale} scale per row{extra}"
  return f"{scale} scale per {spec.group_size}{extra}"


def make_data(n: int, seed: int = 0) -> dict[str, np.ndarray]:
  """``n`` float32 values of each distribution, shaped ``[n // 1024, 1024]``.

  Raises:
    ValueError: n is not a positive multiple of 1024.
  """
  if n <= 0 or n % ROW:
    raise ValueError(f"n must be a positive multiple of {ROW} (the row length), got "
                     f"{n}; e.g. --n=1048576")
  rng = np.random.default_rng(seed)
  shape = (n // ROW, ROW)
  return {"normal": rng.standard_normal(shape).astype(np.float32),
          "student_t3": rng.standard_t(3, shape).astype(np.float32)}


def measure(case: FormatCase, data: dict[str, np.ndarray]) -> dict:
  """Bits per element and SQNR per distribution of one case."""
  row = {"label": case.label, "note": case.note, "bits_per_element": None}
  if case.spec is None:
    row.update({d: None for d in data})
    return row
  spec = case.spec

  @jax.jit
  def run(v):
    q = quantize(v, spec)
    return q, dequantize(q)

  for dist, x in data.items():
    q, y = run(x)
    row[dist] = sqnr_db(x, np.asarray(y))
    row["bits_per_element"] = 8.0 * q.nbytes / x.size
  return row


def report(n: int = 1 << 20, seed: int = 0,
           cases: Optional[Sequence[FormatCase]] = None,
           log: Callable[[str], None] = lambda s: None) -> list[dict]:
  """Measures every case on ``n`` values of each distribution.

  Args:
    n: values per distribution (a multiple of 1024).
    seed: numpy seed of the data.
    cases: rows to measure; default ``default_cases()``.
    log: called with one line per finished row.

  Returns:
    One dict per case: label, note, bits_per_element, and SQNR in dB under
    each name of ``DISTRIBUTIONS`` (None for a scale-only format).
  """
  data = make_data(n, seed)
  rows = []
  for case in (default_cases() if cases is None else cases):
    row = measure(case, data)
    rows.append(row)
    log(_line(row))
  return rows


def _fmt(v: Optional[float], digits: int) -> str:
  if v is None:
    return "—"
  if math.isinf(v):
    return "inf"
  return f"{v:.{digits}f}"


def _line(row: dict) -> str:
  return (f"{row['label']:<18} bits/elem {_fmt(row['bits_per_element'], 3):>7}  "
          + "  ".join(f"{d} {_fmt(row[d], 2):>6} dB" for d in DISTRIBUTIONS))


def to_markdown(rows: Sequence[dict], *, n: int, seed: int, command: str) -> str:
  """The report as a markdown document (what docs/formats.md holds)."""
  today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
  lines = [
      "# Number formats: storage and error",
      "",
      "Every registered format of `lowbit_jax.formats` (aliases such as `e4m3` "
      "are listed under their own name, `fp8_e4m3`), quantized along the last "
      f"axis of a `[{n // ROW}, {ROW}]` float32 tensor "
      f"({n:,} values) with `lowbit_jax.quantize(x, name, axis=-1)`: one scale "
      "per row for integer and float formats, the format's block for MX (32, "
      "E8M0 scale), NVFP4 (16, fp8_e4m3 scale and an fp32 tensor scale) and NF4 "
      "(64). The `g128` rows use groups of 128 along the row instead.",
      "",
      "* **bits/elem**: true storage, `8 * QArray.nbytes / size`: packed codes "
      "(two 4-bit codes per byte, 8 3-bit codes in 3 bytes, 4 fp6 codes in 3 "
      "bytes, 4 2-bit or 8 1-bit codes per byte, 5-7 bit codes one per byte, "
      "9-16 bit codes one uint16 each), scales, zero points and the tensor scale.",
      "* **SQNR** = 10 log10(sum x² / sum (x − dequantize(quantize(x)))²) in dB, "
      "on standard-normal values and on Student-t values with 3 degrees of "
      f"freedom (numpy `default_rng({seed})`).",
      "",
      f"Produced by `{command}` on {today} with jax {jax.__version__} "
      f"({jax.default_backend()}), ml_dtypes {ml_dtypes.__version__}, "
      f"Python {platform.python_version()}.",
      "",
      "| format | bits/elem | SQNR normal (dB) | SQNR Student-t3 (dB) | granularity |",
      "|---|---:|---:|---:|---|",
  ]
  for r in rows:
    lines.append(f"| `{r['label']}` | {_fmt(r['bits_per_element'], 3)} | "
                 f"{_fmt(r['normal'], 2)} | {_fmt(r['student_t3'], 2)} | {r['note']} |")
  lines.append("")
  return "\n".join(lines)
