"""The optimizer state's shardings from the parameters': ``state_shardings`` and its reports.

The state of ``tx.init(params)`` is computed abstractly (``jax.eval_shape``)
and each of its subtrees is matched against the parameters' tree, as
``optax.tree_map_params`` does: a subtree with the parameters' structure whose
leaves have the parameters' shapes (``mu``, ``nu``, the master copies of
``with_master_weights``) takes the parameters' shardings, leaf by leaf; 8-bit
leaves follow :func:`~functional_adam.sharding.rules.block_quantized_shardings`
(``tx.init`` is traced under :func:`~functional_adam.layout_hints` with the
parameters' shardings, so 8-bit blocks are laid out per shard);
everything else (the step count, unmatched leaves) is replicated on the
parameters' mesh. The rules are in :mod:`functional_adam.sharding.rules`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
from jax.sharding import Sharding

from functional_adam.core.base import GradientTransformation, OptState, Params
from functional_adam.core.lift import layout_hints
from functional_adam.sharding import rules
from functional_adam.sharding.checks import (
    check_axis,
    check_same_placement,
    first_mismatch,
    first_shape_mismatch,
)
from functional_adam.sharding.rules import LeafSharding
from functional_adam.storage.flat import FlatState

_UNMATCHED = "replicated (not parameter-shaped)"


class _Param(NamedTuple):
    path: str
    shape: tuple[int, ...]
    sharding: Sharding


class _Target(NamedTuple):
    """The tree that state subtrees are matched against, with each leaf's shape and sharding."""

    treedef: Any
    params: list[_Param]


class StateLeafSharding(NamedTuple):
    """One row of :func:`describe_state_shardings`."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    sharding: Sharding
    reason: str


def _params_target(params: Params, param_shardings: Any) -> _Target:
    """The parameters' leaves, shapes and (checked) shardings."""
    entries, treedef = jax.tree_util.tree_flatten_with_path(params)
    if param_shardings is None:
        shardings = [
            rules.leaf_sharding_like(x, f"params{jax.tree_util.keystr(p)}") for p, x in entries
        ]
    else:
        try:
            shardings = treedef.flatten_up_to(param_shardings)
        except (ValueError, TypeError) as e:
            raise ValueError(f"param_shardings does not have the structure of params: {e}") from e
    found = []
    for (path, leaf), sharding in zip(entries, shardings, strict=True):
        where = f"params{jax.tree_util.keystr(path)}"
        if not isinstance(sharding, Sharding):
            raise TypeError(f"the sharding of {where} is {sharding!r}, not a jax.sharding.Sharding")
        rules.check_fits(sharding, tuple(leaf.shape), where)
        found.append(_Param(where, tuple(leaf.shape), sharding))
    check_same_placement([(p.path, p.sharding) for p in found])
    return _Target(treedef, found)


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _exact_pieces(node: Any, target: _Target) -> list[Any] | None:
    """``node`` cut at the parameters' leaves, if each piece is a parameter-shaped leaf."""
    try:
        pieces = target.treedef.flatten_up_to(node)
    except (ValueError, TypeError):
        return None
    matched = False
    for piece, param in zip(pieces, target.params, strict=True):
        if rules.is_block_quantized(piece) or (_is_array(piece) and piece.shape == param.shape):
            matched = True
        elif piece is not None:
            return None
    return pieces if matched else None


def _per_leaf_pieces(node: Any, target: _Target) -> list[Any] | None:
    """``node`` cut at the parameters' leaves, if it is a per-parameter state (any subtrees)."""
    try:
        pieces = target.treedef.flatten_up_to(node)
    except (ValueError, TypeError):
        return None
    for piece, param in zip(pieces, target.params, strict=True):
        leaves = jax.tree.leaves(piece, is_leaf=rules.is_block_quantized)
        for leaf in leaves:
            if not (rules.is_block_quantized(leaf) or leaf.shape in (param.shape, ())):
                return None
    return pieces


def _children(node: Any) -> tuple[list[tuple[Any, Any]], Any]:
    """``node``'s direct children with their keys, and the structure to rebuild it."""
    return jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)


def _has_exact_match(node: Any, target: _Target) -> bool:
    if node is None or _is_array(node):
        return _exact_pieces(node, target) is not None
    if _exact_pieces(node, target) is not None:
        return True
    return any(_has_exact_match(child, target) for _, child in _children(node)[0])


def _plan_piece(piece: Any, param: _Param, zero1_axis: str | None) -> Any:
    """The shardings of the state belonging to one parameter."""
    if piece is None:
        return None
    if rules.is_block_quantized(piece):
        codes, scale = rules.block_quantized_shardings(
            param.sharding, param.shape, tuple(piece.codes.shape), zero1_axis
        )
        return type(piece)(codes, scale)
    if _is_array(piece):
        if piece.shape != param.shape:
            return LeafSharding(rules.replicated_like(param.sharding), _UNMATCHED)
        if zero1_axis is None:
            return LeafSharding(param.sharding, f"like {param.path}")
        found = rules.add_axis_to_first_free_dim(param.sharding, param.shape, zero1_axis)
        return found._replace(reason=f"like {param.path}, {found.reason}")
    leaves, treedef = _children(piece)
    return treedef.unflatten([_plan_piece(child, param, zero1_axis) for _, child in leaves])


