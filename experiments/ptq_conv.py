r"""PTQ on convolutions: RTN, GPTQ, AWQ and SmoothQuant on a small conv net.

The net (``_Net``) is an encoder-decoder of the shape image models use:
conv -> BatchNorm -> ReLU -> strided conv -> ReLU -> transposed conv
(``transpose_kernel``) -> ReLU -> transposed conv -> GELU -> conv. Its
weights are random (He scaled) with the spread of per-channel magnitudes
trained conv nets show: the BatchNorm scales and each layer's output
channels span ``--spread`` (a log-uniform factor), so some input channels
of every conv carry outliers. Nothing is trained: the table shows what each
algorithm does on these weights, not accuracy on a task.

For every method ``apply_ptq`` quantizes every conv; the table gives the
model output SQNR against the float model (real mode, which stores the
returned codes, is checked to store exactly the returned kernels), each conv's
layer output SQNR on its retained calibration patches (the report's
``output_sqnr_db``) and the fold status of the scalings. Calibration: one
batch; evaluation: another batch of the same distribution.

CPU run (repository root; what ``benchmarks/ptq_conv_cpu.md`` reports)::

  python -m experiments.ptq_conv --out_dir=benchmarks

Writes ``ptq_conv_<device>.json`` and ``.md`` (or ``--tag``) to ``--out_dir``,
with the device, jax version and command.
"""
from __future__ import annotations

import platform
import sys
import time

from absl import app
from absl import flags

from experiments import _report

_BATCH = flags.DEFINE_integer("batch", 8, "images per batch")
_SIZE = flags.DEFINE_integer("size", 16, "image height and width")
_SPREAD = flags.DEFINE_float("spread", 30.0, "per-channel magnitude spread")
_SEED = flags.DEFINE_integer("seed", 0, "seed of weights and images")
_TAG = flags.DEFINE_string("tag", "", "output file stem (default ptq_conv_<device>)")
_OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks", "where results go")

_CONVS = ("enc1", "enc2", "dec1", "dec2", "out")
# (label, method, weight spec name, activation spec name or None)
_POINTS = (
    ("W4 g16 RTN", "rtn", "int4_g16", None),
    ("W4 g16 GPTQ", "gptq", "int4_g16", None),
    ("W4 g16 AWQ", "awq", "int4_g16", None),
    ("W4 g16 AWQ+GPTQ", "awq_gptq", "int4_g16", None),
    ("W3 g16 RTN", "rtn", "int3_g16", None),
    ("W3 g16 GPTQ", "gptq", "int3_g16", None),
    ("W3 g16 AWQ", "awq", "int3_g16", None),
    ("W8A8 RTN", "rtn", "int8", "int8"),
    ("W8A8 SmoothQuant", "smoothquant", "int8", "int8"),
    ("W4A8 RTN", "rtn", "int4_g16", "int8"),
    ("W4A8 SmoothQuant", "smoothquant", "int4_g16", "int8"),
)


def _spec(name, per_channel: bool = False, act: bool = False):
  """A spec by name (``int4_g16``: groups of 16 input channels); per channel
  for enc1 (3 input channels); activations per pixel (``axis=-1``)."""
  from lowbit_jax import QuantSpec  # pylint: disable=g-import-not-at-top
  if name is None:
    return None
  if act:
    return QuantSpec(name, axis=-1)
  if name.endswith("_g16"):
    return QuantSpec(name[:-4]) if per_channel else QuantSpec(name[:-4], group_size=16)
  return QuantSpec(name)


