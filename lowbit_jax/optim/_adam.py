"""Adam and AdamW whose two moments are stored as block-wise quantized QArrays.

The recipe follows two papers:

* Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization": each
  moment is flattened, cut into blocks of 2048 elements, each block scaled by
  its absmax and coded with the dynamic (tree) map, signed for the first
  moment ("dynamic8") and unsigned for the second ("dynamic8_unsigned").
  Tensors with fewer than 4096 elements keep float32 moments.
* Li et al. 2023, "Memory Efficient Optimizers with 4-bit States": 4-bit
  moments need smaller blocks (128) and a second-moment map without zero
  ("DE-0", here "dynamic4_unsigned"): a second moment that rounds to zero
  turns ``m / (sqrt(v) + eps)`` into ``m / eps`` and the update explodes.

Every step dequantizes the moments, updates them in float32, computes the
update from the float32 values and requantizes them: all pure and jittable.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowbit_jax.core import QArray, QuantSpec, dequantize, encode, quantize
from lowbit_jax.core._qarray import FIELDS, codes_unit, pack
from lowbit_jax.core._quantize import expected_fields
from lowbit_jax.formats import BlockFormat, Format, LookupFormat

FormatLike = Union[str, Format, QuantSpec]

# Preset names for ``state_format``: (first-moment format, second-moment
# format, block size). A single name that is not a preset is used for both
# moments as it is.
PRESETS = {
    "int8": ("dynamic8", "dynamic8_unsigned", 2048),
    "8bit": ("dynamic8", "dynamic8_unsigned", 2048),
    "int4": ("dynamic4", "dynamic4_unsigned", 128),
    "4bit": ("dynamic4", "dynamic4_unsigned", 128),
}

DEFAULT_MIN_SIZE = 4096
# optax >= 0.2.5 names it safe_increment; older releases safe_int32_increment.
_safe_increment = getattr(optax, "safe_increment", None) or optax.safe_int32_increment
_BLOCK_8BIT = 2048  # Dettmers et al. 2022
_G_CAP = np.float32(2.0 ** 63)  # |g| is capped here: its square, 2**126, is finite
_BLOCK_4BIT = 128  # Li et al. 2023


class QuantizedAdamState(NamedTuple):
  """State of ``scale_by_adam``.

  Attributes:
    count: int32 step count (for the bias correction).
    mu: first moments: per parameter a QArray over the flattened tensor, or a
      float32 array of the parameter's shape (small tensors, float states).
    nu: second moments, the same way.
  """
  count: jax.Array
  mu: Any
  nu: Any


@dataclasses.dataclass(frozen=True)
class _Moment:
  """How one moment is stored: a spec over the flattened tensor, and whether
  positive values need the never-zero guard (second moment in a format that
  can code 0)."""
  spec: QuantSpec
  guard_zero: bool


def _default_block(spec: QuantSpec) -> int:
  return _BLOCK_4BIT if spec.element.bits <= 4 else _BLOCK_8BIT


def _moment(fmt: Optional[FormatLike], block_size: Optional[int],
            second: bool) -> Optional[_Moment]:
  """Validates one moment's format and builds its flattened block-wise spec."""
  if fmt is None:
    return None
  which = "second" if second else "first"
  if isinstance(fmt, QuantSpec):
    spec = fmt
  elif isinstance(fmt, (str, Format)):
    spec = QuantSpec(fmt)  # unknown names raise a ValueError listing the known ones
  else:
    raise TypeError(f"the {which} moment's format must be a format name, a Format "
                    f"or a QuantSpec, got {type(fmt).__name__}")
  if spec.tile is not None:
    raise ValueError(f"optimizer states are quantized in 1-D blocks along the "
                     f"flattened tensor; the {which} moment's spec has tile="
                     f"{spec.tile}: drop it and set block_size instead")
  if spec.rounding != "nearest":
    raise ValueError(f"the {which} moment's spec rounds {spec.rounding!r}; optimizer "
                     "states round to nearest (QuantSpec(..., rounding='nearest'))")
  f = spec.format
  if isinstance(f, BlockFormat):
    if block_size is not None and block_size != f.block_size:
      raise ValueError(f"{f.name!r} is a block format with blocks of {f.block_size}; "
                       f"block_size={block_size} contradicts it: leave block_size "
                       "unset or pick a format with the block you want")
    block = f.block_size
  elif block_size is not None:
    block = block_size
  elif isinstance(fmt, QuantSpec) and fmt.group_size is not None:
    block = fmt.group_size
  else:
    block = _default_block(spec)
  spec = spec.replace(axis=0, group_size=block, pad=True)
  guard = False
  if not second and spec.symmetric and not np.any(spec.element.values() < 0):
    raise ValueError(
        f"{spec.element.name!r} holds no negative values, but the first moment "
        "is signed; pass a pair with a signed first-moment format, e.g. "
        f"state_format=('dynamic8', {spec.element.name!r}), or a preset ('8bit', "
        "'4bit')")
  if second:
    el = spec.element
    if isinstance(el, LookupFormat) and el.scale_method == "twn":
      raise ValueError(f"{el.name!r} chooses its scale from the data below a "
                       "threshold and rounds small values to 0; it cannot hold the "
                       "second moment. Use 'dynamic8_unsigned', 'dynamic4_unsigned' "
                       "or 'linear4_unsigned'")
    guard = bool(np.any(spec.storage_format.values() == 0.0))
  return _Moment(spec, guard)


