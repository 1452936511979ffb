r"""Yogi (Zaheer et al., NeurIPS 2018, "Adaptive Methods for Nonconvex Optimization",
https://papers.nips.cc/paper/8186-adaptive-methods-for-nonconvex-optimization): Adam whose
second moment moves additively, by at most ``(1 - b2)·|g|²`` per step.

Step t = 1, 2, ..., both moments starting at ``initial_accumulator_value``::

    m_t = b1·m_{t-1} + (1 - b1)·g_t
    v_t = v_{t-1} - (1 - b2)·sign(v_{t-1} - |g_t|²)·|g_t|²
    u_t = m̂_t / (sqrt(v̂_t + eps_root) + eps)

Where Adam's ``v`` forgets a large gradient geometrically, Yogi's shrinks only
by ``(1 - b2)·|g|²`` per step, so a rare large gradient keeps the step small
for longer. The order of float operations is Optax's ``scale_by_yogi``:
float32 and float64 results under ``jax.jit`` are bitwise Optax's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from functional_adam.core import checks
from functional_adam.core.base import GradientTransformation, ScalarOrSchedule, chain
from functional_adam.core.lift import LeafOptimizer, Moment, lift
from functional_adam.optimizers._common import abs_sq, compute_dtypes
from functional_adam.optimizers.adam import ScaleByAdamState, bias_corrections
from functional_adam.transforms.learning_rate import scale_by_learning_rate


def yogi_optimizer(
    b1=0.9,
    b2=0.999,
    eps=1e-3,
    eps_root=0.0,
    initial_accumulator_value=1e-6,
    *,
    mu_dtype=None,
    nu_dtype=None,
) -> LeafOptimizer:
    """Yogi as a :class:`~functional_adam.core.lift.LeafOptimizer` (state ``count, mu, nu``)."""
    checks.check_decays(b1=b1, b2=b2)
    checks.check_epsilons(eps, eps_root)
    checks.check_positive("initial_accumulator_value", initial_accumulator_value)
    initial = float(initial_accumulator_value)
    moments = (
        Moment("mu", False, checks.check_moment_dtype("mu_dtype", mu_dtype), initial),
        Moment("nu", True, checks.check_float_dtype("nu_dtype", nu_dtype), initial),
    )

    def step(g, moments, bc):
        m, v = moments
        dtype, real = compute_dtypes(g, [m], [v])
        g, m, v = g.astype(dtype), m.astype(dtype), v.astype(real)
        m = (1 - b1) * g + b1 * m
        g_sq = abs_sq(g)
        v = v - (1 - b2) * jnp.sign(v - g_sq) * g_sq
        m_hat = m / bc.bc1.astype(m.dtype)
        v_hat = v / bc.bc2.astype(real)
        return m_hat / (jnp.sqrt(v_hat + eps_root) + eps), (m, v)

    return LeafOptimizer(ScaleByAdamState, moments, lambda c: bias_corrections(b1, b2, c), step)


def scale_by_yogi(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-3,
    eps_root: float | jax.Array = 0.0,
    initial_accumulator_value: float = 1e-6,
    *,
    mu_dtype: Any | None = None,
    nu_dtype: Any | None = None,
) -> GradientTransformation:
    r"""Rescales updates by Yogi's ``m̂ / (sqrt(v̂ + eps_root) + eps)`` (see the module docstring).

    Args:
        b1: decay of the first moment, in [0, 1).
        b2: rate of the additive second-moment update, in [0, 1).
        eps: added to ``sqrt(v̂)``; >= 0.
        eps_root: added to ``v̂`` inside the square root; >= 0 (not both 0).
        initial_accumulator_value: where both moments start (a Python float); > 0.
        mu_dtype, nu_dtype: storage dtypes of the moments (``None``: the parameter's).

    Returns:
        A ``GradientTransformation`` with state ``ScaleByAdamState(count, mu, nu)``.

    Example (after a large gradient the second moment shrinks by (1 - b2)·|g|² only):
        >>> import jax.numpy as jnp
        >>> tx = scale_by_yogi(b2=0.9)
        >>> state = tx.init(jnp.zeros(1))
        >>> state.nu
        Array([1.e-06], dtype=float32)
        >>> _, state = tx.update(jnp.array([10.0]), state)
        >>> _, state = tx.update(jnp.array([1.0]), state)
        >>> state.nu.round(4)  # 10.000001 - 0.1·1
        Array([9.9], dtype=float32)
    """
    optimizer = yogi_optimizer(
        b1, b2, eps, eps_root, initial_accumulator_value, mu_dtype=mu_dtype, nu_dtype=nu_dtype
    )
    return lift(optimizer)


def yogi(
    learning_rate: ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-3,
    *,
    mu_dtype: Any | None = None,
    nu_dtype: Any | None = None,
) -> GradientTransformation:
    r"""Yogi: ``θ ← θ - lr·m̂/(sqrt(v̂) + eps)``; ``optax.yogi``'s signature plus the moment dtypes.

    Args:
        learning_rate: a non-negative float, array, or schedule ``count -> lr``.
        b1, b2, eps, mu_dtype, nu_dtype: see :func:`scale_by_yogi`.

    Returns:
        ``chain(scale_by_yogi, scale_by_learning_rate)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import functional_adam as fa
        >>> x = jnp.array(5.0)
        >>> tx = fa.yogi(learning_rate=1e-2)
        >>> updates, _ = tx.update(jax.grad(lambda x: x**2)(x), tx.init(x), x)
        >>> bool(fa.apply_updates(x, updates) < x)
        True
    """
    return chain(
        scale_by_yogi(b1, b2, eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
        scale_by_learning_rate(learning_rate),
    )
