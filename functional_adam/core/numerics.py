"""Small helpers shared by the transformations: counters, dtypes of moments, zeros."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def safe_increment(count: jax.Array) -> jax.Array:
    """``count + 1``, saturating at the dtype's maximum instead of wrapping.

    Example:
        >>> import jax.numpy as jnp
        >>> int(safe_increment(jnp.array(2**31 - 1, jnp.int32)))
        2147483647
    """
    count = jnp.asarray(count)
    top = jnp.array(jnp.iinfo(count.dtype).max, count.dtype)
    return jnp.where(count < top, count + jnp.array(1, count.dtype), top)


def saturate(square: jax.Array, storage_dtype: Any) -> jax.Array:
    """``|g|²`` capped at half the largest finite value of the second moment's ``storage_dtype``.

    Used when ``v`` is stored in a narrower dtype than it is computed in (a
    float16 or bfloat16 second moment). Without the cap, a gradient with
    ``|g| > 181`` stores ``v = inf`` in float16 for good: that entry never
    moves again, and NAdam's look-ahead or a huge first moment turns it into
    ``inf/inf = NaN``. With ``|g|² <= max/2`` the moving average
    ``(1-b2)·|g|² + b2·v`` stays finite. Capping the input rather than ``v``
    itself keeps one ``v`` for storage and use, so XLA fuses it as before.
    (float32 and float64 second moments are not capped, so their results stay
    bitwise Optax's; their square overflows only for ``|g| > 1.8e19``.)

    Example:
        >>> import jax.numpy as jnp
        >>> saturate(jnp.array([1.0, 1e6, jnp.inf]), jnp.float16)
        Array([1.0000e+00, 3.2752e+04, 3.2752e+04], dtype=float32)
    """
    cap = jnp.finfo(storage_dtype).max / 2
    return jnp.minimum(square, jnp.asarray(cap, square.dtype))


def store(value: jax.Array, like: jax.Array) -> jax.Array:
    """A moment computed in ``value``'s dtype, stored in ``like``'s.

    A narrower real storage dtype saturates at its largest finite magnitude
    rather than rounding to ``inf``, which would freeze that entry for good.

    Example:
        >>> import jax.numpy as jnp
        >>> store(jnp.array([1.0, -1e6]), jnp.zeros(2, jnp.float16))
        Array([ 1.00e+00, -6.55e+04], dtype=float16)
    """
    narrower = jnp.dtype(like.dtype).itemsize < jnp.dtype(value.dtype).itemsize
    if narrower and jnp.issubdtype(like.dtype, jnp.floating) and not jnp.iscomplexobj(value):
        top = jnp.asarray(jnp.finfo(like.dtype).max, value.dtype)
        return jnp.clip(value, -top, top).astype(like.dtype)
    return value.astype(like.dtype)


def cast(x: jax.Array, dtype: Any) -> jax.Array:
    """``x`` in ``dtype``, taking the real part when a complex ``x`` goes to a real dtype.

    (A complex first moment of a real parameter, ``mu_dtype=complex64``, keeps a zero
    imaginary part; its update is real.)

    Example:
        >>> import jax.numpy as jnp
        >>> cast(jnp.array([1.5 + 0j]), jnp.float32)
        Array([1.5], dtype=float32)
    """
    if jnp.iscomplexobj(x) and not jnp.issubdtype(dtype, jnp.complexfloating):
        x = jnp.real(x)
    return x.astype(dtype)


def zero_count() -> jax.Array:
    """The int32 step counter at step 0."""
    return jnp.zeros([], jnp.int32)


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype the Adam arithmetic runs in: float32 for 16-bit floats, else ``dtype``.

    Example:
        >>> compute_dtype(jnp.bfloat16), compute_dtype(jnp.complex64)
        (dtype('float32'), dtype('complex64'))
    """
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
        return jnp.dtype(jnp.float32)
    return dtype


def real_dtype(dtype: Any) -> jnp.dtype:
    """The dtype of ``|x|`` for ``x`` of ``dtype`` (float32 for complex64).

    Example:
        >>> real_dtype(jnp.complex64)
        dtype('float32')
    """
    return jnp.finfo(jnp.dtype(dtype)).dtype


def moment_dtype(param_dtype: Any, requested: jnp.dtype | None, *, squared: bool) -> jnp.dtype:
    """The dtype a moment of a parameter of ``param_dtype`` is stored in.

    ``requested`` wins where given. By default a moment has the parameter's
    dtype, except the second moment (``squared=True``) of a **float16**
    parameter, which is float32: float16 cannot hold ``|g|² > 65504``, and a
    capped second moment lets a step reach ``lr·|g|/181`` instead of about
    ``lr`` (bfloat16 has float32's range and keeps bfloat16). The first moment of
    a complex parameter is complex, of the precision asked for; the second
    moment is always real, since it holds ``|g|²``.

    Example:
        >>> moment_dtype(jnp.complex64, None, squared=True)
        dtype('float32')
        >>> moment_dtype(jnp.complex64, jnp.dtype("bfloat16"), squared=False)
        dtype('complex64')
        >>> moment_dtype(jnp.float16, None, squared=True), moment_dtype(jnp.float16, None, squared=False)
        (dtype('float32'), dtype('float16'))
    """
    param_dtype = jnp.dtype(param_dtype)
    complex_param = jnp.issubdtype(param_dtype, jnp.complexfloating)
    if requested is not None:
        base = jnp.dtype(requested)
    elif squared and param_dtype == jnp.float16:
        base = jnp.dtype(jnp.float32)
    else:
        base = real_dtype(param_dtype)
    if squared and jnp.issubdtype(base, jnp.complexfloating):
        base = real_dtype(base)
    if complex_param and not squared:
        return jnp.result_type(base, jnp.complex64)
    return jnp.dtype(base)
