r"""The dynamic map and its tables: nearest-code encoding by two small table look-ups.

The map is bitsandbytes' *dynamic* map (``create_dynamic_map``, after Dettmers,
"8-Bit Approximations for Parallelism in Deep Learning", 2016): decade ``i``
(``i = 0..6``) covers ``10^(i-6)·[0.1, 1]`` with ``n_i`` linearly spaced
values (the centres of ``n_i`` equal bins), where ``n_i = 2^i`` per sign for the
signed map (127 magnitudes, both signs, plus 0 and +1) and ``n_i = 2^(i+1)``
for the unsigned one (254 values, plus 0 and 1). Small magnitudes get a coarse
but wide exponent; magnitudes near the block maximum get up to 7 bits of
fraction: relative spacing 0.9/64 (signed) and 0.9/128 (unsigned) near 1,
where a linear 8-bit map would leave everything below ``s/255`` at zero.

On each decade the map is affine in the index, so the nearest index to
``a = |x| / s`` (in [0, 1]) has a closed form, the **rule** that defines the
codes (:func:`index_rule`)::

    r = #{t in thresholds : a >= t}              # 0: zero, 1..7: a decade, 8: the final 1
    k = min(floor(fma(a, gain[r], -shift[r])), last[r])

with the region constants of :class:`Codec` (the thresholds are the midpoints
where decades meet). The C++ and Pallas kernels compute exactly this; the
``jax.numpy`` path gets the same ``k`` with fewer operations (compile time) from
two small tables built from the rule::

    key = clip((bits(a) >> (23 - KEY_BITS)) - key_base, 0, len(key_table) - 1)
    c   = key_table[key]                  # the index at the lower end of the key's bucket
    k   = c + (a >= midpoints[c])         # midpoints[c]: the least a whose index exceeds c

``key`` is ``a``'s float32 exponent and its top ``KEY_BITS`` mantissa bits: a
bucket of relative width ``2^-7`` that holds at most one midpoint (checked when
the tables are built). Decoding is one look-up of ``M_k``, the float32 value
``(k - offset[d]) · slope[d]`` of the decade ``d`` of ``k``, which the kernels
compute from ``k``'s leading zeros.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

KEY_BITS = 7  # mantissa bits of ``a`` in the look-up key (checked sufficient by make_codec)


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
    """The constants of one map (see the module docstring), as numpy arrays, for every kernel."""

    magnitudes: np.ndarray  # float32: the non-negative values M_k, increasing (decode of k)
    decode: np.ndarray  # float32[256]: the value of each code, indexed by the code's byte
    midpoints: np.ndarray  # float32: the least a whose index exceeds k; the last is inf
    key_table: np.ndarray  # uint8: the index at the lower end of each key's bucket
    key_base: int  # the key of the first bucket (a power of two below the first midpoint)
    thresholds: np.ndarray  # float32[8]: where the regions 1..8 start
    gain: np.ndarray  # float32[9], per region
    shift: np.ndarray  # float32[9], per region
    last: np.ndarray  # int32[9], per region: the largest index of the region
    slope: np.ndarray  # float32[16], per decade d (index d & 15: 15 is the zero code, 7 the top)
    offset: np.ndarray  # float32[16], per decade d
    signed: bool


def _decades(signed: bool) -> list[tuple[int, int]]:
    """``(first magnitude index, number of values)`` of each decade ``i = 0..6`` of the map."""
    if signed:
        return [(2**i, 2**i) for i in range(7)]
    return [(2 ** (i + 1) - 1, 2 ** (i + 1)) for i in range(7)]


def _constants(signed: bool) -> dict:
    """The affine pieces: ``M_k = (k - offset)·slope`` and ``k = floor(a·gain - shift)`` per decade."""
    first, n = (np.array(x, np.float64) for x in zip(*_decades(signed), strict=True))
    scale = 10.0 ** (np.arange(7) - 6)
    # M_k = 10^(i-6)·(0.1 + 0.9·(k - first + 0.5)/n) = (k - offset)·slope within decade i.
    slope, offset = scale * 0.9 / n, first - 0.5 - n / 9
    top = int(first[-1] + n[-1])  # the index of 1.0: 128 (signed) or 255
    slope16, offset16 = np.zeros(16), np.zeros(16)
    slope16[:7], offset16[:7] = slope, offset
    slope16[7], offset16[7] = (
        (1 / 128, 0.0) if signed else (1.0, top - 1.0)
    )  # (top - off)·slope = 1
    # Bins of width 0.9/n from 0.1: k = first + floor((a/10^(i-6) - 0.1)·n/0.9).
    gain9, shift9 = np.zeros(9), np.zeros(9)
    gain9[1:8], shift9[1:8], shift9[8] = n / (0.9 * scale), n / 9 - first, -top
    last9 = np.concatenate([[0], first + n - 1, [top]])
    return dict(
        slope=slope16.astype(np.float32),
        offset=offset16.astype(np.float32),
        gain=gain9.astype(np.float32),
        shift=shift9.astype(np.float32),
        last=last9.astype(np.int32),
        first=first.astype(np.int32),
    )


def _magnitudes(c: dict, top: int) -> np.ndarray:
    """``M_k = (k - offset[d])·slope[d]`` in float32, ``d`` the decade of ``k`` (the kernels' decode)."""
    k = np.arange(top + 1)
    d = (np.searchsorted(np.append(c["first"], top), k, side="right") - 1) & 15  # k = 0: 15
    return (k.astype(np.float32) - c["offset"][d]) * c["slope"][d]


def index_rule(a: np.ndarray, codec: Codec) -> np.ndarray:
    """The nearest index of each float32 ``a >= 0`` by the rule (numpy; fma in float64, exact).

    Example:
        >>> codec = make_codec(signed=False)
        >>> index_rule(np.array([0.0, 1e-9, 2e-7, 0.5, 1.0], np.float32), codec).tolist()
        [0, 0, 1, 183, 255]
        >>> # 0.5 is in bin 56 of the top decade (0.1 + 0.9·[56, 57]/128), which starts at 127
    """
    a = np.asarray(a, np.float32)
    r = np.sum(a[..., None] >= codec.thresholds, axis=-1)
    # a·gain is exact in float64; rounding a·gain - shift once to float32 is fma's result.
    y = (a.astype(np.float64) * codec.gain[r] - codec.shift[r]).astype(np.float32)
    return np.minimum(np.floor(y).astype(np.int64), codec.last[r])


def _midpoints(codec: Codec) -> np.ndarray:
    """For each index k, the least float32 ``a`` whose :func:`index_rule` exceeds k (by bisection)."""
    top = len(codec.magnitudes) - 1
    targets = np.arange(1, top + 1)
    lo = np.zeros(top, np.int64)  # bits of an a below each midpoint
    hi = np.full(top, np.float32(1.0).view(np.int32), np.int64)  # at or above it
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        above = index_rule(mid.astype(np.int32).view(np.float32), codec) >= targets
        hi, lo = np.where(above, mid, hi), np.where(above, lo, mid)
    return np.append(hi.astype(np.int32).view(np.float32), np.float32(np.inf))


def _key_table(midpoints: np.ndarray) -> tuple[np.ndarray, int]:
    shift = 23 - KEY_BITS
    base = int(np.float32(2.0 ** (np.floor(np.log2(midpoints[0])) - 1)).view(np.int32)) >> shift
    keys = np.arange(base, (int(np.float32(1.0).view(np.int32)) >> shift) + 1)
    lower = (keys << shift).astype(np.int32).view(np.float32)
    upper = (((keys + 1) << shift) - 1).astype(np.int32).view(np.float32)
    first = np.searchsorted(midpoints, lower, side="right")
    # One comparison suffices: no bucket holds two midpoints.
    assert np.all(np.searchsorted(midpoints, upper, side="right") - first <= 1)
    return first.astype(np.uint8), base


def _decode_table(magnitudes: np.ndarray, signed: bool) -> np.ndarray:
    if not signed:
        return magnitudes.copy()
    codes = np.arange(256).astype(np.uint8).view(np.int8).astype(np.int64)  # byte -> int8
    values = magnitudes[np.abs(codes)]
    return np.where((codes < 0) & (codes > -128), -values, values).astype(np.float32)


@functools.cache
def make_codec(signed: bool) -> Codec:
    """The constants and tables of the signed or unsigned map (checked against :func:`dynamic_map`).

    Example:
        >>> codec = make_codec(signed=True)
        >>> len(codec.magnitudes), float(codec.magnitudes[-1])  # 0, 127 centres, and +1
        (129, 1.0)
        >>> float(codec.decode[128]), float(codec.decode[255])  # codes -128 (+1) and -1
        (1.0, -5.499999815583578e-07)
    """
    c = _constants(signed)
    top = int(c["last"][-1])
    magnitudes = _magnitudes(c, top)
    np.testing.assert_allclose(magnitudes, dynamic_map(signed)[-top - 1 :], rtol=1e-6)
    starts = np.append(c["first"], top)
    thresholds = ((magnitudes[starts - 1] + magnitudes[starts]) / 2).astype(np.float32)
    # No index falls below its decade's first: each decade starts above 0.1·10^(i-6).
    assert np.all(thresholds[:-1] > 0.1 * 10.0 ** (np.arange(7) - 6))
    codec = Codec(
        magnitudes=magnitudes,
        decode=_decode_table(magnitudes, signed),
        midpoints=np.zeros(0, np.float32),
        key_table=np.zeros(0, np.uint8),
        key_base=0,
        thresholds=thresholds,
        gain=c["gain"],
        shift=c["shift"],
        last=c["last"],
        slope=c["slope"],
        offset=c["offset"],
        signed=signed,
    )
    midpoints = _midpoints(codec)
    key_table, key_base = _key_table(midpoints)
    return codec._replace(midpoints=midpoints, key_table=key_table, key_base=key_base)


def nearest_index(a: jax.Array, codec: Codec) -> jax.Array:
    """Index (int32) of the magnitude nearest to each ``a >= 0`` (float32; above 1 counts as 1).

    Example:
        >>> import jax.numpy as jnp
        >>> codec = make_codec(signed=False)
        >>> nearest_index(jnp.array([0.0, 1e-9, 2e-7, 0.5, 1.0]), codec).tolist()
        [0, 0, 1, 183, 255]
        >>> # 0.5 is in bin 56 of the top decade (0.1 + 0.9·[56, 57]/128), which starts at 127
    """
    bits = jax.lax.bitcast_convert_type(a, jnp.int32)
    key = jnp.clip((bits >> (23 - KEY_BITS)) - codec.key_base, 0, len(codec.key_table) - 1)
    first = _lookup(codec.key_table, key).astype(jnp.int32)
    return first + (a >= _lookup(codec.midpoints, first)).astype(jnp.int32)


def nearest_index_by_rule(a: jax.Array, codec: Codec) -> jax.Array:
    """:func:`nearest_index` computed by the rule itself, with compares and selects.

    The same indices (``a·gain - shift`` is contracted to an fma, as the rule says); more
    operations to compile than the two look-ups, but faster on XLA:CPU, which does a
    look-up one element at a time, and usable where there are no gathers (Pallas/Triton).

    Example:
        >>> import jax.numpy as jnp
        >>> codec = make_codec(signed=False)
        >>> nearest_index_by_rule(jnp.array([0.0, 1e-9, 2e-7, 0.5, 1.0]), codec).tolist()
        [0, 0, 1, 183, 255]
    """
    r = sum((a >= t).astype(jnp.int32) for t in codec.thresholds)
    y = a * _select(r, codec.gain) - _select(r, codec.shift)
    return jnp.minimum(jnp.floor(y).astype(jnp.int32), _select(r, codec.last))


def _select(index: jax.Array, values: np.ndarray) -> jax.Array:
    """``values[index]`` by a chain of selects."""
    out = jnp.full(index.shape, values[0], jnp.asarray(values).dtype)
    for i, value in enumerate(values[1:], start=1):
        out = jnp.where(index == i, value, out)
    return out


def decode_codes_by_rule(codes: jax.Array, codec: Codec) -> jax.Array:
    """:func:`decode_codes` by arithmetic: ``(k - offset[d])·slope[d]``, ``d`` from leading zeros.

    The same values, without a look-up (for Pallas/Triton, which has no gathers).

    Example:
        >>> import jax.numpy as jnp
        >>> codec = make_codec(signed=True)
        >>> codes = jnp.array([0, 1, -1, 127, -128], jnp.int8)
        >>> bool((decode_codes_by_rule(codes, codec) == decode_codes(codes, codec)).all())
        True
    """
    c = codes.astype(jnp.int32)
    k = jnp.abs(c) if codec.signed else c
    # d = floor(log2 k) (signed) or floor(log2(k + 1)) - 1, and -1 for k = 0.
    d = (31 - jax.lax.clz(k)) if codec.signed else (30 - jax.lax.clz(k + 1))
    slope = jnp.where(d < 0, 0.0, _select(d, codec.slope[:8]))
    offset = jnp.where(d < 0, 0.0, _select(d, codec.offset[:8]))
    value = (k.astype(jnp.float32) - offset) * slope
    if codec.signed:
        value = jnp.where((c < 0) & (c != -128), -value, value)
    return value


def decode_codes(codes: jax.Array, codec: Codec) -> jax.Array:
    """The map value (float32) of each code (int8 signed or uint8 unsigned), by one look-up."""
    index = jax.lax.bitcast_convert_type(codes, jnp.uint8) if codec.signed else codes
    return _lookup(codec.decode, index.astype(jnp.int32))


def _lookup(table: np.ndarray, index: jax.Array) -> jax.Array:
    """``table[index]`` for indices known to be in range (a bare gather: no bounds arithmetic)."""
    sharding = getattr(jax.typeof(index), "sharding", None)
    if getattr(sharding, "spec", None) and any(e is not None for e in sharding.spec):
        # Explicit mesh axes: the look-up of each index stays where the index is.
        return jnp.asarray(table).at[index].get(mode="promise_in_bounds", out_sharding=sharding)
    dims = jax.lax.GatherDimensionNumbers(
        offset_dims=(), collapsed_slice_dims=(0,), start_index_map=(0,)
    )
    return jax.lax.gather(
        jnp.asarray(table),
        index[..., None],
        dims,
        slice_sizes=(1,),
        mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )
