r"""SASS instructions per weight element of the weight-only kernel's decode
step, estimated on a machine without a GPU.

The Mosaic GPU kernel itself is compiled to PTX only on a device. This
writes a PTX kernel of one K step of one thread of the one-warpgroup decode
kernel on wgmma-ordered 4-bit codes (a 64 x 256 weight tile, 128 elements a
thread, M = 1..8): the sixteen code words loaded from shared memory, decoded
with the kernel's own PTX blocks (Mosaic GPU's int4 conversion as the lowered
kernel emits it, ``_E2M1_PTX``, the table decode or, for codes in the
split orders, ``int4_split_ptx`` / ``e2m1_split_ptx``, the scale conversions of
``_scale_to_bf16`` written as LLVM emits them or ``scale_word_ptx``), each
register multiplied by its group scale, and the sixteen WGMMAs
(m64n8k16, A from registers) that consume them. ``ptxas`` compiles it for
sm_90a, ``nvdisasm`` lists the SASS, and the instructions (the probe's loads
of its inputs and stores of its outputs left out) are divided by 128.

What it leaves out: the pipeline's own instructions (barrier waits, TMA
issue, address arithmetic: about 0.3 an element in the Nsight listing of
``benchmarks/kernels_h200_notes.md``) and any register pressure the rest of
the kernel adds. Compare its numbers with the Nsight column of the notes
(H100, session 34): int4 per channel 2.56, int4 g128 3.02, MXFP4 (table
decode) 4.75, NVFP4 (table decode, two K chunks) 5.29 instructions an element.

    PYTHONPATH=. python3 -m experiments.decode_sass --md_out=benchmarks/decode_sass.md

Needs ``ptxas`` (the CUDA toolkit) and ``nvdisasm`` (``pip install
nvidia-cuda-nvdisasm``).
"""
from __future__ import annotations

import collections
import gzip

import jax
from absl import app
from absl import flags

from experiments import ptx_check
from experiments import scale_words_sass

_LISTING = flags.DEFINE_string(
    "nsight_listing", "benchmarks/kernels_h100_runs/ncu_sass_wgmma_s34a.txt.gz",
    "an Nsight Compute SASS listing of the kernels (experiments/ncu_sass_mix.py "
    "reads the same) whose loop bodies the estimate is compared with; empty: "
    "no comparison")
# The listing's kernels, in its launch order, and the estimate of each.
_LISTED = (("int4_g128@wgmma", "int4_g128"), ("mxfp4@wgmma", "mxfp4 (table)"),
           ("nvfp4@wgmma", "nvfp4 (table)"))


ELEMENTS = 128  # weight elements a thread decodes in one 64 x 256 step
_WORDS = 16  # 32-bit code words a thread loads a step (8 codes each)
_WGMMA = ("wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 "
          "{{%d0, %d1, %d2, %d3}}, {{%a{0}, %a{1}, %a{2}, %a{3}}}, %desc, %acc, 1, 1, 0;")

# Mosaic GPU's signed int4 -> bf16 pair (the block the lowered kernel holds:
# experiments/ptx_check on an int4 kernel), $1 = codes, $2 = codes >> 4.
_INT4 = """{{
.reg .b32 s<4>;
prmt.b32 s1, {w}, {w4}, {sel};
lop3.b32 s2, s1, 0x000F000F, 0x43084308, 0x6A;
mov.b32 s3, 0x43084308;
sub.bf16x2 {out}, s2, s3;
}}"""

_BF16_ONE = """{{
.reg .b16 b;
ld.shared.b16 b, [{addr}];
mov.b32 {out}, {{b, b}};
}}"""

