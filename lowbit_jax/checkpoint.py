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
  lowbit_jax.json       format version, tree skeleton, per-leaf metadata with a
                        SHA-256 of every stored array, a SHA-256 of every file
                        under arrays/, and a SHA-256 of the metadata itself
  <extra files>         what the caller passed as save(..., extra_files=)

8-bit float codes and scales (``float8_*``) are stored bit-cast to ``uint8``
and cast back on restore, so no tensorstore float8 support is needed. JAX PRNG
key arrays are stored as their key data and rewrapped with their
implementation; empty arrays (which orbax cannot store) live in the metadata
alone. A numpy 64-bit array is refused unless ``jax_enable_x64`` is on: JAX
would narrow it to 32 bits and change its values.

Formats (version 3): every QArray's format is stored by its fields as well as
its registry name, so a custom format restores without being registered, and a
name that this process registers as a different format (the codes would
decode to other values) raises ``FormatMismatchError`` instead of restoring
wrong numbers. Version 2 checkpoints store the name alone and still restore
where that name is registered.

Crash safety: ``save`` writes the whole checkpoint into a hidden sibling
directory (``.<name>.tmp-*``), flushes it to disk, and only then puts it in
place: on Linux by atomically exchanging it with the old directory
(``renameat2(RENAME_EXCHANGE)``), elsewhere by two renames that ``restore`` and
the next ``save`` undo if a crash falls between them. A save killed at any
moment leaves the old checkpoint or the new one, never neither. Saves to the
same directory are serialized by an advisory lock (``.<name>.lowbit_jax.lock``
beside it): a second concurrent save raises ``SaveInProgressError``. Files a
caller keeps with the checkpoint (a run's own metadata) go in through
``save(..., extra_files=)``, so they are replaced in the same step. ``restore``
takes no lock: when a save replaces the checkpoint while it is being read, it
notices (the directory is another one afterwards) and reads it again.

Integrity: ``restore`` verifies the metadata's checksum, every file's checksum
and every restored array's checksum (``verify=False`` skips the last two, which
read everything once more, and checks only that every file is there with its
saved size), and checks each QArray's spec against the shapes and dtypes of its
stored arrays. A damaged checkpoint raises ``CheckpointCorruptedError``, one
line naming the damaged files and the leaves (pytree paths) whose arrays they
ruin: each stored array is then read on its own and checked, since an orbax
data file holds several arrays. ``restore`` never returns an array that differs
from the one saved, except with ``verify=False`` and a byte changed inside a
file without changing its size. Extra files are checked the same way (their
sizes and SHA-256 are in the metadata) when ``restore(files=)`` reads them.

Paths: orbax reads ``[...]`` in its directory's path as a glob character class
and tensorstore splits paths at a backslash, so arrays saved under such a path
land elsewhere or cannot be found; ``save`` and ``restore`` refuse those paths,
and ``save`` refuses a name too long for its temporary sibling.
"""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import uuid
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lowbit_jax import _io, _rules
from lowbit_jax import formats as _formats
from lowbit_jax.core._qarray import FIELDS as _FIELDS
from lowbit_jax.core._qarray import QArray
from lowbit_jax.core._spec import QuantSpec

VERSION = 3
_META = "lowbit_jax.json"
_ARRAYS = "arrays"
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
  """A format as JSON: its registry name (where it is the registered format) and
  always its fields, so that restore rebuilds exactly the saved format."""
  fields = {f.name: _json_value(getattr(fmt, f.name))
            for f in dataclasses.fields(fmt) if f.init}
  out = {"format_type": type(fmt).__name__, "fields": fields}
  try:
    if fmt.name and _formats.get(fmt.name) == fmt:
      out["format"] = fmt.name
  except (KeyError, ValueError):
    pass
  return out


class FormatMismatchError(ValueError):
  """A checkpoint's format differs from the one registered under its name."""


def _format_from_json(d: dict) -> _formats.Format:
  name = d.get("format")
  if "fields" not in d:  # version 2: the registry name alone
    try:
      return _formats.get(name)
    except (KeyError, ValueError, TypeError):
      raise FormatMismatchError(
          f"the checkpoint uses format {name!r}, which is not registered in this "
          "process; register the same format under that name "
          "(lowbit_jax.formats.register) before restoring") from None
  cls = _FORMAT_TYPES.get(d.get("format_type"))
  if cls is None:
    raise ValueError(f"unknown format type in checkpoint metadata: {d!r}")
  fmt = cls(**{k: _from_json_value(v) for k, v in d["fields"].items()})
  if name is not None:
    # Only a registration (or a built-in alias) can clash: a bare ``eXmY``
    # name that nothing registered means get()'s on-demand format, which a
    # custom format saved under that name need not be.
    registered = _formats.get(name) if name in _formats.names() else None
    if registered is not None and registered != fmt:
      raise FormatMismatchError(
          f"the checkpoint's format {name!r} ({fmt!r}) differs from the format "
          f"registered as {name!r} in this process ({registered!r}); its codes "
          "mean the saved format's values: register that format under "
          f"{name!r} (or restore in a process that does not redefine it)")
  return fmt


def spec_to_json(spec: QuantSpec) -> dict:
  """A QuantSpec as JSON-able data (``spec_from_json`` inverts it)."""
  return {f.name: _json_value(getattr(spec, f.name)) for f in dataclasses.fields(spec)}


def spec_from_json(d: dict) -> QuantSpec:
  return QuantSpec(**{k: _from_json_value(v) for k, v in d.items()})


