"""Sharding rules as data: ``[(path regex, partition), ...]`` -> NamedShardings.

A rule pairs a regular expression on a parameter path (pytree keys joined by
``/``, e.g. ``layers_0/attn/q_proj/kernel``) with a partition: a tuple with
one entry per array dim, each ``None`` (not split), a mesh axis name or a
tuple of axis names. The first rule whose regex fully matches wins; a path no
rule matches is replicated. A partition shorter than the array's rank applies
to its *trailing* dims, so one rule covers a dense ``[d, f]`` kernel and a
mixture-of-experts ``[E, d, f]`` one.

``LLAMA_RULES`` lays out ``lowbit_jax.models.llama``: FSDP splits each
matrix's input dim (its ``d_model`` side for the row-parallel ones) over
``"fsdp"``; tensor parallelism is Megatron's (Shoeybi et al., 2019): q/k/v/
gate/up are column-parallel (output dim over ``"tensor"``), o/down
row-parallel (input dim over ``"tensor"``), the embedding is vocab-parallel and
the output head splits the vocabulary; norms are replicated.

The same rules lay out everything else a training state holds, by the path of
the parameter each leaf belongs to:

* optimizer states: a leaf whose path ends with a parameter's path (``mu/
  layers_0/attn/q_proj/kernel``) and has its shape takes its layout;
* quantized arrays (QArray optimizer moments, real-quantized ``QWeight``
  parameters): codes, scales and zero points are split along the same dims,
  and only where every device gets whole scale blocks (and whole packed
  bytes). A moment stored over the *flattened* parameter (``lowbit_jax.optim``)
  is split along its one dim over all the mesh axes the parameter uses. A layout that would split a block raises, unless
  ``on_block_split="replicate"`` asks to keep that dim whole instead;
* learned quantization scales (``quant_scales``): by the path of the weight
  whose layer owns them; a dim is split where the scale grid lines up with the
  weight's split, and kept whole otherwise (scales are small);
* everything else (step counters, amax histories, PRNG keys): replicated.

Divisibility problems raise ``ValueError`` naming the parameter, its shape,
the dim and the mesh axis (``on_indivisible="replicate"`` keeps such a dim
whole instead).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lowbit_jax._rules import QWeight, is_qarray, path_str
from lowbit_jax.core._qarray import WGMMA_RUN_BYTES, QArray, block_shape, codes_unit
from lowbit_jax.train.mesh import FSDP, TENSOR

Partition = tuple
Rule = tuple  # (regex, Partition)

LLAMA_RULES: tuple[Rule, ...] = (
    (r"(.*/)?attn/(q_proj|k_proj|v_proj)/kernel", (FSDP, TENSOR)),
    (r"(.*/)?attn/o_proj/kernel", (TENSOR, FSDP)),
    (r"(.*/)?mlp/(gate_proj|up_proj)/kernel", (FSDP, TENSOR)),
    (r"(.*/)?mlp/down_proj/kernel", (TENSOR, FSDP)),
    (r"(.*/)?mlp/router/kernel", (FSDP, None)),
    (r"(.*/)?embed/embedding", (TENSOR, FSDP)),
    (r"(.*/)?lm_head/kernel", (FSDP, TENSOR)),
    (r".*", ()),
)

_POLICIES = ("error", "replicate")
_WEIGHT_NAMES = ("kernel", "embedding")


def _check_policy(name: str, value: str) -> str:
  if value not in _POLICIES:
    raise ValueError(f"{name} must be one of {_POLICIES}, got {value!r}.")
  return value


def as_rules(rules: Sequence[Any]) -> tuple[Rule, ...]:
  """Validates a rule list: ``[(regex, partition), ...]``.

  A partition entry is None, an axis name or a tuple/list of axis names; a
  ``PartitionSpec`` is accepted as the partition.

  Raises:
    ValueError: a bad regex or partition entry.
  """
  out = []
  for i, rule in enumerate(rules):
    if not isinstance(rule, (tuple, list)) or len(rule) != 2:
      raise ValueError(f"sharding rule {i} must be a (regex, partition) pair, got "
                       f"{rule!r}.")
    regex, part = rule
    try:
      re.compile(regex)
    except (re.error, TypeError) as e:
      raise ValueError(f"sharding rule {i}: {regex!r} is not a valid regular "
                       f"expression: {e}") from None
    if part is None:
      part = ()
    if isinstance(part, str):
      raise ValueError(f"sharding rule {i} ({regex!r}): the partition is the string "
                       f"{part!r}, not a tuple with one entry per dim (aligned to "
                       f"the parameter's trailing dims): ({part!r},) shards the "
                       f"last dim, ({part!r}, None) the one before it.")
    entries = []
    for e in tuple(part):
      if e is None or isinstance(e, str):
        entries.append(e)
      elif isinstance(e, (tuple, list)) and all(isinstance(a, str) for a in e):
        entries.append(tuple(e))
      else:
        raise ValueError(f"sharding rule {i} ({regex!r}): partition entries must be "
                         f"None, a mesh axis name or a tuple of names, got {e!r}.")
    out.append((regex, tuple(entries)))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class Layout:
  """A mesh plus the sharding rules and what to do where they do not fit.

  Attributes:
    mesh: the device mesh.
    rules: ``(regex, partition)`` pairs, first full match wins.
    on_indivisible: "error" (default) or "replicate": a dim whose size the
      mesh axes do not divide.
    on_block_split: "error" (default) or "replicate": a quantized array whose
      requested split would put one scale block (or one packed byte) on two
      devices.
  """
  mesh: Mesh
  rules: tuple = LLAMA_RULES
  on_indivisible: str = "error"
  on_block_split: str = "error"

  def __post_init__(self):
    object.__setattr__(self, "rules", as_rules(self.rules))
    _check_policy("on_indivisible", self.on_indivisible)
    _check_policy("on_block_split", self.on_block_split)

  def axis_size(self, entry) -> int:
    """Devices a partition entry splits a dim over."""
    if entry is None:
      return 1
    names = (entry,) if isinstance(entry, str) else entry
    return math.prod(self.mesh.shape[a] for a in names)

  def sharding(self, partition: Sequence[Any]) -> NamedSharding:
    """A NamedSharding for a per-dim partition (trailing Nones dropped)."""
    parts = list(partition)
    while parts and parts[-1] is None:
      parts.pop()
    return NamedSharding(self.mesh, P(*parts))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  # -- parameters ---------------------------------------------------------------

  def rule_for(self, path: str) -> Partition | None:
    """The partition of the first rule matching ``path`` (None: no rule)."""
    for regex, part in self.rules:
      if re.fullmatch(regex, path):
        return part
    return None

  def partition(self, path: str, shape: Sequence[int]) -> tuple:
    """The validated per-dim partition of a parameter (logical shape).

    Mesh axes of size 1 are dropped; an entry whose axes do not divide the
    dim raises (or is dropped with ``on_indivisible="replicate"``).

    Raises:
      ValueError: a partition longer than the rank, an axis the mesh lacks or
        uses twice, or an indivisible dim.
    """
    shape = tuple(int(d) for d in shape)
    part = self.rule_for(path)
    if part is None:
      return (None,) * len(shape)
    if len(part) > len(shape):
      raise ValueError(f"sharding rule for {path!r} has {len(part)} entries but the "
                       f"parameter has shape {shape} (rank {len(shape)}); give at "
                       "most one entry per dim.")
    part = (None,) * (len(shape) - len(part)) + tuple(part)
    out, used = [], set()
    for d, (size, entry) in enumerate(zip(shape, part)):
      if entry is None:
        out.append(None)
        continue
      names = (entry,) if isinstance(entry, str) else tuple(entry)
      for a in names:
        if a not in self.mesh.shape:
          raise ValueError(f"sharding rule for {path!r} names mesh axis {a!r}, but "
                           f"the mesh has axes {tuple(self.mesh.shape)}.")
        if a in used:
          raise ValueError(f"sharding rule for {path!r} uses mesh axis {a!r} on two "
                           "dims; an axis can split one dim only.")
        used.add(a)
      names = tuple(a for a in names if self.mesh.shape[a] > 1)
      n = math.prod(self.mesh.shape[a] for a in names)
      if n > 1 and size % n:
        if self.on_indivisible == "error":
          raise ValueError(
              f"parameter {path!r} of shape {shape}: dim {d} (size {size}) is not "
              f"divisible by mesh axis {'x'.join(names)!r} of size {n}. Change the "
              "mesh, add a sharding rule for this path that keeps the dim whole, "
              "or pass on_indivisible='replicate'.")
        names = ()
      out.append(None if not names else names[0] if len(names) == 1 else names)
    return tuple(out)

  def qarray_partitions(self, q: QArray, partition: Sequence[Any], path: str
                        ) -> tuple[tuple, tuple]:
    """Partitions of a QArray's codes and of its scales/zero points.

    ``partition`` is per dim of the *stored* array (``q.shape``). A dim is
    split only if every device then holds whole scale blocks and whole packed
    units along it.

    Raises:
      ValueError: a split that would break a block (unless
        ``on_block_split="replicate"``).
    """
    shape = tuple(q.shape)
    bs = block_shape(q.spec, shape)
    n_codes, unit = codes_unit(q.spec.storage_format.bits)
    scale_rank = q.scale.ndim
    codes_part, scale_part = [], []
    for d, entry in enumerate(partition):
      n = self.axis_size(entry)
      if n == 1:
        codes_part.append(None)
        scale_part.append(None)
        continue
      n_blocks = -(-shape[d] // bs[d])
      c = q.codes.shape[d]
      elems = c * n_codes // unit if d == q.pack_axis else c
      ok = (n_blocks % n == 0 and c % n == 0
            and elems == n_blocks * bs[d]
            and (d != q.pack_axis or (c // n) % unit == 0)
            # wgmma-ordered codes move bytes within runs of WGMMA_RUN_BYTES
            and (d != q.pack_axis or q.code_order == "natural"
                 or (c // n) % WGMMA_RUN_BYTES == 0)
            and (scale_rank == len(shape) and q.scale.shape[d] == n_blocks))
      if not ok:
        if self.on_block_split == "error":
          raise ValueError(
              f"{path!r}: splitting dim {d} of the quantized array (shape {shape}, "
              f"format {q.spec.format.name}, scale blocks of {bs[d]} along it, "
              f"codes {tuple(q.codes.shape)}) over mesh axis {entry!r} of size {n} "
              "would put one scale block or packed byte"
              + ("" if q.code_order == "natural" else
                 f" or {WGMMA_RUN_BYTES}-byte run of {q.code_order!r}-ordered codes")
              + " on two devices. Change the "
              "mesh or the block size, add a sharding rule keeping this dim whole, "
              "or pass on_block_split='replicate' to keep it whole.")
        codes_part.append(None)
        scale_part.append(None)
        continue
      codes_part.append(entry)
      scale_part.append(entry)
    if scale_rank != len(shape):
      scale_part = [None] * scale_rank
    return tuple(codes_part), tuple(scale_part)

  def qarray_shardings(self, q: QArray, partition: Sequence[Any], path: str
                       ) -> QArray:
    """The QArray-shaped pytree of NamedShardings for ``q`` (see above)."""
    cp, sp = self.qarray_partitions(q, partition, path)
    s_scale = self.sharding(sp)
    return dataclasses.replace(
        q, codes=self.sharding(cp), scale=s_scale,
        zero_point=None if q.zero_point is None else s_scale,
        tensor_scale=None if q.tensor_scale is None else self.replicated)

  def param_sharding(self, path: str, leaf) -> Any:
    """The sharding of one parameter leaf (an array or a QArray/QWeight)."""
    if isinstance(leaf, QArray):
      logical = (tuple(leaf.shape[::-1]) if isinstance(leaf, QWeight)
                 and leaf.transposed else tuple(leaf.shape))
      part = self.partition(path, logical)
      if isinstance(leaf, QWeight) and leaf.transposed:
        part = part[::-1]
      return self.qarray_shardings(leaf, part, path)
    return self.sharding(self.partition(path, leaf.shape))

  def params(self, params: Any) -> Any:
    """NamedShardings for a parameter pytree (float or real-quantized)."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: self.param_sharding(path_str(kp), x), params,
        is_leaf=is_qarray)

  # -- trees that follow the parameters -----------------------------------------

  def owners(self, params: Any, quant_scales: Any = None) -> dict:
    """``{path: (logical shape, partition)}`` of the leaves other trees follow.

    Parameters are listed under their own path and under ``params/<path>``,
    learned scales under ``quant_scales/<path>`` (the layout of an optimizer
    state built over ``{"params": ..., "quant_scales": ...}``).
    """
    out = {}
    for kp, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)[0]:
      path = path_str(kp)
      shape = (tuple(x.logical_shape) if isinstance(x, QWeight)
               else tuple(x.shape))
      entry = (shape, self.partition(path, shape))
      out[path] = entry
      out[f"params/{path}"] = entry
    if quant_scales is not None:
      shapes = {p: s for p, (s, _) in out.items()}
      for kp, x in jax.tree_util.tree_flatten_with_path(quant_scales)[0]:
        path = path_str(kp)
        out[f"quant_scales/{path}"] = (tuple(x.shape),
                                       self._scale_partition(path, x, shapes))
    return out

  def like(self, tree: Any, owners: Mapping[str, tuple]) -> Any:
    """Shardings for a tree whose leaves belong to ``owners`` (optimizer states).

    A leaf (array or QArray) whose path ends with an owner's path takes that
    owner's partition: as is when it has the owner's shape, block-wise when it
    is a QArray of that shape. Other leaves are replicated.
    """
    def one(kp, x):
      path = path_str(kp)
      owner = _owner(path, owners)
      if owner is None:
        return _replicate_leaf(self, x)
      shape, part = owners[owner]
      if isinstance(x, QArray):
        transposed = isinstance(x, QWeight) and x.transposed
        logical = tuple(x.shape[::-1]) if transposed else tuple(x.shape)
        if logical == shape:
          return self.qarray_shardings(x, part[::-1] if transposed else part, path)
        if x.ndim == 1 and logical[0] == math.prod(shape):
          # A moment over the flattened parameter: split it over all the
          # parameter's axes (each device keeps 1/n of it, in whole blocks).
          axes = tuple(a for e in part if e is not None
                       for a in ((e,) if isinstance(e, str) else e))
          entry = None if not axes else axes[0] if len(axes) == 1 else axes
          return self.qarray_shardings(x, (entry,), path)
        return _replicate_leaf(self, x)
      if tuple(x.shape) != shape:
        return self.replicated
      return self.sharding(part)

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=is_qarray)

  def like_params(self, tree: Any, params: Any) -> Any:
    """``like(tree, owners(params))``: e.g. the optimizer state of ``params``."""
    return self.like(tree, self.owners(params))

  def scales(self, quant_scales: Any, params: Any) -> Any:
    """Shardings for learned quantization scales, by their weight's layout.

    A scale leaf at ``<layer path>/...`` belongs to the weight
    ``<layer path>/kernel`` (or ``/embedding``). Its dims align with the
    weight's trailing dims; a dim is split like the weight's where the scale
    has the weight's length there, or whole groups of it land on each device.
    Other dims, and scales of no weight, are replicated.
    """
    shapes = {path_str(kp): (tuple(x.logical_shape) if isinstance(x, QWeight)
                             else tuple(x.shape)) for kp, x in
              jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)[0]}
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: self.sharding(self._scale_partition(path_str(kp), x, shapes)),
        quant_scales)

  def _scale_partition(self, path: str, x, shapes: Mapping[str, tuple]) -> tuple:
    weight = _weight_of(path, shapes)
    if weight is None or x.ndim == 0 or x.ndim > len(shapes[weight]):
      return (None,) * x.ndim
    wshape = shapes[weight]
    wpart = self.partition(weight, wshape)[len(wshape) - x.ndim:]
    wshape = wshape[len(wshape) - x.ndim:]
    part = []
    for s, w, e in zip(x.shape, wshape, wpart):
      n = self.axis_size(e)
      group = -(-w // s)
      fits = (n > 1 and s % n == 0 and w % n == 0 and (w // n) % group == 0
              and s * group == w)
      part.append(e if fits else None)
    return tuple(part)


def _replicate_leaf(layout: Layout, x):
  if isinstance(x, QArray):
    rep = layout.replicated
    return dataclasses.replace(
        x, codes=rep, scale=rep, zero_point=None if x.zero_point is None else rep,
        tensor_scale=None if x.tensor_scale is None else rep)
  return layout.replicated


def _owner(path: str, param_paths: Mapping[str, Any]) -> str | None:
  """The longest path suffix of ``path`` that is a parameter path."""
  parts = path.split("/")
  for i in range(len(parts)):
    cand = "/".join(parts[i:])
    if cand in param_paths:
      return cand
  return None


def _weight_of(path: str, param_paths: Mapping[str, Any]) -> str | None:
  """The weight whose layer owns a scale at ``path`` (longest layer prefix)."""
  parts = path.split("/")
  for i in range(len(parts) - 1, 0, -1):
    layer = "/".join(parts[:i])
    for name in _WEIGHT_NAMES:
      if f"{layer}/{name}" in param_paths:
        return f"{layer}/{name}"
  return None


__all__ = ["LLAMA_RULES", "Layout", "as_rules"]
