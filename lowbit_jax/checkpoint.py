"""Save and restore parameter pytrees holding quantized weights, with orbax.

``save(directory, params)`` writes every array of ``params`` with
``orbax.checkpoint.StandardCheckpointer`` (a QArray as its packed codes, scales,
zero points and tensor scale, so the size on disk is the packed size) and the
static part of each QArray (spec, logical shape, dtype, pack axis, whether it is
a transposed ``QWeight``) plus the tree's structure as JSON beside it.
``restore(directory)`` rebuilds the same pytree bit for bit, optionally onto
another device layout (``sharding=``): a ``jax.sharding.Sharding`` for every
array, or a function choosing one per array.

Layout of ``directory``::

  arrays/               the orbax checkpoint: {"leaf_<i>": array or
                        {"codes", "scale", "zero_point", "tensor_scale"}}
  lowbit_jax.json       format version, tree skeleton, per-leaf metadata

8-bit float codes and scales (``float8_*``) are stored bit-cast to ``uint8``
and cast back on restore, so no tensorstore float8 support is needed.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lowbit_jax import _rules
from lowbit_jax import formats as _formats
from lowbit_jax.core._qarray import QArray
from lowbit_jax.core._spec import QuantSpec

VERSION = 1
_META = "lowbit_jax.json"
_ARRAYS = "arrays"
_FIELDS = ("codes", "scale", "zero_point", "tensor_scale")
_FORMAT_TYPES = {c.__name__: c for c in (_formats.IntFormat, _formats.FloatFormat,
                                         _formats.LookupFormat, _formats.BlockFormat)}

ShardingLike = Union[None, jax.sharding.Sharding,
                     Callable[[str, tuple, Any], jax.sharding.Sharding]]


# ---------------------------------------------------------------------------
# JSON of specs and formats


def _json_value(v):
  if isinstance(v, _formats.Format):
    return _format_json(v)
  if isinstance(v, tuple):
    return {"tuple": [_json_value(x) for x in v]}
  if isinstance(v, (bool, int, float, str)) or v is None:
    return v
  raise TypeError(f"cannot store {type(v).__name__} {v!r} in checkpoint metadata")


def _from_json_value(v):
  if isinstance(v, dict):
    if "tuple" in v:
      return tuple(_from_json_value(x) for x in v["tuple"])
    return _format_from_json(v)
  return v


def _format_json(fmt: _formats.Format) -> dict:
  try:
    if fmt.name and _formats.get(fmt.name) == fmt:
      return {"format": fmt.name}
  except (KeyError, ValueError):
    pass
  fields = {f.name: _json_value(getattr(fmt, f.name))
            for f in dataclasses.fields(fmt) if f.init}
  return {"format_type": type(fmt).__name__, "fields": fields}


def _format_from_json(d: dict) -> _formats.Format:
  if "format" in d:
    return _formats.get(d["format"])
  cls = _FORMAT_TYPES.get(d.get("format_type"))
  if cls is None:
    raise ValueError(f"unknown format type in checkpoint metadata: {d!r}")
  return cls(**{k: _from_json_value(v) for k, v in d["fields"].items()})


def spec_to_json(spec: QuantSpec) -> dict:
  """A QuantSpec as JSON-able data (``spec_from_json`` inverts it)."""
  return {f.name: _json_value(getattr(spec, f.name)) for f in dataclasses.fields(spec)}


def spec_from_json(d: dict) -> QuantSpec:
  return QuantSpec(**{k: _from_json_value(v) for k, v in d.items()})


# ---------------------------------------------------------------------------
# Tree skeleton


def _skeleton(tree, leaves: list):
  if isinstance(tree, QArray) or tree is None or not _is_container(tree):
    if tree is None:
      return None
    leaves.append(tree)
    return {"leaf": len(leaves) - 1}
  if isinstance(tree, dict):
    return {"dict": [[_key_json(k), _skeleton(v, leaves)] for k, v in tree.items()]}
  kind = "list" if isinstance(tree, list) else "tuple"
  return {kind: [_skeleton(v, leaves) for v in tree]}


def _is_container(x) -> bool:
  return type(x) in (dict, list, tuple)


def _key_json(k):
  if isinstance(k, bool) or not isinstance(k, (str, int)):
    raise TypeError(f"checkpoint dict keys must be str or int, got {k!r}")
  return k


def _from_skeleton(sk, leaves: list):
  if sk is None:
    return None
  if "leaf" in sk:
    return leaves[sk["leaf"]]
  if "dict" in sk:
    return {k: _from_skeleton(v, leaves) for k, v in sk["dict"]}
  if "list" in sk:
    return [_from_skeleton(v, leaves) for v in sk["list"]]
  return tuple(_from_skeleton(v, leaves) for v in sk["tuple"])


# ---------------------------------------------------------------------------
# Arrays


def _storable(x: jax.Array):
  """(array orbax can store, dtype name to restore)."""
  dt = jnp.dtype(x.dtype)
  name = dt.name
  if dt.itemsize == 1 and jnp.issubdtype(dt, jnp.floating):
    return jax.lax.bitcast_convert_type(x, jnp.uint8), name
  return x, name


def _unstore(x: jax.Array, name: str) -> jax.Array:
  dt = jnp.dtype(name)
  if dt != x.dtype:
    return jax.lax.bitcast_convert_type(x, dt)
  return x


def _array_meta(x) -> dict:
  return {"shape": list(x.shape), "dtype": jnp.dtype(x.dtype).name}


def _to_json_tree(params, what: str):
  leaves: list = []
  try:
    skeleton = _skeleton(params, leaves)
  except TypeError as e:
    raise TypeError(f"{what}: {e}") from None
  return skeleton, leaves


def save(directory: str, params: Any, *, force: bool = False) -> None:
  """Saves a parameter pytree (arrays and QArrays) to ``directory``.

  Args:
    directory: a path that does not exist yet (or ``force=True``).
    params: nested dicts/lists/tuples of arrays, QArrays and QWeights (use
      ``nnx.State.to_pure_dict()`` or ``flax.core.unfreeze`` for other
      containers; restore with ``target=`` to get them back).
    force: overwrite an existing checkpoint.

  Raises:
    TypeError: a leaf that is not an array or QArray, or an unsupported
      container.
    FileExistsError: ``directory`` exists and ``force`` is False.
  """
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory) and not force:
    raise FileExistsError(f"{directory} exists; pass force=True to overwrite it")
  skeleton, leaves = _to_json_tree(params, "save")
  tree, meta = {}, []
  for i, leaf in enumerate(leaves):
    key = f"leaf_{i}"
    if isinstance(leaf, QArray):
      fields, dtypes = {}, {}
      for f in _FIELDS:
        a = getattr(leaf, f)
        if a is not None:
          fields[f], dtypes[f] = _storable(a)
      tree[key] = fields
      meta.append({"kind": type(leaf).__name__, "spec": spec_to_json(leaf.spec),
                   "shape": list(leaf.shape), "dtype": leaf.dtype,
                   "pack_axis": leaf.pack_axis,
                   "transposed": bool(getattr(leaf, "transposed", False)),
                   "fields": {f: {"shape": list(fields[f].shape),
                                  "stored": jnp.dtype(fields[f].dtype).name,
                                  "dtype": dtypes[f]} for f in fields}})
    elif isinstance(leaf, (jax.Array, np.ndarray)):
      arr, name = _storable(jnp.asarray(leaf))
      tree[key] = arr
      meta.append({"kind": "array", "shape": list(arr.shape),
                   "stored": jnp.dtype(arr.dtype).name, "dtype": name})
    else:
      raise TypeError(f"save: leaf {i} is a {type(leaf).__name__}; only arrays and "
                      "QArrays can be saved")
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, _ARRAYS), tree, force=force)
    ckptr.wait_until_finished()
  with open(os.path.join(directory, _META), "w") as f:
    json.dump({"version": VERSION, "skeleton": skeleton, "leaves": meta}, f)


def _sharding_for(sharding: ShardingLike, path: str, shape: tuple, dtype):
  if sharding is None:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(sharding, jax.sharding.Sharding):
    return sharding
  if callable(sharding):
    s = sharding(path, shape, dtype)
    if not isinstance(s, jax.sharding.Sharding):
      raise TypeError(f"the sharding function returned {type(s).__name__} for "
                      f"{path}; it must return a jax.sharding.Sharding")
    return s
  raise TypeError(f"sharding must be None, a jax.sharding.Sharding or a function "
                  f"(path, shape, dtype) -> Sharding; got {type(sharding).__name__}")


def restore(directory: str, *, sharding: ShardingLike = None,
            target: Any = None) -> Any:
  """Restores a pytree saved by ``save``, bit for bit.

  Args:
    directory: the checkpoint directory.
    sharding: where the arrays go: None (the first local device), one
      ``jax.sharding.Sharding`` for every array (e.g. a ``NamedSharding`` that
      replicates over a new mesh), or ``fn(path, shape, dtype) -> Sharding``
      where ``path`` names the stored array: the leaf's pytree path, plus
      ``/codes``, ``/scale``, ``/zero_point`` or ``/tensor_scale`` for QArrays.
    target: optional pytree with the saved structure (any container types,
      e.g. an ``nnx.State``); its leaves at the saved paths are replaced by the
      restored ones. Without it the saved dict/list/tuple skeleton is rebuilt.

  Returns:
    The restored pytree (QArrays and QWeights rebuilt with their specs).

  Raises:
    ValueError: not a lowbit_jax checkpoint, a newer format version, or a
      ``target`` whose paths differ from the saved ones.
  """
  directory = os.path.abspath(os.fspath(directory))
  meta_path = os.path.join(directory, _META)
  if not os.path.exists(meta_path):
    raise ValueError(f"{directory} is not a lowbit_jax checkpoint (no {_META}); "
                     "write it with lowbit_jax.checkpoint.save")
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get("version", 0) > VERSION:
    raise ValueError(f"checkpoint format version {meta['version']} is newer than this "
                     f"lowbit_jax reads ({VERSION}); upgrade lowbit_jax")
  skeleton, leaf_meta = meta["skeleton"], meta["leaves"]
  names = [None] * len(leaf_meta)
  _leaf_paths(skeleton, "", names)

  def sds(path, m):
    shape = tuple(m["shape"])
    dt = jnp.dtype(m["stored"])
    return jax.ShapeDtypeStruct(shape, dt, sharding=_sharding_for(
        sharding, path, shape, jnp.dtype(m["dtype"])))

  abstract = {}
  for i, m in enumerate(leaf_meta):
    key = f"leaf_{i}"
    if m["kind"] == "array":
      abstract[key] = sds(names[i], m)
    else:
      abstract[key] = {f: sds(f"{names[i]}/{f}", fm) for f, fm in m["fields"].items()}
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(os.path.join(directory, _ARRAYS), abstract)
  leaves = []
  for i, m in enumerate(leaf_meta):
    stored = tree[f"leaf_{i}"]
    if m["kind"] == "array":
      leaves.append(_unstore(stored, m["dtype"]))
      continue
    fields = {f: None for f in _FIELDS}
    for f, fm in m["fields"].items():
      fields[f] = _unstore(stored[f], fm["dtype"])
    q = QArray(**fields, spec=spec_from_json(m["spec"]), shape=tuple(m["shape"]),
               dtype=m["dtype"], pack_axis=m["pack_axis"])
    if m["kind"] == "QWeight":
      q = _rules.as_qweight(q, transposed=m["transposed"])
    leaves.append(q)
  if target is None:
    return _from_skeleton(skeleton, leaves)
  return _onto_target(target, names, leaves)


def _leaf_paths(sk, prefix: str, names: list) -> None:
  if sk is None:
    return
  if "leaf" in sk:
    names[sk["leaf"]] = prefix
    return
  if "dict" in sk:
    items = [(str(k), v) for k, v in sk["dict"]]
  else:
    items = [(str(i), v) for i, v in enumerate(sk.get("list", sk.get("tuple", [])))]
  for k, v in items:
    _leaf_paths(v, f"{prefix}/{k}" if prefix else k, names)


def _onto_target(target, names: list, leaves: list):
  by_path = dict(zip(names, leaves))
  flat, treedef = jax.tree_util.tree_flatten_with_path(target, is_leaf=_rules.is_qarray)
  paths = [_rules.path_str(kp) for kp, _ in flat]
  if sorted(paths) != sorted(by_path):
    missing = sorted(set(by_path) - set(paths))[:5]
    extra = sorted(set(paths) - set(by_path))[:5]
    raise ValueError(f"target does not have the saved paths: saved but not in target "
                     f"{missing}, in target but not saved {extra}")
  return jax.tree_util.tree_unflatten(treedef, [by_path[p] for p in paths])


def disk_bytes(directory: str) -> int:
  """Total size in bytes of the files under ``directory``."""
  total = 0
  for root, _, files in os.walk(directory):
    for name in files:
      total += os.path.getsize(os.path.join(root, name))
  return total


__all__ = ["save", "restore", "disk_bytes", "spec_to_json", "spec_from_json"]
