r"""ADOPT (Taniguchi et al., NeurIPS 2024, "ADOPT: Modified Adam Can Converge with Any β2 with the
Optimal Rate", https://arxiv.org/abs/2411.02853): normalise by the *previous* second moment,
then take the momentum.

Step t = 0, 1, 2, ... (``t`` counts the steps already taken)::

    x_t = clip(g_t / max(sqrt(v_{t-1}), eps), ±c(t))       (c(t) = t^0.25 by default)
    m_t = b1'·m_{t-1} + (1 - b1')·x_t                        (b1' = b1, or 1 at t = 0)
    v_t = b2'·v_{t-1} + (1 - b2')·|g_t|²                      (b2' = b2, or 0 at t = 0)
    u_t = m_t        (Nesterov: b1'·m_t + (1 - b1')·x_t)

The first step only sets ``v_0 = |g_0|²``: its update is 0. Because ``g_t``
does not enter the ``v`` that divides it, the step is an unbiased direction
for any ``b2``. With ``use_clipping`` (the default, as in Optax) ``x_t`` is
clipped to ``[-c(t), c(t)]``; for complex gradients the modulus is clipped.
The order of float operations is ``optax.contrib.scale_by_adopt``'s: float32 and
float64 results under ``jax.jit`` are bitwise Optax's. The schedule ``c`` is
evaluated at the step count before the increment, computed as the lift's
incremented count minus 1 (the same but at the saturated count 2^31 - 1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from functional_adam.core import checks
from functional_adam.core.base import GradientTransformation, ScalarOrSchedule, chain
from functional_adam.core.lift import LeafOptimizer, Moment, lift
from functional_adam.optimizers._common import abs_sq_for, compute_dtypes
from functional_adam.optimizers.adam import ScaleByAdamState
from functional_adam.transforms.learning_rate import scale_by_learning_rate


def default_clip_value(count: jax.Array) -> jax.Array:
    """``count ** 0.25``, ADOPT's default clipping schedule."""
    return count**0.25


class AdoptScalars(NamedTuple):
    """The per-step scalars of ADOPT: the step's decays and the clipping value."""

    b1: jax.Array
    b2: jax.Array
    clip: jax.Array | None


def _clip(x: jax.Array, c: jax.Array) -> jax.Array:
    if not jnp.iscomplexobj(x):
        return jnp.clip(x, -c, c)
    modulus = jnp.abs(x)
    return jnp.where(modulus > c, x * (c / jnp.where(modulus > c, modulus, 1)), x)


def _check_clip_value_fn(clip_value_fn: Any) -> None:
    if not callable(clip_value_fn):
        raise TypeError(
            f"clip_value_fn must be a callable count -> clip value, got {clip_value_fn!r}"
        )
    checks.check_schedule("clip_value_fn", clip_value_fn)


def adopt_optimizer(
    b1=0.9,
    b2=0.9999,
    eps=1e-6,
    mu_dtype=None,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[jax.Array], jax.Array] = default_clip_value,
    nu_dtype=None,
) -> LeafOptimizer:
    """ADOPT as a :class:`~functional_adam.core.lift.LeafOptimizer` (state ``count, mu, nu``)."""
    checks.check_decays(b1=b1, b2=b2)
    checks.check_positive("eps", eps)  # the first step divides by max(sqrt(0), eps)
    if not isinstance(use_clipping, bool):
        raise TypeError(f"use_clipping must be a bool, got {use_clipping!r}")
    if use_clipping:
        _check_clip_value_fn(clip_value_fn)
    moments = (
        Moment("mu", False, checks.check_moment_dtype("mu_dtype", mu_dtype)),
        Moment("nu", True, checks.check_float_dtype("nu_dtype", nu_dtype)),
    )

    def scalars(count_inc):
        count = count_inc - 1  # Optax's state.count, before the increment
        clip = clip_value_fn(count) if use_clipping else None
        return AdoptScalars(jnp.where(count > 0, b1, 1), jnp.where(count > 0, b2, 0), clip)

    def step(g, moments, s: AdoptScalars):
        m, v_prev = moments
        dtype, real = compute_dtypes(g, [m], [v_prev])
        g, m, v_prev = g.astype(dtype), m.astype(dtype), v_prev.astype(real)
        v = (1 - s.b2) * abs_sq_for(g, moments[1], real) + s.b2 * v_prev
        x = g / jnp.maximum(jnp.sqrt(v_prev), eps)
        if s.clip is not None:
            x = _clip(x, s.clip)
        m = (1 - s.b1) * x + s.b1 * m
        u = (1 - s.b1) * x + s.b1 * m if nesterov else m
        return u, (m, v)

    return LeafOptimizer(ScaleByAdamState, moments, scalars, step)


