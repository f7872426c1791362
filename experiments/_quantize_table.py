"""The GPU quantizer's tiling table (``lowbit_jax/kernels/gpu_quantize_configs.json``)
from ``experiments/bench_gpu_quantize.py``'s rows: which formats to enable,
each format's fastest exact tiling, and merging a partial run into an earlier
table. No flags here, so tests can import it beside other benches.
"""
import re

from experiments._primitive_formats import fwd_bwd_passes
from lowbit_jax.kernels import gpu_quantize


# The dispatcher's operations and the benchmark row that decides each:
# fake_quant under differentiation by the fwd+bwd rows.
ROW_OF = dict(zip(gpu_quantize.OPS, ("quantize", "fake_quant", "fwd+bwd")))

# A kernel is enabled for an operation only where it was at least this much
# faster than XLA's path: closer than that, two runs disagree (int8 per
# tensor's fake_quant: 121.1 against 121.5 us in one run).
MARGIN = 0.02


def _best_and_xla(res: dict):
  best, xla = {}, {}
  for r in res["rows"]:
    if r.get("us") is None:
      continue
    key = (r["kind"], r["op"])
    if r["tiling"] == "xla":
      xla[key] = r["us"]
    elif r.get("exact"):
      best[key] = min(best.get(key, float("inf")), r["us"])
  return best, xla


def enabled_from(res: dict) -> dict:
  """``{op: sorted formats}``: per dispatcher operation, the formats whose
  fastest exact kernel tiling was at least ``MARGIN`` faster than XLA's path
  in the rows that decide it (``ROW_OF``)."""
  best, xla = _best_and_xla(res)
  out = {}
  for op, row_op in ROW_OF.items():
    out[op] = sorted(k for (k, o) in best if o == row_op and (k, o) in xla
                     and best[(k, o)] < (1.0 - MARGIN) * xla[(k, o)])
  return out


def timed_kinds(res: dict) -> dict:
  """``{op: formats}``: those whose XLA and kernel rows this run timed for
  that operation (the rows ``ROW_OF`` names)."""
  timed = {}
  for r in res["rows"]:
    if r.get("us") is not None:
      timed.setdefault((r["kind"], r["op"]), set()).add(r["tiling"] == "xla")
  return {op: {k for (k, o), v in timed.items() if o == row_op and len(v) == 2}
          for op, row_op in ROW_OF.items()}


def merge_tables(old: dict, new: dict, timed: dict) -> dict:
  """``new`` over ``old``, per operation: the formats in ``timed[op]``
  (measured by the new run for that operation) take the new run's entry and
  enabled state for it; the others keep the old table's. Each entry records
  the run it came from (``started``); the table lists every run's command."""
  def runs(t):
    return t.get("runs") or [dict(command=t.get("command"), started=t.get("started"),
                                  device=t.get("device"), jax=t.get("jax"))]
  if old.get("shape") != new.get("shape"):
    raise ValueError(f"--merge_configs: the old table was measured on shape "
                     f"{old.get('shape')}, this run on {new.get('shape')}; tilings "
                     "for different shapes do not merge")
  if old.get("device") and new.get("device") and old["device"] != new["device"]:
    raise ValueError(f"--merge_configs: the old table was measured on "
                     f"{old['device']!r}, this run on {new['device']!r}; each "
                     "device keeps its own table (gpu_quantize.table_filename)")
  entries, enabled = gpu_quantize.merge_by_operation(
      old, new, timed, {"started": old.get("started")},
      {"started": new.get("started")})
  was_timed = gpu_quantize.timed_of(old)
  out = dict(new, entries=entries, enabled=enabled,
             timed={op: sorted(was_timed[op] | set(timed.get(op, ())))
                    for op in gpu_quantize.OPS})
  out["runs"] = [r for r in runs(old) if r not in runs(new)] + runs(new)
  return out


