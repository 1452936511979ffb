r"""AdEMAMix (Pagliardini, Ablin & Grangier, 2024, "The AdEMAMix Optimizer: Better, Faster,
Older", https://arxiv.org/abs/2409.03137): Adam plus a slow momentum.

AdEMAMix, step t = 1, 2, ... (``α`` and ``b3`` may be schedules of t - 1)::

    m1_t = b1·m1_{t-1} + (1 - b1)·g_t             (fast EMA, bias corrected)
    m2_t = b3·m2_{t-1} + (1 - b3)·g_t             (slow EMA, not corrected)
    ν_t  = b2·ν_{t-1} + (1 - b2)·|g_t|²
    u_t  = (m̂1_t + α·m2_t) / (sqrt(ν̂_t + eps_root) + eps)

Simplified AdEMAMix (Morwani et al., 2025, https://arxiv.org/abs/2502.02431), one
momentum of theory-style (unnormalised) form::

    m_t = b1·m_{t-1} + g_t
    n_t = b2·n_{t-1} + (1 - b2)·|g_t|²           (as g² + b2·(n - g²))
    u_t = (m_t + α·g_t) / (sqrt(n̂_t + eps_root) + eps)

The order of float operations is ``optax.contrib``'s (``scale_by_ademamix``,
``scale_by_simplified_ademamix``): float32 and float64 results under
``jax.jit`` are bitwise Optax's. (For complex parameters the second moments
hold ``|g|²``, where Optax's simplified form squares ``g``.) The steps are
elementwise, so they are lifted; Optax's states keep a second count
(``count_m2``, always equal to ``count``) or call the count ``t``, so the
lifted states are stored in Optax's layouts
(:func:`~functional_adam.optimizers._common.with_state_layout`); the
schedules see the lift's incremented count minus 1. :func:`ademamix_8bit`
stores ``m1``, ``m2`` and ``ν`` in 8-bit blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from functional_adam.core import checks
from functional_adam.core.base import GradientTransformation, Params, ScalarOrSchedule, chain
from functional_adam.core.lift import PLAIN, LeafOptimizer, Moment, Storage, lift
from functional_adam.optimizers._common import abs_sq_for, compute_dtypes, with_state_layout
from functional_adam.optimizers.adam import bias_corrections, one_minus_power
from functional_adam.storage.blockwise import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_MIN_8BIT_SIZE,
    BlockStorage,
)
from functional_adam.transforms.learning_rate import scale_by_learning_rate
from functional_adam.transforms.weight_decay import add_decayed_weights


class ScaleByAdemamixState(NamedTuple):
    """State of :func:`scale_by_ademamix` (the fields of ``optax.contrib.ScaleByAdemamixState``)."""

    count: jax.Array
    count_m2: jax.Array  # the count of the schedules of b3 and alpha: always ``count``
    m1: Any
    m2: Any
    nu: Any


class ScaleBySimplifiedAdEMAMixState(NamedTuple):
    """State of :func:`scale_by_simplified_ademamix` (Optax's fields: the count is ``t``)."""

    t: jax.Array
    m: Any
    n: Any


class _LiftedAdemamixState(NamedTuple):
    count: jax.Array
    m1: Any
    m2: Any
    nu: Any


class _LiftedSimplifiedState(NamedTuple):
    count: jax.Array
    m: Any
    n: Any


def _scheduled(value: Any, count: jax.Array) -> Any:
    """A schedule's value at ``count``, or ``None`` for a constant (kept a Python float)."""
    return value(count) if callable(value) else None


def ademamix_optimizer(
    b1=0.9, b2=0.999, b3=0.9999, alpha=6.0, eps=1e-8, eps_root=0.0, mu_dtype=None, nu_dtype=None
) -> LeafOptimizer:
    """AdEMAMix as a :class:`~functional_adam.core.lift.LeafOptimizer` (``count, m1, m2, nu``)."""
    checks.check_decays(b1=b1, b2=b2)
    checks.check_schedule("b3", b3, high=1.0)
    checks.check_schedule("alpha", alpha)
    checks.check_epsilons(eps, eps_root)
    mu_dtype = checks.check_moment_dtype("mu_dtype", mu_dtype)
    nu_dtype = checks.check_float_dtype("nu_dtype", nu_dtype)
    nu_dtype = nu_dtype if nu_dtype is not None else mu_dtype  # Optax: all three in mu_dtype
    moments = (
        Moment("m1", False, mu_dtype),
        Moment("m2", False, mu_dtype),
        Moment("nu", True, nu_dtype),
    )

    def scalars(count_inc):
        count = count_inc - 1  # Optax's count_m2, before the increment
        return bias_corrections(b1, b2, count_inc), _scheduled(b3, count), _scheduled(alpha, count)

    def step(g, moments, s):
        bc, b3_t, alpha_t = s
        b3_t = b3 if b3_t is None else b3_t
        alpha_t = alpha if alpha_t is None else alpha_t
        m1, m2, nu = moments
        dtype, real = compute_dtypes(g, [m1, m2], [nu])
        g, m1, m2 = g.astype(dtype), m1.astype(dtype), m2.astype(dtype)
        m1 = (1 - b1) * g + b1 * m1
        m2 = (1 - b3_t) * g + b3_t * m2
        nu = (1 - b2) * abs_sq_for(g, nu, real) + b2 * nu.astype(real)
        m1_hat = m1 / bc.bc1.astype(dtype)
        nu_hat = nu / bc.bc2.astype(real)
        return (m1_hat + alpha_t * m2) / (jnp.sqrt(nu_hat + eps_root) + eps), (m1, m2, nu)

    return LeafOptimizer(_LiftedAdemamixState, moments, scalars, step)


def _ademamix_outer(s: _LiftedAdemamixState) -> ScaleByAdemamixState:
    return ScaleByAdemamixState(s.count, s.count, s.m1, s.m2, s.nu)


def _ademamix_inner(s: ScaleByAdemamixState) -> _LiftedAdemamixState:
    return _LiftedAdemamixState(s.count, s.m1, s.m2, s.nu)


def _lift_ademamix(optimizer: LeafOptimizer, storage: Storage = PLAIN) -> GradientTransformation:
    return with_state_layout(lift(optimizer, storage), _ademamix_outer, _ademamix_inner)


def scale_by_ademamix(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 6.0,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    mu_dtype: Any | None = None,
    *,
    nu_dtype: Any | None = None,
) -> GradientTransformation:
    r"""Rescales updates by AdEMAMix's ``(m̂1 + α·m2) / (sqrt(ν̂ + eps_root) + eps)``.

    Args:
        b1: decay of the fast EMA, in [0, 1).
        b2: decay of the second moment, in [0, 1).
        b3: decay of the slow EMA, in [0, 1), or a schedule ``count -> b3`` (checked at
            a few counts when it can be evaluated eagerly).
        alpha: weight of the slow EMA, >= 0, or a schedule (the paper warms both up).
        eps: added to ``sqrt(ν̂)``; >= 0.
        eps_root: added to ``ν̂`` inside the square root; >= 0 (not both 0).
        mu_dtype: storage dtype of ``m1`` and ``m2`` (``None``: the parameter's).
        nu_dtype: storage dtype of ``ν`` (``None``: ``mu_dtype``, as in Optax).

    Returns:
        A ``GradientTransformation`` with state :class:`ScaleByAdemamixState`.

    Example (step 1: m̂1 = g, m2 = 1e-4·g, so u = (1 + 6e-4)·sign(g)):
        >>> import jax.numpy as jnp
        >>> tx = scale_by_ademamix()
        >>> u, state = tx.update(jnp.array([3.0]), tx.init(jnp.zeros(1)))
        >>> u.round(4), int(state.count_m2)
        (Array([1.0006], dtype=float32), 1)
    """
    return _lift_ademamix(ademamix_optimizer(b1, b2, b3, alpha, eps, eps_root, mu_dtype, nu_dtype))


def _ademamix_chain(storage, learning_rate, b1, b2, b3, alpha, eps, eps_root, mu_dtype, nu_dtype,
                    weight_decay, mask) -> GradientTransformation:  # fmt: skip
    optimizer = ademamix_optimizer(b1, b2, b3, alpha, eps, eps_root, mu_dtype, nu_dtype)
    return chain(
        _lift_ademamix(optimizer, storage),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def ademamix(
    learning_rate: ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 5.0,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    mu_dtype: Any | None = None,
    weight_decay: float | jax.Array = 0.0,
    mask: Any | Callable[[Params], Any] | None = None,
    *,
    nu_dtype: Any | None = None,
) -> GradientTransformation:
    r"""AdEMAMix with decoupled weight decay; ``optax.contrib.ademamix``'s signature (alpha 5).

    Args:
        learning_rate: a non-negative float, array, or schedule ``count -> lr``.
        b1, b2, b3, alpha, eps, eps_root, mu_dtype, nu_dtype: see :func:`scale_by_ademamix`.
        weight_decay: non-negative decoupled decay rate.
        mask: which parameters to decay; see :func:`functional_adam.add_decayed_weights`.

    Returns:
        ``chain(scale_by_ademamix, add_decayed_weights, scale_by_learning_rate)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import functional_adam as fa
        >>> x = jnp.array(5.0)
        >>> tx = fa.ademamix(learning_rate=1e-2)
        >>> updates, _ = tx.update(jax.grad(lambda x: x**2)(x), tx.init(x), x)
        >>> round(float(fa.apply_updates(x, updates)), 4)  # lr·(1 + 5e-4)
        4.99
    """
    return _ademamix_chain(PLAIN, learning_rate, b1, b2, b3, alpha, eps, eps_root, mu_dtype,
                           nu_dtype, weight_decay, mask)  # fmt: skip


def ademamix_8bit(
    learning_rate: ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 5.0,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    mu_dtype: Any | None = None,
    weight_decay: float | jax.Array = 0.0,
    mask: Any | Callable[[Params], Any] | None = None,
    *,
    nu_dtype: Any | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    min_8bit_size: int = DEFAULT_MIN_8BIT_SIZE,
    code: str = "dynamic",
) -> GradientTransformation:
    r"""AdEMAMix with ``m1``, ``m2`` and ``ν`` in 8-bit blocks: :func:`ademamix` plus ``block_size``.

    About 3 bytes of state per parameter instead of 12; leaves of fewer than
    ``min_8bit_size`` elements keep plain moments. ``code``: the 8-bit format, as in
    :func:`functional_adam.scale_by_adam_8bit`.

    Example:
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> tx = fa.ademamix_8bit(1e-3, min_8bit_size=1000)
        >>> state = tx.init({"w": jnp.zeros(4096)})
        >>> state[0].m2["w"].codes.dtype, state[0].nu["w"].codes.dtype
        (dtype('int8'), dtype('uint8'))
    """
    storage = BlockStorage(block_size, min_8bit_size, code).checked()
    return _ademamix_chain(storage, learning_rate, b1, b2, b3, alpha, eps, eps_root, mu_dtype,
                           nu_dtype, weight_decay, mask)  # fmt: skip


def simplified_ademamix_optimizer(
    b1=0.99, b2=0.95, alpha=0.0, eps=1e-8, eps_root=0.0, *, mu_dtype=None, nu_dtype=None
) -> LeafOptimizer:
    """Simplified AdEMAMix as a :class:`~functional_adam.core.lift.LeafOptimizer` (``count, m, n``)."""
    checks.check_decays(b1=b1, b2=b2)
    checks.check_schedule("alpha", alpha)
    checks.check_epsilons(eps, eps_root)
    moments = (
        Moment("m", False, checks.check_moment_dtype("mu_dtype", mu_dtype)),
        Moment("n", True, checks.check_float_dtype("nu_dtype", nu_dtype)),
    )

    def scalars(count_inc):
        return one_minus_power(b2, count_inc), _scheduled(alpha, count_inc - 1)

    def step(g, moments, s):
        bc2, alpha_t = s
        alpha_t = alpha if alpha_t is None else alpha_t
        m, n = moments
        dtype, real = compute_dtypes(g, [m], [n])
        g, m = g.astype(dtype), m.astype(dtype)
        g_sq = abs_sq_for(g, n, real)
        m = g + b1 * m
        n = g_sq + b2 * (n.astype(real) - g_sq)
        n_hat = n / bc2.astype(real)
        return (m + alpha_t * g) / (jnp.sqrt(n_hat + eps_root) + eps), (m, n)

    return LeafOptimizer(_LiftedSimplifiedState, moments, scalars, step)


def scale_by_simplified_ademamix(
    b1: float | jax.Array = 0.99,
    b2: float | jax.Array = 0.95,
    alpha: ScalarOrSchedule = 0.0,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    *,
    mu_dtype: Any | None = None,
    nu_dtype: Any | None = None,
) -> GradientTransformation:
    r"""Rescales updates by Simplified AdEMAMix's ``(m + α·g) / (sqrt(n̂ + eps_root) + eps)``.

    Args:
        b1: decay of the unnormalised momentum ``m = b1·m + g``, in [0, 1).
        b2: decay of the second moment, in [0, 1).
        alpha: weight of the current gradient, >= 0, or a schedule.
        eps, eps_root: as in :func:`scale_by_ademamix`.
        mu_dtype, nu_dtype: storage dtypes of ``m`` and ``n`` (``None``: the parameter's).

    Returns:
        A ``GradientTransformation`` with state :class:`ScaleBySimplifiedAdEMAMixState`.

    Example (step 1: m = g and n̂ = g², so u = sign(g)):
        >>> import jax.numpy as jnp
        >>> tx = scale_by_simplified_ademamix()
        >>> u, state = tx.update(jnp.array([-4.0]), tx.init(jnp.zeros(1)))
        >>> u.round(5), int(state.t)
        (Array([-1.], dtype=float32), 1)
    """
    optimizer = simplified_ademamix_optimizer(
        b1, b2, alpha, eps, eps_root, mu_dtype=mu_dtype, nu_dtype=nu_dtype
    )
    return with_state_layout(
        lift(optimizer),
        lambda s: ScaleBySimplifiedAdEMAMixState(s.count, s.m, s.n),
        lambda s: _LiftedSimplifiedState(s.t, s.m, s.n),
    )


def simplified_ademamix(
    learning_rate: ScalarOrSchedule,
    b1: float | jax.Array = 0.99,
    b2: float | jax.Array = 0.95,
    alpha: ScalarOrSchedule = 0.0,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    weight_decay: float | jax.Array = 0.0,
    mask: Any | Callable[[Params], Any] | None = None,
    *,
    mu_dtype: Any | None = None,
    nu_dtype: Any | None = None,
) -> GradientTransformation:
    r"""Simplified AdEMAMix with decoupled weight decay; ``optax.contrib.simplified_ademamix``'s
    signature plus the moment dtypes.

    Its momentum is a sum (about ``g/(1 - b1)``), so its learning rate is about
    ``1 - b1`` times Adam's.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import functional_adam as fa
        >>> x = jnp.array(5.0)
        >>> tx = fa.simplified_ademamix(learning_rate=1e-2)
        >>> updates, _ = tx.update(jax.grad(lambda x: x**2)(x), tx.init(x), x)
        >>> round(float(fa.apply_updates(x, updates)), 4)
        4.99
    """
    return chain(
        scale_by_simplified_ademamix(
            b1, b2, alpha, eps, eps_root, mu_dtype=mu_dtype, nu_dtype=nu_dtype
        ),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )
