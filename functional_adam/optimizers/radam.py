r"""RAdam (Liu et al., 2020, "On the Variance of the Adaptive Learning Rate and Beyond",
https://arxiv.org/abs/1908.03265): Adam with its early steps rectified.

Adam's moments, then with ``ρ∞ = 2/(1 - b2) - 1`` and
``ρ_t = ρ∞ - 2t·b2^t/(1 - b2^t)`` (the length of the approximated simple moving
average)::

    r_t = sqrt((ρ_t - 4)(ρ_t - 2)ρ∞ / ((ρ∞ - 4)(ρ∞ - 2)ρ_t))
    u_t = r_t·m̂_t / (sqrt(v̂_t + eps_root) + eps)    if ρ_t >= threshold
    u_t = m̂_t                                         otherwise (momentum SGD)

``ρ_t`` grows from 1 at t = 1 towards ``ρ∞``; with the default threshold 5 and
b2 = 0.999 the first 5 steps are plain momentum. The order of float
operations is Optax's ``scale_by_radam``: float32 and float64 results under
``jax.jit`` are bitwise Optax's. ``convention.epsilon == "hat"`` puts ``eps``
on ``sqrt(v)`` as ``torch.optim.RAdam`` does,
``u = m̂·sqrt(1 - b2^t)/(sqrt(v) + eps)·r`` (:func:`functional_adam.compat.torch_radam`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from functional_adam.compat.conventions import OPTAX, Convention, check_convention
from functional_adam.core import checks
from functional_adam.core.base import GradientTransformation, ScalarOrSchedule, chain
from functional_adam.core.lift import LeafOptimizer, Moment, lift
from functional_adam.optimizers._common import abs_sq_for, compute_dtypes
from functional_adam.optimizers.adam import BiasCorrections, ScaleByAdamState, bias_corrections
from functional_adam.transforms.learning_rate import scale_by_learning_rate


class RAdamScalars(NamedTuple):
    """The per-step scalars of RAdam: bias corrections, ``ρ_t`` and the rectification ``r_t``."""

    bc: BiasCorrections
    rho: jax.Array
    r: jax.Array


def radam_scalars(b1, b2, count: jax.Array) -> RAdamScalars:
    """``ρ_t`` and ``r_t`` of step ``t = count``, in Optax's order of operations.

    In float32 ``ρ_t`` loses about 4 digits to cancellation (``ρ∞`` and the
    subtracted term are near 2000 for b2 = 0.999), as in Optax.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> with jax.enable_x64(True):
        ...     rho = radam_scalars(0.9, 0.999, jnp.array(1)).rho
        >>> round(float(rho), 9)  # ρ_1 = 1
        1.0
    """
    rho_inf = 2.0 / (1.0 - b2) - 1.0
    b2t = b2**count
    rho = rho_inf - 2 * count * b2t / (1 - b2t)
    r = jnp.sqrt((rho - 4.0) * (rho - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho))
    return RAdamScalars(bias_corrections(b1, b2, count), rho, r)


def radam_optimizer(
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    eps_root=0.0,
    threshold=5.0,
    *,
    nesterov: bool = False,
    mu_dtype=None,
    nu_dtype=None,
    convention: Convention = OPTAX,
) -> LeafOptimizer:
    """RAdam as a :class:`~functional_adam.core.lift.LeafOptimizer` (state ``count, mu, nu``)."""
    checks.check_decays(b1=b1, b2=b2)
    checks.check_epsilons(eps, eps_root)
    # Below 4, a ρ_t in (2, 4) makes the rectification the square root of a negative number.
    checks.check_hyperparameter("threshold", threshold, low=4.0)
    hat = check_convention(convention).epsilon == "hat"
    if hat and nesterov:
        raise ValueError("nesterov=True is not defined with convention.epsilon='hat'.")
    moments = (
        Moment("mu", False, checks.check_moment_dtype("mu_dtype", mu_dtype)),
        Moment("nu", True, checks.check_float_dtype("nu_dtype", nu_dtype)),
    )

    def step(g, moments, s: RAdamScalars):
        m, v = moments
        dtype, real = compute_dtypes(g, [m], [v])
        g_sq = abs_sq_for(g.astype(dtype), v, real)
        g, m, v = g.astype(dtype), m.astype(dtype), v.astype(real)
        m = (1 - b1) * g + b1 * m
        v = (1 - b2) * g_sq + b2 * v
        bc1 = s.bc.bc1.astype(m.dtype)
        if nesterov:
            m_hat = b1 * (m / s.bc.bc1_next.astype(m.dtype)) + (1 - b1) * (g / bc1)
        else:
            m_hat = m / bc1
        if hat:  # torch.optim.RAdam: m̂·(sqrt(1 - b2^t)/(sqrt(v) + eps))·r
            adaptive = jnp.sqrt(s.bc.bc2.astype(real)) / (jnp.sqrt(v) + eps)
            rectified = m_hat * adaptive * s.r.astype(real)
        else:
            v_hat = v / s.bc.bc2.astype(real)
            rectified = s.r.astype(m.dtype) * m_hat / (jnp.sqrt(v_hat + eps_root) + eps)
        return jnp.where(s.rho >= threshold, rectified, m_hat), (m, v)

    return LeafOptimizer(ScaleByAdamState, moments, lambda c: radam_scalars(b1, b2, c), step)


def scale_by_radam(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    threshold: float | jax.Array = 5.0,
    *,
    nesterov: bool = False,
    mu_dtype: Any | None = None,
    nu_dtype: Any | None = None,
) -> GradientTransformation:
    r"""Rescales updates by RAdam's rectified Adam step (see the module docstring).

    Args:
        b1: decay of the first moment, in [0, 1).
        b2: decay of the second moment, in [0, 1).
        eps: added to ``sqrt(v̂)``; >= 0.
        eps_root: added to ``v̂`` inside the square root; >= 0 (not both 0).
        threshold: the smallest ``ρ_t`` that is rectified; >= 4.
        nesterov: Nesterov momentum, as in :func:`functional_adam.nadam`.
        mu_dtype, nu_dtype: storage dtypes of the moments (``None``: the parameter's).

    Returns:
        A ``GradientTransformation`` with state ``ScaleByAdamState(count, mu, nu)``.

    Example (the first steps are momentum SGD: u = m̂ = g):
        >>> import jax.numpy as jnp
        >>> tx = scale_by_radam()
        >>> tx.update(jnp.array([3.0, -0.5]), tx.init(jnp.zeros(2)))[0].round(5)
        Array([ 3. , -0.5], dtype=float32)
    """
    optimizer = radam_optimizer(
        b1, b2, eps, eps_root, threshold, nesterov=nesterov, mu_dtype=mu_dtype, nu_dtype=nu_dtype
    )
    return lift(optimizer)


def radam(
    learning_rate: ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    threshold: float | jax.Array = 5.0,
    *,
    nesterov: bool = False,
    mu_dtype: Any | None = None,
    nu_dtype: Any | None = None,
) -> GradientTransformation:
    r"""RAdam: ``θ ← θ - lr·u_t`` (rectified Adam); ``optax.radam``'s signature plus moment dtypes.

    Args:
        learning_rate: a non-negative float, array, or schedule ``count -> lr``.
        b1, b2, eps, eps_root, threshold, nesterov, mu_dtype, nu_dtype: see
            :func:`scale_by_radam`.

    Returns:
        ``chain(scale_by_radam, scale_by_learning_rate)``.

    Example (f(x) = x², x0 = 5: step 1 is SGD with momentum, x - lr·g):
        >>> import jax, jax.numpy as jnp
        >>> import functional_adam as fa
        >>> x = jnp.array(5.0)
        >>> tx = fa.radam(learning_rate=1e-2)
        >>> updates, _ = tx.update(jax.grad(lambda x: x**2)(x), tx.init(x), x)
        >>> round(float(fa.apply_updates(x, updates)), 6)
        4.9
    """
    return chain(
        scale_by_radam(
            b1,
            b2,
            eps,
            eps_root,
            threshold,
            nesterov=nesterov,
            mu_dtype=mu_dtype,
            nu_dtype=nu_dtype,
        ),
        scale_by_learning_rate(learning_rate),
    )