def main(argv):
  del argv
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from lowbit_jax import QuantRule  # pylint: disable=g-import-not-at-top
  from lowbit_jax.algorithms.rtn import sqnr_db  # pylint: disable=g-import-not-at-top
  from lowbit_jax.flax import apply_ptq, quantize_linen  # pylint: disable=g-import-not-at-top

  class _Net(nn.Module):

    @nn.compact
    def __call__(self, x):
      h = nn.Conv(32, (3, 3), name="enc1")(x)
      h = nn.relu(nn.BatchNorm(use_running_average=True, name="bn")(h))
      h = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2), name="enc2")(h))
      h = nn.relu(nn.ConvTranspose(32, (3, 3), strides=(2, 2), transpose_kernel=True,
                                   name="dec1")(h))
      h = nn.gelu(nn.ConvTranspose(32, (3, 3), name="dec2")(h))
      return nn.Conv(3, (3, 3), name="out")(h)

  rng = np.random.default_rng(_SEED.value)
  model = _Net()
  b, n = _BATCH.value, _SIZE.value
  calib = jnp.asarray(rng.standard_normal((b, n, n, 3)), jnp.float32)
  held = jnp.asarray(rng.standard_normal((b, n, n, 3)), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), calib)
  log_spread = np.log(_SPREAD.value)

  def channel_spread(k):
    return np.exp(rng.uniform(-log_spread / 2, log_spread / 2, k)).astype(np.float32)

  params = {}
  for name, leaves in shapes["params"].items():
    if name == "bn":
      k = leaves["scale"].shape[0]
      params[name] = {"scale": jnp.asarray(channel_spread(k)),
                      "bias": jnp.asarray(0.1 * rng.standard_normal(k), jnp.float32)}
      continue
    kshape = leaves["kernel"].shape
    out_axis = len(kshape) - 2 if name == "dec1" else len(kshape) - 1
    fan_in = int(np.prod(kshape)) // kshape[out_axis]
    w = rng.standard_normal(kshape).astype(np.float32) * np.sqrt(2.0 / fan_in)
    shape = [1] * len(kshape)
    shape[out_axis] = -1
    w = w * channel_spread(kshape[out_axis]).reshape(shape)
    params[name] = {"kernel": jnp.asarray(w),
                    "bias": jnp.asarray(0.1 * rng.standard_normal(kshape[out_axis]),
                                        jnp.float32)}
  stats = {"batch_stats": jax.tree.map(jnp.zeros_like, shapes["batch_stats"])}
  stats["batch_stats"]["bn"]["var"] = jnp.ones_like(stats["batch_stats"]["bn"]["var"])
  with jax.default_matmul_precision("float32"):
    ref = model.apply({"params": params, **stats}, held)

  rows = []
  for label, method, wname, aname in _POINTS:
    aspec = _spec(aname, act=True)
    rules = [QuantRule("enc1", weight=_spec(wname, per_channel=True), activation=aspec),
             QuantRule(".*", weight=_spec(wname), activation=aspec)]
    meth, quantizer = ("awq", "gptq") if method == "awq_gptq" else (method, "rtn")
    t0 = time.perf_counter()
    qp, rep = apply_ptq(model, params, [calib], meth, rules, aspec,
                        quantizer=quantizer, other_variables=stats)
    seconds = time.perf_counter() - t0
    qr = quantize_linen(rules, mode="real")
    qv = qr.quantize_params(model, {"params": qp, "quant_scales": rep["quant_scales"],
                                    **stats}, held)
    with jax.default_matmul_precision("float32"):
      real = qr(model.apply)(qv, held)
      # The returned float kernels with the same activation quantization.
      fake = (model.apply({"params": qp, **stats}, held) if aspec is None else
              quantize_linen([QuantRule(".*", activation=aspec)])(model.apply)(
                  {"params": qp, **stats}, held))
    folds = {f["layers"][0]: f["status"] for f in rep["folds"]
             if f.get("conv") and meth in ("awq", "smoothquant")}
    rows.append({
        "label": label, "method": meth, "quantizer": quantizer, "weight": wname,
        "activation": aname, "model_sqnr_db": sqnr_db(ref, real),
        "codes_exact": all(bool(jnp.array_equal(qv["params"][p]["kernel"].logical(),
                                                qp[p]["kernel"])) for p in _CONVS),
        "real_vs_fake_rel": float(jnp.max(jnp.abs(real - fake))
                                  / jnp.max(jnp.abs(fake))),
        "layer_sqnr_db": {p: rep["layers"][p].get("output_sqnr_db")
                          for p in _CONVS[1:]},
        "folds": folds, "seconds": seconds})
    print(label, f"{rows[-1]['model_sqnr_db']:.2f} dB", folds, flush=True)

  device = jax.devices()[0].platform
  stem = _TAG.value or f"ptq_conv_{device}"
  cmd = "python -m experiments.ptq_conv " + " ".join(sys.argv[1:])
  meta = {"device": jax.devices()[0].device_kind, "platform": platform.platform(),
          "jax": jax.__version__, "command": cmd, "batch": b, "size": n,
          "spread": _SPREAD.value, "seed": _SEED.value}
  lines = [f"# PTQ on convolutions ({device}, jax {jax.__version__})", "",
           f"`{cmd}`", "",
           f"Random conv net (`experiments/ptq_conv.py`), per-channel magnitudes "
           f"spread {_SPREAD.value:g}x, enc1 per output channel (3 input "
           f"channels), the rest groups of 16 input channels where marked g16, "
           f"activations per pixel; {b} images of {n}x{n}x3 to calibrate, "
           f"{b} others to evaluate. Model SQNR: held-out output in real mode "
           "against float. Layer SQNR: each conv's output on the calibration "
           "patches the PTQ capture retains "
           "(`report['layers'][p]['output_sqnr_db']`). Folds: the "
           "scaling of each conv's input (enc1 reads the image: nothing to "
           "fold into; dec2's input passes a ReLU; out's a GELU: skipped). Codes "
           "exact: real mode's stored kernels (`quantize_params` with "
           "`report['quant_scales']`) equal the returned ones for every conv; "
           "real vs fake: largest output difference of real mode against the "
           "returned float kernels (with the same activation quantization), "
           "relative to the largest output.", "",
           "| point | model SQNR dB | enc2 | dec1 | dec2 | out | folds | "
           "codes exact | real vs fake | s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    ls = [f"{r['layer_sqnr_db'][p]:.2f}" for p in ("enc2", "dec1", "dec2", "out")]
    folds = ", ".join(f"{p}: {s}" for p, s in r["folds"].items()) or "-"
    lines.append(f"| {r['label']} | {r['model_sqnr_db']:.2f} | " + " | ".join(ls)
                 + f" | {folds} | {r['codes_exact']} | {r['real_vs_fake_rel']:.1e} | "
                 f"{r['seconds']:.1f} |")
  _report.write(_OUT_DIR.value, stem, meta, rows, lines)


if __name__ == "__main__":
  app.run(main)
