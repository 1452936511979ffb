r"""LAMB (You et al., 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76
minutes", https://arxiv.org/abs/1904.00962): AdamW rescaled per leaf by a trust ratio.

For each leaf (layer) with parameters θ and AdamW direction ``d = u_adam + wd·θ``::

    ratio = ‖θ‖ / ‖d‖          (1 where either norm is 0)
    θ ← θ - lr · ratio · d

The ratio is a norm over the whole leaf, not an elementwise function, so it is
not part of a per-leaf step: LAMB is Optax's chain ``scale_by_adam →
add_decayed_weights → scale_by_trust_ratio → scale_by_learning_rate``, with
the Adam stage lifted (:func:`functional_adam.scale_by_adam`) and the trust
ratio a separate stage (:func:`scale_by_trust_ratio`), written after Optax's
so that float32 and float64 results under ``jax.jit`` are bitwise Optax's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from functional_adam.core import checks
from functional_adam.core.base import (
    EmptyState,
    GradientTransformation,
    Params,
    ScalarOrSchedule,
    chain,
)
from functional_adam.core.numerics import compute_dtype
from functional_adam.optimizers._common import tree_where_not_none
from functional_adam.optimizers.adam import scale_by_adam
from functional_adam.transforms.learning_rate import scale_by_learning_rate
from functional_adam.transforms.weight_decay import add_decayed_weights


def safe_norm(x: jax.Array, min_norm) -> jax.Array:
    """``max(‖x‖, min_norm)`` with a zero (not NaN) gradient at 0, as ``optax.safe_norm``.

    Example:
        >>> import jax.numpy as jnp
        >>> float(safe_norm(jnp.array([3.0, 4.0]), 0.0))
        5.0
    """
    norm = jnp.linalg.norm(x, keepdims=True)
    x = jnp.where(norm <= min_norm, jnp.ones_like(x), x)
    norm = jnp.squeeze(norm, axis=None)
    masked_norm = jnp.linalg.norm(x)
    return jnp.where(norm <= min_norm, min_norm, masked_norm)


def _trust_ratio_leaf(u, p, min_norm, trust_coefficient, eps):
    dtype = compute_dtype(jnp.result_type(u, p))
    p32, u32 = p.astype(dtype), u.astype(dtype)
    param_norm = safe_norm(p32, min_norm)
    update_norm = safe_norm(u32, min_norm)
    trust_ratio = trust_coefficient * param_norm / (update_norm + eps)
    zero_norm = jnp.logical_or(param_norm == 0.0, update_norm == 0.0)
    safe_ratio = jnp.where(zero_norm, jnp.array(1.0, dtype=p32.dtype), trust_ratio)
    return (u32 * safe_ratio).astype(u.dtype)


def scale_by_trust_ratio(
    min_norm: float | jax.Array = 0.0,
    trust_coefficient: float | jax.Array = 1.0,
    eps: float | jax.Array = 0.0,
) -> GradientTransformation:
    r"""Scales each leaf's update by ``trust_coefficient·‖θ‖ / (‖u‖ + eps)`` (1 where a norm is 0).

    Like ``optax.scale_by_trust_ratio`` (LAMB, LARS, Fromage); the norms of
    16-bit leaves are taken in float32.

    Args:
        min_norm: both norms are at least this; >= 0.
        trust_coefficient: a multiplier of the ratio; >= 0.
        eps: added to the update's norm; >= 0.

    Returns:
        A ``GradientTransformation`` with an empty state; its ``update`` needs ``params``.

    Example (‖θ‖ = 5, ‖u‖ = 1: the update is scaled by 5):
        >>> import jax.numpy as jnp
        >>> tx = scale_by_trust_ratio()
        >>> params = jnp.array([3.0, 4.0])
        >>> tx.update(jnp.array([0.0, 1.0]), tx.init(params), params)[0]
        Array([0., 5.], dtype=float32)
    """
    checks.check_hyperparameter("min_norm", min_norm)
    checks.check_hyperparameter("trust_coefficient", trust_coefficient)
    checks.check_hyperparameter("eps", eps)

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "scale_by_trust_ratio needs params: call update(updates, state, params)."
            )
        checks.check_same_structure(updates, params, "the params")
        checks.check_shapes(updates, params)
        scaled = tree_where_not_none(
            lambda u, p: _trust_ratio_leaf(u, p, min_norm, trust_coefficient, eps), updates, params
        )
        return scaled, state

    return GradientTransformation(init, update)


def lamb(
    learning_rate: ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-6,
    eps_root: float | jax.Array = 0.0,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any | Callable[[Params], Any] | None = None,
    *,
    mu_dtype: Any | None = None,
    nu_dtype: Any | None = None,
) -> GradientTransformation:
    r"""LAMB: AdamW's direction rescaled per leaf by ``‖θ‖/‖d‖``; ``optax.lamb``'s signature.

    Args:
        learning_rate: a non-negative float, array, or schedule ``count -> lr``.
        b1, b2, eps, eps_root, mu_dtype, nu_dtype: see :func:`functional_adam.scale_by_adam`.
        weight_decay: non-negative decoupled decay rate (or schedule), inside the ratio.
        mask: which parameters to decay; see :func:`functional_adam.add_decayed_weights`.

    Returns:
        ``chain(scale_by_adam, add_decayed_weights, scale_by_trust_ratio, scale_by_learning_rate)``.

    Example (step 1: the Adam direction is ±1 per element, so ‖d‖ = ‖(1, 1)‖ and each
    coordinate moves by lr·‖θ‖/‖d‖ = lr·5/√2):
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> params = jnp.array([3.0, 4.0])
        >>> tx = fa.lamb(1e-2)
        >>> updates, _ = tx.update(jnp.array([1.0, 2.0]), tx.init(params), params)
        >>> updates.round(5)
        Array([-0.03536, -0.03536], dtype=float32)
    """
    return chain(
        scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nu_dtype),
        add_decayed_weights(weight_decay, mask),
        scale_by_trust_ratio(),
        scale_by_learning_rate(learning_rate),
    )
