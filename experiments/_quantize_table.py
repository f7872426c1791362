"""The GPU quantizer's tiling table (``lowbit_jax/kernels/gpu_quantize_configs.json``)
from ``experiments/bench_gpu_quantize.py``'s rows: which formats to enable,
each format's fastest exact tiling, and merging a partial run into an earlier
table. No flags here, so tests can import it beside other benches.
"""


def enabled_from(res: dict) -> set:
  """Formats whose fastest exact kernel tiling beat XLA in both quantize and
  fake_quant."""
  best, xla = {}, {}
  for r in res["rows"]:
    if r["op"] == "fwd+bwd" or r.get("us") is None:
      continue
    key = (r["kind"], r["op"])
    if r["tiling"] == "xla":
      xla[key] = r["us"]
    elif r.get("exact"):
      best[key] = min(best.get(key, float("inf")), r["us"])
  kinds = {k for k, _ in best}
  return {k for k in kinds if all(
      (k, op) in best and (k, op) in xla and best[(k, op)] < xla[(k, op)]
      for op in ("quantize", "fake_quant"))}


def timed_kinds(res: dict) -> set:
  """The formats whose XLA and kernel rows this run timed for both ops."""
  timed = {}
  for r in res["rows"]:
    if r["op"] in ("quantize", "fake_quant") and r.get("us") is not None:
      timed.setdefault(r["kind"], set()).add((r["op"], r["tiling"] == "xla"))
  return {k for k, v in timed.items() if len(v) == 4}


def merge_tables(old: dict, new: dict, timed: set) -> dict:
  """``new`` over ``old``: the formats in ``timed`` (fully measured by the new
  run) take the new run's entries and enabled state; the others keep the old
  table's. Each entry records the run it came from (``started``); the table
  lists every run's command."""
  def runs(t):
    return t.get("runs") or [dict(command=t.get("command"), started=t.get("started"),
                                  device=t.get("device"), jax=t.get("jax"))]
  if old.get("shape") != new.get("shape"):
    raise ValueError(f"--merge_configs: the old table was measured on shape "
                     f"{old.get('shape')}, this run on {new.get('shape')}; tilings "
                     "for different shapes do not merge")
  entries, enabled = {}, set()
  for kind, ops in old.get("entries", {}).items():
    if kind not in timed:
      entries[kind] = {op: {"started": old.get("started"), **e} for op, e in ops.items()}
  enabled |= {k for k in old.get("enabled", []) if k not in timed}
  for kind, ops in new.get("entries", {}).items():
    if kind in timed:
      entries[kind] = {op: {**e, "started": new.get("started")} for op, e in ops.items()}
  enabled |= {k for k in new.get("enabled", []) if k in timed}
  out = dict(new, entries=entries, enabled=sorted(enabled))
  out["runs"] = [r for r in runs(old) if r not in runs(new)] + runs(new)
  return out


def config_table(res: dict) -> dict:
  """The dispatcher's data (``gpu_quantize_configs.json``): per format and
  operation the fastest exact tiling of the run, and the formats to enable."""
  ent = {}
  for r in res["rows"]:
    if r["op"] == "fwd+bwd" or r["tiling"] == "xla" or not r.get("exact") or (
        r.get("us") is None):
      continue
    cur = ent.setdefault(r["kind"], {}).get(r["op"])
    if cur is None or r["us"] < cur["kernel_us"]:
      parts = r["tiling_used"].split(":")
      tn, tk, kpc, st = (int(v) for v in parts[:4])
      ent[r["kind"]][r["op"]] = dict(tile_n=tn, tile_k=tk, k_per_cta=kpc,
                                     stages=st, reverse="rev" in parts[4:],
                                     unroll="loop" not in parts[4:],
                                     kernel_us=round(r["us"], 2),
                                     xla_us=_xla_us(res, r["kind"], r["op"]))
  return dict(device=res["device"], jax=res["jax"], command=res["command"],
              shape=res.get("shape"), started=res["started"],
              enabled=sorted(enabled_from(res)), entries=ent)


def _xla_us(res, kind, op):
  for r in res["rows"]:
    if r["kind"] == kind and r["op"] == op and r["tiling"] == "xla":
      return r.get("us")
  return None