def _resolve(state_format, block_size: Optional[int]):
  """(first-moment _Moment or None, second-moment _Moment or None)."""
  if block_size is not None and (not isinstance(block_size, int)
                                 or isinstance(block_size, bool) or block_size < 1):
    raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
  if state_format is None:
    return None, None
  if isinstance(state_format, str) and state_format in PRESETS:
    m_fmt, v_fmt, block = PRESETS[state_format]
    block = block_size or block
    return _moment(m_fmt, block, False), _moment(v_fmt, block, True)
  if isinstance(state_format, (tuple, list)):
    if len(state_format) != 2:
      raise ValueError("state_format as a sequence must be a pair (first-moment "
                       f"format, second-moment format), got {len(state_format)} items")
    m_fmt, v_fmt = state_format
    return _moment(m_fmt, block_size, False), _moment(v_fmt, block_size, True)
  return _moment(state_format, block_size, False), _moment(state_format, block_size,
                                                           True)


def _smallest_positive(fmt: Format) -> float:
  vals = fmt.values()
  return float(np.min(vals[vals > 0]))


def _quantize_moment(x: jax.Array, moment: _Moment) -> QArray:
  """Quantizes a flattened moment; with the guard, no positive value codes 0.

  A positive entry that would round to zero is raised to the smallest positive
  value its block can hold (the format's smallest positive element times the
  block's own scale, read back through ``dequantize`` so every scale type is
  covered) and the tensor is quantized again. The raised entries stay below
  the block's absmax, so no block's scale changes.
  """
  q = quantize(x, moment.spec)
  if not moment.guard_zero:
    return q
  fmt = moment.spec.storage_format
  code = encode(jnp.float32(_smallest_positive(fmt)), fmt)
  n_codes, unit = codes_unit(fmt.bits)
  n = q.codes.shape[0] // unit * n_codes
  probe = pack(jnp.full((n,), code, jnp.uint32), fmt, 0)
  floor = dequantize(dataclasses.replace(q, codes=probe))
  lost = (x > 0) & (dequantize(q) <= 0)
  return quantize(jnp.where(lost, floor, x), moment.spec)


def _init_moment(p, moment: Optional[_Moment], min_size: int, first: bool):
  if p is None:
    return None
  if jnp.iscomplexobj(p):  # as optax: a complex first moment, a real second
    return jnp.zeros(p.shape, jnp.complex64 if first else jnp.float32)
  if (moment is None or p.size == 0 or p.size < min_size
      or not jnp.issubdtype(p.dtype, jnp.floating)):
    return jnp.zeros(p.shape, jnp.float32)
  return quantize(jnp.zeros((p.size,), jnp.float32), moment.spec)


def _as_qarray(state, moment: Optional[_Moment], g):
  """A quantized moment handed back as the mapping of its fields (``codes``,
  ``scale``, ...) -> its QArray again. ``nnx.Optimizer`` does this: its
  update (``nnx.update``) writes the new state into its Variables as
  ``nnx.State`` mappings, dropping the QArray's static fields, which are
  those of ``_init_moment``'s flat float32 moment of ``g``'s size."""
  if (g is None or moment is None or isinstance(state, (QArray, jax.Array))
      or not hasattr(state, "keys") or "codes" not in state.keys()):
    return state
  meta = expected_fields(moment.spec, (int(np.prod(g.shape)),), "float32")
  have = set(state.keys())
  return dataclasses.replace(meta, **{f: state[f] if f in have else None
                                      for f in FIELDS})


