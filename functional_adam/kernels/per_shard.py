"""An elementwise kernel call that runs on each device's shards of its operands.

XLA cannot partition a custom call: given sharded operands it gathers them and
runs the call on whole arrays on every device. An optimizer kernel is
elementwise per leaf, so each device can run it on its own shards of a leaf's
arrays (θ, g, m, v) with the replicated scalars, and nothing moves between
devices. :func:`per_shard_call` says so to the partitioner through
``jax.experimental.custom_partitioning``, which receives the operands' shardings
when XLA partitions the program, so it works under a plain ``jax.jit`` with
sharded arguments on Auto mesh axes and needs no mesh context (a ``shard_map``
would need the mesh and every leaf's ``PartitionSpec`` at trace time, which a
``jax.jit`` of arrays with Auto axes does not have). On Explicit mesh axes the
types do carry them, and the result types must carry them too, so there the call
is a ``jax.shard_map`` over the leaves' ``PartitionSpec`` s.

The rules, leaf by leaf: every array of a leaf and every result takes the
sharding of the leaf's operand cut into the most shards (on ties the first, the
parameter): the parameter's sharding when the state follows it, the state's under
ZeRO-1 (whose state is the parameter's sharding plus the data axis, so the
parameter is sliced where it lies and only the new parameter is all-gathered, as on
the XLA path). The scalars operand is replicated. Operands marked ``unlinked``
(the gradient) do not take part in sharding propagation: a gradient sharded
otherwise than its parameter is resharded to the parameter's sharding (a collective
of gradient size) instead of the parameter and the state being moved to the
gradient's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

Body = Callable[..., list]
"""``body(scalars, leaves, *statics) -> [results of leaf 0, ...]``: the per-device kernel call."""


def _rule(ranks: Sequence[int], n_operands: int, n_results: int, unlinked: frozenset) -> str:
    """Shardy's rule: each leaf's dimensions are factors of their own, shared by its operands
    (but the ``unlinked`` ones, which get factors of their own) and its results."""
    operands, results = ["s"], []
    for k, rank in enumerate(ranks):
        dims = " ".join(f"l{k}d{d}" for d in range(rank))
        for j in range(n_operands):
            own = " ".join(f"l{k}o{j}d{d}" for d in range(rank))
            operands.append(own if j in unlinked else dims)
        results += [dims] * n_results
    return ", ".join(operands) + " -> " + ", ".join(results)


def _shards(sharding: jax.sharding.Sharding) -> int:
    """How many pieces a ``NamedSharding`` cuts an array into (1 for other shardings)."""
    if not isinstance(sharding, NamedSharding):
        return 1
    axes = [
        a
        for entry in sharding.spec
        if entry
        for a in (entry if isinstance(entry, tuple) else (entry,))
    ]
    return math.prod(sharding.mesh.shape[a] for a in axes)


def _finest(shardings: Sequence[jax.sharding.Sharding], unlinked: frozenset):
    """The leaf's sharding: of its linked operands', the one in most pieces (first on ties)."""
    return max((s for j, s in enumerate(shardings) if j not in unlinked), key=_shards)


def _replicated(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, P(), memory_kind=sharding.memory_kind)
    return sharding  # already replicated: Shardy's rule asks for it (need_replication)


@functools.cache
def _partitioned(body: Body, statics: tuple, ranks: tuple, n_operands: int, n_results: int,
                 unlinked: frozenset) -> Callable:  # fmt: skip
    """``(scalars, *flat operands) -> flat results``, jitted, partitioned per shard, batchable."""

    def call(scalars, *flat):
        leaves = [flat[n_operands * k : n_operands * (k + 1)] for k in range(len(ranks))]
        return tuple(x for out in body(scalars, leaves, *statics) for x in out)

    partitioned = custom_partitioning(call)

    def partition(mesh, arg_shapes, result_shape):
        del result_shape
        leaf = [
            _finest([x.sharding for x in arg_shapes[1 + n_operands * k :][:n_operands]], unlinked)
            for k in range(len(ranks))
        ]
        operands = (_replicated(arg_shapes[0].sharding),)
        operands += tuple(s for s in leaf for _ in range(n_operands))
        results = tuple(s for s in leaf for _ in range(n_results))
        return mesh, call, results, operands

    partitioned.def_partition(
        partition,
        sharding_rule=_rule(ranks, n_operands, n_results, unlinked),
        need_replication_factors=("s",),
    )

    @jax.custom_batching.custom_vmap
    def batchable(scalars, *flat):
        return partitioned(scalars, *flat)

    @batchable.def_vmap
    def _batched(axis_size, in_batched, scalars, *flat):
        # One call per batch element, as the one-device kernel's vmap_method="sequential".
        args = [
            x if batched else jnp.broadcast_to(x, (axis_size, *jnp.shape(x)))
            for x, batched in zip((scalars, *flat), in_batched, strict=True)
        ]
        out = jax.lax.map(lambda xs: partitioned(*xs), tuple(args))
        return out, (True,) * len(out)

    return jax.jit(batchable)  # outside jit too: the partitioner only runs on a compiled program


def _meshes(leaves) -> set:
    """The meshes in the arrays' types (a constant's, a traced argument's), but empty ones."""
    meshes = {jax.typeof(x).sharding.mesh for leaf in leaves for x in leaf}
    return {mesh for mesh in meshes if not mesh.empty}


