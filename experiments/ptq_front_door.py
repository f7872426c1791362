r"""``apply_ptq`` against ``ptq_params`` on the smoke decoder (Linen), per method.

Which methods ``apply_ptq`` delegates to ``ptq_params`` rests on this table:
for each method both drivers quantize every linear of ``LlamaConfig.smoke()``
(random weights; int4, groups of 16) on one calibration batch, and the table
gives how many of the parameters differ and the largest difference relative
to the parameter's magnitude, for the kernels and for the scale grids
(``report["quant_scales"]`` against ``PTQResult.weight_scales``). "rtn",
"gptq", "quarot" and "spinquant" run through ``ptq_params`` (0 differences:
the same computation); "awq", "smoothquant" and "rotation" are ``apply_ptq``'s
Linen-only folds at call boundaries (docs/ptq_front_ends.md says why).

CPU run (repository root; what ``benchmarks/ptq_front_door_cpu.md`` reports)::

  python -m experiments.ptq_front_door --out_dir=benchmarks

Writes ``ptq_front_door_<device>.json`` and ``.md`` (or ``--tag``) to
``--out_dir``, with the device, jax version and command.
"""
from __future__ import annotations

import platform
import sys

from absl import app
from absl import flags

from experiments import _report

_SEED = flags.DEFINE_integer("seed", 0, "seed of weights and tokens")
_TAG = flags.DEFINE_string("tag", "", "output file stem (default ptq_front_door_<device>)")
_OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks", "where results go")

# (label, method, extra keywords of both drivers)
_POINTS = (
    ("RTN", "rtn", {}),
    ("GPTQ", "gptq", {}),
    ("QuaRot + RTN (online down_proj)", "quarot", {"online": ".*/down_proj/kernel"}),
    ("QuaRot + GPTQ (online down_proj)", "quarot",
     {"online": ".*/down_proj/kernel", "quantizer": "gptq"}),
    ("SpinQuant (2 steps) + RTN", "spinquant", {"spinquant": 2}),
    ("AWQ", "awq", {}),
    ("SmoothQuant", "smoothquant", {}),
    ("rotation", "rotation", {}),
)


def _flat(tree, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    p = f"{prefix}/{k}" if prefix else k
    out.update(_flat(v, p) if hasattr(v, "items") else {p: v})
  return out


def _differences(a: dict, b: dict) -> tuple:
  """(number of differing entries, largest relative difference) of two flat dicts."""
  import numpy as np
  n, worst = 0, 0.0
  for k, x in b.items():
    if k not in a:   # only one driver quantized it
      n += 1
      continue
    d = float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(x, np.float64))))
    if d:
      n += 1
      worst = max(worst, d / max(float(np.max(np.abs(x))), 1e-30))
  return n, worst


def main(argv):
  del argv
  import jax
  import lowbit_jax as lb
  from lowbit_jax import QuantRule, QuantSpec
  from lowbit_jax.algorithms import SpinQuantConfig
  from lowbit_jax.flax import apply_ptq
  from lowbit_jax.models.llama import Llama, LlamaConfig

  cfg = LlamaConfig.smoke()
  model = Llama(cfg)
  toks = jax.random.randint(jax.random.key(_SEED.value + 1), (2, 16), 0, cfg.vocab)
  params = jax.jit(model.init)(jax.random.key(_SEED.value), toks)["params"]
  spec = QuantSpec("int4", group_size=16)
  rows = []
  for label, method, kw in _POINTS:
    if "spinquant" in kw:
      kw = {**kw, "spinquant": SpinQuantConfig(steps=kw["spinquant"])}
    qp, rep = apply_ptq(model, params, [(toks,)], method, spec, **kw)
    res = lb.ptq_params(model, {"params": params}, [(toks,)],
                        [QuantRule(".*", weight=spec)], method=method, **kw)
    n_w, d_w = _differences(_flat(qp), _flat(res.params["params"]))
    scales = {p.replace("/weight_scale", "/kernel"): s
              for p, s in _flat(rep["quant_scales"]).items()}
    n_s, d_s = _differences(scales, res.weight_scales)
    rows.append({"point": label, "method": method, "params": len(_flat(qp)),
                 "params_differing": n_w, "max_rel_param_difference": d_w,
                 "scales": len(res.weight_scales), "scales_differing": n_s,
                 "max_rel_scale_difference": d_s})
    print(rows[-1], flush=True)
  device = jax.devices()[0].platform
  stem = _TAG.value or f"ptq_front_door_{device}"
  meta = {"device": device, "jax": jax.__version__, "python": platform.python_version(),
          "command": "python -m experiments.ptq_front_door " + " ".join(sys.argv[1:]),
          "seed": _SEED.value, "model": "LlamaConfig.smoke()"}
  lines = [f"# apply_ptq against ptq_params on the smoke decoder ({device})", "",
           f"`{meta['command']}` (jax {meta['jax']}; random weights, int4 g16 on "
           "every linear, one calibration batch of 2x16 tokens).", "",
           "| point | params differing | max rel. difference | scales differing "
           "| max rel. difference |", "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['point']} | {r['params_differing']} / {r['params']} | "
                 f"{r['max_rel_param_difference']:.2e} | {r['scales_differing']} / "
                 f"{r['scales']} | {r['max_rel_scale_difference']:.2e} |")
  _report.write(_OUT_DIR.value, stem, meta, rows, lines)


if __name__ == "__main__":
  app.run(main)
