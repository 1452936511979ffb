r"""Adan (Xie et al., 2022, "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing
Deep Models", https://arxiv.org/abs/2208.06677, Algorithm 1): Adam with a momentum of
gradient differences.

Step t = 1, 2, ..., with ``Δ_t = g_t - g_{t-1}`` (``Δ_1 = 0``)::

    m_t = b1·m_{t-1} + (1 - b1)·g_t
    v_t = b2·v_{t-1} + (1 - b2)·Δ_t
    n_t = b3·n_{t-1} + (1 - b3)·|g_t + (1 - b2)·Δ_t|²
    u_t = (m̂_t + (1 - b2)·v̂_t) / (sqrt(n̂_t + eps_root) + eps)

all three bias corrected. Optax's defaults name the paper's ``1 - β`` as
``b``: b1 = 0.98, b2 = 0.92, b3 = 0.99. The order of float operations is
Optax's ``scale_by_adan``: float32 and float64 results under ``jax.jit`` are
bitwise Optax's.

The step is elementwise with four per-leaf arrays (``m``, ``v``, ``n`` and the
previous gradient ``g``), so it is lifted; Optax's state
``ScaleByAdanState(m, v, n, g, t)`` keeps its count last and calls it ``t``,
so the lifted state ``(count, m, v, n, g)`` is stored in Optax's layout
(:func:`~functional_adam.optimizers._common.with_state_layout`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from functional_adam.core import checks
from functional_adam.core.base import GradientTransformation, Params, ScalarOrSchedule, chain
from functional_adam.core.lift import LeafOptimizer, Moment, lift
from functional_adam.optimizers._common import abs_sq_for, compute_dtypes, with_state_layout
from functional_adam.optimizers.adam import one_minus_power
from functional_adam.transforms.learning_rate import scale_by_learning_rate
from functional_adam.transforms.weight_decay import add_decayed_weights


class ScaleByAdanState(NamedTuple):
    """State of :func:`scale_by_adan` (the fields of ``optax.ScaleByAdanState``, count last)."""

    m: Any
    v: Any
    n: Any
    g: Any  # the previous gradient
    t: jax.Array  # int32 step count, saturating


class _LiftedAdanState(NamedTuple):
    count: jax.Array
    m: Any
    v: Any
    n: Any
    g: Any


class AdanScalars(NamedTuple):
    """The per-step scalars of Adan: ``1 - b^t`` for each decay, and whether t = 1."""

    bc1: jax.Array
    bc2: jax.Array
    bc3: jax.Array
    first: jax.Array


def adan_optimizer(
    b1=0.98, b2=0.92, b3=0.99, eps=1e-8, eps_root=0.0, *, mu_dtype=None, nu_dtype=None
) -> LeafOptimizer:
    """Adan as a :class:`~functional_adam.core.lift.LeafOptimizer` (state ``count, m, v, n, g``)."""
    checks.check_decays(b1=b1, b2=b2, b3=b3)
    checks.check_epsilons(eps, eps_root)
    mu_dtype = checks.check_moment_dtype("mu_dtype", mu_dtype)
    moments = (
        Moment("m", False, mu_dtype),
        Moment("v", False, mu_dtype),
        Moment("n", True, checks.check_float_dtype("nu_dtype", nu_dtype)),
        Moment("g"),
    )

    def scalars(count):
        bcs = (one_minus_power(b, count) for b in (b1, b2, b3))
        return AdanScalars(*bcs, first=count == 1)

    def step(g, moments, s: AdanScalars):
        m, v, n, g_prev = moments
        dtype, real = compute_dtypes(g, [m, v, g_prev], [n])
        g, m, v, g_prev = (x.astype(dtype) for x in (g, m, v, g_prev))
        diff = jnp.where(s.first, jnp.zeros_like(g), g - g_prev)
        m = (1 - b1) * g + b1 * m
        v = (1 - b2) * diff + b2 * v
        n = (1 - b3) * abs_sq_for(g + (1 - b2) * diff, n, real) + b3 * n.astype(real)
        m_hat = m / s.bc1.astype(dtype)
        v_hat = v / s.bc2.astype(dtype)
        n_hat = n / s.bc3.astype(real)
        u = (m_hat + (1 - b2) * v_hat) / (jnp.sqrt(n_hat + eps_root) + eps)
        return u, (m, v, n, g)

    return LeafOptimizer(_LiftedAdanState, moments, scalars, step)


def _outer(s: _LiftedAdanState) -> ScaleByAdanState:
    return ScaleByAdanState(s.m, s.v, s.n, s.g, s.count)


def _inner(s: ScaleByAdanState) -> _LiftedAdanState:
    return _LiftedAdanState(s.t, s.m, s.v, s.n, s.g)


def scale_by_adan(
    b1: float | jax.Array = 0.98,
    b2: float | jax.Array = 0.92,
    b3: float | jax.Array = 0.99,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    *,
    mu_dtype: Any | None = None,
    nu_dtype: Any | None = None,
) -> GradientTransformation:
    r"""Rescales updates by Adan's direction (see the module docstring).

    Args:
        b1: decay of the gradient's EMA ``m``, in [0, 1).
        b2: decay of the gradient differences' EMA ``v``, in [0, 1).
        b3: decay of the squared term ``n``, in [0, 1).
        eps: added to ``sqrt(n̂)``; >= 0.
        eps_root: added to ``n̂`` inside the square root; >= 0 (not both 0).
        mu_dtype: storage dtype of ``m`` and ``v`` (``None``: the parameter's).
        nu_dtype: storage dtype of ``n`` (``None``: the parameter's real dtype).

    Returns:
        A ``GradientTransformation`` with state :class:`ScaleByAdanState`.

    Example (step 1: Δ = 0, so u = g / |g|):
        >>> import jax.numpy as jnp
        >>> tx = scale_by_adan()
        >>> u, state = tx.update(jnp.array([2.0, -0.5]), tx.init(jnp.zeros(2)))
        >>> u.round(4), state.g, int(state.t)
        (Array([ 1., -1.], dtype=float32), Array([ 2. , -0.5], dtype=float32), 1)
    """
    optimizer = adan_optimizer(b1, b2, b3, eps, eps_root, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    return with_state_layout(lift(optimizer), _outer, _inner)


def adan(
    learning_rate: ScalarOrSchedule,
    b1: float | jax.Array = 0.98,
    b2: float | jax.Array = 0.92,
    b3: float | jax.Array = 0.99,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any | Callable[[Params], Any] | None = None,
    *,
    mu_dtype: Any | None = None,
    nu_dtype: Any | None = None,
) -> GradientTransformation:
    r"""Adan: ``θ ← θ - lr·(u_adan + wd·θ)``; ``optax.adan``'s signature plus the moment dtypes.

    Args:
        learning_rate: a non-negative float, array, or schedule ``count -> lr``.
        b1, b2, b3, eps, eps_root, mu_dtype, nu_dtype: see :func:`scale_by_adan`.
        weight_decay: non-negative decoupled decay rate (or schedule).
        mask: which parameters to decay; see :func:`functional_adam.add_decayed_weights`.

    Returns:
        ``chain(scale_by_adan, add_decayed_weights, scale_by_learning_rate)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import functional_adam as fa
        >>> x = jnp.array(5.0)
        >>> tx = fa.adan(learning_rate=1e-2)
        >>> updates, _ = tx.update(jax.grad(lambda x: x**2)(x), tx.init(x), x)
        >>> round(float(fa.apply_updates(x, updates)), 4)  # step 1 moves x by lr
        4.99
    """
    return chain(
        scale_by_adan(b1, b2, b3, eps, eps_root, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )
