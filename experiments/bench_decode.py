r"""Decode throughput of the Llama decoder: weight-only quantized weights, KV caches.

For each weight scheme (``--weights``), batch size and KV-cache scheme
(``--schemes``), one jitted function prefills a random prompt batch and
generates ``--new_tokens`` tokens greedily
(``lowbit_jax.models.decode.make_generate``: prefill, then a ``lax.scan`` of
decode steps). A second function prefills and generates one token; decode
throughput is ``batch * (new_tokens - 1) / (t_generate - t_prefill)``.
Parameters are random (throughput does not depend on training) and stored in
bf16, the compute dtype; ``bf16`` is the float cache (bf16 too).

Weights (``--weights``, names as ``experiments/bench_kernels.py``'s weight
cases): ``bf16`` is the float model. Every other scheme quantizes the seven
projections of each block (q/k/v/o, gate/up/down; the embedding and the
lm_head stay bf16) weight-only by the library's public path, as a user
deploys a model: ``quantize_linen(rules, mode="real")``, its
``quantize_params`` (float params -> QWeights holding packed codes and
scales, stored K-major) and its wrapped ``apply``, so every projection is a
real-mode ``ops.dot_general`` on stored codes with kernel dispatch
``use_kernel="auto"``. Each row records, per projection, what that
dispatcher picks (``ops.kernel_problem`` + ``kernels.find``, the calls
``dot_general`` makes) at the decode step's M (= batch) and the prefill's
(= batch x prompt), the parameter bytes, and, on a GPU, the number of Mosaic
GPU custom calls in the lowered decode step (a check of the prediction).
Greedy agreement is given against the bf16-weight model with the same cache
and batch (random weights give nearly tied logits: a sanity check, not an
accuracy measure).

Timing: on GPU, device time from CUPTI
(``jax.experimental.mosaic.gpu.profiler.measure``, the median over
``--iters`` calls; every kernel of a call counted, host gaps not) and the wall
clock; elsewhere the wall clock (``block_until_ready``, median of ``--iters``).
Each function is lowered and compiled ahead of time (the compile seconds are
in the JSON rows).

Run on a GPU (repository root)::

  python -m experiments.bench_decode --config=base --out_dir=benchmarks/decode

The Llama-3-8B-shaped model (2 blocks), the weight formats, bf16 cache (each
weight scheme and batch compiles a generate and a prefill, their seconds are
in the rows; ``--time_budget_s`` starts no weight scheme after that many
seconds and every scheme's rows are written as soon as it finishes)::

  python -m experiments.bench_decode --config=llama8b --layers=2 \
      --weights=bf16,int4_g128,int8,int4,mxfp4,nvfp4 --schemes=bf16 \
      --batches=1,16 --prompt_len=128 --new_tokens=64 --iters=5 \
      --time_budget_s=110 --out_dir=benchmarks/decode \
      --tag=decode_weights_llama8b_h200

CPU smoke run (seconds)::

  python -m experiments.bench_decode --config=tiny --prompt_len=16 \
      --new_tokens=16 --residual=8 --kivi_group=8 --iters=2 \
      --weights=bf16,int8,mxfp4 --out_dir=/tmp/bench_decode

Writes ``decode_<device>.json`` and ``decode_<device>.md`` (or ``--tag``) to
``--out_dir``. One batch size per command keeps a run short: ``--batches=1
--tag=decode_h200_b1``, then ``--batches=16 --tag=decode_h200_b16``.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Optional

from absl import app
from absl import flags

from experiments import _cupti


def _define_flags() -> None:
  """Defines the command-line flags (only when run as a program: tests import
  this module's helpers beside other experiments whose flags share names)."""
  # pylint: disable=global-statement
  global _CONFIG, _LAYERS, _BATCHES, _SCHEMES, _WEIGHTS, _PROMPT, _NEW, _RESIDUAL
  global _KIVI_GROUP, _ITERS, _TAG, _OUT_DIR, _CHECK, _BUDGET
  _CONFIG = flags.DEFINE_enum("config", "base", ["base", "small", "tiny", "llama8b"],
                              "LlamaConfig variant, bf16 compute (tiny: "
                              "LlamaConfig.smoke; llama8b: Llama-3-8B's block dims "
                              "with a 32000-token vocabulary)")
  _LAYERS = flags.DEFINE_integer("layers", None, "decoder blocks (default: the "
                                 "config's own; llama8b: 2)")
  _BATCHES = flags.DEFINE_list("batches", ["1", "16"], "batch sizes")
  _SCHEMES = flags.DEFINE_list("schemes", ["bf16", "int8", "fp8_e4m3", "int4", "kivi4",
                                           "kivi2"], "cache schemes")
  _WEIGHTS = flags.DEFINE_list("weights", ["bf16"], "weight schemes of the "
                               "projections (bf16 or weight-only: " +
                               ", ".join(("int8", "int4_g128", "int4", "fp4_g32",
                                          "mxfp4", "nvfp4")) + ")")
  _PROMPT = flags.DEFINE_integer("prompt_len", 512, "prompt tokens (prefilled)")
  _NEW = flags.DEFINE_integer("new_tokens", 256, "generated tokens (>= 2)")
  _RESIDUAL = flags.DEFINE_integer("residual", 32, "float window of quantized caches")
  _KIVI_GROUP = flags.DEFINE_integer("kivi_group", 32,
                                     "tokens per KIVI key group (divides --residual)")
  _ITERS = flags.DEFINE_integer("iters", 5, "timed calls per measurement")
  _TAG = flags.DEFINE_string("tag", "", "output file stem (default decode_<device>)")
  _OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks/decode", "where results go")
  _CHECK = flags.DEFINE_bool(
      "check_kernels", False, "per quantized weight scheme and batch where the "
      "dispatcher picks a kernel at the decode step: one forward pass of one "
      "token per row (M = batch, as a decode step) with the kernels against the "
      "same with use_kernel='never' (XLA), logits compared (two more compiles)")
  _BUDGET = flags.DEFINE_float("time_budget_s", 0.0, "start no further weight scheme "
                               "once this many seconds have passed since main "
                               "started (0: no limit; the first scheme always "
                               "runs); results so far are written after every "
                               "weight scheme")


# The projections of a Llama block that weight schemes quantize.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
               "down_proj")
