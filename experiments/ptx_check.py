r"""Assembles every inline-PTX block of a Mosaic GPU kernel with ``ptxas``, on a
machine without a GPU.

The kernels' hand-written PTX (``llvm.inline_asm`` in ``inline_mgpu`` bodies:
the E2M1 decoders, the cluster exchanges, the E4M3 conversion) and Mosaic
GPU's own are compiled only when a kernel first runs on a device, so a typo,
a wrong operand type or an instruction the target lacks otherwise costs a
device call to find. This lowers a kernel for CUDA on the CPU (as the
lowering tests do), reads the Mosaic GPU module out of the custom call's
backend config, and for each distinct ``llvm.inline_asm`` writes a one-block
PTX kernel (each ``$i`` a register of the type its constraint names: ``r``
.b32, ``l`` .b64, ``h`` .b16, ``f`` .f32, ``d`` .f64, ``b`` .pred; an ``n``
operand its constant) and runs ``ptxas --gpu-name sm_90a`` on it. It checks
syntax, operand types and that the target has each instruction; not what the
code computes (the GPU tests and the interpreter's twins do that).

    PYTHONPATH=. python3 -m experiments.ptx_check --cases=wo:int4_pc:4096x1024:1:64,256,8,4,4,0,0,1,0,0,1

Cases use ``experiments/ncu_probe.py``'s syntax for the weight-only kernel
(``wo:<case>[@wgmma]:<K>x<N>:<M>[:<Config fields>]``). ``ptxas`` comes with
the CUDA toolkit (``nvcc``'s folder, or ``--ptxas``).
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from typing import Optional

from absl import app
from absl import flags

from experiments import ncu_probe  # defines --cases (its wo: syntax)

_PTXAS = flags.DEFINE_string("ptxas", "", "ptxas binary (default: on PATH)")
_ARCH = flags.DEFINE_string("arch", "sm_90a", "ptxas --gpu-name")
_SHOW = flags.DEFINE_bool("show", False, "print each block's PTX kernel")

PTX_VERSION = "8.4"  # wgmma, mapa, barrier.cluster, cvt e4m3x2: 7.8 - 8.0
_REG = {"r": ".b32", "l": ".b64", "h": ".b16", "f": ".f32", "d": ".f64",
        "b": ".pred"}


@dataclasses.dataclass(frozen=True)
class AsmBlock:
  """One ``llvm.inline_asm``: its text, constraint string and the values of
  its immediate (``n``) operands, by operand position."""
  asm: str
  constraints: str
  immediates: tuple = ()


def find_ptxas(path: str = "") -> Optional[str]:
  """``path``, else ``ptxas`` on PATH or beside ``nvcc``, else None."""
  if path:
    return path if os.path.exists(path) else None
  found = shutil.which("ptxas")
  if found:
    return found
  nvcc = shutil.which("nvcc")
  if nvcc:
    cand = os.path.join(os.path.dirname(os.path.realpath(nvcc)), "ptxas")
    if os.path.exists(cand):
      return cand
  return None


def _walk(op):
  for region in op.regions:
    for block in region.blocks:
      for o in block.operations:
        yield o.operation
        yield from _walk(o.operation)


def _constant_value(value) -> Optional[int]:
  owner = getattr(value.owner, "operation", value.owner)
  name = getattr(owner, "name", "")
  if not name.endswith("constant") or "value" not in owner.attributes:
    return None
  attr = owner.attributes["value"]
  try:
    from jax._src.lib.mlir import ir  # pylint: disable=g-import-not-at-top
    return int(ir.IntegerAttr(attr).value)
  except (ValueError, TypeError):
    return None


def mosaic_modules(lowered) -> list[bytes]:
  """The serialized Mosaic GPU modules of a ``jax.stages.Lowered`` (for CUDA)."""
  from jax._src.lib.mlir import ir  # pylint: disable=g-import-not-at-top
  out = []
  for op in _walk(lowered.compiler_ir("stablehlo").operation):
    if op.name != "stablehlo.custom_call":
      continue
    target = ir.StringAttr(op.attributes["call_target_name"]).value
    if not target.startswith("mosaic_gpu"):
      continue
    cfg = ir.DictAttr(op.attributes["mhlo.backend_config"])
    out.append(ir.StringAttr(cfg["module"]).value_bytes)
  return out


def asm_blocks(module: bytes) -> list[AsmBlock]:
  """The distinct inline-asm blocks of one serialized Mosaic GPU module."""
  from jax._src.interpreters import mlir as jmlir  # pylint: disable=g-import-not-at-top
  from jax._src.lib.mlir import ir  # pylint: disable=g-import-not-at-top
  ctx = jmlir.make_ir_context()
  ctx.allow_unregistered_dialects = True
  seen = {}
  with ctx, ir.Location.unknown():
    parsed = ir.Module.parse(module)
    for op in _walk(parsed.operation):
      # serialized modules name ops "stable_mosaic_gpu.llvm.inline_asm"
      if not op.name.endswith("llvm.inline_asm"):
        continue
      asm = ir.StringAttr(op.attributes["asm_string"]).value
      cons = ir.StringAttr(op.attributes["constraints"]).value
      ins = [c for c in _split(cons) if not c.startswith(("=", "~"))]
      imms = tuple((i, _constant_value(op.operands[i]))
                   for i, c in enumerate(ins) if c == "n")
      block = AsmBlock(asm, cons, imms)
      seen.setdefault(block, None)
  return list(seen)


def _split(constraints: str) -> list[str]:
  return [c for c in constraints.split(",") if c]


def probe_kernel(block: AsmBlock) -> str:
  """A PTX module of one kernel running ``block`` on fresh registers."""
  parts = [c for c in _split(block.constraints) if not c.startswith("~")]
  outs = [c for c in parts if c.startswith("=")]
  ins = [c for c in parts if not c.startswith("=")]
  imms = dict(block.immediates)
  decls, names = [], []
  for i, c in enumerate(outs):
    kind = c.lstrip("=&")
    if kind not in _REG:
      raise ValueError(f"output constraint {c!r} of {block.asm!r} is not one "
                       f"of {sorted(_REG)}")
    names.append(f"%o{i}")
    decls.append(f".reg {_REG[kind]} %o{i};")
  for j, c in enumerate(ins):
    if c.isdigit():  # tied to output c
      names.append(names[int(c)])
    elif c == "n":
      v = imms.get(j)
      if v is None:
        raise ValueError(f"immediate operand {j} of {block.asm!r} has no "
                         "constant value")
      names.append(str(v))
    elif c in _REG:
      names.append(f"%i{j}")
      decls.append(f".reg {_REG[c]} %i{j};")
    else:
      raise ValueError(f"input constraint {c!r} of {block.asm!r} is not one of "
                       f"{sorted(_REG)}, n or a tied output")

  def sub(m):
    tok = m.group(0)
    if tok == "$$":
      return "$"
    i = int(m.group(1))
    if i >= len(names):
      raise ValueError(f"{block.asm!r} uses ${i} but has {len(names)} operands")
    return names[i]

  body = re.sub(r"\$\$|\$(\d+)", sub, block.asm)
  return "\n".join([f".version {PTX_VERSION}", ".target sm_90a",
                    ".address_size 64", ".visible .entry probe()", "{",
                    *decls, body, "ret;", "}", ""])


def assemble(ptx: str, ptxas: str, arch: str = "sm_90a") -> tuple[bool, str]:
  """(whether ptxas accepted ``ptx``, its messages)."""
  with tempfile.TemporaryDirectory() as d:
    src = os.path.join(d, "probe.ptx")
    with open(src, "w") as f:
      f.write(ptx.replace(".target sm_90a", f".target {arch}"))
    r = subprocess.run([ptxas, "--gpu-name", arch, src, "-o",
                        os.path.join(d, "probe.cubin")],
                       capture_output=True, text=True, timeout=120, check=False)
  return r.returncode == 0, (r.stdout + r.stderr).strip()


def check_lowered(lowered, ptxas: str, arch: str = "sm_90a"):
  """``[(block, ok, messages)]`` for every distinct inline-asm block of the
  Mosaic GPU kernels in ``lowered``."""
  out = []
  for module in mosaic_modules(lowered):
    for block in asm_blocks(module):
      ok, msg = assemble(probe_kernel(block), ptxas, arch)
      out.append((block, ok, msg))
  return out


def lower_weight_only(spec: str):
  """Lowers one ``wo:`` case (``experiments/ncu_probe.py``) for CUDA."""
  op, name, k, n, rest = ncu_probe._parse(spec)  # pylint: disable=protected-access
  if op != "wo":
    raise app.UsageError(f"--cases: {spec!r}: only wo: cases are lowered here "
                         "(the quantizer's dispatch needs a GPU backend)")
  fn, args, _ = ncu_probe._weight_only(name, k, n, rest)  # pylint: disable=protected-access
  return fn.trace(*args).lower(lowering_platforms=("cuda",))


def main(argv):
  del argv
  ptxas = find_ptxas(_PTXAS.value)
  if ptxas is None:
    raise app.UsageError("no ptxas: install the CUDA toolkit or pass --ptxas")
  bad = 0
  for spec in ncu_probe.case_list(ncu_probe._CASES.value):  # pylint: disable=protected-access
    rows = check_lowered(lower_weight_only(spec), ptxas, _ARCH.value)
    print(f"{spec}: {len(rows)} inline-asm blocks, "
          f"{sum(not ok for _, ok, _ in rows)} rejected")
    for block, ok, msg in rows:
      if _SHOW.value or not ok:
        print(("ok" if ok else "REJECTED") + f"  constraints {block.constraints}")
        print(probe_kernel(block))
        if msg:
          print(msg)
      bad += not ok
  if bad:
    raise SystemExit(f"{bad} inline-asm blocks rejected by ptxas")


if __name__ == "__main__":
  app.run(main)
