"""A kernel call, elementwise per leaf, that runs on each device's shards of its operands.

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

How a leaf's arrays are cut is a :class:`LeafKind`'s: its Shardy factors and, at
partitioning time, the shardings its operands and results take (the 8-bit kernel's
is :class:`functional_adam.kernels.adam8_cpu.Blocks`). :class:`Elementwise`, the fused
Adam kernel's, cuts every array of a leaf and every result like the leaf's operand
cut into the most shards (on ties the first, the parameter): the parameter's
sharding when the state follows it, the state's under ZeRO-1 (whose state is the
parameter's sharding plus the data axis, so the parameter is sliced where it lies
and only the new parameter is all-gathered, as on the XLA path). The scalars
operand is replicated. Operands marked ``unlinked`` (the gradient) do not take part
in sharding propagation: a gradient sharded otherwise than its parameter is
resharded to the parameter's sharding (a collective of gradient size) instead of
the parameter and the state being moved to the gradient's.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

Body = Callable[..., list]
"""``body(scalars, leaves, *statics) -> [results of leaf 0, ...]``: the per-device kernel call."""
Shapes = Sequence[tuple[int, ...]]
Shardings = Sequence[jax.sharding.Sharding]


class LeafKind(Protocol):
    """How one leaf's operands and results are cut (a hashable value: it keys a cache)."""

    results_of: tuple[int, ...]  # per result, the operand it is written over (aliased to)

    def factors(self, k: int, shapes: Shapes) -> tuple[list[str], list[str]]:
        """Shardy's factors (``"a b"`` per array) of leaf ``k``'s operands and results."""

    def shardings(self, shardings: Shardings, shapes: Shapes) -> tuple[list, list]:
        """The shardings the leaf's operands and results take, given its operands' (as
        ``NamedSharding`` where the mesh is known) and their global shapes."""


def shards(sharding: jax.sharding.Sharding) -> int:
    """How many pieces a ``NamedSharding`` cuts an array into (1 for other shardings)."""
    if not isinstance(sharding, NamedSharding):
        return 1
    return math.prod(sharding.mesh.shape[a] for a in axes_of(sharding.spec))


def axes_of(spec: Sequence) -> list[str]:
    """The mesh axes named in a ``PartitionSpec`` (or one entry's tuple), in order."""
    return [a for entry in spec if entry for a in (entry if isinstance(entry, tuple) else (entry,))]