PROJECTION_PATH = r".*/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"
# Weight-only schemes: (format, group along K, scale dtype) as
# experiments/bench_kernels.py's weight cases time them (int and fp4 scales in
# bf16; MXFP4: E8M0 per 32; NVFP4: E4M3 per 16 and a float32 tensor scale).
_WEIGHT_CASES = {
    "int8": ("int8", None, "bfloat16"),
    "int4_g128": ("int4", 128, "bfloat16"),
    "int4": ("int4", None, "bfloat16"),
    "fp4_g32": ("fp4_e2m1", 32, "bfloat16"),
    "mxfp4": ("mxfp4", None, None),
    "nvfp4": ("nvfp4", None, None),
}
WEIGHT_SCHEMES = ("bf16",) + tuple(_WEIGHT_CASES)
# bench_kernels' names of the per-channel cases.
_ALIASES = {"int8_pc": "int8", "int4_pc": "int4"}


def weight_spec(name: str):
  """The weight-only QuantSpec of weight scheme ``name`` (None for ``bf16``).

  Args:
    name: one of ``WEIGHT_SCHEMES`` (or ``int8_pc`` / ``int4_pc``), optionally
      followed by ``@wgmma`` (the code order does not change the spec).

  Returns:
    A QuantSpec with its axis unset (the contraction axis is filled in when
    the weight is stored), zero-padding a K that its group does not divide
    (the small configs; Llama-3-8B's dims need none), or None.

  Raises:
    ValueError: an unknown name.
  """
  from lowbit_jax import QuantSpec  # pylint: disable=g-import-not-at-top
  name = _split_order(name)[0]
  name = _ALIASES.get(name, name)
  if name == "bf16":
    return None
  if name not in _WEIGHT_CASES:
    raise ValueError(f"unknown weight scheme {name!r}; choose from "
                     f"{list(WEIGHT_SCHEMES)}")
  fmt, group, scale_dtype = _WEIGHT_CASES[name]
  kw = {} if scale_dtype is None else {"scale_dtype": scale_dtype}
  if group is not None:
    kw["group_size"] = group
  return QuantSpec(fmt, pad=True, **kw)


def weight_rules(name: str) -> Optional[list]:
  """QuantRules quantizing the block projections weight-only (None: float)."""
  from lowbit_jax import QuantRule  # pylint: disable=g-import-not-at-top
  spec = weight_spec(name)
  if spec is None:
    return None
  return [QuantRule(PROJECTION_PATH, weight=spec, ops=("dot_general",))]


def quantize_weights(model, variables, name: str, example_tokens):
  """The model's variables and apply function for weight scheme ``name``.

  The public real-mode path: ``quantize_linen(rules, mode="real")`` plans the
  matched kernels from one abstract forward pass of ``example_tokens``
  (shapes only), ``quantize_params`` replaces each by a QWeight (codes packed
  two per byte for 4-bit formats, stored K-major as kernels read them), and
  the quantizer's wrapped ``model.apply`` presents them to the layers, whose
  matmuls become ``ops.dot_general`` with ``use_kernel="auto"``.

  Args:
    model: a ``Llama``.
    variables: its float variables (``{"params": ...}``).
    name: a weight scheme (``WEIGHT_SCHEMES``, optionally ``@wgmma``).
    example_tokens: int32 ``[B, T]`` tokens for the abstract planning pass.

  Returns:
    ``(variables, apply_fn)``: for ``bf16`` the inputs and ``model.apply``.

  Raises:
    ValueError: an unknown scheme, or one that left some projection in float.
  """
  from lowbit_jax.core import ops  # pylint: disable=g-import-not-at-top
  from lowbit_jax.flax import quantize_linen  # pylint: disable=g-import-not-at-top
  base, order = _split_order(name)
  rules = weight_rules(base)
  if rules is None:
    return variables, model.apply
  q = quantize_linen(rules, mode="real", strict=True, use_kernel="auto")
  qv = q.quantize_params(model, variables, example_tokens)
  if order != "natural":
    # 8-bit or unevenly padded weights stay natural (strict=False).
    qv = ops.set_code_order(qv, order, strict=False)
  missing = [p for p, _ in _projection_leaves(qv["params"], quantized=False)]
  if missing:
    raise ValueError(f"weight scheme {name!r} left projections in float: "
                     f"{missing[:4]}")
  return qv, q(model.apply)


