r"""SASS instructions of the weight-only kernel's group-scale conversion, per
four scales, with and without ``Config.scale_words``, on a machine without a
GPU.

Each path is a PTX kernel (``experiments/ptx_check.io_probe_kernel``: inputs
loaded from and outputs stored to global memory, so nothing folds away)
that turns four one-byte scales in shared memory into four bf16 pairs, each
holding its scale twice (the operand of the per-register multiply):

* ``per scale``: what the kernel's MLIR does without ``scale_words``
  (``_scale_to_bf16``), written as the PTX that LLVM makes of it: a byte
  load per scale, then for E8M0 a shift and two compare-and-selects (codes
  0 and 255), for E4M3 the hardware conversion through f16 and f32
  (``_E4M3_PTX``) and the rounding to bf16;
* ``word``: ``gpu_weight_only.scale_word_ptx`` itself.

``ptxas`` compiles each for sm_90a and ``nvdisasm`` lists the SASS, whose
instructions are counted without the probe's frame. A static count, not a
timing: in the kernel ptxas schedules these among the decode and the WGMMA.
Needs ``ptxas`` (the CUDA toolkit) and ``nvdisasm`` (``pip install
nvidia-cuda-nvdisasm``)::

    PYTHONPATH=. python3 -m experiments.scale_words_sass --md_out=benchmarks/scale_words_sass.md
"""
from __future__ import annotations

import jax
from absl import app

from experiments import ptx_check


# The per-scale paths as LLVM lowers the kernel's MLIR (arith.extui, shli,
# cmpi + select twice; or the E4M3 asm block then arith.truncf), then the
# broadcast to both lanes: one scale at shared address {addr} to {out}.
# experiments/decode_sass.py writes its per-scale steps with these too.
PER_SCALE_PTX = {
    "e8m0": """{{
.reg .b16 c, t;
.reg .pred p, q;
ld.shared.u8 c, [{addr}];
shl.b16 t, c, 7;
setp.eq.s16 p, c, 0;
selp.b16 t, 0x0040, t, p;
setp.eq.s16 q, c, 255;
selp.b16 t, 0x7FC0, t, q;
mov.b32 {out}, {{t, t}};
}}""",
    "e4m3": """{{
.reg .b16 c, lo, hi, b;
.reg .b32 t;
.reg .f32 f;
ld.shared.u8 c, [{addr}];
cvt.rn.f16x2.e4m3x2 t, c;
mov.b32 {{lo, hi}}, t;
cvt.f32.f16 f, lo;
cvt.rn.bf16.f32 b, f;
mov.b32 {out}, {{b, b}};
}}""",
}


def per_scale_ptx(kind: str) -> str:
  """Four scales by the per-scale path: $0..$3 from the bytes at $4."""
  return "\n".join(PER_SCALE_PTX[kind].format(addr=f"$4+{i}", out=f"${i}")
                   for i in range(4))


def rows():
  """``[(kind, path, histogram)]`` for both scale kinds and both paths."""
  from lowbit_jax.kernels import gpu_weight_only as wo  # pylint: disable=g-import-not-at-top
  ptxas, nvdisasm = ptx_check.require_tools()
  out = []
  for kind in ("e8m0", "e4m3"):
    for path, asm in (("per scale", per_scale_ptx(kind)),
                      ("word (scale_words)", wo.scale_word_ptx(kind))):
      block = ptx_check.AsmBlock(asm, "=r,=r,=r,=r,r")
      kernel = ptx_check.io_probe_kernel(block, smem_words=64)
      out.append((kind, path, ptx_check.sass_histogram(kernel, ptxas, nvdisasm)))
  return out


def report(results) -> str:
  version = ptx_check.ptxas_version()
  lines = ["# Group-scale conversion: SASS per four scales", "",
           "Command: `PYTHONPATH=. python3 -m experiments.scale_words_sass "
           "--md_out=benchmarks/scale_words_sass.md` (CPU, no GPU; jax " + jax.__version__ + ", " + version +
           ", sm_90a; nvdisasm). Static instruction counts of the "
           "conversion alone (experiments/scale_words_sass.py says how the "
           "per-scale path is written), not timings. Here each output is "
           "stored, so both paths pay a PRMT a scale to repeat the scale in "
           "both lanes; in the kernel the per-scale path's is free (its "
           "HMUL2 reads the low half twice, `.H0_H0`, in session 34's "
           "Nsight listing, benchmarks/kernels_h100_runs/"
           "ncu_sass_wgmma_s34a.txt.gz), so there it costs one instruction "
           "a scale less than counted here, and the word path's PRMTs do "
           "the conversion itself.", "",
           "| scales | path | SASS / 4 scales | per scale | instructions |",
           "|---|---|---|---|---|"]
  lines += [f"| {kind} | {path} | {sum(h.values())} | {sum(h.values()) / 4:.2f} "
            f"| {ptx_check.opcode_mix(h)} |" for kind, path, h in results]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  ptx_check.write_report(report(rows()))


if __name__ == "__main__":
  app.run(main)