CASES = {
    # name: (format, decode, scale path)
    "int4_pc": ("int4", None, None),
    "int4_g128": ("int4", None, "bf16"),
    "fp4_g32 (table)": ("fp4_e2m1", "lut", "bf16"),
    "fp4_g32 (table, lut_regs)": ("fp4_e2m1", "lut_regs", "bf16"),
    "mxfp4 (fast)": ("mxfp4", "fast", "per scale"),
    "mxfp4 (table)": ("mxfp4", "lut", "per scale"),
    "mxfp4 (table, scale_words)": ("mxfp4", "lut", "words"),
    "nvfp4 (table)": ("nvfp4", "lut", "per scale"),
    "nvfp4 (table, scale_words)": ("nvfp4", "lut", "words"),
    "mxfp4 (table, lut_regs)": ("mxfp4", "lut_regs", "per scale"),
    "mxfp4 (table, lut_regs, scale_words)": ("mxfp4", "lut_regs", "words"),
    "nvfp4 (table, lut_regs, scale_words)": ("nvfp4", "lut_regs", "words"),
    "int4_pc (wgmma_int4)": ("int4", "split", None),
    "int4_g128 (wgmma_int4)": ("int4", "split", "bf16"),
    "fp4_g32 (wgmma_e2m1)": ("fp4_e2m1", "split", "bf16"),
    "mxfp4 (wgmma_e2m1, scale_words)": ("mxfp4", "split", "words"),
    "nvfp4 (wgmma_e2m1, scale_words)": ("nvfp4", "split", "words"),
    # Config.acc_scale: no multiply in the decode; each group of 128 its own
    # accumulator, promoted after the wait with one FMA per accumulator
    # register (a thread's two rows: two bf16 scales widened to f32).
    "int4_g128 (acc_scale)": ("int4", None, "acc"),
    "int4_g128 (wgmma_int4, acc_scale)": ("int4", "split", "acc"),
}
_ACC_GROUPS = 2  # groups of 128 in the 256-deep step