def _like(new, original):
  """``new`` (a QArray) in ``original``'s container: the mapping of its
  fields when the moment came in as one (``_as_qarray``), else itself."""
  if isinstance(new, QArray) and not isinstance(original, QArray) and hasattr(
      original, "keys"):
    return type(original)({f: getattr(new, f) for f in original.keys()})
  return new


def _read(state, shape) -> jax.Array:
  if isinstance(state, QArray):
    return dequantize(state).reshape(shape)
  return state


def _write(x: jax.Array, state, moment: Optional[_Moment]):
  if isinstance(state, QArray):
    # An inf or NaN gradient element makes its moment non-finite; stored, it
    # would make its block's scale non-finite and every element of the block
    # NaN for good (float32 moments keep it to that one element). It is
    # stored as 0: that step's update is non-finite there, as optax's, and
    # the element's moments then restart from zero.
    return _quantize_moment(jnp.where(jnp.isfinite(x), x, 0).reshape(-1), moment)
  return x


def _check_unit(name: str, v) -> None:
  if isinstance(v, (int, float)) and not 0.0 <= v < 1.0:
    raise ValueError(f"{name} must be in [0, 1), got {v!r}")


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                  eps_root: float = 0.0, *, state_format=None,
                  block_size: Optional[int] = None,
                  min_size: int = DEFAULT_MIN_SIZE
                  ) -> optax.GradientTransformation:
  """Adam's update direction with block-wise quantized moments.

  The same numbers as ``optax.scale_by_adam`` (``m_hat / (sqrt(v_hat +
  eps_root) + eps)``) except that between steps the moments are stored
  quantized. Each step dequantizes them, updates them in float32, computes
  the update from the float32 moments, and requantizes them (Dettmers et al.
  2022, "8-bit Optimizers via Block-wise Quantization"; Li et al. 2023,
  "Memory Efficient Optimizers with 4-bit States"). A non-finite gradient
  element gives a non-finite update there, as in optax, but its quantized
  moments are stored as zero (not spread to its whole block); a finite |g|
  above 2**63, whose square would overflow, is capped there for both moments
  (optax's second moment becomes inf and that element stops for good).
  Combine it with ``optax.add_decayed_weights`` and
  ``optax.scale_by_learning_rate``, or use
  ``adamw``.

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to ``sqrt(v_hat)`` in the denominator.
    eps_root: added to ``v_hat`` inside the square root.
    state_format: how the moments are stored; see ``adamw``.
    block_size: elements per scale along the flattened tensor; see ``adamw``.
    min_size: tensors with fewer elements keep float32 moments.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    ``QuantizedAdamState``.

  Raises:
    ValueError: an unknown format name, a spec that cannot store a moment
      (tiles, stochastic rounding, a ternary second moment), a bad block size,
      or decays outside [0, 1).
  """
  _check_unit("b1", b1)
  _check_unit("b2", b2)
  for name, v in (("min_size", min_size), ("block_size", block_size)):
    if isinstance(v, (jax.Array, np.ndarray, np.generic)):
      raise ValueError(
          f"{name} must be a Python int, got {v!r}; it "
          "sets the states' shapes, so it cannot be a traced hyper-parameter: with "
          "optax.inject_hyperparams pass static_args=('min_size', 'block_size')")
  if not isinstance(min_size, int) or isinstance(min_size, bool) or min_size < 0:
    raise ValueError(f"min_size must be a non-negative int, got {min_size!r}")
  m_moment, v_moment = _resolve(state_format, block_size)

  def init_fn(params):
    is_none = lambda x: x is None  # noqa: E731
    mu = jax.tree.map(lambda p: _init_moment(p, m_moment, min_size, True), params,
                      is_leaf=is_none)
    nu = jax.tree.map(lambda p: _init_moment(p, v_moment, min_size, False), params,
                      is_leaf=is_none)
    return QuantizedAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

  def update_fn(updates, state, params=None):
    del params
    grads, treedef = jax.tree.flatten(updates, is_leaf=lambda x: x is None)
    mus = treedef.flatten_up_to(state.mu)
    nus = treedef.flatten_up_to(state.nu)
    count = _safe_increment(state.count)
    # As optax computes them: 1 - decay**count, cast to each moment's dtype.
    bc1 = 1 - b1 ** count
    bc2 = 1 - b2 ** count
    out, new_mu, new_nu = [], [], []
    for g, mu_in, nu_in in zip(grads, mus, nus):
      mu, nu = _as_qarray(mu_in, m_moment, g), _as_qarray(nu_in, v_moment, g)
      if g is None:
        out.append(None)
        new_mu.append(mu)
        new_nu.append(nu)
        continue
      gf = g.astype(jnp.complex64 if jnp.iscomplexobj(g) else jnp.float32)
      if isinstance(nu, QArray):
        # A finite |g| above 1.8e19 squares to inf, and inf in a block makes its
        # scale inf and every element inf / inf = NaN for good (float32 moments
        # keep the inf to that element). |g| is capped at 2**63 (squared:
        # 2**126) for both moments alike: capping g**2 alone left m at 1e29
        # against a finite v, an update of 5e10 for g = 1e30 (Adam's first
        # step is at most 1) and hundreds of steps more like it. The block's
        # other elements only lose precision under its absmax, as any outlier
        # makes them.
        a = jnp.abs(gf)
        gf = jnp.where(a > _G_CAP, gf * (_G_CAP / jnp.where(a > _G_CAP, a, 1.0)), gf)
      if jnp.iscomplexobj(gf):  # optax: |g|**2 for the second moment
        g2 = jnp.real(gf * jnp.conj(gf))
      else:
        g2 = gf ** 2
      m = (1 - b1) * gf + b1 * _read(mu, g.shape)
      v = (1 - b2) * g2 + b2 * _read(nu, g.shape)
      m_hat = m / bc1.astype(m.dtype)
      v_hat = v / bc2.astype(v.dtype)
      u = m_hat / (jnp.sqrt(v_hat + eps_root) + eps)
      out.append(u.astype(g.dtype))
      # (A moment handed in as a mapping goes back as one: wrappers such as
      # optax.MultiSteps or apply_if_finite combine old and new states.)
      new_mu.append(_like(_write(m, mu, m_moment), mu_in))
      new_nu.append(_like(_write(v, nu, v_moment), nu_in))
    return (treedef.unflatten(out),
            QuantizedAdamState(count=count, mu=treedef.unflatten(new_mu),
                               nu=treedef.unflatten(new_nu)))

  return optax.GradientTransformation(init_fn, update_fn)


