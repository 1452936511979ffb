r"""8-bit block-wise storage of moments: a storage layer for any per-leaf optimizer step.

Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022
(https://arxiv.org/abs/2110.02861). A moment of a large leaf is stored as 8-bit
codes of the dynamic map with one float32 absmax per block
(:mod:`functional_adam.storage.quantized`): a signed moment with the signed map
(int8 codes), a squared moment (``Moment(squared=True)``) as the unsigned codes
of its square root (uint8, :func:`~functional_adam.storage.quantized.encode_second_moment`).
Leaves with fewer than ``min_8bit_size`` elements, and complex leaves (the maps
are real), keep plain moments, as bitsandbytes does for small tensors.

Each step of a quantized leaf runs the optimizer's elementwise ``step`` on the
decoded blocks and encodes the result with each block's new absolute maxima,
all moments' maxima in one reduction::

    moments = decode(codes)                 # float32
    u, moments = step(g, moments, scalars)  # the optimizer's own per-leaf math
    codes = encode(moments)                 # new absmax per block

For leaves of over 4M elements on the CPU this runs in a loop over chunks of
64K elements, so no full-size float32 moment is materialised; otherwise it is
one vectorized expression for the compiler to fuse.

An element whose new moments are not all finite (a gradient that is infinite,
NaN, or whose square overflows) is *invalid*: its block's scales are the
absolute maxima of the valid elements, so its neighbours keep their values, and
its own moments saturate (infinite and overflowing ones to the block's largest
code of their sign, NaN ones to 0 in a signed moment and to the block's largest
value in a squared one). Its update in that step is the float32 step's (NaN for
a non-finite gradient, as in ``adam``).

Because the layer only decodes, calls ``step`` and encodes, any optimizer
written for :func:`functional_adam.core.lift.lift` gets 8-bit moments with
``lift(optimizer, BlockStorage(...))``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from functional_adam.core.checks import static_int
from functional_adam.core.lift import PLAIN, LeafError, LeafStep, Moment
from functional_adam.core.numerics import cast, compute_dtype, moment_dtype
from functional_adam.storage import shard_blocks
from functional_adam.storage.codec import decode_codes_by_rule, make_codec
from functional_adam.storage.quantized import (
    BlockQuantized,
    check_block_size,
    check_code,
    decode_blocks,
    decode_second_moment,
    encode_second_moment_with_scale,
    encode_with_scale,
    zeros,
)

DEFAULT_BLOCK_SIZE = 256
DEFAULT_MIN_8BIT_SIZE = 4096
_CHUNK_ELEMENTS = 2**16  # elements per loop iteration: the temporaries stay in cache
# On the CPU, leaves above this size step in a loop over chunks (no full-size temporaries);
# smaller ones in one expression, which compiles in about half the time (BENCHMARKS.md).
_CHUNKED_MIN_SIZE = 2**22


def check_min_size(min_8bit_size: int) -> int:
    """``min_8bit_size`` as a non-negative Python int (from an int, a numpy integer or a concrete
    0-d integer array), or a ``ValueError`` naming it."""
    min_8bit_size = static_int(min_8bit_size)
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
        raise ValueError(f"min_8bit_size must be a non-negative int, got {min_8bit_size!r}")
    return min_8bit_size


def _decode(
    q: BlockQuantized, squared: bool, by_rule: bool = False, code: str = "dynamic"
) -> jax.Array:
    if by_rule and code == "dynamic":
        value = decode_codes_by_rule(q.codes, make_codec(not squared)) * q.scale[..., None]
        return jnp.square(value) if squared else value
    return decode_second_moment(q, code) if squared else decode_blocks(q, signed=True, code=code)


def encode_moments(
    moments: tuple, squared: tuple, by_rule: bool = False, code: str = "dynamic"
) -> tuple:
    """Encodes the new moments of some blocks; an element is valid if all its moments are finite.

    So an element whose second moment overflowed (``|g| > 1.8e19`` in float32)
    or whose gradient was not finite saturates in every moment, and its block's
    scales are set by the other elements (see :mod:`~functional_adam.storage.quantized`).
    The scales of all moments come from one reduction (one pass over the blocks),
    over the last axis (blocks may have leading axes: the shard-major layout). ``code``:
    the code format (:data:`~functional_adam.storage.quantized.CODES`).
    """
    # The codes' scales are float32, also for float64 parameters.
    moments = tuple(x.astype(jnp.float32) for x in moments)
    valid = functools.reduce(jnp.logical_and, [jnp.isfinite(x) for x in moments])
    if by_rule:  # XLA:CPU: plain max and min of materialized blocks (its fast reductions)
        clean = tuple(jnp.where(valid, x, 0.0) for x in moments)
        maxima = tuple(
            jnp.max(x, axis=-1, initial=0.0)
            if sq
            else jnp.maximum(jnp.max(x, axis=-1, initial=0.0), -jnp.min(x, axis=-1, initial=0.0))
            for x, sq in zip(clean, squared, strict=True)
        )
    else:  # |m| for a signed moment, v for a squared one (max sqrt(v) = sqrt(max v)): one pass
        keys = tuple(
            jnp.where(valid, x if sq else jnp.abs(x), 0.0)
            for x, sq in zip(moments, squared, strict=True)
        )
        maxima = jax.lax.reduce(
            keys,
            (jnp.float32(0),) * len(keys),
            lambda a, b: tuple(jnp.maximum(x, y) for x, y in zip(a, b, strict=True)),
            (keys[0].ndim - 1,),
        )
    out = []
    for x, sq, top in zip(moments, squared, maxima, strict=True):
        if sq:
            scale = jnp.sqrt(top)
            codes = encode_second_moment_with_scale(x, scale, valid, by_rule=by_rule, code=code)
            out.append(BlockQuantized(codes, scale))
        else:
            codes = encode_with_scale(x, top, valid, signed=True, by_rule=by_rule, code=code)
            out.append(BlockQuantized(codes, top))
    return tuple(out)


def _slice_blocks(q: BlockQuantized, start, n: int) -> BlockQuantized:
    return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, n, 0), q)


def _set_blocks(q: BlockQuantized, start, new: BlockQuantized) -> BlockQuantized:
    return jax.tree.map(lambda a, b: jax.lax.dynamic_update_slice_in_dim(a, b, start, 0), q, new)


def _unless_traced(check: Any, value: Any) -> Any:
    return value if isinstance(value, jax.core.Tracer) else check(value)


class BlockStorage(NamedTuple):
    """Moments of leaves of at least ``min_8bit_size`` elements as 8-bit blocks.

    Attributes:
        block_size: elements per block (one float32 absmax each), a power of two.
        min_8bit_size: smaller leaves keep plain moments (float32 for 16- and
            32-bit parameters, or the dtype their :class:`Moment` asks for).
        code: the 8-bit format, ``"dynamic"`` (bitsandbytes' map) or ``"float"``
            (:mod:`~functional_adam.storage.float_codes`).
    """

    block_size: int = DEFAULT_BLOCK_SIZE
    min_8bit_size: int = DEFAULT_MIN_8BIT_SIZE
    code: str = "dynamic"

    def checked(self) -> BlockStorage:
        """This storage with Python ints, or a ``ValueError`` naming the argument at fault.

        A traced size is kept as it is: ``optax.inject_hyperparams`` passes its copy of
        the sizes, traced inside a jitted ``update``, where the steps read the block size
        and which leaves are quantized from the state; ``init`` needs them concrete.
        """
        return BlockStorage(
            _unless_traced(check_block_size, self.block_size),
            _unless_traced(check_min_size, self.min_8bit_size),
            check_code(self.code),
        )

    def quantizes(self, param: Any) -> bool:
        """Whether the moments of ``param`` are stored in 8 bits."""
        for name in ("block_size", "min_8bit_size"):
            if isinstance(getattr(self, name), jax.core.Tracer):
                raise ValueError(
                    f"{name} is traced where the 8-bit state is made: it sets the state's "
                    "shapes, so it must be a concrete int (with optax.inject_hyperparams under "
                    "jax.jit, pass static_args=('block_size', 'min_8bit_size'))"
                )
        return math.prod(param.shape) >= self.min_8bit_size and jnp.issubdtype(
            param.dtype, jnp.floating
        )

    def init(self, param: Any, moment: Moment, layout: Any = None) -> Any:
        """Zero codes: shard-major when the parameter is split over several shards.

        The split is read from ``layout`` (a ``Sharding`` or shard counts, from
        :func:`~functional_adam.core.lift.layout_hints`), else from the parameter itself
        (a placed ``jax.Array``, or a tracer with Explicit mesh axes); the flat
        layout otherwise (:mod:`functional_adam.storage.shard_blocks`).
        """
        if self.quantizes(param):
            if moment.initial != 0:
                raise ValueError(
                    f"BlockStorage: moment {moment.name!r} starts at {moment.initial}; 8-bit "
                    "blocks start at 0 (use plain storage for this optimizer)."
                )
            shape = tuple(param.shape)
            if layout is None:
                shards = shard_blocks.visible_counts(param)
            else:
                shards = shard_blocks.shard_counts(layout, shape)
            if shards is not None:
                return shard_blocks.zeros(shape, shards, self.block_size, signed=not moment.squared)
            return zeros(shape, self.block_size, signed=not moment.squared)
        dtype = moment_dtype(compute_dtype(param.dtype), moment.dtype, squared=moment.squared)
        return jnp.full(param.shape, moment.initial, dtype)

    def is_leaf(self, x: Any) -> bool:
        return isinstance(x, BlockQuantized)

    def step(self, step: LeafStep, g: jax.Array, stored: tuple, scalars: Any) -> tuple:
        if not any(isinstance(x, BlockQuantized) for x in stored):
            return PLAIN.step(step, g, stored, scalars)
        # A squared moment is encoded through its square root, a signed one directly; which
        # is which follows from the codes' dtype (uint8: the unsigned map of a squared moment).
        squared = tuple(x.codes.dtype == jnp.uint8 for x in stored)
        codes_shape = tuple(stored[0].codes.shape)
        if g.ndim and len(codes_shape) == g.ndim + 2:  # shard-major blocks
            error = shard_blocks.layout_error(g.shape, codes_shape, codes_shape[-1], g)
            if error:
                raise LeafError(error)
            return _shard_major_step(step, g, stored, scalars, squared, self.code)
        error = shard_blocks.flat_layout_error(g, codes_shape)
        if error:
            raise LeafError(error)
        chunked = jax.default_backend() == "cpu" and g.size > _CHUNKED_MIN_SIZE
        return _quantized_step(step, g, stored, scalars, squared, chunked, self.code)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))  # eager steps round as jitted ones do
def _quantized_step(step, g, stored, scalars, squared, chunked: bool, code: str):
    """One ``step`` of a quantized leaf: ``(u, new stored moments)``.

    ``u`` is elementwise in ``g`` and the old codes, so XLA fuses it into its
    consumer (``apply_updates``). The new codes need each block's new absolute
    maxima first: ``chunked`` (large leaves on the CPU) in a loop over chunks of 64K elements
    (:func:`_chunked_codes`) that keeps the float32 moments in cache; otherwise in
    one vectorized expression (:func:`_blocks_step` on all blocks) that the compiler
    fuses into a reduction and an encoding, each recomputing decode and step.
    """
    if chunked:
        out = _chunked_codes(step, g, stored, scalars, squared, code)
    else:
        n_blocks, block_size = stored[0].codes.shape
        flat = jnp.pad(g.reshape(-1), (0, n_blocks * block_size - g.size))
        blocks = flat.reshape(n_blocks, block_size)
        out = _blocks_step(step, blocks, stored, scalars, squared, code=code)
    moments = tuple(
        _decode(q, sq, chunked, code).reshape(-1)[: g.size].reshape(g.shape)
        for q, sq in zip(stored, squared, strict=True)
    )
    u = step(g, moments, scalars)[0]
    return cast(u, g.dtype), out


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _shard_major_step(step, g, stored, scalars, squared, code):
    """:func:`_quantized_step` for shard-major blocks: each shard's blocks on their own.

    All blocks are stepped in one vectorized expression (no chunked loop): XLA
    partitions it along the leading shard axes, so each device steps its own blocks.
    """
    shards = stored[0].codes.shape[: g.ndim]
    g_blocks = shard_blocks.to_blocks(g, shards, stored[0].codes.shape[-1])
    out = _blocks_step(step, g_blocks, stored, scalars, squared, code=code)
    moments = tuple(
        shard_blocks.from_blocks(_decode(q, sq, code=code), g.shape)
        for q, sq in zip(stored, squared, strict=True)
    )
    u = step(g, moments, scalars)[0]
    return cast(u, g.dtype), out


def _blocks_step(step, g_blocks, old, scalars, squared, by_rule=False, code="dynamic") -> tuple:
    """The new stored moments of some blocks: decode, ``step``, encode (one reduction).

    ``by_rule`` (the CPU's chunks): the codec's arithmetic instead of its tables, and plain
    reductions, which XLA:CPU runs faster (the same codes and scales).
    """
    moments = tuple(_decode(q, sq, by_rule, code) for q, sq in zip(old, squared, strict=True))
    _, new = step(g_blocks, moments, scalars)
    return encode_moments(new, squared, by_rule, code)


def _chunked_codes(step, g, stored, scalars, squared, code) -> tuple:
    """:func:`_blocks_step` in a loop over chunks of 64K elements, without full-size temporaries.

    The loop reads ``g`` and the old codes and writes the new codes into buffers
    it carries (the blocks after the last whole chunk, with the zero-padded final
    block, are done after the loop). It never reads what it carries: when it did
    (and XLA fused that read into another output), XLA copied the whole buffers
    in every iteration, which made a step quadratic in the leaf size.
    """
    n_blocks, block_size = stored[0].codes.shape
    size = g.size
    flat = g.reshape(-1)
    chunk = max(1, min(_CHUNK_ELEMENTS // block_size, size // block_size))
    looped = size // block_size // chunk * chunk  # blocks done inside the loop
    out = tuple(jax.tree.map(jnp.zeros_like, q) for q in stored)

    def body(i, carry):
        start = i * chunk
        g_chunk = jax.lax.dynamic_slice_in_dim(flat, start * block_size, chunk * block_size)
        old = tuple(_slice_blocks(q, start, chunk) for q in stored)
        blocks = g_chunk.reshape(chunk, block_size)
        new = _blocks_step(step, blocks, old, scalars, squared, True, code)
        return tuple(_set_blocks(c, start, n) for c, n in zip(carry, new, strict=True))

    if looped:
        out = jax.lax.fori_loop(0, looped // chunk, body, out)
    if looped < n_blocks:
        tail = jnp.pad(flat[looped * block_size :], (0, n_blocks * block_size - size))
        old = tuple(jax.tree.map(lambda a: a[looped:], q) for q in stored)
        new = _blocks_step(step, tail.reshape(-1, block_size), old, scalars, squared, True, code)
        out = tuple(_set_blocks(c, looped, n) for c, n in zip(out, new, strict=True))
    return out