# ---------------------------------------------------------------------------
# Tree skeleton


def _skeleton(tree, leaves: list, names: list, path: str = ""):
  """The JSON skeleton of ``tree``; appends its leaves and their paths (as
  ``_leaf_paths`` reads them back) to ``leaves`` and ``names``."""
  if isinstance(tree, QArray) or tree is None or not _is_container(tree):
    if tree is None:
      return None
    if not isinstance(tree, (QArray, jax.Array, np.ndarray)):
      where = f"leaf {path!r}" if path else "the tree"
      inner = jax.tree_util.tree_leaves(tree)
      hint = ("only arrays, QArrays and None can be saved"
              if len(inner) == 1 and inner[0] is tree else
              "save() takes nested dicts, lists and tuples: convert it first "
              "(flax.serialization.to_state_dict, nnx.to_pure_dict) and "
              "restore with target= to get the original containers back")
      raise TypeError(f"{where} is a {type(tree).__name__}; {hint}")
    leaves.append(tree)
    names.append(path)
    return {"leaf": len(leaves) - 1}
  join = lambda k: f"{path}/{k}" if path else str(k)
  if isinstance(tree, dict):
    return {"dict": [[_key_json(k), _skeleton(v, leaves, names, join(k))]
                     for k, v in tree.items()]}
  kind = "list" if isinstance(tree, list) else "tuple"
  return {kind: [_skeleton(v, leaves, names, join(i)) for i, v in enumerate(tree)]}


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


# Sub-byte dtypes orbax (tensorstore) stores as they are; the others (uint4,
# uint2, float4_e2m1fn, ...) are widened to one uint8 per element.
_NATIVE_SUB_BYTE = ("int4", "int2")


def _bits(dt) -> int:
  try:
    return jnp.iinfo(dt).bits if jnp.issubdtype(dt, jnp.integer) else jnp.finfo(dt).bits
  except ValueError:
    return 8 * dt.itemsize


def _storable(x: jax.Array):
  """(array orbax can store, dtype name to restore)."""
  dt = jnp.dtype(x.dtype)
  name = dt.name
  bits = _bits(dt) if jnp.issubdtype(dt, jnp.number) else 8 * dt.itemsize
  if bits < 8 and name not in _NATIVE_SUB_BYTE:
    if jnp.issubdtype(dt, jnp.floating):   # its bits, as an unsigned int
      x = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}"))
    return x.astype(jnp.uint8), name
  if dt.itemsize == 1 and jnp.issubdtype(dt, jnp.floating):
    return jax.lax.bitcast_convert_type(x, jnp.uint8), name
  return x, name


def _unstore(x: jax.Array, name: str) -> jax.Array:
  dt = jnp.dtype(name)
  if dt == x.dtype:
    return x
  bits = _bits(dt)
  if bits < 8:   # widened to uint8 by _storable
    if jnp.issubdtype(dt, jnp.floating):
      return jax.lax.bitcast_convert_type(x.astype(jnp.dtype(f"uint{bits}")), dt)
    return x.astype(dt)
  return jax.lax.bitcast_convert_type(x, dt)


def _array_meta(x) -> dict:
  return {"shape": list(x.shape), "dtype": jnp.dtype(x.dtype).name}


def _to_json_tree(params, what: str):
  """``(skeleton, leaves, their paths)`` of a tree to save."""
  leaves, names = [], []
  try:
    skeleton = _skeleton(params, leaves, names)
  except TypeError as e:
    raise TypeError(f"{what}: {e}") from None
  return skeleton, leaves, names


class CheckpointCorruptedError(ValueError):
  """A checkpoint whose files or arrays do not match their stored checksums."""


class SaveInProgressError(RuntimeError):
  """Another ``save`` to the same directory holds its lock."""


def _sha256_array(x) -> str:
  a = np.ascontiguousarray(np.asarray(jax.device_get(x)))
  return hashlib.sha256(a.reshape(-1).view(np.uint8)).hexdigest()


def _sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def _file_manifest(root: str) -> dict:
  """{relative path: {"size", "sha256"}} of every file under ``root``."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      p = os.path.join(dirpath, name)
      out[os.path.relpath(p, root)] = {"size": os.path.getsize(p),
                                       "sha256": _sha256_file(p)}
  return out


def _meta_digest(meta: dict) -> str:
  body = {k: v for k, v in meta.items() if k != "sha256"}
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _fsync_tree(root: str) -> None:
  """Flushes every file and directory under ``root`` to disk."""
  for dirpath, _, files in os.walk(root):
    for name in files:
      fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    _fsync_dir(dirpath)


_fsync_dir = _io.fsync_dir   # (a name of this module: the fault-injection tests patch it)


# ---------------------------------------------------------------------------
# Atomic replacement and the save lock


def _sibling(directory: str, kind: str) -> str:
  parent, name = os.path.split(directory)
  return os.path.join(parent, f".{name}.{kind}")


def _leftovers(directory: str, kind: str) -> list:
  """The ``.<name>.<kind>-<pid>-<8 hex>`` siblings a save of ``directory``
  made. The whole name must match: those of a checkpoint named, say,
  ``<name>.old-1`` start with the same prefix and are another checkpoint's."""
  parent, name = os.path.split(directory)
  own = re.compile(re.escape(f".{name}.{kind}-") + r"[0-9]+-[0-9a-f]{8}")
  try:
    entries = os.listdir(parent)
  except FileNotFoundError:
    return []
  return sorted(os.path.join(parent, e) for e in entries if own.fullmatch(e))


