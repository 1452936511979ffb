"""Per-leaf rules: which sharding one optimizer-state leaf gets from its parameter's.

Three rules, each a small function so that a layout change touches one place:

- a leaf with the parameter's shape (a moment, a master copy) gets the
  parameter's sharding, and with ZeRO-1 also the data axis
  (:func:`add_axis_to_first_free_dim`);
- an 8-bit leaf follows the parameter: shard-major codes
  ``(S_0, ..., S_{r-1}, n_local_blocks, block_size)`` are sharded on their leading
  axes as the parameter's dimensions; flat codes ``(n_blocks, block_size)`` along
  their block axis when the blocks line up with the parameter's shards
  (:func:`block_quantized_shardings`);
- everything else (the step count, unmatched leaves) is replicated.

Each rule returns the sharding and a short reason, which
:func:`functional_adam.describe_state_shardings` reports per leaf.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from jax.sharding import AxisType, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding


class LeafSharding(NamedTuple):
    """The sharding chosen for one state leaf and why, in words."""

    sharding: Sharding
    reason: str


def replicated_like(sharding: Sharding) -> Sharding:
    """The fully replicated sharding on the devices of ``sharding`` (its mesh, or its device).

    Example:
        >>> import jax
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> replicated_like(NamedSharding(mesh, P("data"))).spec
        P()
    """
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(), memory_kind=sharding.memory_kind)
    if isinstance(sharding, SingleDeviceSharding):
        return sharding
    raise TypeError(
        f"state_shardings supports NamedSharding and SingleDeviceSharding parameters, got "
        f"{type(sharding).__name__}; place the parameters with jax.sharding.NamedSharding."
    )


def padded_spec(sharding: NamedSharding, ndim: int) -> list[Any]:
    """The sharding's partition spec as a list of ``ndim`` entries (``None``: unsharded)."""
    spec = list(sharding.spec)
    return spec + [None] * (ndim - len(spec))