def _projection_leaves(params, quantized: bool = True):
  """``(path, leaf)`` of the projection kernels (QWeights, or float leaves)."""
  import jax  # pylint: disable=g-import-not-at-top
  from lowbit_jax import QArray  # pylint: disable=g-import-not-at-top
  from lowbit_jax._rules import path_str  # pylint: disable=g-import-not-at-top
  out = []
  for kp, leaf in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, QArray))[0]:
    path = path_str(kp)
    parts = path.split("/")
    if len(parts) >= 2 and parts[-2] in PROJECTIONS and parts[-1] == "kernel":
      if isinstance(leaf, QArray) == quantized:
        out.append((path, leaf))
  return out


def param_bytes(params) -> tuple:
  """``(all parameter bytes, projection-kernel bytes)``; a QArray counts its
  true storage (codes, scales, tensor scale)."""
  import jax  # pylint: disable=g-import-not-at-top
  from lowbit_jax import QArray  # pylint: disable=g-import-not-at-top
  total = sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(
      params, is_leaf=lambda x: isinstance(x, QArray)))
  proj = sum(int(x.nbytes) for q in (True, False)
             for _, x in _projection_leaves(params, quantized=q))
  return total, proj


def projection_dispatch(params, m: int, dtype: str = "bfloat16") -> dict:
  """What the quantized ``dot_general`` runs for each projection at ``m`` rows.

  Asks the dispatcher exactly as ``ops.dot_general`` does for a stored
  weight: ``ops.kernel_problem`` (the MatmulProblem of ``x[m, K]`` times the
  K-major QWeight) and ``kernels.find`` (the first kernel whose ``supports``
  is true: the Mosaic GPU kernels' answer is their tuned table, on a Hopper
  GPU only).

  Args:
    params: parameters holding the projection QWeights.
    m: activation rows (decode: the batch; prefill: batch x prompt).
    dtype: the activation dtype.

  Returns:
    ``{layer path: {"k": K, "n": N, "kernel": module name or None, "why":
    str, "table": bool or None}}`` where ``table`` is what the GPU
    weight-only kernel's tuned table says for this problem on a GPU (None:
    no tuned entry or not a weight-only problem), whatever this device is.
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from lowbit_jax import kernels  # pylint: disable=g-import-not-at-top
  from lowbit_jax.core import ops  # pylint: disable=g-import-not-at-top
  out = {}
  for path, w in _projection_leaves(params):
    k, n = w.logical_shape
    x = jax.ShapeDtypeStruct((m, k), dtype)
    layer = path.rsplit("/", 1)[0]
    if not getattr(w, "transposed", False):
      out[layer] = {"k": k, "n": n, "kernel": None, "table": None,
                    "why": "weight not stored K-major"}
      continue
    prob, why = ops.kernel_problem(x, w, (((1,), (1,)), ((), ())))
    table = None
    kern = None
    if prob is not None:
      kern = kernels.find(prob)
      table = _table_verdict(dataclasses.replace(prob, backend="gpu"))
      if kern is None:
        why = {True: "the tuned table picks the kernel, but no supported GPU here",
               False: "the tuned table measured XLA faster",
               None: "no tuned table entry"}[table]
      else:
        why = ""
    out[layer] = {"k": k, "n": n, "table": table, "why": why,
                  "kernel": None if kern is None else kern.__name__.rsplit(".", 1)[-1]}
  return out


def _table_verdict(prob) -> Optional[bool]:
  try:
    from lowbit_jax.kernels import gpu_weight_only as wo  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  if prob.x_format is not None or prob.w_format not in wo._FORMATS:  # pylint: disable=protected-access
    return None
  e = wo.tuned_entry(prob)
  return None if e is None else bool(e.get("use_kernel"))


def _dispatch_summary(d: dict) -> dict:
  """``{projection name: sorted kernel names used by its layers ("xla")}``."""
  out = {}
  for layer, e in d.items():
    name = layer.rsplit("/", 1)[-1]
    out.setdefault(name, set()).add(e["kernel"] or "xla")
  return {p: sorted(v) for p, v in out.items()}


def kernel_check(model, variables, apply, name: str, tokens) -> dict:
  """Logits of one forward pass with the dispatcher's kernels vs XLA's path.

  Args:
    model: the ``Llama``.
    variables: its quantized variables (``quantize_weights``).
    apply: their wrapped apply (``use_kernel="auto"``).
    name: the weight scheme.
    tokens: int32 ``[B, 1]``: one token per row, so every projection has
      ``M = B`` rows, as at a decode step.

  Returns:
    ``{"kernel_vs_xla_logits_max_abs_err", "kernel_vs_xla_logits_max_abs",
    "kernel_vs_xla_argmax_agreement"}``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lowbit_jax.flax import quantize_linen  # pylint: disable=g-import-not-at-top
  xla = quantize_linen(weight_rules(name), mode="real", use_kernel="never")
  got = np.asarray(jax.jit(apply)(variables, tokens), np.float32)
  want = np.asarray(jax.jit(xla(model.apply))(variables, tokens), np.float32)
  return {"kernel_vs_xla_logits_max_abs_err": float(np.abs(got - want).max()),
          "kernel_vs_xla_logits_max_abs": float(np.abs(want).max()),
          "kernel_vs_xla_argmax_agreement": float(np.mean(
              got.argmax(-1) == want.argmax(-1)))}


def count_mosaic_calls(hlo_text: str) -> int:
  """Mosaic GPU kernel launches written in a lowered module's text."""
  return sum(1 for line in hlo_text.splitlines()
             if "custom_call" in line and "@mosaic_gpu" in line)


def _schemes() -> dict:
  from lowbit_jax import QuantRule, QuantSpec  # pylint: disable=g-import-not-at-top
  from lowbit_jax.models import kv_cache  # pylint: disable=g-import-not-at-top

  def per_token(fmt, **kw):
    return [QuantRule(r".*/attn/cache/(key|value)", ops=("kv_cache",),
                      activation=QuantSpec(fmt, axis=-1, **kw))]
  return {"bf16": None, "int8": per_token("int8"), "fp8_e4m3": per_token("fp8_e4m3"),
          "int4": per_token("int4"),
          "kivi4": kv_cache.kivi_rules(4, _KIVI_GROUP.value),
          "kivi2": kv_cache.kivi_rules(2, _KIVI_GROUP.value)}


class _Timer:
  """Median seconds per call: CUPTI device time on GPU, else the wall clock."""

  def __init__(self, jax):
    self.jax = jax
    self.gpu = jax.default_backend() == "gpu"

  def wall(self, fn, *args) -> float:
    self.jax.block_until_ready(fn(*args))  # warm up
    ts = []
    for _ in range(_ITERS.value):
      t0 = time.perf_counter()
      self.jax.block_until_ready(fn(*args))
      ts.append(time.perf_counter() - t0)
    return statistics.median(ts)

  def device(self, fn, *args):
    if not self.gpu:
      return None
    self.jax.block_until_ready(fn(*args))
    return _cupti.median_ms(fn, *args, iters=_ITERS.value) * 1e-3  # ms -> s

  def kernels(self, fn, *args):
    """``[(kernel name, ms)]`` of one call, in launch order (CUPTI); None off GPU."""
    if not self.gpu:
      return None
    from jax.experimental.mosaic.gpu import profiler  # pylint: disable=g-import-not-at-top
    _, ts = profiler.measure(fn, aggregate=False)(*args)
    return list(ts or [])


def step_kernels(launches, steps: int) -> dict:
  """Microseconds per decode step of each kernel the decode loop launches.

  A kernel name launched at least ``steps`` times in one generate call is the
  loop's (prefill kernels are launched once per call or per layer; XLA's
  kernel names are unique within a program, Mosaic GPU kernels of one body
  share a name); its total time is spread over the ``steps`` decode steps.

  Args:
    launches: ``[(kernel name, ms)]`` of one generate call (``_Timer.kernels``).
    steps: the decode steps in that call (new tokens - 1).

  Returns:
    ``{kernel name: us per step}``, largest first.
  """
  total, count = {}, {}
  for name, ms in launches:
    total[name] = total.get(name, 0.0) + ms
    count[name] = count.get(name, 0) + 1
  per = {k: 1e3 * total[k] / steps for k in total if count[k] >= steps}
  return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def llama8b_config(layers: int = 2, **changes: Any):
  """LlamaConfig with Llama-3-8B's block dims (Grattafiori et al., 2024, "The
  Llama 3 Herd of Models"): d_model 4096, 32 query / 8 key-value heads,
  d_ff 14336, rope theta 5e5, bf16 compute; ``layers`` blocks and a
  32000-token vocabulary (Llama-3's is 128256; the embedding and lm_head stay
  bf16 in every weight scheme, so a smaller one only trims a fixed cost)."""
  from lowbit_jax.models.llama import LlamaConfig  # pylint: disable=g-import-not-at-top
  return LlamaConfig(**{**dict(vocab=32000, d_model=4096, n_layers=layers,
                               n_heads=32, n_kv_heads=8, d_ff=14336, max_len=8192,
                               rope_theta=500000.0, dtype="bfloat16"), **changes})


def _model(jax, jnp):
  from lowbit_jax.models.llama import Llama, LlamaConfig  # pylint: disable=g-import-not-at-top
  name = _CONFIG.value
  if name == "llama8b":
    cfg = llama8b_config(_LAYERS.value or 2)
  else:
    cfg = (LlamaConfig.smoke(dtype="bfloat16") if name == "tiny"
           else getattr(LlamaConfig, name)(dtype="bfloat16"))
    if _LAYERS.value is not None:
      cfg = cfg.replace(n_layers=_LAYERS.value)
  need = _PROMPT.value + _NEW.value
  if need > cfg.max_len:
    cfg = cfg.replace(max_len=need)
  model = Llama(cfg)
  dt = cfg.compute_dtype
  # Parameters initialized in the compute dtype directly (float32 first would
  # double the peak of the 8B-shaped model for nothing).
  params = jax.jit(lambda k: jax.tree.map(
      lambda p: p.astype(dt), model.init(k, jnp.zeros((1, 8), jnp.int32))["params"]
  ))(jax.random.key(0))
  return model, {"params": params}


def _rate(b: int, n: int, t_gen: float, t_pre: float):
  """Decode tokens/s, or None when the timings cannot resolve the decode steps."""
  return b * (n - 1) / (t_gen - t_pre) if t_gen > t_pre else None


def _step_ms(n: int, t_gen: float, t_pre: float):
  return 1e3 * (t_gen - t_pre) / (n - 1) if t_gen > t_pre else None


def _fmt(v, spec: str) -> str:
  return "n/a" if v is None else format(v, spec)


def _compile(fn, *args):
  """``(compiled, lowered text, seconds)`` of a jitted function."""
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  text = lowered.as_text()
  compiled = lowered.compile()
  return compiled, text, time.perf_counter() - t0


def _split_order(name: str) -> tuple:
  """``("int4_g128", "wgmma")`` for ``int4_g128@wgmma``; ``(name, "natural")``."""
  base, _, order = name.partition("@")
  return base, order or "natural"


def _weight_order(names) -> list:
  """The weight schemes to run, validated, bf16 first (the others' baseline).

  A scheme may end in ``@wgmma`` (or ``@wgmma_e2m1`` for E2M1 codes,
  ``@wgmma_int4`` for int4 ones): its
  4-bit codes are then stored in that order of the Hopper kernel
  (``ops.set_code_order``)."""
  from lowbit_jax.core._qarray import CODE_ORDERS, SPLIT_ORDERS  # pylint: disable=g-import-not-at-top
  from lowbit_jax.kernels import gpu_weight_only as wo  # pylint: disable=g-import-not-at-top
  names = [_ALIASES.get(w, w) for w in names]
  for w in names:
    base, order = _split_order(w)
    base = _ALIASES.get(base, base)
    fmt = _WEIGHT_CASES.get(base, (None,))[0]
    if base not in WEIGHT_SCHEMES or order not in CODE_ORDERS or (
        order != "natural" and base == "bf16") or (
            order in SPLIT_ORDERS and wo.split_order_for(fmt) != order):
      raise app.UsageError(f"unknown --weights scheme {w!r}; choose from "
                           f"{list(WEIGHT_SCHEMES)}, a quantized one optionally "
                           "followed by @wgmma, an E2M1 one (fp4_g32, mxfp4, "
                           "nvfp4) by @wgmma_e2m1, an int4 one by @wgmma_int4")
  if len(set(names)) != len(names):
    raise app.UsageError(f"--weights lists a scheme twice: {names}")
  return sorted(names, key=lambda w: w != "bf16")


_START = [time.perf_counter()]