def _exchange_fn():
  """``renameat2(..., RENAME_EXCHANGE)`` from libc, or None where it is missing."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    fn = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):
    return None
  fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                 ctypes.c_uint]
  fn.restype = ctypes.c_int
  return fn


_RENAMEAT2 = _exchange_fn()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: str, b: str) -> bool:
  """Atomically swaps two directories; False where the system cannot."""
  if _RENAMEAT2 is None:
    return False
  if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
    return False
  raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def _replace(tmp: str, directory: str) -> None:
  """Puts the complete checkpoint ``tmp`` at ``directory`` atomically."""
  if not os.path.exists(directory):
    os.rename(tmp, directory)
  elif _exchange(tmp, directory):
    shutil.rmtree(tmp)  # the old checkpoint, now at tmp
  else:
    # Two renames; a crash between them leaves the old checkpoint at `old`,
    # which restore() reads and the next save() moves back (_recover).
    old = f"{_sibling(directory, 'old')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old)
  _fsync_dir(os.path.dirname(directory))


def _check_replaceable(directory: str) -> None:
  """Raises unless ``save(force=True)`` may replace the existing ``directory``:
  a checkpoint, an empty directory, or one whose metadata is gone but that
  holds nothing except orbax's arrays/ (a damaged checkpoint); a user's own
  folder (even one that happens to hold an arrays/ folder) is never replaced."""
  entries = os.listdir(directory) if os.path.isdir(directory) else None
  if entries is None or (entries and not _is_checkpoint(directory)
                         and not (set(entries) == {_ARRAYS}
                                  and _orbax_arrays(directory))):
    raise ValueError(f"{directory} exists and is not a lowbit_jax checkpoint; "
                     "save() replaces the whole directory, so it refuses to "
                     "delete it: remove it yourself or save elsewhere")


# Beside the checkpoint, save adds at most this many bytes to its name: the
# temporary ".<name>.tmp-<pid>-<8 hex>" (a pid has at most 7 digits).
_SIBLING_EXTRA = len(".") + len(".tmp-") + 7 + len("-") + 8


def _check_save_path(directory: str) -> None:
  """Raises for a path orbax cannot store arrays under, or a name too long
  for the temporary and lock files ``save`` puts beside it."""
  doing = "save:"
  _io.check_orbax_path(directory, doing)
  parent, name = os.path.split(directory)
  try:
    limit = os.pathconf(parent if os.path.isdir(parent) else "/", "PC_NAME_MAX")
  except (OSError, ValueError):
    limit = 255
  n = len(os.fsencode(name))
  if n + _SIBLING_EXTRA > limit:
    raise ValueError(
        f"{doing} {directory}: its name is {n} bytes; save writes the checkpoint "
        f"beside it first, under a name {_SIBLING_EXTRA} bytes longer, and this "
        f"file system allows {limit}: use a name of at most "
        f"{limit - _SIBLING_EXTRA} bytes")


def check_save_target(directory: str, *, force: bool = False) -> None:
  """Raises now what ``save(directory, ..., force=force)`` would raise about
  the target directory, for callers with a long computation before the save.

  Raises:
    FileExistsError: ``directory`` exists and ``force`` is False.
    ValueError: ``force`` is True but ``directory`` is not a checkpoint that
      ``save`` may replace; a path orbax cannot store arrays under (with
      ``[...]`` or a backslash), or a name too long for the temporary
      directory ``save`` writes beside it.
  """
  directory = os.path.abspath(os.fspath(directory))
  _check_save_path(os.path.realpath(directory))
  if os.path.exists(directory):
    if not force:
      raise FileExistsError(f"{directory} exists; pass force=True to overwrite it")
    _check_replaceable(directory)


def _is_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, _META))


# Files orbax's StandardCheckpointer writes into the arrays directory.
_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "manifest.ocdbt", "_METADATA",
                  "commit_success.txt")


def _orbax_arrays(path: str) -> bool:
  """Whether ``path/arrays`` is empty or written by orbax (not a user's folder)."""
  arrays = os.path.join(path, _ARRAYS)
  if not os.path.isdir(arrays):
    return False
  names = os.listdir(arrays)
  return not names or any(m in names for m in _ORBAX_MARKERS)


def _recover(directory: str) -> None:
  """Under the save lock: undoes a crash of an earlier save."""
  if not os.path.exists(directory):
    olds = [p for p in _leftovers(directory, "old") if _is_checkpoint(p)]
    if olds:
      os.rename(olds[-1], directory)
  for p in _leftovers(directory, "tmp") + _leftovers(directory, "old"):
    shutil.rmtree(p, ignore_errors=True)


class _SaveLock:
  """An exclusive ``flock`` on ``.<name>.lowbit_jax.lock`` beside the checkpoint.

  The kernel drops the lock when its holder dies, so a killed save never
  blocks the next one.
  """

  def __init__(self, directory: str):
    self.directory = directory
    self.path = _sibling(directory, "lowbit_jax.lock")
    self.fd = None

  def __enter__(self):
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        raise SaveInProgressError(
            f"another save to {self.directory} is in progress (it holds "
            f"{self.path}); wait for it to finish or save elsewhere") from None
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:  # else the previous holder removed the file after we opened it
        self.fd = fd
        return self
      os.close(fd)

  def __exit__(self, *exc):
    try:
      os.unlink(self.path)
    finally:
      os.close(self.fd)


# ---------------------------------------------------------------------------
# Save and restore


def _leaf_record(name: str, leaf) -> tuple:
  """(what orbax stores for one leaf or None, the leaf's metadata)."""
  if isinstance(leaf, QArray):
    # What restore would refuse as damaged is refused here, before writing.
    from lowbit_jax.core._quantize import expected_fields  # pylint: disable=g-import-not-at-top
    try:
      expect = expected_fields(leaf.spec, tuple(leaf.shape), str(jnp.dtype(leaf.dtype)))
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"save: QArray {name!r} has a spec and shape quantize cannot "
                       f"make ({type(e).__name__}: {e})") from None
    why = _fields_mismatch(expect, {f: (jnp.shape(getattr(leaf, f)),
                                        jnp.result_type(getattr(leaf, f)))
                                    for f in _FIELDS if getattr(leaf, f) is not None})
    if why is not None:
      raise ValueError(f"save: QArray {name!r} holds {why}: its arrays are not "
                       f"those of its recorded {tuple(leaf.shape)} {leaf.spec} "
                       "(cast or reshaped by a tree map?); nothing was written")
    fields, dtypes = {}, {}
    for f in _FIELDS:
      a = getattr(leaf, f)
      if a is not None:
        fields[f], dtypes[f] = _storable(a)
    return fields, {
        "kind": type(leaf).__name__, "spec": spec_to_json(leaf.spec),
        "shape": list(leaf.shape), "dtype": leaf.dtype, "pack_axis": leaf.pack_axis,
        "code_order": leaf.code_order,
        "transposed": bool(getattr(leaf, "transposed", False)),
        "fields": {f: {"shape": list(fields[f].shape),
                       "stored": jnp.dtype(fields[f].dtype).name, "dtype": dtypes[f],
                       "sha256": _sha256_array(fields[f])} for f in fields}}
  kind = "array"
  if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype,
                                                          jax.dtypes.prng_key):
    impl = str(jax.random.key_impl(leaf))
    leaf, kind = jax.random.key_data(leaf), "key"
  elif isinstance(leaf, np.ndarray):
    narrow = jax.dtypes.canonicalize_dtype(leaf.dtype)
    if narrow != leaf.dtype:
      raise ValueError(
          f"save: leaf {name!r} is a numpy {leaf.dtype} array, which JAX without "
          f"jax_enable_x64 holds as {narrow}, changing its values; cast it yourself "
          f"(x.astype(np.{narrow})) or enable x64 "
          "(jax.config.update('jax_enable_x64', True))")
  arr, dtype = _storable(jnp.asarray(leaf))
  m = {"kind": kind, "shape": list(arr.shape), "stored": jnp.dtype(arr.dtype).name,
       "dtype": dtype, "sha256": _sha256_array(arr)}
  if kind == "key":
    m["impl"] = impl
  if arr.size == 0:  # orbax refuses empty arrays: the metadata alone rebuilds it
    m["empty"] = True
    return None, m
  return arr, m


def _check_extra_files(extra_files) -> dict:
  out = {}
  for name, data in (extra_files or {}).items():
    if (not isinstance(name, str) or name in (_META, _ARRAYS, "", ".", "..")
        or os.sep in name or (os.altsep and os.altsep in name)
        or name.startswith(".")):
      raise ValueError(f"save: extra file name {name!r} must be a plain file name, "
                       f"not {_META!r}, {_ARRAYS!r} or hidden")
    if isinstance(data, str):
      data = data.encode("utf-8")
    if not isinstance(data, bytes):
      raise TypeError(f"save: extra file {name!r} must be str or bytes, got "
                      f"{type(data).__name__}")
    out[name] = data
  return out


def save(directory: str, params: Any, *, force: bool = False,
         extra_files: dict | None = None) -> None:
  """Saves a parameter pytree (arrays and QArrays) to ``directory``, atomically.

  The checkpoint is written completely beside ``directory`` and then put in
  its place in one step (see the module docstring): if the process dies at
  any moment, ``directory`` holds the old checkpoint or the new one. A
  ``directory`` that is a symbolic link is written where the link points.

  Args:
    directory: a path that does not exist yet (or ``force=True``).
    params: nested dicts/lists/tuples of arrays, QArrays and QWeights (use
      ``nnx.to_pure_dict(state)`` or ``flax.core.unfreeze`` for other
      containers; restore with ``target=`` to get them back). JAX PRNG key
      arrays and empty arrays round-trip too; numpy 64-bit arrays need
      ``jax_enable_x64`` (without it they are refused, not narrowed).
    force: replace an existing checkpoint (the whole directory: files other
      code wrote into it are not kept; pass them as ``extra_files``).
    extra_files: ``{file name: str or bytes}`` written into the checkpoint
      directory with it, so they are replaced in the same atomic step (e.g. a
      run's own JSON metadata). ``restore`` ignores them.

  Raises:
    TypeError: a leaf that is not an array or QArray, or an unsupported
      container.
    ValueError: two leaves with the same path (a dict key holding "/" and a
      nested dict spelling the same path), a numpy 64-bit array without x64,
      or ``force`` is True but ``directory`` is not a lowbit_jax checkpoint
      and holds other files (it is never deleted).
    FileExistsError: ``directory`` exists and ``force`` is False.
    SaveInProgressError: another save to ``directory`` is running.
  """
  directory = os.path.realpath(os.path.abspath(os.fspath(directory)))
  _check_save_path(directory)
  if os.path.exists(directory) and not force:
    raise FileExistsError(f"{directory} exists; pass force=True to overwrite it")
  extra = _check_extra_files(extra_files)
  skeleton, leaves, names = _to_json_tree(params, "save")
  seen = set()
  for name in names:
    if name in seen:
      raise ValueError(f"save: two leaves have the path {name!r} (a dict key "
                       "containing '/' spells the same path as nested dicts); "
                       "rename one of them")
    seen.add(name)
  tree, meta = {}, []
  for i, leaf in enumerate(leaves):
    stored, m = _leaf_record(names[i], leaf)
    if stored is not None:
      tree[f"leaf_{i}"] = stored
    meta.append(m)
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  with _SaveLock(directory):
    _recover(directory)
    check_save_target(directory, force=force)   # again, under the lock
    tmp = f"{_sibling(directory, 'tmp')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
      arrays = os.path.join(tmp, _ARRAYS)
      if tree:
        _write_arrays(arrays, tree)
      else:  # nothing for orbax (every leaf empty or None)
        os.makedirs(arrays)
      for fname, data in extra.items():
        with open(os.path.join(tmp, fname), "wb") as f:
          f.write(data)
      record = {"version": VERSION, "skeleton": skeleton, "leaves": meta,
                "files": _file_manifest(arrays),
                "extra_files": {fname: {"size": len(data),
                                        "sha256": hashlib.sha256(data).hexdigest()}
                                for fname, data in extra.items()}}
      record["sha256"] = _meta_digest(record)
      _write_meta(os.path.join(tmp, _META), record)
      _fsync_tree(tmp)
      _replace(tmp, directory)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise


def _write_arrays(path: str, tree: dict) -> None:
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, tree)
    ckptr.wait_until_finished()


def _write_meta(path: str, record: dict) -> None:
  with open(path, "w") as f:
    json.dump(record, f)


def _fitting(s: jax.sharding.Sharding, path: str, shape: tuple):
  """``s``, or a ValueError naming the leaf when it cannot lay out ``shape``."""
  try:
    s.shard_shape(tuple(shape))
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise ValueError(
        f"restore: the sharding given for {path!r} (shape {tuple(shape)}) does not "
        f"fit it ({type(e).__name__}: {first}); pass a sharding function "
        "(path, shape, dtype) -> Sharding that splits only dims its mesh axes "
        "divide (e.g. replicated for small or odd-sized arrays)") from None
  return s


def _sharding_for(sharding: ShardingLike, path: str, shape: tuple, dtype):
  if sharding is None:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(sharding, jax.sharding.Sharding):
    return _fitting(sharding, path, shape)
  if callable(sharding):
    s = sharding(path, shape, dtype)
    if not isinstance(s, jax.sharding.Sharding):
      raise TypeError(f"the sharding function returned {type(s).__name__} for "
                      f"{path}; it must return a jax.sharding.Sharding")
    return _fitting(s, path, shape)
  raise TypeError(f"sharding must be None, a jax.sharding.Sharding or a function "
                  f"(path, shape, dtype) -> Sharding; got {type(sharding).__name__}")


def _read_meta(directory: str) -> dict:
  meta_path = os.path.join(directory, _META)
  try:
    with open(meta_path, "rb") as f:
      meta = json.loads(f.read().decode("utf-8"))
    if not isinstance(meta, dict):
      raise ValueError(f"a JSON {type(meta).__name__}, not an object")
  except (ValueError, UnicodeDecodeError) as e:
    raise CheckpointCorruptedError(
        f"{meta_path} is damaged (not valid JSON metadata: {e}); the checkpoint in "
        f"{directory} cannot be read") from None
  version = meta.get("version", 0)
  if not isinstance(version, int):
    raise CheckpointCorruptedError(f"{meta_path} is damaged (version {version!r})")
  if version > VERSION:
    raise ValueError(f"checkpoint format version {version} is newer than this "
                     f"lowbit_jax reads ({VERSION}); upgrade lowbit_jax")
  if version >= 2 and meta.get("sha256") != _meta_digest(meta):
    raise CheckpointCorruptedError(
        f"{meta_path} is damaged: its contents do not match its checksum")
  if not isinstance(meta.get("skeleton"), (dict, type(None))) or not isinstance(
      meta.get("leaves"), list):
    raise CheckpointCorruptedError(f"{meta_path} is damaged (no skeleton or leaves)")
  return meta


def _damaged_files(directory: str, manifest: dict, *, contents: bool = True) -> list:
  """The files under arrays/ that are missing, resized or (``contents``) changed."""
  root = os.path.join(directory, _ARRAYS)
  bad = []
  for rel, want in sorted(manifest.items()):
    p = os.path.join(root, rel)
    if not os.path.isfile(p):
      bad.append(f"{p} (missing)")
    elif os.path.getsize(p) != want["size"]:
      bad.append(f"{p} (size {os.path.getsize(p)}, saved {want['size']})")
    elif contents and _sha256_file(p) != want["sha256"]:
      bad.append(f"{p} (checksum mismatch)")
  return bad


def _stored_arrays(leaf_meta: list, names: list):
  """(orbax key, leaf path, field metadata) of every stored array."""
  for i, m in enumerate(leaf_meta):
    if m.get("empty"):
      continue
    if m["kind"] in ("array", "key"):
      yield f"leaf_{i}", names[i], m
    else:
      for f, fm in m["fields"].items():
        yield f"leaf_{i}.{f}", f"{names[i]}/{f}", fm