def _axes(entry: Any) -> tuple[str, ...]:
    """The mesh axis names of one partition-spec entry (``None``, a name, or a tuple)."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def axes_size(mesh: Any, entry: Any) -> int:
    """How many shards one partition-spec entry makes on ``mesh``."""
    return math.prod(mesh.shape[a] for a in _axes(entry))


def add_axis_to_first_free_dim(
    sharding: Sharding, shape: tuple[int, ...], axis: str
) -> LeafSharding:
    """ZeRO-1: ``sharding`` with ``axis`` added on the first dimension that can take it.

    As MaxText's ``shard_optimizer_over_data``: the state of a data-parallel
    (replicated) parameter is partitioned over the data axis, so each device
    keeps ``1/N`` of it. The axis goes on the first unsharded dimension it
    divides, or else joins the sharding of the first dimension that divides by
    both (an FSDP bias ``P('fsdp')`` becomes ``P(('fsdp', 'data'))``). A leaf
    already sharded over ``axis`` stays as it is; a leaf with no such dimension
    stays replicated over ``axis`` (the reason says so).

    Example:
        >>> import jax
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> mesh = jax.make_mesh((1,), ("data",))
        >>> add_axis_to_first_free_dim(NamedSharding(mesh, P()), (6, 4), "data").sharding.spec
        P('data',)
    """
    if not isinstance(sharding, NamedSharding):
        raise TypeError(f"zero1_axis needs NamedSharding parameters, got {sharding}")
    spec = padded_spec(sharding, len(shape))
    size = sharding.mesh.shape[axis]
    if any(axis in _axes(entry) for entry in spec):
        return LeafSharding(sharding, f"already sharded over {axis!r}")
    # First an unsharded dimension the axis divides; else a sharded one that can also take it.
    free = [
        d for d, (e, n) in enumerate(zip(spec, shape, strict=True)) if e is None and n % size == 0
    ]
    shared = [
        d
        for d, (e, n) in enumerate(zip(spec, shape, strict=True))
        if e is not None and n % (axes_size(sharding.mesh, e) * size) == 0
    ]
    if not free and not shared:
        return LeafSharding(
            sharding,
            f"not partitioned over {axis!r}: no dimension of {tuple(shape)} is divisible "
            f"by {size} times its shards",
        )
    dim = free[0] if free else shared[0]
    spec[dim] = axis if free else (*_axes(spec[dim]), axis)
    # As long as the parameter's spec or up to `dim`: jax.jit caches on the spec
    # itself, and returns specs as long as their inputs' (P("data") is not P("data", None)).
    spec = spec[: max(len(sharding.spec), dim + 1)]
    new = NamedSharding(sharding.mesh, PartitionSpec(*spec), memory_kind=sharding.memory_kind)
    return LeafSharding(new, f"plus {axis!r} on dim {dim} (ZeRO-1)")


def is_block_quantized(node: Any) -> bool:
    """Whether ``node`` is an 8-bit leaf: a NamedTuple ``(codes, scale)``."""
    return isinstance(node, tuple) and getattr(node, "_fields", None) == ("codes", "scale")


def block_quantized_shardings(
    param_sharding: Sharding,
    param_shape: tuple[int, ...],
    codes_shape: tuple[int, ...],
    zero1_axis: str | None,
) -> tuple[LeafSharding, LeafSharding]:
    """Shardings of an 8-bit leaf's ``codes (n_blocks, block_size)`` and ``scale (n_blocks,)``.

    The blocks cut the *flattened* parameter into runs of ``block_size``
    elements. A parameter sharded on its first axis only (over ``k`` shards)
    holds contiguous runs of ``size / k`` elements, so the block axis can be
    sharded the same way when ``size / k`` is a multiple of ``block_size``
    (every block lies in one shard). Otherwise the 8-bit leaf is replicated.
    With ``zero1_axis`` (not used by the parameter), that axis is added after
    the parameter's on the block axis when the number of blocks divides.

    Shard-major codes (rank ``len(param_shape) + 2``, see
    :mod:`functional_adam.storage.shard_blocks`) take the parameter's partition spec
    on their leading axes (:func:`shard_major_shardings`).

    Returns:
        ``(codes sharding, scale sharding)`` with the same reason.
    """
    if param_shape and len(codes_shape) == len(param_shape) + 2:
        return shard_major_shardings(param_sharding, param_shape, codes_shape, zero1_axis)
    replicated = replicated_like(param_sharding)
    n_blocks, block_size = codes_shape
    if not isinstance(param_sharding, NamedSharding):
        reason = "8-bit: replicated (parameter on one device)"
        return LeafSharding(replicated, reason), LeafSharding(replicated, reason)
    mesh = param_sharding.mesh
    spec = padded_spec(param_sharding, len(param_shape))
    follows, why = _blocks_follow(spec, mesh, param_shape, block_size)
    block_axes, zero1 = follows, ""
    used = {a for entry in spec for a in _axes(entry)}
    if zero1_axis is not None and zero1_axis not in used:
        candidate = (*follows, zero1_axis)
        if n_blocks % axes_size(mesh, candidate) == 0:
            block_axes, zero1 = candidate, f"{zero1_axis!r} added (ZeRO-1)"
        else:
            zero1 = f"not over {zero1_axis!r}: {n_blocks} blocks for {axes_size(mesh, candidate)}"
    if not block_axes:
        reason = f"8-bit: replicated ({why})" + (f"; {zero1}" if zero1 else "")
        return LeafSharding(replicated, reason), LeafSharding(replicated, reason)
    reason = f"8-bit: block axis over {block_axes}" + (f" ({why})" if follows else "")
    reason += f", {zero1}" if zero1 else ""
    entry = block_axes[0] if len(block_axes) == 1 else block_axes
    kind = param_sharding.memory_kind
    codes = NamedSharding(mesh, PartitionSpec(entry), memory_kind=kind)
    scale = NamedSharding(mesh, PartitionSpec(entry), memory_kind=kind)
    return LeafSharding(codes, reason), LeafSharding(scale, reason)


def layout_sharding(
    sharding: Sharding, shape: tuple[int, ...], zero1_axis: str | None
) -> LeafSharding:
    """The sharding a moment of this parameter gets: the parameter's, plus ``zero1_axis``.

    8-bit blocks are laid out per shard of this sharding (its shard counts are the
    :func:`~functional_adam.layout_hints` that ``init`` gets), so with ZeRO-1 each
    device also keeps only its part of the 8-bit state.
    """
    if zero1_axis is None or not isinstance(sharding, NamedSharding):
        return LeafSharding(sharding, "")
    return add_axis_to_first_free_dim(sharding, shape, zero1_axis)


def shard_major_shardings(
    param_sharding: Sharding,
    param_shape: tuple[int, ...],
    codes_shape: tuple[int, ...],
    zero1_axis: str | None,
) -> tuple[LeafSharding, LeafSharding]:
    """Shardings of shard-major codes ``(S_0, ..., S_{r-1}, n_local, block_size)`` and scales.

    The leading axes take the spec of the moment's sharding (:func:`layout_sharding`:
    the parameter's, plus ``zero1_axis`` on the dimension ZeRO-1 chooses), so each
    device holds the blocks of its own shard. Codes laid out for other shard counts
    are refused with a ``ValueError`` naming both layouts.
    """
    r = len(param_shape)
    layout = layout_sharding(param_sharding, param_shape, zero1_axis)
    sharding = layout.sharding
    spec = padded_spec(sharding, r) if isinstance(sharding, NamedSharding) else [None] * r
    mesh = getattr(sharding, "mesh", None)
    counts = tuple(axes_size(mesh, entry) for entry in spec)
    if counts != tuple(codes_shape[:r]):
        raise ValueError(
            f"8-bit blocks laid out for {tuple(codes_shape[:r])} shards (codes {codes_shape}) "
            f"but the state of this parameter is split into {counts} ({sharding})"
        )
    reason = f"8-bit: blocks of each shard of {sharding.spec}"
    reason += f" ({layout.reason})" if layout.reason else ""
    # The specs jax.jit gives its computed outputs: full length on Explicit axes,
    # without trailing Nones on Auto ones (so a step's outputs hit its cache again).
    codes, scale = [*spec, None, None], [*spec, None]
    if not all(t == AxisType.Explicit for t in mesh.axis_types):
        codes, scale = _trimmed(codes), _trimmed(scale)
    kind = sharding.memory_kind
    return (
        LeafSharding(NamedSharding(mesh, PartitionSpec(*codes), memory_kind=kind), reason),
        LeafSharding(NamedSharding(mesh, PartitionSpec(*scale), memory_kind=kind), reason),
    )


def _trimmed(spec: list[Any]) -> list[Any]:
    """``spec`` without trailing ``None`` s."""
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return spec


def _blocks_follow(
    spec: list[Any], mesh: Any, shape: tuple[int, ...], block_size: int
) -> tuple[tuple[str, ...], str]:
    """The axes the block axis can share with the parameter, and why (or why not), in words."""
    if any(entry is not None for entry in spec[1:]):
        return (), "parameter sharded beyond its first axis"
    if not spec or spec[0] is None:
        return (), "parameter not sharded"
    per_shard, rest = divmod(math.prod(shape), axes_size(mesh, spec[0]))
    if rest or per_shard % block_size:
        return (), f"{per_shard} elements per shard is not whole blocks of {block_size}"
    return _axes(spec[0]), "like the parameter's first axis"


def check_fits(sharding: Sharding, shape: tuple[int, ...], where: str) -> None:
    """Raises ``ValueError`` naming ``where`` if ``sharding`` cannot lay out ``shape``."""
    try:
        sharding.check_compatible_aval(tuple(shape))  # rank
        sharding.shard_shape(tuple(shape))  # divisibility
    except Exception as e:
        raise ValueError(
            f"{where} of shape {tuple(shape)} cannot have sharding {sharding}: {e}"
        ) from e


def leaf_sharding_like(leaf: Any, where: str) -> Sharding:
    """The sharding of one parameter leaf (a ``jax.Array`` or a ``ShapeDtypeStruct``)."""
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        raise ValueError(
            f"{where} has no sharding: give jax.Arrays, jax.ShapeDtypeStruct(shape, dtype, "
            "sharding=NamedSharding(mesh, spec)), or param_shardings."
        )
    if not isinstance(sharding, Sharding):
        raise TypeError(f"{where}.sharding is {sharding!r}, not a jax.sharding.Sharding")
    return sharding