def scale_by_adopt(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.9999,
    eps: float | jax.Array = 1e-6,
    mu_dtype: Any | None = None,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[jax.Array], jax.Array] = default_clip_value,
    nu_dtype: Any | None = None,
) -> GradientTransformation:
    r"""Rescales updates by ADOPT's momentum of normalised gradients (see the module docstring).

    Args:
        b1: decay of the momentum, in [0, 1).
        b2: decay of the second moment, in [0, 1).
        eps: the smallest ``sqrt(v)`` divided by; > 0.
        mu_dtype, nu_dtype: storage dtypes of the moments (``None``: the parameter's).
        nesterov: Nesterov momentum.
        use_clipping: clip the normalised gradient to ``[-c(t), c(t)]``.
        clip_value_fn: ``c``, a callable ``count -> clip value >= 0`` (checked at
            a few counts when it can be evaluated eagerly).

    Returns:
        A ``GradientTransformation`` with state ``ScaleByAdamState(count, mu, nu)``.

    Example (step 1 only records v = g²; step 2 moves):
        >>> import jax.numpy as jnp
        >>> tx = scale_by_adopt()
        >>> u, state = tx.update(jnp.array([2.0]), tx.init(jnp.zeros(1)))
        >>> u, state.nu
        (Array([0.], dtype=float32), Array([4.], dtype=float32))
        >>> tx.update(jnp.array([2.0]), state)[0].round(6)  # 0.1·clip(2/2, ±1)
        Array([0.1], dtype=float32)
    """
    optimizer = adopt_optimizer(
        b1,
        b2,
        eps,
        mu_dtype,
        nesterov=nesterov,
        use_clipping=use_clipping,
        clip_value_fn=clip_value_fn,
        nu_dtype=nu_dtype,
    )
    return lift(optimizer)


def adopt(
    learning_rate: ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.9999,
    eps: float | jax.Array = 1e-6,
    mu_dtype: Any | None = None,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[jax.Array], jax.Array] = default_clip_value,
    nu_dtype: Any | None = None,
) -> GradientTransformation:
    r"""ADOPT: ``θ ← θ - lr·m_t``; the signature of ``optax.contrib.adopt``, plus ``nu_dtype``.

    Under ``optax.inject_hyperparams``, name ``clip_value_fn`` in ``static_args``
    (it is a function of the count, not a schedule of a hyperparameter).

    Args:
        learning_rate: a non-negative float, array, or schedule ``count -> lr``.
        b1, b2, eps, mu_dtype, nu_dtype, nesterov, use_clipping, clip_value_fn: see
            :func:`scale_by_adopt`.

    Returns:
        ``chain(scale_by_adopt, scale_by_learning_rate)``.

    Example (f(x) = x²: the first step does not move, the second moves by 0.1·lr):
        >>> import jax, jax.numpy as jnp
        >>> import functional_adam as fa
        >>> x = jnp.array(5.0)
        >>> tx = fa.adopt(learning_rate=1e-2)
        >>> state = tx.init(x)
        >>> for _ in range(2):
        ...     updates, state = tx.update(jax.grad(lambda x: x**2)(x), state, x)
        ...     x = fa.apply_updates(x, updates)
        >>> round(float(x), 6)
        4.999
    """
    return chain(
        scale_by_adopt(
            b1,
            b2,
            eps,
            mu_dtype,
            nesterov=nesterov,
            use_clipping=use_clipping,
            clip_value_fn=clip_value_fn,
            nu_dtype=nu_dtype,
        ),
        scale_by_learning_rate(learning_rate),
    )
