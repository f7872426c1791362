"""``flax.serialization`` of QArrays and real mode's QWeights.

``to_bytes`` / ``from_bytes`` / ``to_state_dict`` then save and restore them
(optimizer states, real-mode parameters): the state dict holds the arrays,
the restore target its static fields (spec, shape, ``transposed``, ...).
Registered when ``lowbit_jax.flax`` is imported (``import lowbit_jax`` and
``lowbit_jax.optim`` load no flax).
"""
from __future__ import annotations

import dataclasses

from flax import serialization

from lowbit_jax._rules import QWeight
from lowbit_jax.core._qarray import FIELDS, QArray


def _to_state_dict(q) -> dict:
  return {f: serialization.to_state_dict(getattr(q, f)) for f in FIELDS
          if getattr(q, f) is not None}


def _from_state_dict(target, state: dict):
  want = sorted(f for f in FIELDS if getattr(target, f) is not None)
  if sorted(state) != want:
    raise ValueError(f"the saved QArray holds {sorted(state)}, the target QArray "
                     f"({target.spec}) {want}: restore onto a target of the same "
                     "format")
  return dataclasses.replace(target, **{
      f: serialization.from_state_dict(getattr(target, f), state[f]) for f in want})


# (flax looks serializers up by exact type)
for _cls in (QArray, QWeight):
  serialization.register_serialization_state(_cls, _to_state_dict, _from_state_dict,
                                             override=True)
