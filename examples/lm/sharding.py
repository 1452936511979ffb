"""Shardings of an optimizer state, from the parameters' shardings; state born sharded.

Stand-ins, with the same signatures, for the library's ``fa.state_shardings`` and
``fa.init_sharded``: where functional_adam has them, replace the import of this module with
``functional_adam``.

The rule (as Levanter/Praxis shard Adam's moments, and MaxText's ZeRO-1):

- a part of the state with the parameters' tree structure (``mu``, ``nu``, a master copy)
  has, at each parameter's place, leaves sharded like that parameter when they have its
  shape; other shapes (8-bit codes ``(n_blocks, block_size)`` and their scales) get the
  parameter's mesh axes on their first dimension those axes divide;
- everything else (step counters, scalars) is replicated;
- ``zero1_axis`` additionally splits each such leaf over that axis, on the first dimension
  that the axes already there times that axis still divide (left alone where none does).

``jax.jit(tx.init)`` on sharded parameters would place the state as the compiler likes
(the zeros do not depend on the parameters' values); :func:`init_sharded` asks for these
shardings with ``out_shardings``, so no device ever holds a full-size moment.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def _axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(axes: tuple[str, ...]) -> Any:
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _leaf_spec(shape, param, mesh, zero1_axis) -> P:
    """The spec of a state leaf of ``shape`` that belongs to parameter ``param``."""
    pspec = list(param.sharding.spec) + [None] * (len(param.shape) - len(param.sharding.spec))
    if tuple(shape) == tuple(param.shape):
        dims = [_axes(e) for e in pspec]
    else:
        used = tuple(a for e in pspec for a in _axes(e))
        size = math.prod(mesh.shape[a] for a in used)
        dims = [()] * len(shape)
        fits = [i for i, n in enumerate(shape) if n % size == 0]
        if used and fits:
            dims[fits[0]] = used
    if zero1_axis is not None and all(zero1_axis not in d for d in dims):
        for i, n in enumerate(shape):
            size = math.prod(mesh.shape[a] for a in (*dims[i], zero1_axis))
            if n % size == 0:
                dims[i] = (*dims[i], zero1_axis)
                break
    return P(*(_entry(d) for d in dims))


def state_shardings(tx: Any, params: Any, *, zero1_axis: str | None = None) -> Any:
    """The ``NamedSharding`` tree of ``tx.init(params)``, from the parameters' shardings.

    Args:
      tx: an Optax-shaped optimizer.
      params: sharded arrays or ``ShapeDtypeStruct``s with ``NamedSharding``s, one mesh.
      zero1_axis: a mesh axis over which to split the moments as well (ZeRO-1), or ``None``.

    Returns:
      A tree of ``NamedSharding`` with the structure of ``jax.eval_shape(tx.init, params)``.
    """
    p_leaves, p_def = jax.tree.flatten(params)
    mesh = p_leaves[0].sharding.mesh

    def like(sub, param):
        return jax.tree.map(
            lambda x: NamedSharding(mesh, _leaf_spec(x.shape, param, mesh, zero1_axis)), sub
        )

    def walk(node):
        try:
            subtrees = p_def.flatten_up_to(node)
        except (ValueError, TypeError):
            subtrees = None
        if subtrees is not None:
            return p_def.unflatten([like(s, p) for s, p in zip(subtrees, p_leaves, strict=True)])
        children, node_def = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
        if jax.tree_util.treedef_is_leaf(node_def) and children and children[0] is node:
            return NamedSharding(mesh, P())  # a leaf outside the parameters' structure
        return node_def.unflatten([walk(c) for c in children])

    return walk(jax.eval_shape(tx.init, params))


def init_sharded(tx: Any, params: Any, *, zero1_axis: str | None = None) -> Any:
    """``tx.init(params)`` computed under ``jit`` straight into :func:`state_shardings`."""
    shardings = state_shardings(tx, params, zero1_axis=zero1_axis)
    return jax.jit(tx.init, out_shardings=shardings)(params)
