r"""AdaBelief (Zhuang et al., 2020, "AdaBelief Optimizer: Adapting Stepsizes by the Belief in
Observed Gradients", https://arxiv.org/abs/2010.07468): Adam whose second moment is the
variance of the gradient around its prediction ``m``.

Step t = 1, 2, ...::

    m_t = b1·m_{t-1} + (1 - b1)·g_t
    s_t = b2·s_{t-1} + (1 - b2)·|g_t - m_t|² + eps_root     (Optax's ``nu``)
    u_t = m̂_t / (sqrt(ŝ_t) + eps)

with ``m̂``, ``ŝ`` bias corrected as in Adam (``nesterov=True``: NAdam's
look-ahead ``m̂``). ``eps_root`` is added to the stored ``s`` every step, as in
the paper's Algorithm 2 and Optax. The order of float operations is Optax's
``scale_by_belief``: float32 and float64 results under ``jax.jit`` are bitwise
Optax's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from functional_adam.core import checks
from functional_adam.core.base import GradientTransformation, ScalarOrSchedule, chain
from functional_adam.core.lift import LeafOptimizer, Moment, lift
from functional_adam.optimizers._common import abs_sq_for, compute_dtypes
from functional_adam.optimizers.adam import bias_corrections
from functional_adam.transforms.learning_rate import scale_by_learning_rate


class ScaleByBeliefState(NamedTuple):
    """State of :func:`scale_by_belief` (the fields of ``optax.ScaleByBeliefState``)."""

    count: jax.Array  # int32 scalar, saturating
    mu: Any
    nu: Any  # s_t, the EMA of |g - m|² (plus eps_root)


def belief_optimizer(
    b1=0.9, b2=0.999, eps=1e-16, eps_root=1e-16, *, nesterov=False, mu_dtype=None, nu_dtype=None
) -> LeafOptimizer:
    """AdaBelief as a :class:`~functional_adam.core.lift.LeafOptimizer`."""
    checks.check_decays(b1=b1, b2=b2)
    checks.check_epsilons(eps, eps_root)
    moments = (
        Moment("mu", False, checks.check_moment_dtype("mu_dtype", mu_dtype)),
        Moment("nu", True, checks.check_float_dtype("nu_dtype", nu_dtype)),
    )

    def step(g, moments, bc):
        m, s = moments
        dtype, real = compute_dtypes(g, [m], [s])
        g, m = g.astype(dtype), m.astype(dtype)
        m = (1 - b1) * g + b1 * m
        s = (1 - b2) * abs_sq_for(g - m, s, real) + b2 * s.astype(real)
        s = s + eps_root
        if nesterov:
            m_hat = b1 * (m / bc.bc1_next.astype(m.dtype)) + (1 - b1) * (g / bc.bc1.astype(m.dtype))
        else:
            m_hat = m / bc.bc1.astype(m.dtype)
        s_hat = s / bc.bc2.astype(real)
        return m_hat / (jnp.sqrt(s_hat) + eps), (m, s)

    return LeafOptimizer(
        ScaleByBeliefState, moments, lambda count: bias_corrections(b1, b2, count), step
    )


def scale_by_belief(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-16,
    eps_root: float | jax.Array = 1e-16,
    *,
    nesterov: bool = False,
    mu_dtype: Any | None = None,
    nu_dtype: Any | None = None,
) -> GradientTransformation:
    r"""Rescales updates by AdaBelief's ``m̂ / (sqrt(ŝ) + eps)`` (see the module docstring).

    Args:
        b1: decay of the first moment, in [0, 1).
        b2: decay of the belief ``s``, in [0, 1).
        eps: added to ``sqrt(ŝ)``; >= 0.
        eps_root: added to ``s`` every step; >= 0 (not both 0).
        nesterov: Nesterov momentum (NAdam's look-ahead).
        mu_dtype, nu_dtype: storage dtypes of the moments (``None``: the parameter's).

    Returns:
        A ``GradientTransformation`` with state :class:`ScaleByBeliefState`.

    Example (step 1: m̂ = g and ŝ = (g - 0.1·g)², so u = 1/0.9 per unit of sign):
        >>> import jax.numpy as jnp
        >>> tx = scale_by_belief()
        >>> u, state = tx.update(jnp.array([2.0, -3.0]), tx.init(jnp.zeros(2)))
        >>> u.round(4)
        Array([ 1.1111, -1.1111], dtype=float32)
    """
    optimizer = belief_optimizer(
        b1, b2, eps, eps_root, nesterov=nesterov, mu_dtype=mu_dtype, nu_dtype=nu_dtype
    )
    return lift(optimizer)


def adabelief(
    learning_rate: ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-16,
    eps_root: float | jax.Array = 1e-16,
    *,
    nesterov: bool = False,
    mu_dtype: Any | None = None,
    nu_dtype: Any | None = None,
) -> GradientTransformation:
    r"""AdaBelief: ``θ ← θ - lr·m̂/(sqrt(ŝ) + eps)``; ``optax.adabelief``'s signature plus dtypes.

    Args:
        learning_rate: a non-negative float, array, or schedule ``count -> lr``.
        b1, b2, eps, eps_root, nesterov, mu_dtype, nu_dtype: see :func:`scale_by_belief`.

    Returns:
        ``chain(scale_by_belief, scale_by_learning_rate)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import functional_adam as fa
        >>> x = jnp.array(5.0)
        >>> tx = fa.adabelief(learning_rate=1e-2)
        >>> updates, _ = tx.update(jax.grad(lambda x: x**2)(x), tx.init(x), x)
        >>> bool(fa.apply_updates(x, updates) < x)
        True
    """
    return chain(
        scale_by_belief(
            b1, b2, eps, eps_root, nesterov=nesterov, mu_dtype=mu_dtype, nu_dtype=nu_dtype
        ),
        scale_by_learning_rate(learning_rate),
    )
