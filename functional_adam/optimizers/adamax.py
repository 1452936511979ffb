r"""AdaMax (Kingma & Ba, 2014, §7.1, https://arxiv.org/abs/1412.6980): Adam with the infinity norm.

Step t = 1, 2, ...::

    m_t = b1·m_{t-1} + (1 - b1)·g_t
    u_t = max(|g_t| + eps, b2·u_{t-1})        (Optax's ``nu``; no bias correction)
    update_t = (m_t / (1 - b1^t)) / u_t

so each step moves a coordinate by at most about ``lr``. ``adamaxw`` adds
decoupled weight decay. The order of float operations is Optax's
``scale_by_adamax``: float32 and float64 results under ``jax.jit`` are bitwise
Optax's. ``torch.optim.Adamax`` computes the same (``eps`` added to ``|g|``
before the maximum): :func:`functional_adam.compat.torch_adamax`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from functional_adam.core import checks
from functional_adam.core.base import GradientTransformation, Params, ScalarOrSchedule, chain
from functional_adam.core.lift import LeafOptimizer, Moment, lift
from functional_adam.optimizers._common import compute_dtypes
from functional_adam.optimizers.adam import ScaleByAdamState, one_minus_power
from functional_adam.transforms.learning_rate import scale_by_learning_rate
from functional_adam.transforms.weight_decay import add_decayed_weights


def adamax_optimizer(b1=0.9, b2=0.999, eps=1e-8, mu_dtype=None, nu_dtype=None) -> LeafOptimizer:
    """AdaMax as a :class:`~functional_adam.core.lift.LeafOptimizer` (state ``count, mu, nu``)."""
    checks.check_decays(b1=b1, b2=b2)
    checks.check_positive("eps", eps)  # eps = 0: a zero gradient at step 1 divides 0 by 0
    moments = (
        Moment("mu", False, checks.check_moment_dtype("mu_dtype", mu_dtype)),
        Moment("nu", True, checks.check_float_dtype("nu_dtype", nu_dtype)),
    )

    def step(g, moments, bc1):
        m, nu = moments
        dtype, real = compute_dtypes(g, [m], [nu])
        g, m, nu = g.astype(dtype), m.astype(dtype), nu.astype(real)
        m = (1 - b1) * g + b1 * m
        nu = jnp.maximum(jnp.abs(g) + eps, b2 * nu)
        return (m / bc1.astype(m.dtype)) / nu, (m, nu)

    return LeafOptimizer(ScaleByAdamState, moments, lambda count: one_minus_power(b1, count), step)


def scale_by_adamax(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    *,
    mu_dtype: Any | None = None,
    nu_dtype: Any | None = None,
) -> GradientTransformation:
    r"""Rescales updates by AdaMax's ``m̂ / max(|g| + eps, b2·u)`` (see the module docstring).

    Args:
        b1: decay of the first moment, in [0, 1).
        b2: decay of the infinity norm, in [0, 1).
        eps: added to ``|g|``; > 0.
        mu_dtype, nu_dtype: storage dtypes of the moments (``None``: the parameter's;
            ``nu`` is real for complex parameters).

    Returns:
        A ``GradientTransformation`` with state ``ScaleByAdamState(count, mu, nu)``.

    Example:
        >>> import jax.numpy as jnp
        >>> tx = scale_by_adamax()
        >>> u, state = tx.update(jnp.array([4.0, -0.5]), tx.init(jnp.zeros(2)))
        >>> u.round(4), state.nu  # step 1: m̂ = g, u = |g| + eps
        (Array([ 1., -1.], dtype=float32), Array([4. , 0.5], dtype=float32))
    """
    return lift(adamax_optimizer(b1, b2, eps, mu_dtype, nu_dtype))


def adamax(
    learning_rate: ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    *,
    mu_dtype: Any | None = None,
    nu_dtype: Any | None = None,
) -> GradientTransformation:
    r"""AdaMax: ``θ ← θ - lr · m̂ / u``; ``optax.adamax``'s signature plus the moment dtypes.

    Args:
        learning_rate: a non-negative float, array, or schedule ``count -> lr``.
        b1, b2, eps, mu_dtype, nu_dtype: see :func:`scale_by_adamax`.

    Returns:
        ``chain(scale_by_adamax, scale_by_learning_rate)``.

    Example (f(x) = x², x0 = 5: the first step moves x by lr):
        >>> import jax, jax.numpy as jnp
        >>> import functional_adam as fa
        >>> x = jnp.array(5.0)
        >>> tx = fa.adamax(learning_rate=1e-2)
        >>> updates, _ = tx.update(jax.grad(lambda x: x**2)(x), tx.init(x), x)
        >>> round(float(fa.apply_updates(x, updates)), 6)
        4.99
    """
    return chain(
        scale_by_adamax(b1, b2, eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
        scale_by_learning_rate(learning_rate),
    )


def adamaxw(
    learning_rate: ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any | Callable[[Params], Any] | None = None,
    *,
    mu_dtype: Any | None = None,
    nu_dtype: Any | None = None,
) -> GradientTransformation:
    r"""AdaMax with decoupled weight decay: ``θ ← θ - lr·(m̂/u + wd·θ)``; ``optax.adamaxw``'s signature.

    Args:
        learning_rate, b1, b2, eps, mu_dtype, nu_dtype: see :func:`adamax`.
        weight_decay: non-negative decay rate (or schedule).
        mask: which parameters to decay; see :func:`functional_adam.add_decayed_weights`.

    Returns:
        ``chain(scale_by_adamax, add_decayed_weights, scale_by_learning_rate)``.

    Example (a zero gradient: only the decay acts):
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> params = jnp.array([2.0])
        >>> tx = fa.adamaxw(0.1, weight_decay=0.5)
        >>> tx.update(jnp.zeros(1), tx.init(params), params)[0]
        Array([-0.1], dtype=float32)
    """
    return chain(
        scale_by_adamax(b1, b2, eps, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )
