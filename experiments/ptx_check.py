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
import fractions
import math
import os
import re
import shutil
import subprocess
import tempfile
from typing import Optional

from absl import app
from absl import flags
import numpy as np

from experiments import ncu_probe  # defines --cases (its wo: syntax)

_PTXAS = flags.DEFINE_string("ptxas", "", "ptxas binary (default: on PATH)")
_ARCH = flags.DEFINE_string("arch", "sm_90a", "ptxas --gpu-name")
_SHOW = flags.DEFINE_bool("show", False, "print each block's PTX kernel")
# the report file of experiments/decode_sass.py and scale_words_sass.py
MD_OUT = flags.DEFINE_string("md_out", "", "markdown report to write (the SASS "
                             "count scripts; default: print)")

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


def bind_operands(asm: str, names) -> str:
  """``asm`` with each ``$i`` replaced by ``names[i]`` (``$$`` by ``$``)."""
  def sub(m):
    if m.group(0) == "$$":
      return "$"
    i = int(m.group(1))
    if i >= len(names):
      raise ValueError(f"{asm!r} uses ${i} but has {len(names)} operands")
    return names[i]
  return re.sub(r"\$\$|\$(\d+)", sub, asm)


def _bind(block: AsmBlock):
  """``(declarations, body, inputs, outputs)``: a register (``%o<i>``,
  ``%i<j>``) for each operand of ``block`` of the type its constraint names,
  the block with its operands bound, and the input and output constraint
  kinds."""
  parts = [c for c in _split(block.constraints) if not c.startswith("~")]
  outs = [c.lstrip("=&") for c in parts if c.startswith("=")]
  ins = [c for c in parts if not c.startswith("=")]
  imms = dict(block.immediates)
  decls, names = [], []
  for i, kind in enumerate(outs):
    if kind not in _REG:
      raise ValueError(f"output constraint {kind!r} of {block.asm!r} is not "
                       f"one of {sorted(_REG)}")
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
  return decls, bind_operands(block.asm, names), ins, outs


def _module(entry: str, lines) -> str:
  return "\n".join([f".version {PTX_VERSION}", ".target sm_90a",
                    ".address_size 64", f".visible .entry {entry}", "{",
                    *lines, "ret;", "}", ""])


def probe_kernel(block: AsmBlock) -> str:
  """A PTX module of one kernel running ``block`` on fresh registers."""
  decls, body, _, _ = _bind(block)
  return _module("probe()", decls + [body])


_LD = {".b32": "ld.global.b32", ".b64": "ld.global.b64", ".b16": "ld.global.b16",
       ".f32": "ld.global.f32", ".f64": "ld.global.f64"}


def io_probe_kernel(block: AsmBlock, smem_words: int = 0) -> str:
  """Like ``probe_kernel``, but each input is loaded from global memory and
  each output stored there (so that ptxas can fold nothing away): the
  kernel whose SASS ``sass_histogram`` counts. ``smem_words`` 32-bit words of
  shared memory are declared (``probe_smem``) for blocks that load from it;
  a ``.b32`` input may be an address in it. Predicate operands are not
  supported."""
  decls, body, ins, outs = _bind(block)
  if "b" in outs + ins:
    raise ValueError(f"{block.asm!r}: predicate operands are not supported here")
  head = [".reg .u64 %pa;", *decls]
  if smem_words:
    head.append(f".shared .align 16 .b32 probe_smem[{smem_words}];")
  head.append("ld.param.u64 %pa, [p];")
  regs = [(f"%i{j}", c) for j, c in enumerate(ins) if c in _REG]
  regs += [(f"%o{i}", c) for i, c in enumerate(outs)]
  loads = [f"{_LD[_REG[c]]} {r}, [%pa+{8 * k}];"
           for k, (r, c) in enumerate(regs) if r.startswith("%i")]
  stores = [f"{_LD[_REG[c]].replace('ld.', 'st.')} [%pa+{8 * k}], {r};"
            for k, (r, c) in enumerate(regs) if r.startswith("%o")]
  return _module("probe(.param .u64 p)", head + loads + [body] + stores)