def main(argv):
  _START[0] = time.perf_counter()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _NEW.value < 2:
    raise app.UsageError("--new_tokens must be >= 2 (one generated token is the "
                         "prefill's)")
  if _LAYERS.value is not None and _LAYERS.value < 1:
    raise app.UsageError(f"--layers must be >= 1, got {_LAYERS.value}")
  if _ITERS.value < 1:
    raise app.UsageError(f"--iters must be >= 1 (timed calls per measurement), got "
                         f"{_ITERS.value}")
  if not all(b.strip().isdigit() and int(b) >= 1 for b in _BATCHES.value):
    raise app.UsageError(f"--batches must be positive ints, got {_BATCHES.value}")
  if _PROMPT.value < 1 or _RESIDUAL.value < 0 or _KIVI_GROUP.value < 1:
    raise app.UsageError(f"--prompt_len must be >= 1, --residual >= 0 and "
                         f"--kivi_group >= 1, got {_PROMPT.value}, {_RESIDUAL.value}, "
                         f"{_KIVI_GROUP.value}")
  if (any(n.startswith("kivi") for n in _SCHEMES.value)
      and _RESIDUAL.value % _KIVI_GROUP.value):
    raise app.UsageError(f"--kivi_group={_KIVI_GROUP.value} must divide --residual="
                         f"{_RESIDUAL.value} (KIVI flushes the float window a key "
                         "group at a time)")
  weights = _weight_order(_WEIGHTS.value)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from lowbit_jax.models import decode, kv_cache  # pylint: disable=g-import-not-at-top

  schemes = _schemes()
  for name in _SCHEMES.value:
    if name not in schemes:
      raise app.UsageError(f"unknown scheme {name!r}; choose from {list(schemes)}")
  model, float_vars = _model(jax, jnp)
  cfg = model.config
  timer = _Timer(jax)
  p, n = _PROMPT.value, _NEW.value
  batches = [int(x) for x in _BATCHES.value]
  rows = []
  bf16_out = {}   # (batch, cache scheme) -> tokens of the bf16-weight model
  skipped = []
  for wname in weights:
    if (rows and _BUDGET.value
        and time.perf_counter() - _START[0] > _BUDGET.value):
      skipped.append(wname)
      continue
    t0 = time.perf_counter()
    variables, apply = quantize_weights(model, float_vars, wname,
                                        jnp.zeros((1, 8), jnp.int32))
    jax.block_until_ready(variables)
    quantize_s = time.perf_counter() - t0
    total_b, proj_b = param_bytes(variables["params"])
    for b in batches:
      tokens = jax.random.randint(jax.random.key(b), (b, p), 0, cfg.vocab)
      lengths = jnp.full((b,), p, jnp.int32)
      disp = {"decode": projection_dispatch(variables["params"], b),
              "prefill": projection_dispatch(variables["params"], b * p)}
      check = (kernel_check(model, variables, apply, wname, tokens[:, :1])
               if _CHECK.value and wname != "bf16" and any(
                   e["kernel"] for e in disp["decode"].values()) else {})
      ref_out = None
      for name in _SCHEMES.value:
        rules = schemes[name]
        residual = _RESIDUAL.value if rules else None
        kw = dict(prompt_len=p, batch=b, cache_rules=rules, residual=residual,
                  max_len=p + n, apply_fn=apply)
        args = (variables, tokens, lengths, jax.random.key(0))
        gen, gen_hlo, c_gen = _compile(decode.make_generate(model, n, **kw), *args)
        pre, pre_hlo, c_pre = _compile(decode.make_generate(model, 1, **kw), *args)
        out = np.asarray(gen(*args))
        if ref_out is None:
          ref_out = out
        if wname == "bf16":
          bf16_out[(b, name)] = out
        base = bf16_out.get((b, name))
        t_gen, t_pre = timer.wall(gen, *args), timer.wall(pre, *args)
        d_gen, d_pre = timer.device(gen, *args), timer.device(pre, *args)
        cache = kv_cache.init_cache(cfg, b, rules=rules, residual=residual,
                                    max_len=p + n)
        row = {"weights": wname, "scheme": name, "batch": b, "prompt_len": p,
               "new_tokens": n,
               "wall_generate_s": t_gen, "wall_prefill_s": t_pre,
               "wall_decode_tokens_per_s": _rate(b, n, t_gen, t_pre),
               "wall_ms_per_step": _step_ms(n, t_gen, t_pre),
               "cache_bytes": cache.nbytes,
               "param_bytes": total_b, "projection_bytes": proj_b,
               "greedy_agreement_with_first_scheme": float(np.mean(out == ref_out)),
               "greedy_agreement_vs_bf16_weights": (
                   None if base is None else float(np.mean(out == base))),
               "compile_generate_s": c_gen, "compile_prefill_s": c_pre,
               "quantize_weights_s": quantize_s, **check}
        if wname != "bf16":
          row["dispatch_decode"] = _dispatch_summary(disp["decode"])
          row["dispatch_prefill"] = _dispatch_summary(disp["prefill"])
          row["kernel_projections_decode"] = sum(
              e["kernel"] is not None for e in disp["decode"].values())
          row["kernel_projections_prefill"] = sum(
              e["kernel"] is not None for e in disp["prefill"].values())
          row["projections"] = len(disp["decode"])
          row["dispatch_detail"] = {
              phase: {layer: e for layer, e in d.items()
                      if layer.startswith("layers_0/")}
              for phase, d in disp.items()}
        if timer.gpu:
          # Mosaic GPU calls in the decode step's HLO (generate - prefill).
          row["mosaic_calls_decode_step_hlo"] = (count_mosaic_calls(gen_hlo)
                                                 - count_mosaic_calls(pre_hlo))
          row["mosaic_calls_prefill_hlo"] = count_mosaic_calls(pre_hlo)
        if d_gen is not None:
          row.update(device_generate_s=d_gen, device_prefill_s=d_pre,
                     device_decode_tokens_per_s=_rate(b, n, d_gen, d_pre),
                     device_ms_per_step=_step_ms(n, d_gen, d_pre))
          pre_launches = (timer.kernels(pre, *args)
                          if row.get("mosaic_calls_prefill_hlo") else None)
          row.update(_step_breakdown(timer.kernels(gen, *args), pre_launches, n,
                                     cfg, row))
        print(json.dumps({k: v for k, v in row.items() if k != "dispatch_detail"}),
              flush=True)
        rows.append(row)
        del gen, pre, gen_hlo, pre_hlo
    if wname != "bf16":
      del variables
    _speedups(rows)
    _write(rows, cfg, weights, skipped)
  if skipped:
    _write(rows, cfg, weights, skipped)
    print(f"--time_budget_s={_BUDGET.value} reached: skipped weight schemes "
          f"{skipped}", flush=True)


def _step_breakdown(launches, pre_launches, n: int, cfg, row) -> dict:
  """The decode loop's kernels per step (device), and the Mosaic GPU share.

  Only where the loop's launches can be told from the prefill's (more decode
  steps than four launches per block). Mosaic kernels are those whose CUPTI
  name contains "mosaic" (None, not a wrong zero, when the lowered step has
  Mosaic calls but no launch carries such a name); Mosaic kernels of one body
  share a name, so where the prefill launches some too, the prefill call's
  (``pre_launches``) are subtracted.
  """
  steps = n - 1
  if not launches or steps <= 4 * cfg.n_layers:
    return {}
  per = step_kernels(launches, steps)
  for name, ms in pre_launches or []:
    if name in per and "mosaic" in name.lower():
      per[name] -= 1e3 * ms / steps
  mosaic = sum(v for k, v in per.items() if "mosaic" in k.lower())
  if mosaic == 0 and row.get("mosaic_calls_decode_step_hlo"):
    mosaic = None
  return {"device_step_kernels_us": dict(list(per.items())[:24]),
          "device_step_kernels_total_us": sum(per.values()),
          "device_step_mosaic_us": mosaic}


def _speedups(rows) -> None:
  """Adds each row's decode rate relative to the bf16-weight row like it."""
  base = {(r["scheme"], r["batch"]): r for r in rows if r["weights"] == "bf16"}
  for r in rows:
    b = base.get((r["scheme"], r["batch"]))
    for kind in ("wall", "device"):
      key = f"{kind}_decode_tokens_per_s"
      mine, ref = r.get(key), (b or {}).get(key)
      r[f"{kind}_speedup_vs_bf16_weights"] = (mine / ref if mine and ref else None)


def _write(rows, cfg, weights, skipped) -> None:
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  tag = "".join(c if c.isalnum() else "_" for c in dev.device_kind.lower())
  cmd = "python -m experiments.bench_decode " + " ".join(sys.argv[1:])
  meta = {"device": f"{dev.platform}: {dev.device_kind} x {jax.device_count()}",
          "jax": jax.__version__, "python": platform.python_version(),
          "command": cmd, "config": _CONFIG.value, "model": dataclasses.asdict(cfg),
          "residual": _RESIDUAL.value, "kivi_group": _KIVI_GROUP.value,
          "iters": _ITERS.value, "weights": weights, "skipped_weights": skipped,
          "elapsed_s": time.perf_counter() - _START[0],
          "weight_specs": {w: repr(weight_spec(w)) for w in weights},
          "date": time.strftime("%Y-%m-%d")}
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  base = os.path.join(_OUT_DIR.value, _TAG.value or f"decode_{tag}")
  with open(base + ".json", "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  lines = (_cache_table(rows, meta, cmd) if weights == ["bf16"]
           else _weights_tables(rows, meta, cmd, cfg))
  if skipped:
    lines += ["", f"Not run (--time_budget_s={_BUDGET.value} reached): "
              f"{', '.join(skipped)}."]
  with open(base + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print(f"wrote {base}.json and {base}.md")


def _cache_table(rows, meta, cmd) -> list:
  """The KV-cache table (bf16 weights only), as before ``--weights``."""
  dev_cols = any("device_generate_s" in r for r in rows)
  head = ("| scheme | batch | cache MB | decode tok/s (wall) | ms/step (wall) |"
          + (" decode tok/s (device) | ms/step (device) |" if dev_cols else "")
          + " greedy agreement |")
  lines = [f"# Decode throughput, {_CONFIG.value} model, KV cache schemes", "",
           f"Command: `{cmd}`. Device: {meta['device']}, jax {meta['jax']}, "
           f"Python {meta['python']}, run on {meta['date']}.", "",
           f"Prompt {rows[0]['prompt_len']} tokens, {rows[0]['new_tokens']} "
           f"generated (greedy, one jit: prefill + lax.scan); quantized caches keep "
           f"a float window of {_RESIDUAL.value} tokens. Decode rate = batch x "
           "(new tokens - 1) / (generate time - prefill time); medians of "
           f"{_ITERS.value} calls. Greedy agreement: fraction of generated tokens "
           "equal to the first scheme's (random weights give nearly tied logits, so "
           "only a sanity check). n/a: generate was not measurably slower than "
           "prefill (noise).",
           "", head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    line = (f"| {r['scheme']} | {r['batch']} | {r['cache_bytes'] / 2**20:.2f} | "
            f"{_fmt(r['wall_decode_tokens_per_s'], '.1f')} | "
            f"{_fmt(r['wall_ms_per_step'], '.3f')} |")
    if dev_cols:
      line += (f" {_fmt(r.get('device_decode_tokens_per_s'), '.1f')} | "
               f"{_fmt(r.get('device_ms_per_step'), '.3f')} |")
    line += f" {r['greedy_agreement_with_first_scheme']:.3f} |"
    lines.append(line)
  return lines


def _weights_tables(rows, meta, cmd, cfg) -> list:
  """The weight-scheme table (and its cache columns) plus the dispatch table."""
  dev_cols = any("device_generate_s" in r for r in rows)
  chk_cols = any("kernel_vs_xla_logits_max_abs_err" in r for r in rows)
  kind = "device" if dev_cols else "wall"
  head = ("| weights | cache | batch | params MB | projections MB | cache MB |"
          " Mosaic projections (decode) |"
          " decode tok/s (wall) | ms/step (wall) |"
          + (" decode tok/s (device) | ms/step (device) | Mosaic us/step |"
             if dev_cols else "")
          + f" vs bf16 weights ({kind}) | greedy agreement vs bf16 weights |"
          " greedy agreement vs first cache |"
          + (" kernel vs XLA logits: max err / max |logit| |" if chk_cols else ""))
  lines = [f"# Decode throughput, {_CONFIG.value} model ({cfg.n_layers} blocks, "
           f"d_model {cfg.d_model}, d_ff {cfg.d_ff}, {cfg.n_heads}/{cfg.n_kv_heads} "
           f"heads, vocab {cfg.vocab}), weight-only schemes in real mode", "",
           f"Command: `{cmd}`. Device: {meta['device']}, jax {meta['jax']}, "
           f"Python {meta['python']}, run on {meta['date']}.", "",
           "Weights: the q/k/v/o and gate/up/down projections quantized weight-only "
           "by rules in real mode (`quantize_linen(rules, mode=\"real\")`, "
           "`quantize_params`, the wrapped apply; every projection an "
           "`ops.dot_general` on stored codes with `use_kernel=\"auto\"`); "
           "embedding and lm_head bf16. Mosaic projections: how many of the "
           "model's projections the dispatcher sends to a Mosaic GPU kernel at the "
           "decode step (M = batch)"
           + (" (HLO: the Mosaic custom calls in the lowered decode step, "
              "a check); Mosaic us/step: device time per decode step of the "
              "Mosaic GPU kernels (CUPTI, the decode loop's launches; the JSON "
              "rows list every loop kernel's time per step)" if dev_cols else "")
           + ". "
           f"Prompt {rows[0]['prompt_len']} tokens, {rows[0]['new_tokens']} "
           "generated (greedy, one jit: prefill + lax.scan). Decode rate = batch x "
           "(new tokens - 1) / (generate time - prefill time); medians of "
           f"{_ITERS.value} calls. Greedy agreement: fraction of generated tokens "
           "equal to the bf16-weight model's (same cache, batch) and to the first "
           "cache scheme's (same weights); random weights give nearly tied logits, "
           "so only a sanity check. n/a: not measured or not resolvable (noise)."
           + (" Kernel vs XLA (--check_kernels): one forward pass of one token "
              "per row (M = batch) with the dispatched kernels against "
              "use_kernel='never', largest logit difference over the largest "
              "logit (-: no kernel dispatched)." if chk_cols else ""),
           "", head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    if r["weights"] == "bf16":
      mosaic = "-"
    else:
      mosaic = f"{r['kernel_projections_decode']}/{r['projections']}"
      if "mosaic_calls_decode_step_hlo" in r:
        mosaic += f" (HLO {r['mosaic_calls_decode_step_hlo']})"
    agree = r["greedy_agreement_vs_bf16_weights"]
    line = (f"| {r['weights']} | {r['scheme']} | {r['batch']} | "
            f"{r['param_bytes'] / 2**20:.1f} | {r['projection_bytes'] / 2**20:.1f} | "
            f"{r['cache_bytes'] / 2**20:.2f} | {mosaic} | "
            f"{_fmt(r['wall_decode_tokens_per_s'], '.1f')} | "
            f"{_fmt(r['wall_ms_per_step'], '.3f')} |")
    if dev_cols:
      line += (f" {_fmt(r.get('device_decode_tokens_per_s'), '.1f')} | "
               f"{_fmt(r.get('device_ms_per_step'), '.3f')} | "
               f"{_fmt(r.get('device_step_mosaic_us'), '.1f')} |")
    ratio = r.get(f"{kind}_speedup_vs_bf16_weights")
    line += (f" {_fmt(ratio, '.2f')}{'' if ratio is None else 'x'} |"
             f" {_fmt(agree, '.3f')} |"
             f" {r['greedy_agreement_with_first_scheme']:.3f} |")
    if chk_cols:
      err = r.get("kernel_vs_xla_logits_max_abs_err")
      line += (" - |" if err is None else
               f" {err:.3g} / {r['kernel_vs_xla_logits_max_abs']:.3g} |")
    lines.append(line)
  lines += _dispatch_table(rows)
  return lines


def _dispatch_table(rows) -> list:
  """Per weight scheme and projection of block 0: kernel or XLA, and why."""
  seen = {}
  for r in rows:
    if r["weights"] == "bf16" or "dispatch_detail" not in r:
      continue
    for phase, d in r["dispatch_detail"].items():
      m = r["batch"] * (1 if phase == "decode" else r["prompt_len"])
      for layer, e in d.items():
        seen.setdefault((r["weights"], layer), {})[(phase, m)] = e
  if not seen:
    return []
  cols = sorted({c for v in seen.values() for c in v}, key=lambda c: (c[0], c[1]))
  head = ("| weights | projection (block 0) | K x N |"
          + "".join(f" {ph} M={m} |" for ph, m in cols))
  lines = ["", "## Kernel dispatch", "",
           "What `ops.dot_general` runs for each projection (`ops.kernel_problem` + "
           "`kernels.find`, the dispatcher's own calls): the kernel module, or XLA "
           "with the reason. The GPU weight-only kernel's tuned table "
           "(`lowbit_jax/kernels/gpu_tuned_configs.json`, the H200's, under the "
           "device's own `gpu_tuned_configs.<device>.json` where there is one: "
           "`gpu_weight_only.table_for_device`) decides on a Hopper GPU; "
           "elsewhere every projection runs XLA.", "",
           head, "|" + "---|" * (head.count("|") - 1)]
  for (w, layer), v in seen.items():
    e0 = next(iter(v.values()))
    cells = []
    for c in cols:
      e = v.get(c)
      if e is None:
        cells.append("-")
      elif e["kernel"] is not None:
        cells.append(e["kernel"])
      else:
        cells.append(f"XLA ({e['why']})")
    lines.append(f"| {w} | {layer.split('/', 1)[1]} | {e0['k']}x{e0['n']} | "
                 + " | ".join(cells) + " |")
  return lines


if __name__ == "__main__":
  _define_flags()
  app.run(main)