def table_from_results(results: list, base=None) -> dict:
  """The tiling table of several runs' result JSONs (dicts), each merged
  over the ones before it (``merge_tables``), the first over ``base`` where
  given: a device's table rebuilt from its runs without a GPU.

  Raises:
    ValueError: no results, or results of different devices or shapes.
  """
  if not results:
    raise ValueError("--from_results: no result files")
  devices = {r["device"] for r in results}
  if len(devices) > 1:
    raise ValueError(f"--from_results: runs of several devices {sorted(devices)}; "
                     "a table holds one device's measurements")
  table = base
  for res in results:
    new = config_table(res)
    table = new if table is None else merge_tables(table, new, timed_kinds(res))
  return table


_ONE_PASS = re.compile(r"op(\d+)w(\d+)s(\d+)")  # cfg_str's one-pass part


def cfg_str(c) -> str:
  """A ``gpu_quantize.Config`` as the bench writes it (``config_table`` reads
  it back): tile_n:tile_k:k_per_cta:stages[:rev][:loop][:lut][:opCwWsS][:amax]."""
  return (f"{c.tile_n}:{c.tile_k}:{c.k_per_cta}:{c.stages}"
          + (":rev" if c.reverse else "") + ("" if c.unroll else ":loop")
          + (":lut" if c.lut else "")
          + (f":op{c.one_pass}w{c.warpgroups}s{c.strips}" if c.one_pass else "")
          + (":amax" if c.amax_kernel else ""))


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
      one = [m for m in map(_ONE_PASS.fullmatch, parts[4:]) if m]
      one_pass, wgs, strips = (int(v) for v in one[0].groups()) if one else (0, 1, 1)
      ent[r["kind"]][r["op"]] = dict(tile_n=tn, tile_k=tk, k_per_cta=kpc,
                                     stages=st, reverse="rev" in parts[4:],
                                     unroll="loop" not in parts[4:],
                                     lut="lut" in parts[4:],
                                     **({"amax_kernel": True}
                                        if "amax" in parts[4:] else {}),
                                     **({"one_pass": one_pass, "warpgroups": wgs,
                                         "strips": strips} if one_pass else {}),
                                     kernel_us=round(r["us"], 2),
                                     xla_us=_xla_us(res, r["kind"], r["op"]))
  return dict(device=res["device"], jax=res["jax"], command=res["command"],
              shape=res.get("shape"), started=res["started"],
              enabled=enabled_from(res), entries=ent,
              timed={op: sorted(v) for op, v in timed_kinds(res).items()})


def _xla_us(res, kind, op):
  for r in res["rows"]:
    if r["kind"] == kind and r["op"] == op and r["tiling"] == "xla":
      return r.get("us")
  return None


def recount_fwd_bwd(res: dict) -> list:
  """The fwd+bwd rows' roofline (on the XLA row, which the kernel rows
  share) from ``fwd_bwd_passes`` of the run's tensor; notes it. Returns the
  kinds whose count changed."""
  c = res.get("ceiling") or {}
  if not c.get("gbps"):
    return []
  xbytes = c["k"] * c["n"] * 2
  changed = []
  for r in res["rows"]:
    if r["op"] != "fwd+bwd" or r["tiling"] != "xla" or not r.get("roof_us"):
      continue
    if r["kind"] not in gpu_quantize.supported_kinds():
      continue
    with gpu_quantize.forced(()):  # XLA's path, as the row timed
      moved = fwd_bwd_passes(gpu_quantize.spec_for(r["kind"])) * xbytes
    roof = moved / c["gbps"] / 1e3
    if abs(roof - r["roof_us"]) > 1e-6 * roof:
      changed.append(r["kind"])
    r["roof_us"] = roof
  res.setdefault("notes", []).append(
      "fwd+bwd's roofline recounted with `_primitive_formats.fwd_bwd_bytes` "
      "(`--report=... --recount_fwd_bwd`): x read and the value written, plus the cotangent read and the "
      "gradient written only where the gradient is not the cotangent itself; "
      "changed for " + (", ".join(changed) or "none"))
  return changed