def _flat_target(state: FlatState, target: _Target) -> _Target:
    """The buffers of :func:`functional_adam.flatten` as replicated parameters (or refuse)."""
    for param in target.params:
        if not param.sharding.is_fully_replicated:
            raise ValueError(
                f"flatten: {param.path} is sharded ({param.sharding}), but a flat state keeps "
                "all leaves of a dtype in one buffer, which cannot follow per-leaf shardings. "
                "Use the per-leaf optimizer (flat=False) for sharded parameters."
            )
    sizes: dict[str, int] = {}
    for spec in state.layout:
        sizes[spec.buffer] = max(sizes.get(spec.buffer, 0), spec.offset + math.prod(spec.shape))
    replicated = rules.replicated_like(target.params[0].sharding)
    buffers = {key: _Param(f"flat buffer {key!r}", (n,), replicated) for key, n in sizes.items()}
    keys = {key: key for key in buffers}
    return _Target(jax.tree.structure(keys), [buffers[k] for k in jax.tree.leaves(keys)])


def _plan(node: Any, target: _Target, zero1_axis: str | None) -> Any:
    """A tree of :class:`LeafSharding` with the structure of the abstract state ``node``."""
    if node is None:
        return None
    if isinstance(node, FlatState) and target.params:
        leaves, treedef = _children(node)
        flat = _flat_target(node, target)
        return treedef.unflatten([_plan(child, flat, zero1_axis) for _, child in leaves])
    pieces = _exact_pieces(node, target)
    if pieces is None and not _is_array(node) and not _has_exact_match(node, target):
        pieces = _per_leaf_pieces(node, target)
    if pieces is not None:
        planned = [
            _plan_piece(x, p, zero1_axis) for x, p in zip(pieces, target.params, strict=True)
        ]
        return target.treedef.unflatten(planned)
    if _is_array(node):
        return LeafSharding(rules.replicated_like(target.params[0].sharding), _UNMATCHED)
    leaves, treedef = _children(node)
    return treedef.unflatten([_plan(child, target, zero1_axis) for _, child in leaves])


def layout_hints_for(
    params: Params, zero1_axis: str | None = None, param_shardings: Any = None
) -> Any:
    """The :func:`~functional_adam.layout_hints` under which ``tx.init`` gives the state that
    :func:`state_shardings` places: each moment's sharding (the parameter's, plus
    ``zero1_axis`` as ZeRO-1 adds it)."""
    return _hints(_params_target(params, param_shardings), zero1_axis)


def _hints(target: _Target, zero1_axis: str | None) -> Any:
    """The moments' shardings (the parameters', plus ZeRO-1's axis) as
    :func:`~functional_adam.core.lift.layout_hints`: 8-bit blocks are laid out per shard."""
    return target.treedef.unflatten(
        [rules.layout_sharding(p.sharding, p.shape, zero1_axis).sharding for p in target.params]
    )


def _planned(tx: GradientTransformation, params: Params, zero1_axis, param_shardings):
    """``(abstract state, tree of LeafSharding)`` for ``tx.init(params)``."""
    target = _params_target(params, param_shardings)
    if zero1_axis is not None:
        check_axis(zero1_axis, target.params[0].sharding if target.params else None, "zero1_axis")
    abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    with layout_hints(_hints(target, zero1_axis)):
        abstract = jax.eval_shape(lambda p: tx.init(p), abstract_params)
    if not target.params:
        return abstract, jax.tree.map(lambda _: None, abstract)
    return abstract, _plan(abstract, target, zero1_axis)


def _is_plan_leaf(x: Any) -> bool:
    return isinstance(x, LeafSharding)


