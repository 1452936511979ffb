r"""Block-wise 8-bit quantization with the dynamic map (the codec behind ``adam_8bit``).

Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022
(https://arxiv.org/abs/2110.02861). An array is flattened, padded with zeros
to a multiple of ``block_size`` and cut into blocks; each block keeps one
float32 scale ``s = max|x|`` and one 8-bit code per element, the index of the
entry of a fixed 256-value map ``Q`` (in [-1, 1]) nearest to ``x / s``::

    encode:  code_i = argmin_k |Q_k - x_i / s|        decode:  x̂_i = s · Q[code_i]

so ``|x_i - x̂_i| <= s · (Q_{k+1} - Q_k) / 2`` for the two map entries around
``x_i / s``: the error bound is half the local spacing of the map.

The map is bitsandbytes' *dynamic* map; its tables, and how a nearest code is
found by two small table look-ups, are in :mod:`functional_adam.storage.codec`.
``code="float"`` selects the other format, whose codes are the top bits of the
float32 of ``x / s`` (:mod:`functional_adam.storage.float_codes`), with the same
scales, code dtypes and saturation policy.

Codes: the unsigned map stores its sorted index as ``uint8``. The signed map
stores ``int8(index - 127)`` wrapped to 8 bits, so that code 0 is 0.0, code
``+k`` and ``-k`` are opposite values, and code -128 is +1.0 (the map holds +1
but not -1, as bitsandbytes' does). Zero arrays therefore encode to zero codes.

Non-finite and overflowing values never spoil their block. The scale is the
absolute maximum over the block's *valid* elements only (by default the finite
ones; a caller may mark more as invalid, as 8-bit Adam does for an element whose
second moment overflowed), and an invalid element is encoded within the block's
code range: infinite and finite invalid values saturate to the largest code of
their sign (``+s``, or ``-0.993·s``, the signed map's most negative value),
``NaN`` to 0 with the signed map and to ``s`` with the unsigned one. A block
with no valid element has scale 0 and decodes to zeros. So the other elements of the block keep their codes,
and every decoded value is finite.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from functional_adam.core.checks import static_int
from functional_adam.storage import float_codes
from functional_adam.storage.codec import (  # noqa: F401  (dynamic_map, make_codec: public here too)
    decode_codes,
    dynamic_map,
    make_codec,
    nearest_index,
    nearest_index_by_rule,
)


class BlockQuantized(NamedTuple):
    """An array stored as 8-bit codes with one float32 scale per block (a pytree of arrays).

    The original shape is not stored: the caller knows it (it is the gradient's).
    """

    # int8 (signed map) or uint8 (unsigned map), shape (n_blocks, block_size); per shard
    # (S_0, ..., S_{r-1}, n_local_blocks, block_size): functional_adam.storage.shard_blocks
    codes: jax.Array
    scale: jax.Array  # float32, the codes' shape without block_size: each block's absolute maximum


CODES = ("dynamic", "float")


def check_code(code: str) -> str:
    """``code`` if it names a code format (:data:`CODES`), else a ``ValueError`` naming it.

    Example:
        >>> check_code("fp8")
        Traceback (most recent call last):
        ...
        ValueError: code must be one of ('dynamic', 'float'), got 'fp8'
    """
    if not isinstance(code, str) or code not in CODES:
        raise ValueError(f"code must be one of {CODES}, got {code!r}")
    return code


def check_block_size(block_size: int, name: str = "block_size") -> int:
    """``block_size`` as a Python int if it is a positive power of two, else a ``ValueError``.

    A numpy integer or a concrete 0-d integer array (as ``optax.inject_hyperparams``
    passes it) counts as its value.

    Example:
        >>> check_block_size(100)
        Traceback (most recent call last):
        ...
        ValueError: block_size must be a positive power of two (e.g. 256 or 2048), got 100
    """
    block_size = static_int(block_size)
    ok = isinstance(block_size, int) and not isinstance(block_size, bool)
    if not ok or block_size < 1 or block_size & (block_size - 1):
        raise ValueError(
            f"{name} must be a positive power of two (e.g. 256 or 2048), got {block_size!r}"
        )
    return int(block_size)


def num_blocks(size: int, block_size: int) -> int:
    """Number of blocks of ``block_size`` that hold ``size`` elements (the last one padded)."""
    return math.ceil(size / block_size)


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
    """``x`` flattened, zero-padded to whole blocks, shape ``(n_blocks, block_size)``."""
    flat = x.reshape(-1)
    pad = num_blocks(flat.size, block_size) * block_size - flat.size
    return jnp.pad(flat, (0, pad)).reshape(-1, block_size)


@functools.partial(jax.jit, static_argnames=("block_size", "signed", "code"))
def quantize(
    x: jax.Array, block_size: int, *, signed: bool, code: str = "dynamic"
) -> BlockQuantized:
    """Encodes a real array block-wise with the dynamic map (see the module docstring).

    Args:
        x: a real array of any shape (values must be >= 0 when ``signed=False``).
        block_size: elements per block, a positive power of two.
        signed: use the signed map (int8 codes) or the unsigned one (uint8 codes).
        code: ``"dynamic"`` (the map) or ``"float"`` (float codes).

    Returns:
        :class:`BlockQuantized` with codes of shape ``(ceil(x.size / block_size), block_size)``.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize(jnp.array([-2.0, 0.0, 0.5, 2.0]), 4, signed=True)
        >>> q.scale  # one block: its absolute maximum
        Array([2.], dtype=float32)
        >>> q.codes  # 0 is 0.0; +1 (the block maximum) is code -128; -1 is not in the map
        Array([[-127,    0,   74, -128]], dtype=int8)
        >>> # 0.5/2 = 0.25 -> 0.1 + 0.9·10.5/64, centre of bin 10 of the top decade (code 64 + 10)
        >>> dequantize(q, (4,), signed=True).round(6)
        Array([-1.985938,  0.      ,  0.495312,  2.      ], dtype=float32)
    """
    blocks = _blocks(jnp.asarray(x, jnp.float32), check_block_size(block_size))
    return encode_blocks(blocks, signed=signed, code=check_code(code))


def encode_blocks(
    blocks: jax.Array, *, signed: bool, valid: jax.Array | None = None, code: str = "dynamic"
) -> BlockQuantized:
    """:func:`quantize` of an array already shaped ``(n_blocks, block_size)`` (float32).

    Args:
        blocks: float32 values, shape ``(n_blocks, block_size)``.
        signed: use the signed map (int8 codes) or the unsigned one (uint8 codes).
        valid: which elements count for the scale (boolean, the shape of
            ``blocks``); default: the finite ones. The others saturate (module
            docstring).
        code: ``"dynamic"`` or ``"float"``.

    Returns:
        :class:`BlockQuantized`; every scale is finite.

    Example:
        >>> import jax.numpy as jnp
        >>> q = encode_blocks(jnp.array([[1.0, -0.5], [0.0, 0.0]]), signed=True)
        >>> q.scale, decode_blocks(q, signed=True).round(4)  # -0.5 -> -(0.1 + 0.9·28.5/64)
        (Array([1., 0.], dtype=float32), Array([[ 1.    , -0.5008],
               [ 0.    ,  0.    ]], dtype=float32))
        >>> q = encode_blocks(jnp.array([[0.5, jnp.inf, jnp.nan, -jnp.inf]]), signed=True)
        >>> q.scale, decode_blocks(q, signed=True).round(4)  # the finite 0.5 sets the scale
        (Array([0.5], dtype=float32), Array([[ 0.5   ,  0.5   ,  0.    , -0.4965]], dtype=float32))
    """
    valid = jnp.isfinite(blocks) if valid is None else valid
    scale = jnp.max(jnp.where(valid, jnp.abs(blocks), 0.0), axis=1, initial=0.0)
    return BlockQuantized(encode_with_scale(blocks, scale, valid, signed=signed, code=code), scale)


def encode_with_scale(
    blocks: jax.Array,
    scale: jax.Array,
    valid: jax.Array,
    *,
    signed: bool,
    by_rule: bool = False,
    code: str = "dynamic",
) -> jax.Array:
    """The codes of ``blocks`` (float32, ``(n_blocks, block_size)``) for the given ``scale``.

    ``scale`` (``(n_blocks,)``) is the absolute maximum of each block's ``valid``
    elements (:func:`encode_blocks` computes it); invalid elements saturate (module
    docstring). Elementwise given the scales, so a fused kernel can compute the
    scales first and encode in a second sweep over data in cache. ``by_rule``: find
    the codes with :func:`~functional_adam.storage.codec.nearest_index_by_rule`
    (the same codes; faster to run on a CPU, slower to compile) instead of the tables.
    ``code="float"``: float codes (:mod:`~functional_adam.storage.float_codes`).
    """
    inverse = jnp.where(scale > 0, 1 / scale, 0.0)[..., None]
    saturated = jnp.where(jnp.isnan(blocks), 0.0, 1.0) if signed else 1.0
    a = jnp.where(valid, jnp.abs(blocks) * inverse, saturated)
    if code == "float":
        q = float_codes.encode(a, signed)
        if not signed:
            return q.astype(jnp.uint8)
        return jnp.where(blocks < 0, -q, q).astype(jnp.int8)
    codec = make_codec(signed)
    index = (nearest_index_by_rule if by_rule else nearest_index)(a, codec)
    if not signed:
        return index.astype(jnp.uint8)
    top = len(codec.magnitudes) - 2  # -1 is not in the map: negatives stop at the largest centre
    code = jnp.where(blocks < 0, -jnp.minimum(index, top), index)
    return jax.lax.bitcast_convert_type((code & 0xFF).astype(jnp.uint8), jnp.int8)


def decode_blocks(q: BlockQuantized, *, signed: bool, code: str = "dynamic") -> jax.Array:
    """The float32 values of ``q``, shaped ``(n_blocks, block_size)`` like its codes."""
    if code == "float":
        values = float_codes.decode_codes(q.codes, signed)
    else:
        values = decode_codes(q.codes, make_codec(signed))
    return values * q.scale[..., None]


def encode_second_moment(
    v: jax.Array, valid: jax.Array | None = None, code: str = "dynamic"
) -> BlockQuantized:
    """``v`` (``(n, block_size)`` blocks, >= 0) stored as the unsigned codes of ``sqrt(v)``.

    Two departures from storing ``v`` itself, both against the "zero-point
    problem" (Li et al., "Memory Efficient Optimizers with 4-bit States", 2023):
    a ``v`` rounded to 0 while ``m`` is not makes ``m / (sqrt(v) + eps)`` huge.
    Storing ``sqrt(v)`` halves the dynamic range the map must cover (``v``'s
    smallest code is ``3.25e-7`` of the block maximum, gradients 2,500 times
    smaller than the block's largest were lost; ``sqrt(v)`` keeps them down to
    ``3.25e-7``), and a positive value is never rounded to 0 but to the smallest
    code (which can only shrink the step). ``valid`` is as in :func:`encode_blocks`:
    an invalid (or infinite, or NaN) ``v`` saturates to the block's largest.

    Example:
        >>> import jax.numpy as jnp
        >>> q = encode_second_moment(jnp.array([[4.0, 1.0, 0.0, 1e-20]]))
        >>> q.scale, q.codes  # scale: max sqrt(v) = 2; 1e-20 gets code 1, not 0
        (Array([2.], dtype=float32), Array([[255, 183,   0,   1]], dtype=uint8))
        >>> decode_second_moment(q).round(4)  # 1 -> (2·(0.1 + 0.9·56.5/128))² (bin 56)
        Array([[4.    , 0.9891, 0.    , 0.    ]], dtype=float32)
    """
    valid = jnp.isfinite(v) if valid is None else valid
    # max sqrt(v) is sqrt(max v) (sqrt is monotonic and correctly rounded): one sqrt per block.
    scale = jnp.sqrt(jnp.max(jnp.where(valid, v, 0.0), axis=1, initial=0.0))
    return BlockQuantized(encode_second_moment_with_scale(v, scale, valid, code=code), scale)


def encode_second_moment_with_scale(
    v: jax.Array,
    scale: jax.Array,
    valid: jax.Array,
    *,
    by_rule: bool = False,
    code: str = "dynamic",
) -> jax.Array:
    """The codes of :func:`encode_second_moment` for ``scale = sqrt(max v)`` over the valid ``v``."""
    root = jnp.sqrt(v)
    codes = encode_with_scale(root, scale, valid, signed=False, by_rule=by_rule, code=code)
    return jnp.where((root > 0) & (codes == 0), jnp.uint8(1), codes)


def decode_second_moment(q: BlockQuantized, code: str = "dynamic") -> jax.Array:
    """The inverse of :func:`encode_second_moment`: ``v`` as float32 blocks."""
    return jnp.square(decode_blocks(q, signed=False, code=code))


@functools.partial(jax.jit, static_argnames=("shape", "signed", "code"))
def dequantize(
    q: BlockQuantized, shape: tuple[int, ...], *, signed: bool, code: str = "dynamic"
) -> jax.Array:
    """Decodes :func:`quantize`'s output to a float32 array of ``shape``.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize(jnp.arange(6.0).reshape(2, 3), 4, signed=False)  # blocks [0..3], [4, 5, pad]
        >>> q.scale
        Array([3., 5.], dtype=float32)
        >>> dequantize(q, (2, 3), signed=False).round(2)
        Array([[0.  , 1.01, 2.  ],
               [3.  , 4.  , 5.  ]], dtype=float32)
    """
    values = decode_blocks(q, signed=signed, code=check_code(code))
    return values.reshape(-1)[: math.prod(shape)].reshape(shape)


def zeros(shape: tuple[int, ...], block_size: int, *, signed: bool) -> BlockQuantized:
    """The encoding of ``jnp.zeros(shape)``: zero codes and zero scales.

    Example:
        >>> zeros((5,), 4, signed=False).codes.shape
        (2, 4)
    """
    n = num_blocks(math.prod(shape), check_block_size(block_size))
    dtype = jnp.int8 if signed else jnp.uint8
    return BlockQuantized(jnp.zeros((n, block_size), dtype), jnp.zeros((n,), jnp.float32))