def replicated(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """``sharding``'s devices, every one holding the whole array."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, P(), memory_kind=sharding.memory_kind)
    devices = np.asarray(sharding._device_assignment)  # no mesh known: a flat one of its devices
    return NamedSharding(jax.sharding.Mesh(devices, ("devices",)), P())


@dataclasses.dataclass(frozen=True)
class Elementwise:
    """Every operand and result of a leaf has the leaf's shape; the leaf takes the sharding of
    its operand cut into most pieces (the first on ties); ``unlinked`` operands (the gradient)
    are resharded to it rather than propagated to. ``results_of``: see :class:`LeafKind`."""

    results_of: tuple[int, ...]
    unlinked: frozenset = frozenset()

    def factors(self, k: int, shapes: Shapes) -> tuple[list[str], list[str]]:
        dims = " ".join(f"l{k}d{d}" for d in range(len(shapes[0])))
        own = [" ".join(f"l{k}o{j}d{d}" for d in range(len(shapes[0]))) for j in range(len(shapes))]
        operands = [own[j] if j in self.unlinked else dims for j in range(len(shapes))]
        return operands, [dims] * len(self.results_of)

    def shardings(self, shardings: Shardings, shapes: Shapes) -> tuple[list, list]:
        del shapes
        leaf = max((s for j, s in enumerate(shardings) if j not in self.unlinked), key=shards)
        return [leaf] * len(shardings), [leaf] * len(self.results_of)


def _rule(kind: LeafKind, shapes: tuple) -> str:
    """Shardy's rule: the scalars replicated, each leaf's factors its own."""
    operands, results = ["s"], []
    for k, leaf in enumerate(shapes):
        ins, outs = kind.factors(k, leaf)
        operands += ins
        results += outs
    return ", ".join(operands) + " -> " + ", ".join(results)


def _split(flat: Sequence, sizes: Sequence[int]) -> list[tuple]:
    starts = [0, *itertools.accumulate(sizes)]
    return [tuple(flat[a:b]) for a, b in itertools.pairwise(starts)]


@functools.cache
def _partitioned(body: Body, statics: tuple, kind: LeafKind, shapes: tuple) -> Callable:
    """``(scalars, *flat operands) -> flat results``, jitted, partitioned per shard, batchable."""
    sizes = [len(leaf) for leaf in shapes]

    def call(scalars, *flat):
        return tuple(x for out in body(scalars, _split(flat, sizes), *statics) for x in out)

    partitioned = custom_partitioning(call)

    def partition(mesh, arg_shapes, result_shape):
        del result_shape
        operands, results = [replicated(arg_shapes[0].sharding)], []
        for leaf in _split(arg_shapes[1:], sizes):
            ins, outs = kind.shardings([x.sharding for x in leaf], [x.shape for x in leaf])
            operands += ins
            results += outs
        return mesh, call, tuple(results), tuple(operands)

    partitioned.def_partition(
        partition, sharding_rule=_rule(kind, shapes), need_replication_factors=("s",)
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


def _shard_map_call(body, statics, scalars, leaves, kind, mesh):
    """Explicit axes: a ``shard_map`` over the specs ``kind`` gives the arrays' types."""
    in_specs, out_specs, operands = [P()], [], []
    for leaf in leaves:
        ins, outs = kind.shardings([jax.typeof(x).sharding for x in leaf], [x.shape for x in leaf])
        in_specs += [s.spec for s in ins]
        out_specs += [s.spec for s in outs]
        operands += [
            jax.sharding.reshard(x, NamedSharding(mesh, s.spec))
            for x, s in zip(leaf, ins, strict=True)
        ]
    sizes = [len(leaf) for leaf in leaves]

    def call(scalars, *flat):
        return tuple(x for out in body(scalars, _split(flat, sizes), *statics) for x in out)

    scalars = jax.sharding.reshard(scalars, NamedSharding(mesh, P()))
    flat = jax.shard_map(call, mesh=mesh, in_specs=tuple(in_specs), out_specs=tuple(out_specs))(
        scalars, *operands
    )
    # Each result typed as the operand it replaces (a gathered leaf is sliced back).
    return [
        tuple(
            jax.sharding.reshard(x, jax.typeof(leaf[j]).sharding)
            for x, j in zip(out, kind.results_of, strict=True)
        )
        for out, leaf in zip(
            _split(flat, [len(kind.results_of)] * len(leaves)), leaves, strict=True
        )
    ]


def per_shard_call(
    body: Body,
    statics: tuple,
    scalars: jax.Array,
    leaves: Sequence[Sequence[jax.Array]],
    kind: LeafKind,
) -> list[tuple[jax.Array, ...]]:
    """``body(scalars, leaves, *statics)``, run by each device on its shards of each leaf.

    Args:
        body: the kernel call on one device's arrays, elementwise per leaf as ``kind``
            says; a module-level function (it keys a cache, with ``statics``).
        statics: hashable arguments of ``body`` after ``leaves``.
        scalars: a 1-D array, replicated.
        leaves: per leaf, its operands.
        kind: how a leaf's arrays are cut (:class:`Elementwise` for the Adam kernel).

    Returns:
        Per leaf, its results (one per ``kind.results_of``), sharded as ``kind`` says.

    Raises:
        ValueError: for arrays that :func:`supported` refuses.

    Example:
        >>> import jax.numpy as jnp
        >>> def shift(scalars, leaves):  # elementwise: x + s[0] per leaf
        ...     return [(x + scalars[0],) for (x,) in leaves]
        >>> per_shard_call(shift, (), jnp.ones(1), [(jnp.zeros(3),)], Elementwise((0,)))
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
        return _shard_map_call(body, statics, scalars, leaves, kind, mesh)
    shapes = tuple(tuple(tuple(x.shape) for x in leaf) for leaf in leaves)
    flat = _partitioned(body, statics, kind, shapes)(scalars, *(x for leaf in leaves for x in leaf))
    return _split(flat, [len(kind.results_of)] * len(leaves))
