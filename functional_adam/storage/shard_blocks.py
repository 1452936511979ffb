r"""The *shard-major* layout of 8-bit blocks: each device's shard of a parameter blocked on its own.

A parameter of shape ``(d_0, ..., d_{r-1})`` split into ``S_i`` shards along each
dimension ``i`` (``S_i`` is the product of the sizes of the mesh axes in its
``PartitionSpec`` entry) is stored as codes of shape
``(S_0, ..., S_{r-1}, n_local_blocks, block_size)`` and scales of shape
``(S_0, ..., S_{r-1}, n_local_blocks)``: entry ``(s_0, ..., s_{r-1})`` holds the
shard ``x[s_0·d_0/S_0 : (s_0+1)·d_0/S_0, ...]`` flattened, zero-padded to whole
blocks and cut into ``n_local_blocks = ceil(prod(d_i/S_i) / block_size)`` blocks::

    x (d_0, ..., d_{r-1})
      -> reshape (S_0, d_0/S_0, ..., S_{r-1}, d_{r-1}/S_{r-1})
      -> transpose the S_i to the front, reshape the rest to one axis, pad, cut into blocks

Sharding the leading ``S_i`` axes like the parameter's dimensions puts every
block on the device that holds its elements, so a step moves nothing between
devices. The layout is read from the codes alone: rank ``r + 2`` (``r >= 1``) is
shard-major, rank 2 the flat layout of :mod:`functional_adam.storage.quantized` (unsharded
parameters).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec, Sharding

from functional_adam.storage.quantized import BlockQuantized, check_block_size, num_blocks


def shard_counts(layout: Any, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Shards per dimension of a leaf of ``shape``, from a ``Sharding`` or a tuple of ints.

    ``None`` when ``layout`` is ``None``, splits nothing, or does not divide ``shape``
    (those leaves keep the flat layout).

    Example:
        >>> shard_counts((1, 4), (8, 12)), shard_counts((1, 1), (8, 12)), shard_counts((3,), (8,))
        ((1, 4), None, None)
    """
    if layout is None:
        return None
    if isinstance(layout, Sharding):
        try:
            local = layout.shard_shape(tuple(shape))
        except Exception:  # a sharding that does not divide the shape: no shard-major layout
            return None
        counts = tuple(d // n if n else 1 for d, n in zip(shape, local, strict=True))
    else:
        counts = tuple(int(n) for n in layout)
    if len(counts) != len(shape) or any(n < 1 or d % n for d, n in zip(shape, counts, strict=True)):
        return None
    return counts if math.prod(counts) > 1 else None


def visible_counts(x: Any) -> tuple[int, ...] | None:
    """The shard counts of ``x`` where they can be seen: a placed ``jax.Array``, or a
    tracer with Explicit mesh axes. ``None`` otherwise (Auto axes under ``jit``) or unsplit."""
    if isinstance(x, jax.core.Tracer):
        sharding = getattr(jax.typeof(x), "sharding", None)
        if not isinstance(sharding, NamedSharding) or not _explicit(sharding):
            return None
    else:
        sharding = getattr(x, "sharding", None)
        if not isinstance(sharding, Sharding):
            return None
    return shard_counts(sharding, tuple(x.shape))


def _explicit(sharding: NamedSharding) -> bool:
    types = sharding.mesh.axis_types
    return bool(types) and all(t == AxisType.Explicit for t in types)


def layout_shards(codes_shape: tuple[int, ...], ndim: int) -> tuple[int, ...] | None:
    """The shard counts of shard-major codes for a rank-``ndim`` leaf; ``None`` if flat."""
    if ndim == 0 or len(codes_shape) != ndim + 2:
        return None
    return tuple(codes_shape[:ndim])


def zeros(
    shape: tuple[int, ...], shards: tuple[int, ...], block_size: int, *, signed: bool
) -> BlockQuantized:
    """Zero codes and scales in the shard-major layout.

    Example:
        >>> q = zeros((8, 12), (1, 4), 16, signed=True)  # 8 x 3 = 24 elements per shard
        >>> q.codes.shape, q.scale.shape
        ((1, 4, 2, 16), (1, 4, 2))
    """
    local = math.prod(d // n for d, n in zip(shape, shards, strict=True))
    n = num_blocks(local, check_block_size(block_size))
    dtype = jnp.int8 if signed else jnp.uint8
    return BlockQuantized(
        jnp.zeros((*shards, n, block_size), dtype), jnp.zeros((*shards, n), jnp.float32)
    )


def _named(x: jax.Array) -> NamedSharding | None:
    """``x``'s sharding in its type, with Explicit axes (reshapes then need ``out_sharding``)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    if isinstance(sharding, NamedSharding) and _explicit(sharding):
        return sharding
    return None


def _reshape(x: jax.Array, shape: tuple[int, ...], spec: list[Any], named) -> jax.Array:
    if named is None:
        return x.reshape(shape)
    return jax.lax.reshape(x, shape, out_sharding=NamedSharding(named.mesh, PartitionSpec(*spec)))


def _lead_spec(named, ndim: int) -> list[Any]:
    spec = list(named.spec)[:ndim] if named is not None else []
    return spec + [None] * (ndim - len(spec))


def to_blocks(x: jax.Array, shards: tuple[int, ...], block_size: int) -> jax.Array:
    """``x`` as shard-major blocks ``(S_0, ..., S_{r-1}, n_local_blocks, block_size)``.

    Example:
        >>> import jax.numpy as jnp
        >>> to_blocks(jnp.arange(8.0).reshape(2, 4), (1, 2), 4)[0, 1]  # columns 2-3, padded
        Array([[2., 3., 6., 7.]], dtype=float32)
    """
    r, named = x.ndim, _named(x)
    spec = _lead_spec(named, r)
    split = [n for d, s in zip(x.shape, shards, strict=True) for n in (s, d // s)]
    y = _reshape(x, tuple(split), [e for entry in spec for e in (entry, None)], named)
    y = y.transpose([2 * i for i in range(r)] + [2 * i + 1 for i in range(r)])
    local = math.prod(split[1::2])
    y = _reshape(y, (*shards, local), [*spec, None], named)
    n = num_blocks(local, block_size)
    y = jnp.pad(y, [(0, 0)] * r + [(0, n * block_size - local)])
    return _reshape(y, (*shards, n, block_size), [*spec, None, None], named)


def from_blocks(blocks: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The inverse of :func:`to_blocks`: shard-major blocks back to an array of ``shape``.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.arange(24.0).reshape(4, 6)
        >>> bool((from_blocks(to_blocks(x, (2, 3), 8), (4, 6)) == x).all())
        True
    """
    r, named = len(shape), _named(blocks)
    spec = _lead_spec(named, r)
    shards = blocks.shape[:r]
    local_shape = tuple(d // s for d, s in zip(shape, shards, strict=True))
    y = _reshape(blocks, (*shards, blocks.shape[-2] * blocks.shape[-1]), [*spec, None], named)
    y = y[..., : math.prod(local_shape)]
    y = _reshape(y, (*shards, *local_shape), [*spec, *[None] * r], named)
    y = y.transpose([j for i in range(r) for j in (i, r + i)])
    return _reshape(y, tuple(shape), spec, named)


def layout_error(
    shape: tuple[int, ...], codes_shape: tuple[int, ...], block_size: int, g: Any
) -> str | None:
    """Why shard-major codes of ``codes_shape`` cannot hold a leaf of ``shape`` (stepped with
    gradient ``g``), in words; ``None`` when they can.

    The codes must split every dimension evenly into whole local blocks, and a gradient
    whose sharding is visible (a placed array, or Explicit axes) must be split into the
    same shards or coarser ones (ZeRO-1 splits the state further than the parameter).
    """
    shards = layout_shards(codes_shape, len(shape))
    local = [d // s if s and d % s == 0 else None for d, s in zip(shape, shards, strict=True)]
    if None in local:
        return (
            f"8-bit blocks laid out for {shards} shards (codes {codes_shape}) do not divide "
            f"a leaf of shape {tuple(shape)}"
        )
    n = num_blocks(math.prod(local), block_size)
    if codes_shape[-2] != n:
        return (
            f"8-bit codes {codes_shape} hold {codes_shape[-2]} blocks per shard; a leaf of shape "
            f"{tuple(shape)} in {shards} shards needs {n}"
        )
    seen = visible_counts(g)
    if seen is not None and any(s % n for s, n in zip(shards, seen, strict=True)):
        sharding = jax.typeof(g).sharding if isinstance(g, jax.core.Tracer) else g.sharding
        return (
            f"8-bit blocks laid out for {shards} shards (codes {codes_shape}) but the gradient "
            f"is split into {seen} shards ({sharding}); build the state for these parameters "
            "(fa.init_sharded) or restore it onto their layout"
        )
    return None


def flat_layout_error(g: Any, codes_shape: tuple[int, ...]) -> str | None:
    """Why flat codes cannot be stepped with a gradient split on Explicit mesh axes, or ``None``.

    Flat blocks run across the shards of a split parameter unless it is split on its
    first dimension alone into whole blocks per shard; Explicit axes refuse the
    reshape that would move them (Auto axes gather instead).
    """
    if not isinstance(g, jax.core.Tracer):
        return None
    seen = visible_counts(g)
    if seen is None:
        return None
    per_shard = math.prod(g.shape) // math.prod(seen)
    if all(n == 1 for n in seen[1:]) and per_shard % codes_shape[-1] == 0:
        return None
    return (
        f"8-bit blocks laid out flat (codes {codes_shape}) but the gradient is split into "
        f"{seen} shards ({jax.typeof(g).sharding}); build the state with fa.init_sharded "
        "(or fa.jitted_init), which blocks each shard on its own"
    )
