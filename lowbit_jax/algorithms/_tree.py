"""Nested parameter mappings addressed by '/'-joined paths (copy on write)."""
from __future__ import annotations


def with_leaves(tree, path: str, **leaves) -> dict:
  """A copy of ``tree`` with leaves of the node at ``path`` replaced.

  Only the dicts along ``path`` are copied; every other subtree is shared.
  ``path=""`` updates the root.
  """
  parts = path.split("/") if path else []

  def rec(node, i):
    node = dict(node)
    if i == len(parts):
      node.update(leaves)
      return node
    node[parts[i]] = rec(node[parts[i]], i + 1)
    return node
  return rec(tree, 0)
