"""Pieces shared by the per-leaf optimizers of this folder: compute dtypes, ``|g|²``, state layouts.

The compute dtype rule is :func:`functional_adam.adam_leaf`'s: the arithmetic
runs in float32 for 16-bit gradients and moments, in their own precision
otherwise; a moment of squares (``Moment(squared=True)``) is real. The lift
casts the results back to each moment's storage dtype and ``u`` to the
gradient's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from functional_adam.core.base import GradientTransformation, Params
from functional_adam.core.numerics import compute_dtype, real_dtype, saturate


def compute_dtypes(
    g: jax.Array, signed: Sequence[jax.Array] = (), squared: Sequence[jax.Array] = ()
) -> tuple[jnp.dtype, jnp.dtype]:
    """``(dtype, real)``: the dtypes of the arithmetic on ``g`` and the signed moments, and on
    the squared (real) moments.

    Example:
        >>> import jax.numpy as jnp
        >>> compute_dtypes(jnp.zeros(2, jnp.bfloat16), [jnp.zeros(2, jnp.bfloat16)])
        (dtype('float32'), dtype('float32'))
    """
    dtype = jnp.result_type(compute_dtype(g.dtype), *(compute_dtype(m.dtype) for m in signed))
    real = jnp.result_type(real_dtype(dtype), *(compute_dtype(v.dtype) for v in squared))
    return dtype, real


def abs_sq(x: jax.Array) -> jax.Array:
    """``|x|²``, real also for complex ``x`` (the same HLO as Optax's ``g**2`` for real ``x``).

    Example:
        >>> import jax.numpy as jnp
        >>> abs_sq(jnp.array([3 + 4j]))
        Array([25.], dtype=float32)
    """
    return (x.conj() * x).real if jnp.iscomplexobj(x) else x**2


def abs_sq_for(x: jax.Array, stored: jax.Array, dtype: Any) -> jax.Array:
    """``|x|²`` in ``dtype``, capped (:func:`~functional_adam.core.numerics.saturate`) when the
    moment it feeds is ``stored`` in a narrower dtype, so that moment stays finite."""
    square = abs_sq(x).astype(dtype)
    if jnp.finfo(stored.dtype).bits < jnp.finfo(dtype).bits:
        square = saturate(square, stored.dtype)
    return square


def with_state_layout(
    tx: GradientTransformation, outer: Callable[[Any], Any], inner: Callable[[Any], Any]
) -> GradientTransformation:
    """``tx`` whose state is kept as ``outer(state)`` and handed back to it as ``inner(...)``.

    For a lifted optimizer whose reference keeps its state in another layout
    (Optax's ``ScaleByAdanState(m, v, n, g, t)`` has its count last and named
    ``t``); ``inner(outer(s))`` must be ``s``.

    Example:
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> tx = with_state_layout(fa.scale_by_adam(), lambda s: (s.mu, s.nu, s.count),
        ...                        lambda s: fa.ScaleByAdamState(s[2], s[0], s[1]))
        >>> _, state = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
        >>> int(state[2])
        1
    """

    def init(params: Params):
        return outer(tx.init(params))

    def update(updates, state, params=None, **extra_args):
        updates, new_state = tx.update(updates, inner(state), params, **extra_args)
        return updates, outer(new_state)

    return GradientTransformation(init, update)


def tree_where_not_none(fn: Callable[..., Any], *trees: Any) -> Any:
    """``fn`` over the leaves of ``trees``, ``None`` leaves (of the first tree) kept."""
    return jax.tree.map(
        lambda x, *rest: None if x is None else fn(x, *rest),
        *trees,
        is_leaf=lambda x: x is None,
    )