def adamw(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay=1e-4, mask=None, *, state_format=None,
          block_size: Optional[int] = None, min_size: int = DEFAULT_MIN_SIZE,
          eps_root: float = 0.0) -> optax.GradientTransformation:
  """AdamW (Loshchilov & Hutter 2019) with 8-bit or 4-bit optimizer states.

  ``optax.adamw`` with the same hyper-parameters, except that the two moments
  are stored as block-wise quantized ``QArray``s over the flattened tensor
  (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"; Li et
  al. 2023, "Memory Efficient Optimizers with 4-bit States"). With
  ``state_format=None`` it is ``optax.adamw`` (float32 moments). The state is
  a pytree of arrays and QArrays: it jits and shards like any other and
  checkpoints with Orbax or ``lowbit_jax.checkpoint`` (with
  ``flax.serialization`` once ``lowbit_jax.flax`` is imported);
  ``state_nbytes`` measures it.

  ``state_format`` names:

  * ``"int8"`` or ``"8bit"``: the 8-bit optimizer of Dettmers et al. 2022:
    first moment in ``"dynamic8"`` (signed dynamic tree map), second moment in
    ``"dynamic8_unsigned"`` (the unsigned dynamic map without its zero code),
    blocks of 2048 absmax-scaled elements with float32 scales: 8.016 bits per
    element.
  * ``"int4"`` or ``"4bit"``: Li et al. 2023's 4-bit states with block-wise
    normalization: first moment in ``"dynamic4"`` (their dynamic exponent map,
    "DE"), second moment in ``"dynamic4_unsigned"`` (DE without zero, "DE-0"),
    blocks of 128: 4.25 bits per element. (Their zero-free linear map is
    registered as ``"linear4_unsigned"``: pass
    ``state_format=("dynamic4", "linear4_unsigned")`` to use it.)
  * any other format name, ``Format`` or ``QuantSpec`` (``"fp8_e4m3"``,
    ``"nf4"``, ``"mxfp4"``, a format you registered): that format for both
    moments. Blocks are ``block_size`` long, else the spec's ``group_size``,
    else the format's own block (block formats), else 128 for formats of 4
    bits or fewer and 2048 for wider ones. The spec's scale dtype, symmetry
    and clip ratio are kept; its axis is replaced (blocks run along the
    flattened tensor, zero-padded at the end). A format without negative
    values (``"linear4_unsigned"``, ``"dynamic8_unsigned"``) cannot hold the
    signed first moment and is refused: name it in a pair.
  * a pair ``(first, second)`` of any of the above but the preset names (a
    name in a pair is always the format of that name, so ``("int8",
    "dynamic8_unsigned")`` is a linear int8 first moment); ``None`` in the pair
    keeps that moment in float32.

  The second moment never rounds to zero where it is positive. The unsigned
  maps above contain no zero. A second-moment format that can code 0 (int8,
  fp8, nf4, MX, ...) is guarded: a positive entry that would round to 0 is
  raised to the smallest positive value of its block before it is coded. That
  over-estimates tiny second moments (those coordinates take smaller steps)
  instead of dividing by ``eps``; blockwise-linear maps still lose much of the
  second moment's range, so prefer the unsigned maps.

  Tensors with fewer than ``min_size`` elements (biases, norms), empty
  tensors and non-float parameters keep float32 moments, as in both papers.
  Complex parameters keep a complex64 first moment and a float32 second
  moment of ``|g|**2``, as ``optax.adamw`` does.

  Different learning rates (e.g. for learned quantization scales, LSQ step
  sizes) come from ``optax.multi_transform``::

    import optax
    import lowbit_jax.optim

    def labels(params):
      return jax.tree_util.tree_map_with_path(
          lambda path, _: "scale" if "scale" in jax.tree_util.keystr(path)
          else "weight", params)

    tx = optax.multi_transform(
        {"weight": lowbit_jax.optim.adamw(1e-3, state_format="8bit"),
         "scale": lowbit_jax.optim.adamw(1e-2, weight_decay=0.0)},  # float32
        param_labels=labels)
    opt_state = tx.init(params)
    updates, opt_state = jax.jit(tx.update)(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

  Args:
    learning_rate: a float or an optax schedule (a function of the step).
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to ``sqrt(v_hat)`` in the denominator.
    weight_decay: decoupled weight decay (a float or a schedule).
    mask: which parameters weight decay applies to (a pytree of bools or a
      function of the params), as in ``optax.adamw``.
    state_format: how the moments are stored, see above; None: float32.
    block_size: elements per scale along the flattened tensor; None: the
      preset's or format's default (see above).
    min_size: tensors with fewer elements keep float32 moments (4096, as in
      both papers; 0 quantizes every float tensor).
    eps_root: added to ``v_hat`` inside the square root.

  Returns:
    An ``optax.GradientTransformation``: ``scale_by_adam``, then
    ``optax.add_decayed_weights``, then ``optax.scale_by_learning_rate``, the
    same chain as ``optax.adamw``.

  Raises:
    ValueError: see ``scale_by_adam``.
  """
  return optax.chain(
      scale_by_adam(b1, b2, eps, eps_root, state_format=state_format,
                    block_size=block_size, min_size=min_size),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def state_nbytes(opt_state) -> int:
  """Bytes an optimizer state occupies: every QArray's true (packed) size plus
  every other array leaf's size.

  Also takes the abstract state from ``jax.eval_shape(tx.init, params)``, so a
  state can be sized without being allocated.

  Args:
    opt_state: any pytree of arrays, QArrays and ``jax.ShapeDtypeStruct``s.

  Returns:
    The total in bytes.
  """
  total = 0
  for leaf in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, QArray)):
    if isinstance(leaf, QArray):
      total += leaf.nbytes
    elif hasattr(leaf, "dtype") and hasattr(leaf, "shape"):
      total += np.dtype(leaf.dtype).itemsize * math.prod(leaf.shape)
    else:
      total += np.asarray(leaf).nbytes
  return int(total)