def step_ptx(fmt: str, decode, scales) -> str:
  """The PTX kernel of one K step (module docstring)."""
  from lowbit_jax.kernels import gpu_weight_only as wo  # pylint: disable=g-import-not-at-top
  lines = [".version 8.4", ".target sm_90a", ".address_size 64",
           ".visible .entry step(.param .u64 p, .param .u32 sw, .param .u32 ss)",
           "{", ".reg .u64 %pa, %desc;", ".reg .pred %acc;", ".reg .b32 %sw, %ss, %t<8>;",
           f".reg .b32 %w<{_WORDS}>, %a<{4 * _WORDS}>, %s<{2 * _WORDS}>;",
           ".reg .f32 %d<4>;",
           ".shared .align 16 .b8 smem[16384];",
           "ld.param.u64 %pa, [p];", "ld.param.u32 %sw, [sw];",
           "ld.param.u32 %ss, [ss];", "ld.global.u64 %desc, [%pa];",
           "setp.ne.u64 %acc, %desc, 0;"]
  lines += [f"mov.f32 %d{i}, 0f00000000;" for i in range(4)]
  for q in range(_WORDS // 4):
    lines.append(f"ld.shared.v4.b32 {{%w{4*q}, %w{4*q+1}, %w{4*q+2}, "
                 f"%w{4*q+3}}}, [%sw+{16 * q}];")
  # words 0..7: row r, 32 columns each; words 8..15: row r + 8
  if decode == "split":  # "wgmma_int4" / "wgmma_e2m1" codes: the kernel's blocks
    block = wo.int4_split_ptx if fmt == "int4" else wo.e2m1_split_ptx
    for j in range(_WORDS):
      for i in range(4):
        lines.append(ptx_check.bind_operands(
            block(i), [f"%a{4 * j + i}", f"%w{j}"]))
  elif fmt == "int4":
    for j in range(_WORDS):
      lines.append(f"shr.b32 %t0, %w{j}, 4;")
      for i in range(4):
        sel = hex(0xF4F0 + 0x101 * i)
        lines.append(_INT4.format(w=f"%w{j}", w4="%t0", sel=sel,
                                  out=f"%a{4 * j + i}"))
  elif decode == "fast":
    lines.append("mov.b32 %t7, 0x7E807E80;")  # 2**126, both lanes
    for j in range(_WORDS):
      lines += [f"shr.b32 %t0, %w{j}, 4;", f"shl.b32 %t1, %w{j}, 4;"]
      for i in range(4):
        sm, ss = wo.e2m1_prmt_selectors(i)
        blk = wo._E2M1_PTX.format(sel_mag=hex(sm), sel_sign=hex(ss))  # pylint: disable=protected-access
        lines.append(ptx_check.bind_operands(
            blk, [f"%a{4 * j + i}", f"%w{j}", "%t0", "%t1"]))
        lines.append(f"mul.rn.bf16x2 %a{4 * j + i}, %a{4 * j + i}, %t7;")
  else:  # table decode
    u_lo, u_hi, t_lo, t_hi = wo._e2m1_lut_tables()  # pylint: disable=protected-access
    idx = wo._E2M1_LUT_IDX_PTX.format(u_lo=hex(u_lo), u_hi=hex(u_hi))  # pylint: disable=protected-access
    val = wo._E2M1_LUT_PTX.format(t_lo=hex(t_lo), t_hi=hex(t_hi))  # pylint: disable=protected-access
    regs = decode == "lut_regs"
    if regs:
      # Config.lut_regs: the words stored at the kernel's start (another
      # block: ptxas cannot forward them), read back once a step
      idx, val = wo._E2M1_LUT_IDX_REGS_PTX, wo._E2M1_LUT_REGS_PTX  # pylint: disable=protected-access
      fill = [f"st.shared.b32 [%ss+{256 + 4 * i}], {hex(v)};"
              for i, v in enumerate(wo.lut_table_words())]
      lines += [".reg .b32 %tk, %tul, %tuh, %ttl, %tth;", *fill, "bar.sync 0;",
                "ld.shared.v4.b32 {%tk, %tul, %tuh, %ttl}, [%ss+256];",
                "ld.shared.b32 %tth, [%ss+272];"]
    for j in range(_WORDS):
      for half in range(2):
        src = f"%w{j}" if half == 0 else "%t2"
        if half:
          lines.append(f"shr.b32 %t2, %w{j}, 16;")
        lines.append(f"and.b32 %t3, {src}, 0x7777;")
        lines.append(ptx_check.bind_operands(
            idx, ["%t4", "%t3", src, "%tk", "%tul", "%tuh"]))
        for part in range(2):
          sel = "%t4"
          if part:
            lines.append("shr.b32 %t5, %t4, 16;")
            sel = "%t5"
          lines.append(ptx_check.bind_operands(
              val, [f"%a{4 * j + 2 * half + part}", sel, "%ttl", "%tth"]))
  # group scales, one bf16 pair a (row, group)
  if scales is not None and scales != "acc":
    # bf16 scales: int4 in groups of 128 (four words a scale), fp4 of 32 (one)
    words_per_group = 4 if fmt == "int4" else 1
    if scales == "bf16":
      for g in range(_WORDS // words_per_group):
        lines.append(_BF16_ONE.format(addr=f"%ss+{2 * g}", out=f"%s{g}"))
    elif scales == "per scale":
      one = scale_words_sass.PER_SCALE_PTX["e8m0" if fmt == "mxfp4" else "e4m3"]
      n = _WORDS if fmt == "mxfp4" else 2 * _WORDS  # a word: 1 or 2 groups
      for g in range(n):
        lines.append(one.format(addr=f"%ss+{g}", out=f"%s{g}"))
    else:
      kind = "e8m0" if fmt == "mxfp4" else "e4m3"
      n = _WORDS if fmt == "mxfp4" else 2 * _WORDS
      for q in range(n // 4):
        lines.append(ptx_check.bind_operands(
            wo.scale_word_ptx(kind),
            [f"%s{4 * q + i}" for i in range(4)] + [f"%ss+{4 * q}"]))
    for j in range(_WORDS):
      for i in range(4):
        if scales == "bf16":
          g = j // words_per_group
        elif fmt == "mxfp4":
          g = j
        else:
          g = 2 * j + i // 2
        lines.append(f"mul.rn.bf16x2 %a{4 * j + i}, %a{4 * j + i}, %s{g};")
  lines.append("wgmma.fence.sync.aligned;")
  if scales == "acc":
    # a fresh (zeroed) accumulator a group, the group's WGMMAs into it
    per = _WORDS // _ACC_GROUPS
    lines.append(f".reg .f32 %e<{4 * _ACC_GROUPS}>, %f<{2 * _ACC_GROUPS}>;")
    lines.append(".reg .b16 %h<{0}>;".format(2 * _ACC_GROUPS))
    lines += [f"mov.f32 %e{i}, 0f00000000;" for i in range(4 * _ACC_GROUPS)]
    for k in range(_WORDS):
      g = k // per
      wg = _WGMMA.replace("%d0, %d1, %d2, %d3", ", ".join(
          f"%e{4 * g + i}" for i in range(4)))
      lines.append(wg.format(4 * k, 4 * k + 1, 4 * k + 2, 4 * k + 3))
  else:
    for k in range(_WORDS):
      lines.append(_WGMMA.format(4 * k, 4 * k + 1, 4 * k + 2, 4 * k + 3))
  lines += ["wgmma.commit_group.sync.aligned;", "wgmma.wait_group.sync.aligned 0;"]
  if scales == "acc":
    # each group's scales of the thread's two rows, widened, and the FMAs
    for g in range(_ACC_GROUPS):
      for r in range(2):
        lines.append(f"ld.shared.b16 %h{2 * g + r}, [%ss+{2 * (2 * g + r)}];")
        lines.append(f"cvt.f32.bf16 %f{2 * g + r}, %h{2 * g + r};")
      for i in range(4):
        lines.append(f"fma.rn.f32 %d{i}, %e{4 * g + i}, %f{2 * g + i // 2}, %d{i};")
  lines += [f"st.global.f32 [%pa+{8 + 4 * i}], %d{i};" for i in range(4)]
  lines += ["ret;", "}", ""]
  return "\n".join(lines)


def rows(names=None):
  """``[(case, histogram)]`` of ``names`` (default: every case)."""
  ptxas, nvdisasm = ptx_check.require_tools()
  return [(name, ptx_check.sass_histogram(step_ptx(*case), ptxas, nvdisasm))
          for name, case in CASES.items() if names is None or name in names]


def loop_bodies(path: str) -> list:
  """Per kernel of an Nsight SASS listing: (case, opcode counts of its K
  loop's body), the body being the instructions executed most often (once
  per warp and K step)."""
  from experiments import ncu_sass_mix  # pylint: disable=g-import-not-at-top
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    text = f.read()
  cases, kernels = ncu_sass_mix.parse(text)
  out = []
  for case, rows in zip(cases, kernels):
    top = max(ex for _, ex, _ in rows)
    ops = collections.Counter(op.split(".")[0] for op, ex, _ in rows if ex == top)
    out.append((case, ops))
  return out


def comparison(results, path: str) -> list[str]:
  """Rows comparing the estimate with the kernels' loop bodies in ``path``."""
  est = {name: collections.Counter() for name, _ in results}
  for name, hist in results:
    for op, n in hist.items():
      est[name][op.split(".")[0]] += n
  lines = ["", f"Against the kernels themselves: the loop body of each kernel in "
           f"`{path}` (Nsight Compute SASS listing, H100, session 34; the "
           "instructions executed once per warp and K step) and the estimate of "
           "the same step, instructions by opcode (listing / estimate):", "",
           "| kernel | listing | estimate | by opcode |", "|---|---|---|---|"]
  for (case, body), (listed, name) in zip(loop_bodies(path), _LISTED):
    if listed not in case or name not in est:
      continue
    e = est[name]
    keys = sorted(set(body) | set(e), key=lambda k: (-body.get(k, 0), k))
    mix = ", ".join(f"{k} {body.get(k, 0)}/{e.get(k, 0)}" for k in keys)
    lines.append(f"| {case} ({name}) | {sum(body.values())} | "
                 f"{sum(e.values())} | {mix} |")
  return lines


def report(results) -> str:
  version = ptx_check.ptxas_version()
  lines = ["# Decode step: SASS instructions per weight element (static)", "",
           "Command: `PYTHONPATH=. python3 -m experiments.decode_sass "
           "--md_out=benchmarks/decode_sass.md` (CPU, no GPU; jax " + jax.__version__ + ", " + version + ", sm_90a; "
           "nvdisasm). One K step of one thread of the one-warpgroup decode "
           "kernel on wgmma-ordered codes (64 x 256 weights, 128 elements a "
           "thread, M <= 8), written in PTX from the kernel's own blocks "
           "(experiments/decode_sass.py says what it leaves out: the "
           "pipeline's instructions, about 0.3 an element). Nsight Compute "
           "counted on the kernels themselves (H100, session 34): int4 per "
           "channel 2.56, int4 g128 3.02, MXFP4 table decode 4.75, NVFP4 "
           "table decode 5.29.", "",
           "| case | SASS / element | instructions per element |", "|---|---|---|"]
  lines += [f"| {name} | {sum(h.values()) / ELEMENTS:.2f} | "
            f"{ptx_check.opcode_mix(h, ELEMENTS, by_count=True)} |"
            for name, h in results]
  if _LISTING.value:
    lines += comparison(results, _LISTING.value)
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  ptx_check.write_report(report(rows()))


if __name__ == "__main__":
  app.run(main)
