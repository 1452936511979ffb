r"""Block-wise 8-bit quantization with the dynamic map (the codec behind ``adam_8bit``).

Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022
(https://arxiv.org/abs/2110.02861). An array is flattened, padded with zeros
to a multiple of ``block_size`` and cut into blocks; each block keeps one
float32 scale ``s = max|x|`` and one 8-bit code per element, the index of the
entry of a fixed 256-value map ``Q`` (in [-1, 1]) nearest to ``x / s``::

    encode:  code_i = argmin_k |Q_k - x_i / s|        decode:  x̂_i = s · Q[code_i]

so ``|x_i - x̂_i| <= s · (Q_{k+1} - Q_k) / 2`` for the two map entries around
``x_i / s``: the error bound is half the local spacing of the map.

The map is bitsandbytes' *dynamic* map (``create_dynamic_map``, after Dettmers,
"8-Bit Approximations for Parallelism in Deep Learning", 2016): decade ``i``
(``i = 0..6``) covers ``10^(i-6)·[0.1, 1]`` with ``n_i`` linearly spaced
values (the centres of ``n_i`` equal bins), where ``n_i = 2^i`` per sign for the
signed map (127 magnitudes, both signs, plus 0 and +1) and ``n_i = 2^(i+1)``
for the unsigned one (254 values, plus 0 and 1). Small magnitudes get a coarse
but wide exponent; magnitudes near the block maximum get up to 7 bits of
fraction: relative spacing 0.9/64 (signed) and 0.9/128 (unsigned) near 1,
where a linear 8-bit map would leave everything below ``s/255`` at zero.

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
``NaN`` to 0 with the signed map and to ``s`` with the unsigned one. A block with no valid element has scale
0 and decodes to zeros. So the other elements of the block keep their codes,
and every decoded value is finite.

Encoding and decoding use no table look-ups (gathers are slow on CPUs): on each
decade the map is affine in the code, so the nearest code of ``a = |x| / s`` is
``clip(floor(a·gain - shift), first, last)`` with the decade's constants, chosen
by comparing ``a`` with the midpoints where decades meet (a few vector selects).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class BlockQuantized(NamedTuple):
    """An array stored as 8-bit codes with one float32 scale per block (a pytree of arrays).

    The original shape is not stored: the caller knows it (it is the gradient's).
    """

    codes: jax.Array  # int8 (signed map) or uint8 (unsigned map), shape (n_blocks, block_size)
    scale: jax.Array  # float32, shape (n_blocks,): the absolute maximum of each block


def dynamic_map(signed: bool) -> np.ndarray:
    """The 256 values of bitsandbytes' dynamic quantization map, sorted, as float32.

    Args:
        signed: the signed map (for Adam's first moment) or the unsigned one
            (for the second moment, which is never negative).

    Returns:
        A float32 numpy array of 256 increasing values in [-1, 1] (signed) or [0, 1].

    Example:
        >>> q = dynamic_map(signed=False)
        >>> (q[:3] * 1e7).round(2).tolist(), q[-1].item()  # 0, then 10^-6·(0.325, 0.775), ..., 1
        ([0.0, 3.25, 7.75], 1.0)
    """
    values = [0.0, 1.0]
    for i in range(7):
        n = 2**i if signed else 2 ** (i + 1)
        edges = np.linspace(0.1, 1.0, n + 1)
        centres = 10.0 ** (i - 6) * (edges[:-1] + edges[1:]) / 2
        values += list(centres) + (list(-centres) if signed else [])
    assert len(values) == 256
    return np.sort(np.asarray(values, np.float64)).astype(np.float32)


class Codec(NamedTuple):
    """Constants of one map, region by region (zero, the seven decades, one), for encode/decode.

    On each region the map is affine in the index ``j``, ``Q_j = slope·(j - offset)``,
    and the nearest index to ``a`` is ``clip(floor(a·gain - shift), first, last)``.
    """

    magnitudes: np.ndarray  # float32: the non-negative values, increasing (decode of 0, 1, ...)
    thresholds: np.ndarray  # float32: where each decade and the final 1 start (midpoints)
    gain: np.ndarray  # float32, per decade
    shift: np.ndarray  # float32, per decade
    first: np.ndarray  # int32, per decade: first magnitude index
    last: np.ndarray  # int32, per decade: last magnitude index
    slope: np.ndarray  # float32, per decade
    offset: np.ndarray  # float32, per decade
    signed: bool


def _decades(signed: bool) -> list[tuple[int, int, int]]:
    """``(decade, first magnitude index, number of values)`` of the dynamic map's decades."""
    if signed:
        return [(i, 2**i, 2**i) for i in range(7)]
    return [(i, 2 ** (i + 1) - 1, 2 ** (i + 1)) for i in range(7)]


@functools.cache
def make_codec(signed: bool) -> Codec:
    """Builds the region constants of the signed or unsigned map (checked against the map).

    Example:
        >>> codec = make_codec(signed=True)
        >>> len(codec.magnitudes), float(codec.magnitudes[-1])  # 0, 127 centres, and +1
        (129, 1.0)
    """
    q = dynamic_map(signed).astype(np.float64)
    magnitudes = q[q >= 0]
    decades = _decades(signed)
    scale = np.array([10.0 ** (i - 6) for i, _, _ in decades])
    first = np.array([f for _, f, _ in decades])
    n = np.array([n for _, _, n in decades], np.float64)
    # Q_j = 10^(i-6)·(0.1 + 0.9·(j - first + 0.5)/n) = slope·(j - offset) within decade i.
    slope, offset = scale * 0.9 / n, first - 0.5 - n / 9
    # Bins of width 0.9/n from 0.1: j = first + floor((a/10^(i-6) - 0.1)·n/0.9).
    gain, shift = n / (0.9 * scale), n / 9 - first
    starts = np.append(first, len(magnitudes) - 1)
    thresholds = (magnitudes[starts - 1] + magnitudes[starts]) / 2
    assert (thresholds[:-1] > 0.1 * scale).all()  # so no index falls below its decade's first
    codec = Codec(
        magnitudes=np.zeros(0, np.float32),
        thresholds=thresholds.astype(np.float32),
        gain=gain.astype(np.float32),
        shift=shift.astype(np.float32),
        first=first.astype(np.int32),
        last=(first + n - 1).astype(np.int32),
        slope=slope.astype(np.float32),
        offset=offset.astype(np.float32),
        signed=signed,
    )
    with jax.ensure_compile_time_eval():  # make_codec may first be called under jax.jit
        values = np.asarray(_magnitude_value(jnp.arange(len(magnitudes)), codec))
    np.testing.assert_allclose(values, magnitudes, rtol=1e-6)  # the affine pieces are the map
    return codec._replace(magnitudes=values)


def _select(a: jax.Array, thresholds: np.ndarray, values: np.ndarray) -> jax.Array:
    """``values[r]`` where ``r`` is the last region with ``a >= thresholds[r]`` (or 0)."""
    out = jnp.full(a.shape, values[0])
    for t, v in zip(thresholds[1:], values[1:], strict=True):
        out = jnp.where(a >= t, v, out)
    return out


def _nearest_magnitude(a: jax.Array, codec: Codec) -> jax.Array:
    """Index (int32) of the magnitude nearest to each ``a`` in [0, 1] (no table look-ups)."""
    t = codec.thresholds[:-1]
    j = jnp.floor(a * _select(a, t, codec.gain) - _select(a, t, codec.shift)).astype(jnp.int32)
    # No lower clip: each decade starts (thresholds) above its first bin's lower edge.
    j = jnp.minimum(j, _select(a, t, codec.last))
    j = jnp.where(a < codec.thresholds[0], 0, j)
    return jnp.where(a >= codec.thresholds[-1], int(codec.last[-1]) + 1, j)


def _magnitude_value(j: jax.Array, codec: Codec) -> jax.Array:
    """The magnitude (float32) of index ``j`` (int32); the inverse of :func:`_nearest_magnitude`."""
    top = int(codec.last[-1]) + 1
    value = _select(j, codec.first, codec.slope) * (j - _select(j, codec.first, codec.offset))
    return jnp.where(j == 0, 0.0, jnp.where(j >= top, 1.0, value))


def check_block_size(block_size: int, name: str = "block_size") -> int:
    """Returns ``block_size`` if it is a positive power of two (a Python int), else raises.

    Example:
        >>> check_block_size(100)
        Traceback (most recent call last):
        ...
        ValueError: block_size must be a positive power of two (e.g. 256 or 2048), got 100
    """
    ok = isinstance(block_size, int | np.integer) and not isinstance(block_size, bool)
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


@functools.partial(jax.jit, static_argnames=("block_size", "signed"))
def quantize(x: jax.Array, block_size: int, *, signed: bool) -> BlockQuantized:
    """Encodes a real array block-wise with the dynamic map (see the module docstring).

    Args:
        x: a real array of any shape (values must be >= 0 when ``signed=False``).
        block_size: elements per block, a positive power of two.
        signed: use the signed map (int8 codes) or the unsigned one (uint8 codes).

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
    return encode_blocks(blocks, signed=signed)


def encode_blocks(
    blocks: jax.Array, *, signed: bool, valid: jax.Array | None = None
) -> BlockQuantized:
    """:func:`quantize` of an array already shaped ``(n_blocks, block_size)`` (float32).

    Args:
        blocks: float32 values, shape ``(n_blocks, block_size)``.
        signed: use the signed map (int8 codes) or the unsigned one (uint8 codes).
        valid: which elements count for the scale (boolean, the shape of
            ``blocks``); default: the finite ones. The others saturate (module
            docstring).

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
    codec = make_codec(signed)
    valid = jnp.isfinite(blocks) if valid is None else valid
    clean = jnp.where(valid, blocks, 0.0)
    # max(max x, -min x): plain reductions, which XLA:CPU runs faster than max |x|.
    scale = jnp.max(clean, axis=1, initial=0.0)
    if signed:
        scale = jnp.maximum(scale, -jnp.min(clean, axis=1, initial=0.0))
    inverse = jnp.where(scale > 0, 1 / scale, 0.0)
    saturated = jnp.where(jnp.isnan(blocks), 0.0, 1.0) if signed else 1.0
    a = jnp.where(valid, jnp.abs(clean) * inverse[:, None], saturated)
    index = _nearest_magnitude(a, codec)
    if not signed:
        return BlockQuantized(index.astype(jnp.uint8), scale)
    top = int(codec.last[-1])  # -1 is not in the map: negatives stop at the largest centre
    code = jnp.where(blocks < 0, -jnp.minimum(index, top), index)
    code = jax.lax.bitcast_convert_type((code & 0xFF).astype(jnp.uint8), jnp.int8)
    return BlockQuantized(code, scale)


def decode_blocks(q: BlockQuantized, *, signed: bool) -> jax.Array:
    """The float32 values of ``q``, shaped ``(n_blocks, block_size)`` like its codes."""
    codec = make_codec(signed)
    codes = q.codes.astype(jnp.int32)
    magnitude = _magnitude_value(jnp.abs(codes), codec) * q.scale[:, None]
    if not signed:
        return magnitude
    return jnp.where((codes < 0) & (codes > -128), -magnitude, magnitude)


def encode_second_moment(v: jax.Array, valid: jax.Array | None = None) -> BlockQuantized:
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
    root = jnp.sqrt(v)
    q = encode_blocks(root, signed=False, valid=valid)
    return q._replace(codes=jnp.where((root > 0) & (q.codes == 0), jnp.uint8(1), q.codes))


def decode_second_moment(q: BlockQuantized) -> jax.Array:
    """The inverse of :func:`encode_second_moment`: ``v`` as float32 blocks."""
    return jnp.square(decode_blocks(q, signed=False))


@functools.partial(jax.jit, static_argnames=("shape", "signed"))
def dequantize(q: BlockQuantized, shape: tuple[int, ...], *, signed: bool) -> jax.Array:
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
    values = decode_blocks(q, signed=signed)
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
