r"""Runs one PTQ point and prints its metrics as JSON (see configs/ptq.py).

  python -m experiments.ptq --config configs/ptq.py
"""
import inspect
import json

import experiments
from absl import app
from absl import logging

from lowbit_jax import checkpoint, pipelines

_CONFIG = experiments.define_config("configs/ptq.py", "PTQ config")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  c = _CONFIG.value
  if c.model not in pipelines.POINTS:
    raise app.UsageError(f"--config.model must be one of {sorted(pipelines.POINTS)}")
  fn = pipelines.POINTS[c.model]
  try:   # point_kwargs of another model (the default ones are MiniLM's)
    inspect.signature(fn).bind(c.scheme, c.target, c.method, **dict(c.point_kwargs))
  except TypeError as e:
    raise app.UsageError(
        f"--config.point_kwargs do not fit model {c.model!r} ({e}); for the decoder "
        "LM start from its variant: --config configs/ptq.py:llama") from None
  if c.save_dir:  # checked before any computing
    if c.model != "minilm" or c.method != "rtn":
      raise app.UsageError("save_dir is supported for model=minilm, method=rtn: pass "
                           "--config.method=rtn (the default method is gptq)")
    try:
      checkpoint.check_save_target(c.save_dir, force=c.force)
    except FileExistsError:
      raise FileExistsError(f"--config.save_dir={c.save_dir} exists; pass "
                            "--config.force=True to replace it") from None
  m = fn(c.scheme, c.target, c.method, **dict(c.point_kwargs))
  m.pop("layers", None)
  print(json.dumps(m, indent=1, sort_keys=True))
  if c.save_dir:
    print(json.dumps(pipelines.minilm_save_quantized(c.scheme, c.target, c.save_dir,
                                                     force=c.force), indent=1))


if __name__ == "__main__":
  experiments.run(main)
