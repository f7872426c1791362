"""Randomized Hadamard rotations that spread outliers before quantization.

Ashkboos, Mohtashami, Croci, Li, Cameron, Jaggi, Alistarh, Hoefler & Hensman,
"QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", NeurIPS 2024; and Liu et
al., "SpinQuant: LLM Quantization with Learned Rotations", 2024 (which learns the
rotation; here it is random). The randomized Hadamard transform is from Ailon &
Chazelle 2006 and was used for quantization by Chee et al. 2023 ("QuIP").

An orthogonal ``R`` leaves a linear layer unchanged,
``x @ w == (x @ R) @ (R^T @ w)``, while spreading the energy of a few outlier
channels over all of them, so that per-token activation scales and per-group
weight scales fit the bulk of the values. ``R`` is a Walsh-Hadamard matrix
(Sylvester's construction, normalized) with random signs on its rows. For a
dimension ``n = b * 2^a`` with ``b`` a Paley order (12, 20, 28, 44, ...) it is
``H_b kron H_{2^a}`` (``lowbit_jax.core.hadamard``); for other ``n = 2^a * m``
(odd ``m > 1``) the rotation is ``H_{2^a} kron Q_m`` with ``Q_m`` a random
orthogonal ``m x m`` block (Haar, from a QR decomposition), still with random
signs; for odd ``n`` it is a plain random orthogonal matrix.

``rotate_model`` is the whole QuaRot pass on any pre-norm model given as a
function of its parameters: it finds the residual stream in the function's
jaxpr (``lowbit_jax._residual``), fuses the norm gains into the layers that
read them, folds one randomized Hadamard ``Q`` into every reader and writer of
the stream, and pre-rotates the kernels that take an *online* Hadamard
transform of their input (``QuantRule(input_rotation="hadamard")``, e.g. the
down projection, whose input has no fold). ``block_size`` builds a block-diagonal
rotation (one independent rotation per block), which keeps channels within a
block, e.g. within an attention head.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lowbit_jax import _rules
from lowbit_jax._residual import (ResidualStream, find_residual_stream,
                                  matmul_input_axes, param_path)
from lowbit_jax.algorithms.rtn import check_kernel
from lowbit_jax.core._hadamard import hadamard, hadamard_factors, hadamard_transform

Kernels = Union[jax.Array, Sequence[jax.Array]]


def _pow2_part(n: int) -> int:
  return n & -n


def hadamard_matrix(n: int) -> np.ndarray:
  """The normalized Sylvester Walsh-Hadamard matrix ``H_n`` (``H H^T = I``).

  Args:
    n: a power of two.

  Returns:
    float32 ``[n, n]`` numpy array with entries ``+-1/sqrt(n)``; symmetric.

  Raises:
    ValueError: n is not a positive power of two.
  """
  if not isinstance(n, int) or n < 1 or n & (n - 1):
    raise ValueError(f"a Walsh-Hadamard matrix needs a power-of-two size, got {n!r}; "
                     "use random_hadamard for other sizes")
  return hadamard(n)  # Sylvester's construction at powers of two


def walsh_hadamard_transform(x: jax.Array) -> jax.Array:
  """``x @ H_n`` over the last axis in O(n log n) (fast Walsh-Hadamard transform).

  Args:
    x: float array whose last axis has a power-of-two length n.

  Returns:
    ``x @ hadamard_matrix(n)`` (x's shape and dtype).

  Raises:
    ValueError: the last axis is not a power of two.
  """
  x = jnp.asarray(x)
  n = x.shape[-1]
  if n < 1 or n & (n - 1):
    raise ValueError(f"the last axis must be a power of two, got {n}")
  return hadamard_transform(x, -1)


def random_orthogonal(key: jax.Array, n: int) -> jax.Array:
  """A Haar-random orthogonal ``[n, n]`` float32 matrix (QR of a Gaussian).

  Args:
    key: PRNG key.
    n: the size.

  Returns:
    ``Q`` with ``Q Q^T = I``.
  """
  g = jax.random.normal(key, (n, n), jnp.float32)
  q, r = jnp.linalg.qr(g)
  return q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0)[None, :]


def _one_block(key: jax.Array, n: int) -> jax.Array:
  k_sign, k_orth = jax.random.split(key)
  try:
    hadamard_factors(n)
  except ValueError:
    pass
  else:   # a true Hadamard matrix (Sylvester, or Paley kron Sylvester)
    signs = jax.random.rademacher(k_sign, (n,), jnp.float32)
    return signs[:, None] * jnp.asarray(hadamard(n))
  p = _pow2_part(n)
  m = n // p
  h = jnp.asarray(hadamard_matrix(p))
  if m > 1:
    h = jnp.kron(h, random_orthogonal(k_orth, m))
  signs = jax.random.rademacher(k_sign, (n,), jnp.float32)
  return signs[:, None] * h


def random_hadamard(key: jax.Array, n: int, *,
                    block_size: Optional[int] = None) -> jax.Array:
  """A randomized Hadamard rotation ``R = diag(+-1) H`` (QuaRot, Ashkboos et al. 2024).

  Args:
    key: PRNG key (signs, and the orthogonal factor when n is not a power of
      two).
    n: the dimension.
    block_size: if given, a block-diagonal rotation of independent
      ``block_size x block_size`` blocks (must divide n).

  Returns:
    float32 orthogonal ``[n, n]``: rotate with ``x @ R`` and ``R.T @ w``.

  Raises:
    ValueError: n < 1 or block_size does not divide n.
  """
  if not isinstance(n, int) or n < 1:
    raise ValueError(f"n must be a positive int, got {n!r}")
  if block_size is None:
    return _one_block(key, n)
  if not isinstance(block_size, int) or block_size < 1 or n % block_size:
    raise ValueError(f"block_size must be a positive divisor of n={n}, got "
                     f"{block_size!r}")
  keys = jax.random.split(key, n // block_size)
  blocks = [_one_block(k, block_size) for k in keys]
  return jax.scipy.linalg.block_diag(*blocks)


def rotate_weights(weights: Kernels, r: jax.Array) -> tuple:
  """``R^T w`` for each kernel ``[K, N]`` (the inputs become ``x @ R``).

  Args:
    weights: a kernel or several sharing the input.
    r: orthogonal ``[K, K]``.

  Returns:
    A tuple of rotated kernels (dtypes kept).

  Raises:
    ValueError: shapes disagree.
  """
  ws = weights if isinstance(weights, (list, tuple)) else (weights,)
  out = []
  for i, w in enumerate(ws):
    w = check_kernel(w, f"weights[{i}]")
    if r.shape != (w.shape[0], w.shape[0]):
      raise ValueError(f"rotation shape {r.shape} does not match the kernel's "
                       f"{w.shape[0]} input features")
    out.append(jnp.matmul(r.T, w.astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST).astype(w.dtype))
  return tuple(out)


def rotate_inputs(x: jax.Array, r: jax.Array) -> jax.Array:
  """``x @ R`` over the last axis (x's dtype kept)."""
  x = jnp.asarray(x)
  return jnp.matmul(x.astype(jnp.float32), r,
                    precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


# ---------------------------------------------------------------------------
# QuaRot on a whole model


def _rotate_axis(w: jax.Array, axis: int, q, traceable: bool = False) -> jax.Array:
  """``w`` with ``axis`` multiplied by ``q`` (``w'[.., j, ..] = sum_i w[.., i, ..] q[i, j]``).

  In float64 on the host (a one-off transformation of the weights), or, with
  ``traceable``, in float32 jax ops (full-precision matmul) that jit and
  ``jax.grad`` see through (SpinQuant's training objective).
  """
  if traceable:
    out = jnp.tensordot(jnp.asarray(w, jnp.float32), jnp.asarray(q, jnp.float32),
                        axes=((axis,), (0,)), precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(out, -1, axis).astype(w.dtype)
  w64 = np.asarray(w, np.float64)
  out = np.moveaxis(np.tensordot(w64, np.asarray(q, np.float64), axes=((axis,), (0,))),
                    -1, axis)
  return jnp.asarray(out, dtype=w.dtype)


def _scale_axis(w: jax.Array, axis: int, g: jax.Array) -> jax.Array:
  shape = [1] * w.ndim
  shape[axis] = w.shape[axis]
  out = np.asarray(w, np.float64) * np.asarray(g, np.float64).reshape(shape)
  return jnp.asarray(out, dtype=w.dtype)


def _map_leaves(params: Any, updates: dict) -> Any:
  def f(kp, leaf):
    p = param_path(kp)
    return updates.get(p, leaf)
  return jax.tree_util.tree_map_with_path(f, params)


def _leaves(params: Any) -> dict:
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return {param_path(kp): leaf for kp, leaf in flat}


def fuse_gains(params: Any, stream: ResidualStream) -> Any:
  """Fuses each norm gain of ``stream.fusions`` into the kernels that read it.

  Args:
    params: the parameter pytree.
    stream: the structure (``find_residual_stream``).

  Returns:
    Params of the same structure: each gain is ones and its readers hold
    ``diag(g) W`` (along the axis the fusion names); the float function is
    unchanged.
  """
  cur = dict(_leaves(params))
  for f in stream.fusions:
    g = cur[f.gain]
    for path, axis in f.readers:
      cur[path] = _scale_axis(cur[path], axis, g)
    cur[f.gain] = jnp.ones_like(g)
  return _map_leaves(params, cur)


def rotate_residual(params: Any, stream: ResidualStream, q: jax.Array, *,
                    fuse: bool = True, traceable: bool = False) -> Any:
  """Fuses the norm gains and folds ``Q`` into every reader and writer of the stream.

  Args:
    params: the parameter pytree (any pytree; paths as ``_rules.path_str``).
    stream: the structure (``find_residual_stream``).
    q: orthogonal ``[d, d]``, d = ``stream.width``.
    fuse: fuse the norm gains first (``fuse_gains``); False for params whose
      gains are fused already.
    traceable: fold with float32 jax ops (differentiable in ``q`` and
      ``params``, usable under jit) instead of float64 on the host; the
      gains are never fused in this mode (fuse them first, on the host).

  Returns:
    Params of the same structure: each gain in ``stream.fusions`` is ones and
    its readers hold ``diag(g) W``; each ``(path, axis)`` of ``stream.rotate``
    is multiplied by ``q`` along that axis.

  Raises:
    ValueError: q's shape does not match the stream's width, or fuse and
      traceable are both set.
  """
  d = stream.width
  if tuple(q.shape) != (d, d):
    raise ValueError(f"the rotation must be [{d}, {d}] (the stream's width), got "
                     f"{tuple(q.shape)}")
  if fuse and traceable:
    raise ValueError("rotate_residual(traceable=True) does not fuse norm gains: call "
                     "fuse_gains(params, stream) first and pass fuse=False")
  if fuse:
    params = fuse_gains(params, stream)
  cur = dict(_leaves(params))
  for path, axis in stream.rotate:
    cur[path] = _rotate_axis(cur[path], axis, q, traceable)
  return _map_leaves(params, cur)


@dataclasses.dataclass(frozen=True)
class RotatedModel:
  """What ``rotate_model`` did (data).

  Attributes:
    stream: the residual stream's structure.
    online: ``(kernel path, axis)`` of the kernels pre-rotated for an online
      Hadamard transform of their input (``H^T W`` along that axis); the model
      must run with ``QuantRule(input_rotation="hadamard")`` there (see
      ``rules``).
    rotation: the residual rotation ``Q`` ``[d, d]``.
    head_rotations: the per-head rotation(s) folded with ``heads`` (one
      ``[head_dim, head_dim]`` for all pairs, or ``[n_pairs, head_dim,
      head_dim]``), or None.
    r3: ``(qk_regex, cache_key_regex)``: SpinQuant's R3, an online Hadamard on
      queries and keys after the rotary embedding, which ``rules`` adds (see
      ``r3_rules``); None: none.
  """
  stream: ResidualStream
  online: tuple
  rotation: jax.Array
  head_rotations: Optional[jax.Array] = None
  r3: Optional[tuple] = None

  @property
  def online_paths(self) -> tuple:
    """The kernel paths that take an online Hadamard transform."""
    return tuple(p for p, _ in self.online)

  def rules(self, rules: Sequence = ()) -> tuple:
    """``rules`` with ``input_rotation="hadamard"`` at the online kernels.

    For each online kernel, a rule for exactly that path is put first: a copy
    of the first rule of ``rules`` that matches it (its path or its layer's),
    with the rotation set, or a float rule that only rotates.

    Args:
      rules: ordered QuantRules (or anything ``QuantConfig`` accepts).

    With ``r3`` set, the result also carries SpinQuant's R3 (``r3_rules``):
    pass the same call's result as the KV cache's rules to rotate the cached
    keys too.

    Returns:
      A tuple of QuantRules for any front end.
    """
    base = _rules.as_rules(rules)
    if self.r3 is not None:
      base = r3_rules(base, *self.r3)
    head = []
    for path in self.online_paths:
      cands = _rules.candidates(path)
      match = next((r for r in base if any(r.matches(c) for c in cands)
                    and set(r.ops) & {"dot_general", "einsum"}), None)
      layer = cands[-1] if len(cands) > 1 else path
      rx = re.escape(layer) + "(/kernel)?" if layer != path else re.escape(path)
      if match is None:
        head.append(_rules.QuantRule(rx, ops=("dot_general", "einsum"),
                                     input_rotation="hadamard"))
      else:
        head.append(dataclasses.replace(match, path=rx, ops=tuple(
            o for o in match.ops if o in ("dot_general", "einsum")),
            input_rotation="hadamard"))
    return tuple(head) + tuple(base)


R3_PATHS = (r".*/attn/qk", r".*/attn/cache/key")


def r3_rules(rules: Sequence = (), qk: Optional[str] = R3_PATHS[0],
             cache_key: Optional[str] = R3_PATHS[1]) -> tuple:
  """``rules`` with SpinQuant's R3: a Hadamard on queries and keys per head.

  Liu et al. 2024, "SpinQuant: LLM Quantization with Learned Rotations",
  Sec. 3: after the rotary embedding, queries and keys are both multiplied by
  a Hadamard matrix over ``head_dim`` (``(q H)(k H)^T = q k^T``, so attention
  is unchanged in exact arithmetic), which spreads outlier channels before a
  quantized KV cache or a quantized ``q.k`` sees them. No weight changes: it
  is an online rotation, expressed here as ``input_rotation="hadamard"`` on

  * every rule with ``"act_matmul"`` in its ops, restricted to ``qk`` (both
    operands of ``q.k`` rotated inside the quantized op), and
  * every rule with ``"kv_cache"`` in its ops, restricted to ``cache_key``
    (the cache stores rotated keys and the model rotates the queries to
    match, ``lowbit_jax.models.kv_cache``),

  each copy put before the rules (a path restricted by a lookahead, so it
  matches what both regexes match), plus a rotation-only rule for each regex
  in case none of ``rules`` reaches it (a float ``q.k`` is left as it is; a
  float cache stores the rotated keys). Pass the result both to the model's
  quantizer and as the cache rules.

  Args:
    rules: ordered QuantRules (or anything ``QuantConfig`` accepts).
    qk: regex of the attention score matmuls (``ActEinsum`` paths); None:
      leave them.
    cache_key: regex of the cached keys; None: leave the cache.

  Returns:
    A tuple of QuantRules.
  """
  base = _rules.as_rules(rules)
  head = []
  for target, op in ((qk, "act_matmul"), (cache_key, "kv_cache")):
    if target is None:
      continue
    re.compile(target)
    for r in base:
      if op in r.ops and r.input_rotation is None:
        head.append(dataclasses.replace(r, path=f"(?=(?:{target})\\Z)(?:{r.path})",
                                        ops=(op,), input_rotation="hadamard"))
    head.append(_rules.QuantRule(target, ops=(op,), input_rotation="hadamard"))
  return tuple(head) + tuple(base)


def _rotate_heads(w: jax.Array, axis: int, head_dim: int, h,
                  traceable: bool = False) -> jax.Array:
  """``w`` with each ``head_dim`` block of ``axis`` multiplied by ``h``."""
  n = w.shape[axis]
  if n % head_dim:
    raise ValueError(f"axis {axis} of a {tuple(w.shape)} kernel is not a whole "
                     f"number of heads of {head_dim}")
  if traceable:
    w32 = jnp.moveaxis(jnp.asarray(w, jnp.float32), axis, -1)
    lead = w32.shape[:-1]
    out = jnp.matmul(w32.reshape(lead + (n // head_dim, head_dim)),
                     jnp.asarray(h, jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(out.reshape(lead + (n,)), -1, axis).astype(w.dtype)
  w64 = np.moveaxis(np.asarray(w, np.float64), axis, -1)
  lead = w64.shape[:-1]
  out = (w64.reshape(lead + (n // head_dim, head_dim)) @ np.asarray(h, np.float64))
  return jnp.asarray(np.moveaxis(out.reshape(lead + (n,)), -1, axis), dtype=w.dtype)


def head_pairs(params: Any, heads: tuple) -> tuple:
  """The ``(value kernel, output kernel)`` path pairs that ``heads`` names.

  Args:
    params: the parameter pytree.
    heads: ``(value_regex, out_regex, head_dim)`` (see ``rotate_model``).

  Returns:
    A tuple of path pairs: the i-th value kernel (sorted by path) with the
    i-th output kernel.

  Raises:
    ValueError: the regexes match different (or zero) numbers of parameters.
  """
  v_rx, o_rx, _ = heads
  cur = _leaves(params)
  vs = sorted(p for p in cur if re.fullmatch(v_rx, p))
  os_ = sorted(p for p in cur if re.fullmatch(o_rx, p))
  if not vs or len(vs) != len(os_):
    raise ValueError(f"heads: {v_rx!r} matches {len(vs)} kernels and {o_rx!r} "
                     f"{len(os_)}; they must match the same positive number")
  return tuple(zip(vs, os_))


def rotate_heads(params: Any, pairs: Sequence[tuple], head_dim: int, hs, *,
                 traceable: bool = False, biases: Sequence[tuple] = ()) -> Any:
  """Folds a per-head rotation into value outputs and output-projection inputs.

  For each pair, every ``head_dim`` block of the value kernel's last axis is
  multiplied by ``h`` (each head's values become ``v h``) and every block of
  the output kernel's first axis by ``h`` too (``W_o -> h^T W_o`` per head):
  attention mixes tokens within a head, so ``(p v h)(h^T W_o) = p v W_o`` and
  the output is unchanged for an orthogonal ``h``. A bias added to the
  value projection's output (Qwen2's, say) is part of ``v`` and takes ``h``
  too, per head along its own axis: pass ``biases`` (``rotate_model`` finds
  them in the function's jaxpr).

  Args:
    params: the parameter pytree.
    pairs: ``(value path, output path)`` pairs (``head_pairs``).
    head_dim: the head width.
    hs: one orthogonal ``[head_dim, head_dim]`` matrix for all pairs, or one
      per pair (``[len(pairs), head_dim, head_dim]``).
    traceable: fold with float32 jax ops (differentiable, jit-able) instead of
      float64 on the host.
    biases: ``(kernel path, bias path, bias axis)`` triples
      (``ResidualStream.biases``); those whose kernel is a pair's value kernel
      are rotated with it.

  Returns:
    Params of the same structure.

  Raises:
    ValueError: hs has the wrong shape, or a kernel (or a value bias) is not a
      whole number of heads.
  """
  n = len(pairs)
  if tuple(hs.shape) == (head_dim, head_dim):
    hs = [hs] * n
  elif tuple(hs.shape) != (n, head_dim, head_dim):
    raise ValueError(f"head rotations must be [{head_dim}, {head_dim}] or [{n}, "
                     f"{head_dim}, {head_dim}] (one per pair), got {tuple(hs.shape)}")
  cur = _leaves(params)
  upd = {}
  for i, (vp, op) in enumerate(pairs):
    h = hs[i]
    upd[vp] = _rotate_heads(cur[vp], cur[vp].ndim - 1, int(head_dim), h, traceable)
    upd[op] = _rotate_heads(cur[op], 0, int(head_dim), h, traceable)
    for kp, bp, ax in biases:
      if kp == vp:
        upd[bp] = _rotate_heads(cur[bp], ax, int(head_dim), h, traceable)
  return _map_leaves(params, upd)


def rotate_model(fn: Callable, params: Any, *args, key: Optional[jax.Array] = None,
                 online: Optional[str] = None,
                 heads: Optional[tuple] = None,
                 rotation: Optional[jax.Array] = None,
                 head_rotations: Optional[jax.Array] = None, **kwargs) -> tuple:
  """QuaRot's rotation of a pre-norm model, found from its jaxpr (Ashkboos et al. 2024).

  Finds the residual stream of ``fn(params, *args, **kwargs)``, fuses each
  RMS norm's gain into the layers that read it, and folds one randomized
  Hadamard rotation ``Q`` (``random_hadamard(key, d)``) into the embedding,
  every reader's input axis and every writer's output axis (and biases), so
  that the float function is unchanged. Kernels whose path fully matches
  ``online`` are pre-rotated to ``H^T W`` along their contracted axis, for an
  online Hadamard transform of their input at run time
  (``QuantRule(input_rotation="hadamard")``; ``RotatedModel.rules`` adds it
  to a rule list), e.g. ``online=".*/down_proj/kernel"`` (QuaRot's
  down-projection Hadamard). ``rotation`` / ``head_rotations`` fold given
  orthogonal matrices instead of the Hadamards, the same way (SpinQuant's
  learned rotations, ``lowbit_jax.algorithms.spinquant``).

  Args:
    fn: the model as a function of its parameter pytree.
    params: the parameters (float).
    *args, **kwargs: example inputs for tracing.
    key: PRNG key of the random signs (and of the orthogonal factor for a
      width ``core.hadamard`` does not build); not used with ``rotation``.
    online: regex of kernel paths that take an online Hadamard transform.
    heads: ``(value_regex, out_regex, head_dim)``: fold a Hadamard of order
      ``head_dim`` into every head of each value projection's output and of
      the matching output projection's input (QuaRot's per-head rotation,
      exact offline because attention only mixes tokens within a head; with
      grouped-query attention every head uses the same matrix). The i-th
      value kernel (sorted by path) pairs with the i-th output kernel; the
      value kernel's output is its last axis and the output kernel's input
      its first. Use it only where that holds (check the float outputs, as
      ``apply_ptq`` does).
    rotation: an orthogonal ``[d, d]`` residual rotation to fold instead of
      ``random_hadamard(key, d)``.
    head_rotations: with ``heads``: orthogonal ``[head_dim, head_dim]`` (all
      pairs) or ``[n_pairs, head_dim, head_dim]`` (one per pair, in
      ``head_pairs`` order) instead of the Hadamard.

  Returns:
    ``(new_params, RotatedModel)``.

  Raises:
    ValueError: the model's residual stream cannot be rotated (the message
      names the operation and module); ``online`` matches no kernel, a kernel
      contracted on several axes, or one whose input width has no Hadamard
      matrix here; neither ``key`` nor ``rotation`` is given, or
      ``head_rotations`` without ``heads``.
  """
  if key is None and rotation is None:
    raise ValueError("rotate_model needs key= (a random Hadamard rotation) or "
                     "rotation= (a given orthogonal matrix)")
  if head_rotations is not None and heads is None:
    raise ValueError("head_rotations= needs heads=(value_regex, out_regex, head_dim)")
  stream = find_residual_stream(fn, params, *args, **kwargs)
  q = random_hadamard(key, stream.width) if rotation is None else jnp.asarray(
      rotation, jnp.float32)
  new = rotate_residual(params, stream, q)
  done = []
  if online is not None:
    axes = matmul_input_axes(fn, params, *args, **kwargs)
    hits = sorted(p for p in axes if re.fullmatch(online, p))
    if not hits:
      raise ValueError(f"online={online!r} matches no parameter that a matmul "
                       f"uses; matmul parameters include {sorted(axes)[:6]}")
    cur = _leaves(new)
    upd = {}
    for p in hits:
      ax = axes[p]
      if len(ax) != 1 or None in ax:
        raise ValueError(f"{p}: an online Hadamard needs a kernel contracted on "
                         f"exactly one of its own axes, found {sorted(ax, key=str)}")
      a = next(iter(ax))
      if any(r == (p, a) for r in stream.rotate):
        raise ValueError(f"{p}: reads the residual stream, which is rotated by the "
                         "fold already; leave it out of online")
      # H^T W along axis a (raises naming the sizes it can build).
      upd[p] = _rotate_axis(cur[p], a, hadamard(int(cur[p].shape[a])))
      done.append((p, a))
    new = _map_leaves(new, upd)
  hs = None
  if heads is not None:
    head_dim = int(heads[2])
    pairs = head_pairs(new, heads)
    for vp, op in pairs:
      if vp in dict(done) or op in dict(done):
        raise ValueError(f"heads: {vp!r} / {op!r} also take an online Hadamard")
    hs = (jnp.asarray(hadamard(head_dim)) if head_rotations is None
          else jnp.asarray(head_rotations, jnp.float32))
    new = rotate_heads(new, pairs, head_dim, hs, biases=stream.biases)
  return new, RotatedModel(stream, tuple(done), q, hs)
