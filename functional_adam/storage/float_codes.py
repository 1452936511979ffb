r"""Float codes: an 8-bit code is the top bits of the float32 of ``x / scale``.

The second 8-bit format of the block storage (``code="float"``; the default,
``code="dynamic"``, is bitsandbytes' map, :mod:`functional_adam.storage.codec`).
For ``a = |x| / s`` in [0, 1] (``s`` the block's absolute maximum), with
``bits(a)`` its float32 bit pattern read as an int32:

* signed (Adam's ``m``): ``q = min(max((bits(a) + 2^19 - (889 << 20)) >> 20, 0), 127)``,
  the code ``±q`` as int8. ``q`` is ``a``'s exponent (4 bits) and its top 3 mantissa
  bits, rounded to nearest (ties away from 0): ``q = 127`` is 1.0, then 8 codes per
  binade down to ``2^-16·1.25`` (``q = 1``); magnitudes below ``2^-16·1.1875``
  encode as 0.
* unsigned (``sqrt(v)``): ``q = min(max((bits(a) + 2^18 - (1777 << 19)) >> 19, 0), 255)``
  as uint8: 4 exponent and 4 mantissa bits, 255 is 1.0, 16 codes per binade down to
  ``2^-16·1.125``.

Decoding is the inverse bit pattern, ``float32((q + 889) << 20)`` (signed) or
``float32((q + 1777) << 19)``, and 0 for ``q = 0``::

    encode: a few integer operations     decode: two integer operations and a select

Against the dynamic map: a relative spacing of 1/8 (signed) and 1/16 (unsigned) at
every magnitude, where the dynamic map has 0.9/64 and 0.9/128 near the block
maximum but up to 10x that at the low end of each decade, and a range of ``2^-16``
of the block maximum where the dynamic map reaches ``10^-7``. What it buys is
speed: no table search per element (BENCHMARKS.md has the kernel's time and the
trajectories of both).

Example:
    >>> import jax.numpy as jnp
    >>> q = encode(jnp.array([1.0, 0.5, 0.3, 1e-6]), signed=True)
    >>> q.tolist()  # 0.3 = 2^-2·1.2: nearest 2^-2·1.25 (8 codes per binade, mantissa 2/8)
    [127, 119, 113, 0]
    >>> decode(q, signed=True).tolist()
    [1.0, 0.5, 0.3125, 0.0]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# (base, shift, top) per map: q = (bits(a) + 2^(shift-1) - (base << shift)) >> shift.
SIGNED = (889, 20, 127)  # bits(1.0) >> 20 = 1016 = 889 + 127
UNSIGNED = (1777, 19, 255)  # bits(1.0) >> 19 = 2032 = 1777 + 255


def constants(signed: bool) -> tuple[int, int, int]:
    """``(base, shift, top)`` of the signed or the unsigned float codes."""
    return SIGNED if signed else UNSIGNED


def encode(a: jax.Array, signed: bool) -> jax.Array:
    """The code magnitude ``q`` (int32, 0..top) of each ``a`` in [0, 1] (float32)."""
    base, shift, top = constants(signed)
    bits = jax.lax.bitcast_convert_type(a.astype(jnp.float32), jnp.int32)
    q = (bits + ((1 << (shift - 1)) - (base << shift))) >> shift
    return jnp.clip(q, 0, top)


def decode(q: jax.Array, signed: bool) -> jax.Array:
    """The float32 magnitude in [0, 1] of each code magnitude ``q`` (an integer array)."""
    base, shift, _ = constants(signed)
    q = q.astype(jnp.int32)
    value = jax.lax.bitcast_convert_type((q + base) << shift, jnp.float32)
    return jnp.where(q > 0, value, 0.0)


def decode_codes(codes: jax.Array, signed: bool) -> jax.Array:
    """The float32 values in [-1, 1] of int8 (signed, ``±q``) or uint8 (unsigned) codes."""
    if not signed:
        return decode(codes, False)
    k = codes.astype(jnp.int32)
    magnitude = decode(jnp.abs(k), True)
    return jnp.where(k < 0, -magnitude, magnitude)
