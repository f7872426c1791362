r"""AWQ and SmoothQuant through ``ptq_params`` on the smoke decoder, per front end.

The decoder is ``LlamaConfig.smoke()`` (GQA, SwiGLU, RMSNorm) with random
weights; the norm gains are given a per-channel magnitude spread
(``--spread``, log-uniform), so some input channels of every linear carry
outliers as in trained LMs. Nothing is trained: the table shows what each
method does on these weights (layer output errors and model output SQNR
against the float model), not accuracy on a task.

For each point the model is quantized by ``lb.ptq_params`` as a plain
function of its params (``quantize_function``'s front end) and as the Linen
module; the table gives the number of weight sites whose scaling folded, the
mean over sites of ``error / rtn_error`` (layer output error on the captured
inputs), the model output SQNR of fake mode on a held-out batch, and the
largest |real - fake| difference of the outputs (real mode with the returned
scales). Where ``apply_ptq`` applies (AWQ, the Linen module), its model
output SQNR is given too.

CPU run (repository root; what ``benchmarks/ptq_scaling_front_ends_cpu.md``
reports)::

  python -m experiments.ptq_scaling_front_ends --out_dir=benchmarks

Writes ``ptq_scaling_front_ends_<device>.json`` and ``.md`` (or ``--tag``) to
``--out_dir``, with the device, jax version and command.
"""
from __future__ import annotations

import json
import platform
import sys
import time

from absl import app
from absl import flags

from experiments import _report

_SPREAD = flags.DEFINE_float("spread", 20.0, "per-channel norm gain spread")
_SEED = flags.DEFINE_integer("seed", 0, "seed of weights and tokens")
_TAG = flags.DEFINE_string("tag", "", "output file stem (default "
                           "ptq_scaling_front_ends_<device>)")
_OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks", "where results go")

# (label, method, weight spec, activation spec or None)
_POINTS = (
    ("W4 g16 RTN", "rtn", ("int4", 16), None),
    ("W4 g16 AWQ", "awq", ("int4", 16), None),
    ("W4 g16 AWQ (no clip)", "awq_noclip", ("int4", 16), None),
    ("W3 g16 RTN", "rtn", ("int3", 16), None),
    ("W3 g16 AWQ", "awq", ("int3", 16), None),
    ("W8A8 RTN", "rtn", ("int8", None), "int8"),
    ("W8A8 SmoothQuant", "smoothquant", ("int8", None), "int8"),
)


def _sqnr(ref, out) -> float:
  import numpy as np
  ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
  return float(10 * np.log10(np.sum(ref ** 2) / max(np.sum((ref - out) ** 2), 1e-30)))


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  import lowbit_jax as lb
  from lowbit_jax import QuantRule, QuantSpec
  from lowbit_jax.flax import apply_ptq, quantize_linen
  from lowbit_jax.models.llama import Llama, LlamaConfig

  cfg = LlamaConfig.smoke()
  model = Llama(cfg)
  key = jax.random.key(_SEED.value)
  calib = jax.random.randint(jax.random.fold_in(key, 1), (4, 32), 0, cfg.vocab)
  held = jax.random.randint(jax.random.fold_in(key, 2), (4, 32), 0, cfg.vocab)
  params = jax.jit(model.init)(key, calib)["params"]
  keys = iter(jax.random.split(jax.random.fold_in(key, 3), 64))
  spread = float(np.log(_SPREAD.value))

  def gains(path, x):
    if path[-1].key == "scale":
      return x * jnp.exp(jax.random.uniform(next(keys), x.shape, minval=0.0,
                                            maxval=spread))
    return x
  params = jax.tree_util.tree_map_with_path(gains, params)
  fn = lambda p, t: model.apply({"params": p}, t)
  ref = jax.jit(fn)(params, held)

  rows = []
  for label, method, (fmt, group), act in _POINTS:
    wspec = QuantSpec(fmt, group_size=group) if group else QuantSpec(fmt)
    aspec = QuantSpec(act, axis=-1) if act else None
    rules = [QuantRule("lm_head"), QuantRule(".*", weight=wspec, activation=aspec)]
    row = {"point": label, "method": method}
    for front, m, p in (("function", fn, params), ("linen", model, {"params": params})):
      t0 = time.perf_counter()
      res = lb.ptq_params(m, p, [calib], rules, method=method)
      secs = time.perf_counter() - t0
      tree = res.params if front == "function" else res.params["params"]
      layers = res.report["layers"]
      qf = lb.quantize_function(fn, rules, mode="fake")
      fake = qf(tree, held)
      qr = lb.quantize_function(fn, rules, mode="real")
      rp = qr.quantize_params(tree, held, **lb.real_mode_kwargs(res, "function"))
      real = qr(rp, held)
      row[front] = {
          "folded": sum(e.get("fold") is not None for e in layers.values())
                    if method != "rtn" else 0,
          "sites": len(layers),
          "mean_error_vs_rtn": float(np.mean([e["error_vs_rtn"]
                                              for e in layers.values()])),
          "output_sqnr_db": _sqnr(ref, fake),
          "real_minus_fake": float(jnp.max(jnp.abs(real - fake))),
          "seconds": secs}
    if method == "awq":
      qp, _ = apply_ptq(model, params, [calib], "awq", wspec, layers=".*_proj")
      fake = jax.jit(quantize_linen(rules, mode="fake")(model.apply))(
          {"params": qp}, held)
      row["apply_ptq_output_sqnr_db"] = _sqnr(ref, fake)
    rows.append(row)
    print(json.dumps(row), flush=True)

  device = jax.devices()[0].device_kind
  dev = "cpu" if jax.devices()[0].platform == "cpu" else device.replace(" ", "_")
  stem = _TAG.value or f"ptq_scaling_front_ends_{dev}"
  meta = {"device": device, "jax": jax.__version__, "python": platform.python_version(),
          "command": "python -m experiments.ptq_scaling_front_ends " +
                     " ".join(sys.argv[1:]),
          "spread": _SPREAD.value, "seed": _SEED.value, "model": "LlamaConfig.smoke()"}
  lines = [f"# AWQ / SmoothQuant through ptq_params on the smoke decoder ({device})", "",
           f"`{meta['command']}` (jax {meta['jax']}; random weights, norm gain "
           f"spread {_SPREAD.value}; calibration 4x32 tokens, evaluation another "
           "4x32).", "",
           "| point | front end | folded / sites | mean error / RTN | output SQNR (dB) "
           "| max abs real - fake | apply_ptq SQNR (dB) |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    for front in ("function", "linen"):
      e = r[front]
      ap = r.get("apply_ptq_output_sqnr_db")
      lines.append(f"| {r['point']} | {front} | {e['folded']} / {e['sites']} | "
                   f"{e['mean_error_vs_rtn']:.3f} | {e['output_sqnr_db']:.2f} | "
                   f"{e['real_minus_fake']:.2e} | "
                   f"{'' if ap is None or front != 'linen' else f'{ap:.2f}'} |")
  _report.write(_OUT_DIR.value, stem, meta, rows, lines)


if __name__ == "__main__":
  app.run(main)
