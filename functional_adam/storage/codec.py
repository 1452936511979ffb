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

Encoding ``a = |x| / s`` in [0, 1] to the index ``k`` of the nearest magnitude
``M_k`` (ties to the larger) takes integer operations and two look-ups, the same
in ``jax.numpy``, in the C++ kernel and in the Pallas kernel::

    key = clip((bits(a) >> (23 - KEY_BITS)) - key_base, 0, len(key_table) - 1)
    c   = key_table[key]                  # the nearest index at the key's lower end
    k   = c + (a >= midpoints[c])         # the next one, past the midpoint

``key`` is ``a``'s float32 exponent and its top ``KEY_BITS`` mantissa bits: a
bucket of relative width ``2^-7`` that holds at most one midpoint of the map
(:func:`make_codec` checks that), so one comparison with the exact midpoint
finishes the search. Decoding is one look-up, ``M[k]``.
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
    """The tables of one map (see the module docstring); numpy arrays, shared by all kernels."""

    magnitudes: np.ndarray  # float32: the non-negative values M_k, increasing (decode of k)
    decode: np.ndarray  # float32[256]: the value of each code, indexed by the code's byte
    midpoints: np.ndarray  # float32: smallest float32 >= (M_k + M_{k+1}) / 2; the last is inf
    key_table: np.ndarray  # uint8: the nearest index at the lower end of each key's bucket
    key_base: int  # the key of the first bucket (a power of two below the first midpoint)
    signed: bool


def _midpoints(magnitudes: np.ndarray) -> np.ndarray:
    exact = (magnitudes[:-1].astype(np.float64) + magnitudes[1:]) / 2  # exact in float64
    mid = exact.astype(np.float32)
    mid = np.where(
        mid < exact, np.nextafter(mid, np.float32(np.inf)), mid
    )  # a >= mid iff a >= exact
    return np.append(mid, np.float32(np.inf)).astype(np.float32)


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
    """The tables of the signed or unsigned map (checked against :func:`dynamic_map`).

    Example:
        >>> codec = make_codec(signed=True)
        >>> len(codec.magnitudes), float(codec.magnitudes[-1])  # 0, 127 centres, and +1
        (129, 1.0)
        >>> float(codec.decode[128]), float(codec.decode[255])  # codes -128 (+1) and -1
        (1.0, -5.499999815583578e-07)
    """
    q = dynamic_map(signed)
    magnitudes = q[q >= 0]
    midpoints = _midpoints(magnitudes)
    key_table, key_base = _key_table(midpoints)
    return Codec(
        magnitudes, _decode_table(magnitudes, signed), midpoints, key_table, key_base, signed
    )


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


def decode_codes(codes: jax.Array, codec: Codec) -> jax.Array:
    """The map value (float32) of each code (int8 signed or uint8 unsigned), by one look-up."""
    index = jax.lax.bitcast_convert_type(codes, jnp.uint8) if codec.signed else codes
    return _lookup(codec.decode, index.astype(jnp.int32))


def _lookup(table: np.ndarray, index: jax.Array) -> jax.Array:
    """``table[index]`` for indices known to be in range (a bare gather: no bounds arithmetic)."""
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