def _damaged_leaves(directory: str, leaf_meta: list, names: list) -> list:
  """Which leaves a damaged checkpoint still reads back right.

  Orbax's data files hold several arrays each, so a damaged file does not by
  itself say which leaves it ruins: every stored array is read on its own
  (tensorstore directly, the way orbax lays them out) and checked against its
  SHA-256. Only called once a file is known to be damaged.

  Returns:
    ``["'path' (why)", ...]`` for the arrays that cannot be read or read back
    different from what was saved; [] if every array still matches.
  """
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  root = os.path.join(directory, _ARRAYS)
  out = []
  for key, name, fm in _stored_arrays(leaf_meta, names):
    spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt",
                                          "base": {"driver": "file", "path": f"{root}/"},
                                          "path": f"{key}/"}}
    try:
      arr = ts.open(spec, open=True, read=True).result().read().result()
    except Exception:  # pylint: disable=broad-except
      out.append(f"{name!r} (unreadable)")
      continue
    if (tuple(arr.shape) != tuple(fm["shape"]) or "sha256" not in fm
        or _sha256_array(arr) != fm["sha256"]):
      out.append(f"{name!r} (reads back different)")
  return out


def _damage_report(directory: str, bad_files: list, leaf_meta: list,
                   names: list) -> str:
  """One line naming the damaged files and the leaves they ruin."""
  try:
    leaves = _damaged_leaves(directory, leaf_meta, names)
  except Exception as e:  # pylint: disable=broad-except
    leaves = None
    why = f"{type(e).__name__}: {e}".splitlines()[0][:200]
  msg = (f"the checkpoint in {directory} is damaged: files {', '.join(bad_files)} do "
         "not match what save() stored; ")
  if leaves is None:
    return msg + (f"the leaves they hold could not be checked one by one ({why}): "
                  "do not trust any array of this checkpoint")
  if leaves:
    n = sum(1 for _ in _stored_arrays(leaf_meta, names))
    return msg + (f"{len(leaves)} of its {n} stored arrays are ruined: "
                  f"{', '.join(leaves)}")
  return msg + ("every leaf's array still reads back matching its checksum (the "
                "damage is in orbax's bookkeeping files); restore(..., verify=False) "
                "skips the checksums and may still read it")


def _fields_mismatch(expect: QArray, got: dict) -> Optional[str]:
  """None when ``got`` (field -> (shape, dtype name)) are the arrays
  ``quantize`` makes (``expect``, abstract), else what differs. A leading
  stack every field shares is allowed: per-layer QArrays stacked for a
  ``lax.scan`` (``jax.vmap(quantize)`` of the layers) record one layer's
  shape."""
  lead = None
  for f in _FIELDS:
    want, g = getattr(expect, f), got.get(f)
    exp = None if want is None else (tuple(want.shape), jnp.dtype(want.dtype).name)
    desc = None if g is None else (tuple(g[0]), jnp.dtype(g[1]).name)
    if (want is None) != (g is None):
      return f"{f} as {desc}, where quantize makes {exp}"
    if want is None:
      continue
    n = len(desc[0]) - len(exp[0])
    if n < 0 or desc[0][n:] != exp[0] or desc[1] != exp[1]:
      return f"{f} as {desc}, where quantize makes {exp}"
    if lead is None:
      lead = desc[0][:n]
    elif desc[0][:n] != lead:
      return (f"{f} with leading axes {desc[0][:n]}, the other fields {lead} (a "
              "stack of QArrays shares its leading axes)")
  return None


def _check_spec(name: str, m: dict, meta_path: str) -> None:
  """The stored arrays of a QArray leaf have the shapes its spec implies."""
  from lowbit_jax.core._quantize import expected_fields  # pylint: disable=g-import-not-at-top
  try:
    spec = spec_from_json(m["spec"])
    expect = expected_fields(spec, tuple(m["shape"]), str(m["dtype"]))
  except FormatMismatchError as e:
    raise FormatMismatchError(f"leaf {name!r}: {e}") from None
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointCorruptedError(
        f"{meta_path} is damaged: leaf {name!r} has a spec or shape that cannot "
        f"be quantized ({type(e).__name__}: {e})") from None
  why = _fields_mismatch(expect, {f: (g["shape"], g["dtype"])
                                  for f, g in m["fields"].items()})
  if why is not None:
    raise CheckpointCorruptedError(
        f"{meta_path} is damaged: leaf {name!r} stores {why} (its spec {spec} of a "
        f"{tuple(m['shape'])} array)")


def _locate(directory: str) -> str:
  """``directory``, or the old checkpoint a crashed two-rename swap left beside it."""
  if not os.path.exists(directory):
    olds = [p for p in _leftovers(directory, "old") if _is_checkpoint(p)]
    if olds:
      return olds[-1]
  return directory


def restore(directory: str, *, sharding: ShardingLike = None,
            target: Any = None, verify: bool = True,
            files: Sequence[str] = ()) -> Any:
  """Restores a pytree saved by ``save``, bit for bit, checking its integrity.

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
    verify: check the SHA-256 of every file and of every restored array
      against the ones ``save`` stored (reads everything once more; pass False
      for speed). The metadata's own checksum, the specs and the files' sizes
      are always checked.

    files: names of ``extra_files`` the save wrote, read in the same attempt
      as the arrays (so they always belong to the same checkpoint, which
      reading them apart from ``restore`` does not guarantee when a save may
      run concurrently).

  A checkpoint that a concurrent ``save`` replaces while it is read is read
  again (up to ``_RESTORE_ATTEMPTS`` times), so the result is always one
  whole checkpoint, never parts of two.

  Returns:
    The restored pytree (QArrays and QWeights rebuilt with their specs); with
    ``files``, ``(pytree, {name: bytes})``.

  Raises:
    ValueError: not a lowbit_jax checkpoint, a newer format version, a
      ``target`` whose paths, shapes or dtypes differ from the saved ones, a
      ``sharding`` that does not fit a leaf, or 64-bit arrays while
      ``jax_enable_x64`` is off.
    FileNotFoundError: one of ``files`` is not in the checkpoint.
    FormatMismatchError: (a ValueError) a format the checkpoint names is
      registered here as a different format, or (version 2) not registered.
    CheckpointCorruptedError: (a ValueError) damaged metadata, files or
      arrays; the message names the files and leaves.
  """
  directory = os.path.abspath(os.fspath(directory))
  _io.check_orbax_path(os.path.realpath(directory), "restore:")
  for attempt in range(_RESTORE_ATTEMPTS):
    where = _locate(directory)
    before = _identity(where)
    try:
      out = _restore_once(where, sharding, target, verify)
      if files:
        recorded = _read_meta(where).get("extra_files", {})
        out = (out, {name: _read_extra(where, name, recorded.get(name), verify)
                     for name in files})
    except (ValueError, OSError):
      if attempt + 1 < _RESTORE_ATTEMPTS and _identity(_locate(directory)) != before:
        continue  # a save replaced the checkpoint while it was read: read again
      raise
    if _identity(_locate(directory)) == before:
      return out
  raise CheckpointCorruptedError(
      f"the checkpoint in {directory} was replaced by a save {_RESTORE_ATTEMPTS} "
      "times while it was being read; restore it when the saves pause")


_RESTORE_ATTEMPTS = 5


def _read_extra(directory: str, name: str, want: Optional[dict],
                verify: bool) -> bytes:
  """An extra file, checked against the size and (``verify``) SHA-256 the
  save recorded, ``want`` (None: a checkpoint from before lowbit_jax recorded
  them, unchecked)."""
  if os.path.basename(name) != name or name in (_META, _ARRAYS):
    raise ValueError(f"files: {name!r} is not an extra file's name (save's "
                     "extra_files keys are plain file names)")
  path = os.path.join(directory, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"the checkpoint in {directory} has no file {name!r} "
                            "(the save that wrote it did not pass it in extra_files)")
  with open(path, "rb") as f:
    data = f.read()
  if want is not None and (len(data) != want["size"] or (
      verify and hashlib.sha256(data).hexdigest() != want["sha256"])):
    why = (f"size {len(data)}, saved {want['size']}" if len(data) != want["size"]
           else "checksum mismatch")
    raise CheckpointCorruptedError(
        f"the checkpoint in {directory} is damaged: its file {path} ({why}) does "
        "not match what save() stored")
  return data


def _identity(path: str):
  """What changes when a save puts a new checkpoint at ``path``."""
  try:
    st = os.stat(path)
  except FileNotFoundError:
    return None
  return (st.st_dev, st.st_ino)


