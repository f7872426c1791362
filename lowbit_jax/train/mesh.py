"""Device meshes as data: ``"data:2,fsdp:2,tensor:2"`` -> a ``jax.sharding.Mesh``.

A training mesh always has the three axes of ``AXES``:

* ``"data"``: data parallelism (the batch is split, parameters replicated);
* ``"fsdp"``: fully sharded data parallelism (the batch is split *and* each
  parameter, its optimizer state and its learned scales are sharded; XLA
  gathers a weight where a matmul needs it), Rajbhandari et al., 2020, "ZeRO:
  Memory Optimizations Toward Training Trillion Parameter Models";
* ``"tensor"``: tensor (model) parallelism of each matmul, Shoeybi et al.,
  2019, "Megatron-LM".

A mesh string names any subset of them with their sizes; the axes it leaves
out have size 1, so sharding rules may always name all three. The product of
the sizes is the number of devices used (the first ones of ``jax.devices()``);
``""`` puts every device on ``"data"``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
AXES = (DATA, FSDP, TENSOR)
BATCH_AXES = (DATA, FSDP)


def parse_mesh(spec: str, num_devices: int | None = None) -> dict[str, int]:
  """Parses a mesh string into ``{axis: size}`` over all of ``AXES``.

  Args:
    spec: comma-separated ``axis:size`` pairs, e.g. ``"data:4,tensor:2"``, in
      the order the mesh lays the axes out (the last varies fastest over
      devices); ``""`` means ``"data:<num_devices>"``.
    num_devices: devices available (default: ``jax.device_count()``).

  Returns:
    An ordered dict: the named axes in the given order, then the others
    with size 1.

  Raises:
    ValueError: an unknown or repeated axis, a size that is not a positive
      int, or more devices than exist.
  """
  n_avail = jax.device_count() if num_devices is None else num_devices
  spec = (spec or "").strip()
  if not spec:
    return {DATA: n_avail, FSDP: 1, TENSOR: 1}
  sizes: dict[str, int] = {}
  for part in spec.split(","):
    name, sep, size = part.strip().partition(":")
    name = name.strip()
    if not sep or name not in AXES:
      raise ValueError(f"bad mesh entry {part.strip()!r} in {spec!r}: write "
                       f"'axis:size' pairs with axes from {AXES}, e.g. "
                       "'data:2,fsdp:2,tensor:2'.")
    if name in sizes:
      raise ValueError(f"mesh {spec!r} names axis {name!r} twice.")
    try:
      n = int(size)
    except ValueError:
      n = 0
    if n < 1 or str(n) != size.strip():
      raise ValueError(f"mesh axis {name!r} in {spec!r} needs a positive integer "
                       f"size, got {size.strip()!r}.")
    sizes[name] = n
  total = math.prod(sizes.values())
  if total > n_avail:
    raise ValueError(f"mesh {spec!r} needs {total} devices but only {n_avail} "
                     "exist; make the product of the axis sizes at most that.")
  for name in AXES:
    sizes.setdefault(name, 1)
  return sizes


def make_mesh(spec: str = "", *, devices: Sequence[jax.Device] | None = None
              ) -> Mesh:
  """Returns the ``Mesh`` a mesh string describes, over the first devices.

  Args:
    spec: see ``parse_mesh``.
    devices: the devices to take them from (default: ``jax.devices()``).

  Raises:
    ValueError: see ``parse_mesh``.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh(spec, len(devices))
  n = math.prod(sizes.values())
  grid = np.asarray(devices[:n], dtype=object).reshape(tuple(sizes.values()))
  return Mesh(grid, tuple(sizes))


def data_mesh(num_devices: int = 0) -> Mesh:
  """Returns a data-parallel mesh over the first ``num_devices`` (0: all).

  Raises:
    ValueError: if more devices are asked for than exist.
  """
  available = jax.device_count()
  if num_devices < 0 or num_devices > available:
    raise ValueError(f"num_devices must be in [0, {available}] (0 = all), got "
                     f"{num_devices}.")
  return make_mesh(f"{DATA}:{num_devices or available}")


def mesh_string(mesh: Mesh) -> str:
  """The mesh string of ``mesh`` (axes of size 1 left out; ``"data:1"`` if all are)."""
  parts = [f"{a}:{s}" for a, s in mesh.shape.items() if s > 1]
  return ",".join(parts) or f"{DATA}:1"


def batch_size_multiple(mesh: Mesh) -> int:
  """The number the global batch must be a multiple of: data x fsdp sizes."""
  return math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Shards a batch's first axis over ``("data", "fsdp")``, the rest replicated."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
  return NamedSharding(mesh, P(axes))


def shard_batch(batch: np.ndarray, mesh: Mesh) -> jax.Array:
  """Places a host batch on ``mesh``, split along its first axis.

  Raises:
    ValueError: if the batch size is not a multiple of the data x fsdp size.
  """
  m = batch_size_multiple(mesh)
  if batch.shape[0] % m:
    raise ValueError(f"batch size {batch.shape[0]} must be a multiple of the "
                     f"number of devices the batch is split over ({m}: the "
                     f"data x fsdp axes of mesh {mesh_string(mesh)!r}).")
  return jax.device_put(batch, batch_sharding(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that puts a full copy on every device of ``mesh``."""
  return NamedSharding(mesh, P())


__all__ = ["AXES", "DATA", "FSDP", "TENSOR", "BATCH_AXES", "parse_mesh", "make_mesh",
           "data_mesh", "mesh_string", "batch_size_multiple", "batch_sharding",
           "shard_batch", "replicated"]