def state_shardings(
    tx: GradientTransformation,
    params: Params,
    *,
    zero1_axis: str | None = None,
    param_shardings: Any = None,
) -> Any:
    """The ``jax.sharding.Sharding`` of each leaf of ``tx.init(params)``, computed abstractly.

    Rules (per leaf, see :func:`describe_state_shardings` for the reasons):

    - a leaf in a subtree with the parameters' structure and shapes (moments,
      ``with_master_weights``' master copies) gets its parameter's sharding;
    - an 8-bit leaf of ``adam_8bit`` (and the other 8-bit optimizers) whose moment is
      split over several shards (the parameter's sharding, plus ``zero1_axis`` as for a
      float32 moment) is laid out per shard (codes
      ``(S_0, ..., S_{r-1}, n_local_blocks, block_size)``,
      :mod:`functional_adam.storage.shard_blocks`) and sharded on its leading axes like
      that moment. An unsplit one keeps flat codes ``(n_blocks, block_size)``,
      replicated (over ``zero1_axis`` when its size divides ``n_blocks``);
    - the buffers of :func:`~functional_adam.flatten` are replicated; sharded
      parameters are refused (a buffer holds many leaves, it cannot follow their
      shardings). :class:`~functional_adam.FlatParams` buffers are parameters
      like any other and their state follows them;
    - the step count and anything else is replicated on the parameters' mesh.

    With ``zero1_axis`` (ZeRO-1, MaxText's ``shard_optimizer_over_data``), each
    parameter-shaped leaf is also partitioned over that mesh axis on its first
    unsharded dimension that the axis size divides; a leaf with none stays
    replicated over it. With data-parallel (replicated) parameters each device
    then keeps ``1/N`` of the moments, and the compiled step all-gathers the
    updated parameters.

    Args:
        tx: any transformation (``adam``, ``chain(...)``, ``compat.*``, ``adam_8bit``, ...).
        params: a pytree of ``jax.Array`` or ``jax.ShapeDtypeStruct`` with ``.sharding``
            (all on one mesh, or all on one device).
        zero1_axis: a mesh axis name to partition the state over, or ``None``.
        param_shardings: the parameters' shardings, a tree like ``params``; by
            default each leaf's ``.sharding``.

    Returns:
        A pytree with the structure of ``tx.init(params)`` whose leaves are shardings.

    Raises:
        ValueError: a parameter without a sharding, shardings on different meshes or
            not fitting their leaf, ``param_shardings`` not shaped like ``params``, an
            unknown ``zero1_axis``, sharded parameters under ``flatten``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> import functional_adam as fa
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> params = {"w": jax.ShapeDtypeStruct((4, 2), jnp.float32, sharding=NamedSharding(mesh, P()))}
        >>> shardings = fa.state_shardings(fa.adam(1e-3), params, zero1_axis="data")
        >>> shardings[0].mu["w"].spec, shardings[0].count.spec
        (P('data',), P())
    """
    _, plan = _planned(tx, params, zero1_axis, param_shardings)
    return jax.tree.map(lambda x: x.sharding, plan, is_leaf=_is_plan_leaf)


def abstract_state(
    tx: GradientTransformation,
    params: Params,
    *,
    zero1_axis: str | None = None,
    param_shardings: Any = None,
) -> Any:
    """``tx.init(params)`` as ``jax.ShapeDtypeStruct`` leaves carrying :func:`state_shardings`.

    A restore target for Orbax, or the input of ``jax.jit(...).lower(...)`` for
    memory analysis, with nothing allocated.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import functional_adam as fa
        >>> params = {"w": jax.ShapeDtypeStruct((4, 2), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
        >>> fa.abstract_state(fa.adam(1e-3), params)[0].mu["w"].shape
        (4, 2)
    """
    abstract, plan = _planned(tx, params, zero1_axis, param_shardings)
    return jax.tree.map(
        lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p.sharding if p else None),
        abstract,
        plan,
    )


def describe_state_shardings(
    tx: GradientTransformation,
    params: Params,
    *,
    zero1_axis: str | None = None,
    param_shardings: Any = None,
) -> list[StateLeafSharding]:
    """One row per leaf of ``tx.init(params)``: path, shape, dtype, sharding and the rule used.

    Says per leaf whether ZeRO-1 partitioned it, on which dimension, or why not.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> import functional_adam as fa
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> params = {"b": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=NamedSharding(mesh, P()))}
        >>> for row in fa.describe_state_shardings(fa.adam(1e-3), params, zero1_axis="data"):
        ...     print(row.path, row.sharding.spec, row.reason)
        [0].count P() replicated (not parameter-shaped)
        [0].mu['b'] P('data',) like params['b'], plus 'data' on dim 0 (ZeRO-1)
        [0].nu['b'] P('data',) like params['b'], plus 'data' on dim 0 (ZeRO-1)
    """
    abstract, plan = _planned(tx, params, zero1_axis, param_shardings)
    rows = []
    entries = jax.tree_util.tree_flatten_with_path(abstract)[0]
    for (path, leaf), planned in zip(
        entries, jax.tree.leaves(plan, is_leaf=_is_plan_leaf), strict=True
    ):
        rows.append(
            StateLeafSharding(
                jax.tree_util.keystr(path), tuple(leaf.shape), str(leaf.dtype), *planned
            )
        )
    return rows


def check_state_shardings(
    tx: GradientTransformation,
    state: OptState,
    params: Params,
    *,
    zero1_axis: str | None = None,
) -> None:
    """Raises ``ValueError`` unless ``state`` is laid out as :func:`state_shardings` says.

    For a state restored from a checkpoint or built elsewhere: names the first
    leaf whose sharding differs, both shardings, and whether the meshes differ.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import functional_adam as fa
        >>> params = {"w": jnp.ones(3)}
        >>> fa.check_state_shardings(fa.adam(1e-3), fa.adam(1e-3).init(params), params)
    """
    abstract = abstract_state(tx, params, zero1_axis=zero1_axis)
    expected = jax.tree.map(lambda x: x.sharding, abstract)
    mismatch = first_shape_mismatch(state, abstract) or first_mismatch(state, expected)
    if mismatch is not None:
        raise ValueError(f"check_state_shardings: {mismatch}")