def find_nvdisasm(path: str = "") -> Optional[str]:
  """``nvdisasm``: ``path``, on PATH, beside ``ptxas``, or from the
  ``nvidia-cuda-nvdisasm`` wheel; else None."""
  if path:
    return path if os.path.exists(path) else None
  found = shutil.which("nvdisasm")
  if found:
    return found
  ptxas = find_ptxas()
  if ptxas:
    cand = os.path.join(os.path.dirname(os.path.realpath(ptxas)), "nvdisasm")
    if os.path.exists(cand):
      return cand
  try:
    import nvidia  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  for root in getattr(nvidia, "__path__", []):
    for sub in ("cu13", "cu12", "cuda_nvdisasm"):
      cand = os.path.join(root, sub, "bin", "nvdisasm")
      if os.path.exists(cand):
        return cand
  return None


# Instructions of the probe's frame, not of the block.
_FRAME_OPS = ("LDG", "STG", "LDC", "ULDC", "EXIT", "BRA", "NOP", "S2R", "S2UR")


def sass_histogram(ptx: str, ptxas: str, nvdisasm: str,
                   arch: str = "sm_90a") -> dict[str, int]:
  """Opcode -> count of the SASS ``ptxas`` makes of ``ptx``, without the
  frame's loads, stores, constant reads and exit (``_FRAME_OPS``)."""
  with tempfile.TemporaryDirectory() as d:
    ok, msg, cubin = _ptxas(ptx, ptxas, arch, d)
    if not ok:
      raise RuntimeError(f"ptxas rejected the kernel: {msg}")
    listing = subprocess.run([nvdisasm, "-c", cubin], check=True,
                             capture_output=True, text=True, timeout=120).stdout
  hist: dict[str, int] = {}
  for line in listing.splitlines():
    m = re.match(r"\s*/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
    if not m:
      continue
    op = m.group(1)
    if op.split(".")[0] in _FRAME_OPS:
      continue
    hist[op] = hist.get(op, 0) + 1
  return hist


def require_tools() -> tuple[str, str]:
  """(ptxas, nvdisasm) for the SASS count scripts, or a UsageError saying
  how to get them."""
  ptxas, nvdisasm = find_ptxas(), find_nvdisasm()
  if ptxas is None or nvdisasm is None:
    raise app.UsageError("needs ptxas (CUDA toolkit) and nvdisasm "
                         "(pip install nvidia-cuda-nvdisasm)")
  return ptxas, nvdisasm


def ptxas_version() -> str:
  """ptxas' version line (``Build cuda_13.0...``)."""
  out = subprocess.run([find_ptxas(), "--version"], capture_output=True,
                       text=True, check=False).stdout
  return out.strip().splitlines()[-1]


def opcode_mix(hist: dict, per: float = 1.0, by_count: bool = False) -> str:
  """``"OP n, ..."`` of a SASS histogram, each count divided by ``per``
  (two decimals unless ``per`` is 1), most frequent first or by name."""
  items = (sorted(hist.items(), key=lambda kv: -kv[1]) if by_count
           else sorted(hist.items()))
  fmt = (lambda v: f"{v}") if per == 1 else (lambda v: f"{v / per:.2f}")  # noqa: E731
  return ", ".join(f"{k} {fmt(v)}" for k, v in items)


def write_report(text: str) -> None:
  """Prints a SASS count script's report and writes it to ``--md_out``."""
  if MD_OUT.value:
    with open(MD_OUT.value, "w") as f:
      f.write(text)
  print(text)


def _ptxas(ptx: str, ptxas: str, arch: str, folder: str):
  """Compiles ``ptx`` for ``arch`` in ``folder``: (accepted, ptxas' messages,
  the cubin's path)."""
  src, cubin = os.path.join(folder, "p.ptx"), os.path.join(folder, "p.cubin")
  with open(src, "w") as f:
    f.write(ptx.replace(".target sm_90a", f".target {arch}"))
  r = subprocess.run([ptxas, "--gpu-name", arch, src, "-o", cubin],
                     capture_output=True, text=True, timeout=120, check=False)
  return r.returncode == 0, (r.stdout + r.stderr).strip(), cubin


def assemble(ptx: str, ptxas: str, arch: str = "sm_90a") -> tuple[bool, str]:
  """(whether ptxas accepted ``ptx``, its messages)."""
  with tempfile.TemporaryDirectory() as d:
    ok, msg, _ = _ptxas(ptx, ptxas, arch, d)
  return ok, msg


def check_lowered(lowered, ptxas: str, arch: str = "sm_90a"):
  """``[(block, ok, messages)]`` for every distinct inline-asm block of the
  Mosaic GPU kernels in ``lowered``."""
  out = []
  for module in mosaic_modules(lowered):
    for block in asm_blocks(module):
      ok, msg = assemble(probe_kernel(block), ptxas, arch)
      out.append((block, ok, msg))
  return out


# ----------------------------------------------------------------------------
# A bit-exact emulator of the integer and conversion PTX the kernels' blocks
# use, to check what a block computes on every input, on the CPU.
# ----------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _prmt(a: int, b: int, sel: int) -> int:
  """``prmt.b32`` in its default mode: byte ``i`` of the result is byte
  ``sel[i] & 7`` of ``{b, a}``, or that byte's sign replicated when
  ``sel[i] & 8``."""
  src = (b << 32) | a
  out = 0
  for i in range(4):
    nib = (sel >> (4 * i)) & 0xF
    byte = (src >> (8 * (nib & 7))) & 0xFF
    if nib & 8:
      byte = 0xFF if byte & 0x80 else 0
    out |= byte << (8 * i)
  return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
  """``lop3.b32``: bit ``k`` of the result is bit ``(a_k << 2) | (b_k << 1) |
  c_k`` of ``lut`` (the table PTX builds from a = 0xF0, b = 0xCC, c = 0xAA)."""
  out = 0
  for bit in range(32):
    idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
    out |= ((lut >> idx) & 1) << bit
  return out


def _cvt(kind: str, src: int) -> int:
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  if kind == "rn.f16x2.e4m3x2":
    lo, hi = (np.array(v, np.uint8).view(ml_dtypes.float8_e4m3fn).astype(
        np.float16).view(np.uint16) for v in (src & 0xFF, src >> 8))
    return int(lo) | (int(hi) << 16)
  if kind == "f32.f16":
    return int(np.array(src, np.uint16).view(np.float16).astype(
        np.float32).view(np.uint32))
  if kind == "rn.bf16.f16":
    return int(np.array(src, np.uint16).view(np.float16).astype(
        np.float32).astype(ml_dtypes.bfloat16).view(np.uint16))
  raise NotImplementedError(f"cvt.{kind}")


def _bf16_bits(x) -> int:
  """The bf16 bits of the exact value ``x`` (a Fraction, or a float that is
  exact) rounded to nearest even (subnormals kept, overflow to inf)."""
  if isinstance(x, float) and math.isnan(x):
    return 0x7FC0
  sign = 0x8000 if (x < 0 or (x == 0 and math.copysign(1.0, float(x)) < 0)) else 0
  a = abs(fractions.Fraction(x))
  if a == 0:
    return sign
  e = a.numerator.bit_length() - a.denominator.bit_length()
  if fractions.Fraction(2) ** e > a:
    e -= 1  # 2**e <= a < 2**(e + 1)
  quantum = fractions.Fraction(2) ** max(e - 7, -133)  # 8 significant bits
  r = round(a / quantum) * quantum  # half to even
  if r >= 2 ** 128:
    return sign | 0x7F80
  bits = int(np.array(float(r), np.float32).view(np.uint32)) >> 16
  return sign | bits


def _bf16x2(op, a: int, b: int) -> int:
  """``mul`` / ``add`` / ``sub.rn.bf16x2``: each 16-bit lane's exact result,
  rounded once."""
  out = 0
  for lane in range(2):
    va, vb = ((v >> (16 * lane)) & 0xFFFF for v in (a, b))
    fa, fb = (float(np.array(v << 16, np.uint32).view(np.float32)) for v in (va, vb))
    if math.isnan(fa) or math.isnan(fb) or math.isinf(fa) or math.isinf(fb):
      r = {"mul": fa * fb, "add": fa + fb, "sub": fa - fb}[op]
      bits = 0x7FC0 if math.isnan(r) else (0xFF80 if r < 0 else 0x7F80)
    else:
      qa, qb = fractions.Fraction(fa), fractions.Fraction(fb)
      r = {"mul": qa * qb, "add": qa + qb, "sub": qa - qb}[op]
      bits = _bf16_bits(r)
      if r == 0 and op == "mul" and (math.copysign(1, fa) * math.copysign(1, fb) < 0):
        bits = 0x8000
    out |= bits << (16 * lane)
  return out


def emulate(asm: str, inputs, n_out: int, smem: Optional[dict] = None) -> list:
  """Runs an inline-asm block on integer register values.

  Args:
    asm: the block's text with ``$i`` operands (outputs first).
    inputs: the input operands' bit patterns (ints), in order.
    n_out: how many outputs the block has.
    smem: ``{address: 32-bit word}`` for ``ld.shared.b32``.

  Returns:
    The outputs' bit patterns.

  Supports the instructions the kernels' decode blocks use (mov, and, or,
  xor, not, shl, shr, shf.r.wrap, add, sub, lop3, prmt in its default mode,
  mul / add / sub of bf16x2 (rounded once to nearest even),
  ld.shared.b32 and the cvt forms of ``_cvt``); anything else raises
  NotImplementedError.
  """
  regs = {f"${i}": v for i, v in enumerate([0] * n_out + list(inputs))}
  imm = re.compile(r"-?(0x[0-9a-fA-F]+|\d+)")

  def val(tok):
    tok = tok.strip()
    if tok in regs:
      return regs[tok]
    if imm.fullmatch(tok):
      return int(tok, 0) & _M32
    raise KeyError(f"unknown operand {tok!r} in {asm!r}")

  def operands(rest):
    """Top-level comma-separated operands; a ``{a, b}`` list stays one."""
    out, depth, cur = [], 0, ""
    for ch in rest:
      depth += (ch == "{") - (ch == "}")
      if ch == "," and depth == 0:
        out.append(cur.strip())
        cur = ""
      else:
        cur += ch
    return out + [cur.strip()] if cur.strip() else out

  def halves(tok):
    return [t.strip() for t in tok.strip("{} ").split(",")]

  for stmt in re.sub(r"//[^\n]*", "", asm).split(";"):
    stmt = " ".join(stmt.split()).lstrip("{} ").strip()  # scope braces
    if not stmt or stmt.startswith(".reg"):
      continue
    op, _, rest = stmt.partition(" ")
    args = operands(rest)
    base = op.split(".")[0]
    if base == "mov" and args[0].startswith("{"):  # mov.b32 {lo, hi}, w
      lo, hi = halves(args[0])
      w = val(args[1])
      regs[lo], regs[hi] = w & 0xFFFF, w >> 16
    elif base == "mov" and args[1].startswith("{"):  # mov.b32 w, {lo, hi}
      lo, hi = (val(t) & 0xFFFF for t in halves(args[1]))
      regs[args[0]] = lo | (hi << 16)
    elif base == "mov":
      regs[args[0]] = val(args[1])
    elif base in ("and", "or", "xor"):
      f = {"and": int.__and__, "or": int.__or__, "xor": int.__xor__}[base]
      regs[args[0]] = f(val(args[1]), val(args[2]))
    elif base == "not":
      regs[args[0]] = ~val(args[1]) & _M32
    elif base == "shl":
      regs[args[0]] = (val(args[1]) << min(val(args[2]), 32)) & _M32
    elif base == "shr" and op.endswith((".b32", ".u32")):
      regs[args[0]] = val(args[1]) >> min(val(args[2]), 32)
    elif base in ("add", "sub") and op.endswith((".u32", ".s32")):
      sign = 1 if base == "add" else -1
      regs[args[0]] = (val(args[1]) + sign * val(args[2])) & _M32
    elif op == "shf.r.wrap.b32":  # funnel shift right of (b:a), by c mod 32
      a, b, c = (val(t) for t in args[1:4])
      regs[args[0]] = (((b << 32) | a) >> (c % 32)) & _M32
    elif base in ("mul", "add", "sub") and op.endswith(".bf16x2"):
      regs[args[0]] = _bf16x2(base, val(args[1]), val(args[2]))
    elif op == "lop3.b32":
      regs[args[0]] = _lop3(*(val(t) for t in args[1:5]))
    elif op == "prmt.b32":
      regs[args[0]] = _prmt(val(args[1]), val(args[2]), val(args[3]))
    elif op == "ld.shared.b32":
      addr = val(args[1].strip("[] "))
      if smem is None or addr not in smem:
        raise KeyError(f"ld.shared.b32 from {addr:#x}, not in smem")
      regs[args[0]] = smem[addr]
    elif base == "cvt" and len(args) == 2:
      regs[args[0]] = _cvt(op[4:], val(args[1]))
    else:
      raise NotImplementedError(f"{op} in {asm!r}")
  return [regs[f"${i}"] for i in range(n_out)]


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
