r"""SpinQuant's learned rotations against QuaRot's Hadamard start on the decoder LM.

Loads a trained decoder (``lowbit_jax.pipelines`` trains ``--variant`` in
``--workdir`` first if it holds no finished run), learns SpinQuant's residual
rotation R1 and per-head rotation R2 (Liu et al. 2024; ``spinquant_model``
with the rules ``apply_ptq(..., "spinquant")`` uses) on ``--n_calib``
training sequences, and
reports the quantized model's next-token loss at the randomized-Hadamard start
and after learning, on the calibration batch and on as many held-out
sequences, plus held-out perplexity of QuaRot and SpinQuant
(``lowbit_jax.pipelines.llama_point``). Smoke run (the smoke decoder, W4A4):

  python -m experiments.spinquant --workdir /tmp/lowbit_jax_lm_smoke \
      --variant smoke --seq_len 64 --out_dir /tmp/spinquant_smoke

Writes ``results.json`` (with the device, jax version and command) to
``--out_dir``.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time

import experiments
from absl import app
from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/lowbit_jax_lm_smoke",
                               "a trained decoder run (trained here if empty)")
_VARIANT = flags.DEFINE_string("variant", "smoke", "configs/train_lm.py variant")
_SCHEME = flags.DEFINE_string("scheme", "int4", "a lowbit_jax.schemes name")
_TARGET = flags.DEFINE_enum("target", "weights+acts", ["weights", "weights+acts"],
                            "quantize the weights, or the weights and activations")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "tokens per sequence", lower_bound=2)
_N_CALIB = flags.DEFINE_integer("n_calib", 8, "calibration (and held-out) sequences",
                                lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 100, "Cayley SGD steps", lower_bound=0)
_LR = flags.DEFINE_float("lr", 1.5, "Cayley SGD learning rate (linear decay)")
_MAX_EVAL = flags.DEFINE_integer("max_eval_tokens", 2048, "held-out tokens (perplexity)",
                                 lower_bound=0)
_PPL = flags.DEFINE_bool("perplexity", True, "also run the sweep points (perplexity)")
_OUT = flags.DEFINE_string("out_dir", "/tmp/spinquant_smoke", "results written here")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from lowbit_jax import QuantRule, pipelines, schemes
  from lowbit_jax.algorithms import SpinQuantConfig, spinquant_model
  from lowbit_jax.core import as_spec  # pylint: disable=g-import-not-at-top
  from lowbit_jax.flax import quantize_linen  # pylint: disable=g-import-not-at-top

  t0 = time.time()
  if _SCHEME.value not in schemes.SCHEMES:
    raise app.UsageError(f"--scheme={_SCHEME.value!r} is not a scheme; one of "
                         f"{sorted(schemes.SCHEMES)}")
  if os.path.exists(_OUT.value) and not os.path.isdir(_OUT.value):
    raise app.UsageError(f"--out_dir={_OUT.value} is a file; give a folder")
  sch = schemes.get(_SCHEME.value)
  # pylint: disable-next=protected-access
  _, model, params, data = pipelines._llama(_WORKDIR.value, _VARIANT.value)
  n, t = _N_CALIB.value, _SEQ_LEN.value
  toks = np.asarray(data.train_tokens[: 2 * n * t]).astype(np.int32).reshape(2 * n, t)
  calib, held = jnp.asarray(toks[:n]), jnp.asarray(toks[n:])
  act = sch.activation if _TARGET.value == "weights+acts" else None
  cfg = SpinQuantConfig(steps=_STEPS.value, learning_rate=_LR.value)
  aspec = None if act is None else as_spec(act)
  if aspec is not None and aspec.axis is None and aspec.tile is None:
    aspec = aspec.replace(axis=-1)   # per token, as apply_ptq
  rules = [QuantRule(".*", weight=sch.weight, activation=aspec)]   # as apply_ptq's loss
  fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
  with jax.default_matmul_precision("float32"):
    _, _, hist = spinquant_model(
        fn, params, [(calib,)], rules, config=cfg,
        online=pipelines.LLAMA_ONLINE,
        heads=pipelines.LLAMA_HEADS + (model.config.head_dim,),
        quantize=lambda f, r: quantize_linen(r)(f), eval_batches=[(held,)])
  out = {"scheme": _SCHEME.value, "target": _TARGET.value, "steps": _STEPS.value,
         "lr": _LR.value, "n_calib": n, "seq_len": t,
         "selected": hist["selected"],
         "quantized_loss": {k: hist[k] for k in ("calib_before", "calib_after",
                                                 "eval_before", "eval_after",
                                                 "best_step")}}
  if _PPL.value:
    for method in ("rtn", "quarot", "spinquant"):
      m = pipelines.llama_point(_SCHEME.value, _TARGET.value, method,
                                workdir=_WORKDIR.value, variant=_VARIANT.value,
                                seq_len=t, max_eval_tokens=_MAX_EVAL.value, n_calib=n)
      out[f"perplexity_{method}"] = m["perplexity"]
  out.update(device=str(jax.devices()[0]), jax=jax.__version__,
             python=platform.python_version(),
             command="python -m experiments.spinquant " + " ".join(sys.argv[1:]),
             seconds=round(time.time() - t0, 1))
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "results.json"), "w") as f:
    json.dump(out, f, indent=1)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  experiments.run(main)