def _restore_once(directory: str, sharding: ShardingLike, target: Any,
                  verify: bool) -> Any:
  """One read of the checkpoint at ``directory`` (``restore`` retries it)."""
  meta_path = os.path.join(directory, _META)
  if not os.path.exists(meta_path):
    raise ValueError(f"{directory} is not a lowbit_jax checkpoint (no {_META}); "
                     "write it with lowbit_jax.checkpoint.save")
  meta = _read_meta(directory)
  skeleton, leaf_meta = meta["skeleton"], meta["leaves"]
  names = [None] * len(leaf_meta)
  try:
    _leaf_paths(skeleton, "", names)
    for i, m in enumerate(leaf_meta):
      if m["kind"] not in ("array", "key"):
        _check_spec(names[i], m, meta_path)
  except (KeyError, TypeError, IndexError, AttributeError) as e:
    raise CheckpointCorruptedError(
        f"{meta_path} is damaged (malformed metadata: {type(e).__name__} {e})"
    ) from None
  wide = sorted({names[i] + (f"/{f}" if f else "") + f" ({dt})"
                 for i, m in enumerate(leaf_meta)
                 for f, fm in ([("", m)] if "stored" in m else m.get("fields", {}).items())
                 for dt in (fm["stored"], fm["dtype"])
                 if jax.dtypes.canonicalize_dtype(jnp.dtype(dt)) != jnp.dtype(dt)})
  if wide:
    raise ValueError(
        f"the checkpoint in {directory} holds 64-bit arrays ({', '.join(wide[:5])}"
        + (f" and {len(wide) - 5} more" if len(wide) > 5 else "") + "), which "
        "JAX without jax_enable_x64 would narrow to 32 bits, changing their values; "
        "enable it (jax.config.update('jax_enable_x64', True)) before restoring")
  if "files" in meta:  # without verify, only missing and resized files (no reads)
    bad_files = _damaged_files(directory, meta["files"], contents=verify)
    if bad_files:  # orbax is not asked to read them: it would fail noisily or not at all
      raise CheckpointCorruptedError(_damage_report(directory, bad_files, leaf_meta,
                                                    names))

  def sds(path, m):
    shape = tuple(m["shape"])
    dt = jnp.dtype(m["stored"])
    return jax.ShapeDtypeStruct(shape, dt, sharding=_sharding_for(
        sharding, path, shape, jnp.dtype(m["dtype"])))

  abstract = {}
  for i, m in enumerate(leaf_meta):
    key = f"leaf_{i}"
    if m.get("empty"):
      continue
    if m["kind"] in ("array", "key"):
      abstract[key] = sds(names[i], m)
    else:
      abstract[key] = {f: sds(f"{names[i]}/{f}", fm) for f, fm in m["fields"].items()}
  try:
    tree = {}
    if abstract:  # a tree of only empty arrays and Nones stores nothing in orbax
      with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(os.path.join(directory, _ARRAYS), abstract)
  except Exception as e:  # pylint: disable=broad-except
    bad_files = (_damaged_files(directory, meta["files"]) if not verify and "files"
                 in meta else [])
    if bad_files:  # verify=False skipped the file checksums: name files and leaves
      raise CheckpointCorruptedError(_damage_report(directory, bad_files, leaf_meta,
                                                    names)) from None
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    leaves_named = sorted({names[int(k)] + (f"/{f}" if f else "")
                           for k, f in re.findall(r"leaf_(\d+)(?:\.(\w+))?", str(e))
                           if int(k) < len(names)})
    raise CheckpointCorruptedError(
        f"cannot read the arrays of the checkpoint in {directory}"
        + (f"; leaves: {', '.join(map(repr, leaves_named))}" if leaves_named else "")
        + f" ({type(e).__name__}: {first})") from None
  bad_leaves = []
  if verify:
    for i, m in enumerate(leaf_meta):
      if m.get("empty"):
        continue
      stored = tree[f"leaf_{i}"]
      if m["kind"] in ("array", "key"):
        pairs = [(names[i], stored, m)]
      else:
        pairs = [(f"{names[i]}/{f}", stored[f], fm) for f, fm in m["fields"].items()]
      for name, arr, fm in pairs:
        if "sha256" in fm and _sha256_array(arr) != fm["sha256"]:
          bad_leaves.append(name)
  if bad_leaves:
    raise CheckpointCorruptedError(
        f"the checkpoint in {directory} is damaged: leaves "
        f"{', '.join(map(repr, bad_leaves))} do not match their stored checksums "
        f"(in {os.path.join(directory, _ARRAYS)})")
  leaves = []
  for i, m in enumerate(leaf_meta):
    if m.get("empty"):
      stored = jax.device_put(
          np.zeros(m["shape"], m["stored"]),
          _sharding_for(sharding, names[i], tuple(m["shape"]), jnp.dtype(m["dtype"])))
    else:
      stored = tree[f"leaf_{i}"]
    if m["kind"] == "key":
      leaves.append(jax.random.wrap_key_data(stored, impl=m["impl"]))
      continue
    if m["kind"] == "array":
      leaves.append(_unstore(stored, m["dtype"]))
      continue
    fields = {f: None for f in _FIELDS}
    for f, fm in m["fields"].items():
      fields[f] = _unstore(stored[f], fm["dtype"])
    q = QArray(**fields, spec=spec_from_json(m["spec"]), shape=tuple(m["shape"]),
               dtype=m["dtype"], pack_axis=m["pack_axis"],
               code_order=m.get("code_order", "natural"))
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
  # An nnx.State's leaves sit under each Variable's "value" (".../kernel/value",
  # ".../stats/value/amax" for a Variable holding a dict) where its
  # to_pure_dict(), which save() takes, has ".../kernel" (".../stats/amax").

  def pure(p):
    if p in by_path:
      return p
    parts = p.split("/")
    for i in reversed(range(len(parts))):   # the Variable's own "value" (the
      if parts[i] == "value":               # last one: a module may be named so)
        q = "/".join(parts[:i] + parts[i + 1:])
        if q in by_path:
          return q
    return p
  paths = [pure(_rules.path_str(kp)) for kp, _ in flat]
  if sorted(paths) != sorted(by_path):
    missing = sorted(set(by_path) - set(paths))[:5]
    extra = sorted(set(paths) - set(by_path))[:5]
    raise ValueError(f"target does not have the saved paths: saved but not in target "
                     f"{missing}, in target but not saved {extra}")
  wrong = [f"{p!r} (saved {tuple(by_path[p].shape)}, target {tuple(t.shape)})"
           for p, (_, t) in zip(paths, flat)
           if hasattr(t, "shape") and tuple(t.shape) != tuple(by_path[p].shape)]
  if wrong:
    raise ValueError(f"target's shapes differ from the saved ones at {len(wrong)} "
                     f"leaves: {', '.join(wrong[:5])}; restore without target= to "
                     "see what was saved")
  wrong = [f"{p!r} (saved {jnp.dtype(by_path[p].dtype).name}, target "
           f"{jnp.dtype(t.dtype).name})" for p, (_, t) in zip(paths, flat)
           if getattr(t, "dtype", None) is not None
           and getattr(by_path[p], "dtype", None) is not None
           and jnp.dtype(t.dtype) != jnp.dtype(by_path[p].dtype)]
  if wrong:
    raise ValueError(f"target's dtypes differ from the saved ones at {len(wrong)} "
                     f"leaves: {', '.join(wrong[:5])}; restore returns the saved "
                     "dtypes bit for bit: restore without target= and cast, or "
                     "give a target of the saved dtypes")
  return jax.tree_util.tree_unflatten(treedef, [by_path[p] for p in paths])


def disk_bytes(directory: str) -> int:
  """Total size in bytes of the files under ``directory``."""
  total = 0
  for root, _, files in os.walk(directory):
    for name in files:
      total += os.path.getsize(os.path.join(root, name))
  return total


__all__ = ["save", "restore", "check_save_target", "disk_bytes", "spec_to_json",
           "spec_from_json", "CheckpointCorruptedError", "SaveInProgressError",
           "FormatMismatchError"]