def supported(leaves: Sequence[Sequence[jax.Array]]) -> bool:
    """Whether :func:`per_shard_call` takes these arrays: at most one mesh, its axes of one type.

    (Auto or Manual axes: ``custom_partitioning``; Explicit axes: ``shard_map``.)
    """
    meshes = _meshes(leaves)
    return len(meshes) <= 1 and all(len({*mesh.axis_types}) == 1 for mesh in meshes)


def _shard_map_call(body, statics, scalars, leaves, n_results, unlinked, mesh):
    """Explicit axes: ``shard_map`` over each leaf's ``PartitionSpec`` (:func:`_finest`)."""
    specs = [_finest([jax.typeof(x).sharding for x in leaf], unlinked).spec for leaf in leaves]
    leaves = [
        tuple(jax.sharding.reshard(x, NamedSharding(mesh, spec)) for x in leaf)
        for leaf, spec in zip(leaves, specs, strict=True)
    ]
    n_operands = len(leaves[0])

    def call(scalars, *flat):
        local = [flat[n_operands * k : n_operands * (k + 1)] for k in range(len(leaves))]
        return tuple(x for out in body(scalars, local, *statics) for x in out)

    flat = jax.shard_map(
        call,
        mesh=mesh,
        in_specs=(P(), *(spec for spec in specs for _ in range(n_operands))),
        out_specs=tuple(spec for spec in specs for _ in range(n_results)),
    )(
        jax.sharding.reshard(scalars, NamedSharding(mesh, P())),
        *(x for leaf in leaves for x in leaf),
    )
    return [tuple(flat[n_results * k : n_results * (k + 1)]) for k in range(len(leaves))]


def per_shard_call(
    body: Body,
    statics: tuple,
    scalars: jax.Array,
    leaves: Sequence[Sequence[jax.Array]],
    *,
    n_results: int,
    unlinked: Sequence[int] = (),
) -> list[tuple[jax.Array, ...]]:
    """``body(scalars, leaves, *statics)``, run by each device on its shards of each leaf.

    Args:
        body: the kernel call on one device's arrays; it must be elementwise per
            leaf (every operand and result of a leaf has the leaf's shape) and a
            module-level function (it keys a cache, with ``statics``).
        statics: hashable arguments of ``body`` after ``leaves``.
        scalars: a 1-D array, replicated.
        leaves: per leaf, its operands, all of one shape; the sharding of the one
            cut into most pieces (the first on ties) is the leaf's.
        n_results: results per leaf.
        unlinked: positions, within a leaf, of operands resharded to the leaf's
            sharding rather than propagated to it (the gradient).

    Returns:
        Per leaf, its ``n_results`` results, sharded as the leaf.

    Raises:
        ValueError: for arrays that :func:`supported` refuses.

    Example:
        >>> import jax.numpy as jnp
        >>> def shift(scalars, leaves):  # elementwise: x + s[0] per leaf
        ...     return [(x + scalars[0],) for (x,) in leaves]
        >>> per_shard_call(shift, (), jnp.ones(1), [(jnp.zeros(3),)], n_results=1)
        [(Array([1., 1., 1.], dtype=float32),)]
    """
    if not supported(leaves):
        raise ValueError(
            "per_shard_call: the arrays must be on one mesh whose axes are all Auto, all "
            f"Explicit or all Manual, not on {_meshes(leaves)}."
        )
    meshes = _meshes(leaves)
    mesh = meshes.pop() if meshes else None
    if mesh is not None and mesh.axis_types[0] == jax.sharding.AxisType.Explicit:
        return _shard_map_call(body, statics, scalars, leaves, n_results, frozenset(unlinked), mesh)
    ranks = tuple(len(leaf[0].shape) for leaf in leaves)
    n_operands = len(leaves[0]) if leaves else 0
    call = _partitioned(body, statics, ranks, n_operands, n_results, frozenset(unlinked))
    flat = call(scalars, *(x for leaf in leaves for x in leaf))
    return [tuple(flat[n_results * k : n_results * (k + 1)]) for k in range(len(leaves))]
