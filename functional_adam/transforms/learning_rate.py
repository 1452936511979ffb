"""Scaling by a constant or by a schedule: ``scale``, ``scale_by_schedule``, ``scale_by_learning_rate``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from functional_adam.core import checks
from functional_adam.core.base import EmptyState, GradientTransformation, ScalarOrSchedule, Schedule
from functional_adam.core.numerics import safe_increment, zero_count


class ScaleByScheduleState(NamedTuple):
    """State of :func:`scale_by_schedule` (the fields of ``optax.ScaleByScheduleState``)."""

    count: jax.Array  # int32 scalar, saturating


def _scale_leaves(updates: Any, factor: Any) -> Any:
    """``factor * u`` for each leaf, with ``factor`` cast to the leaf's dtype first."""
    return jax.tree.map(lambda u: jnp.asarray(factor, dtype=u.dtype) * u, updates)


def scale(step_size: float | jax.Array) -> GradientTransformation:
    """Multiplies updates by a fixed scalar ``step_size`` (cast to each update's dtype).

    Example:
        >>> import jax.numpy as jnp
        >>> scale(-0.5).update(jnp.array([2.0]), EmptyState())[0]
        Array([-1.], dtype=float32)
    """
    checks.check_hyperparameter("step_size", step_size, low=-float("inf"))

    def init(params):
        del params
        return EmptyState()

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        return _scale_leaves(updates, step_size), state

    return GradientTransformation(init, update)


def scale_by_schedule(step_size_fn: Schedule) -> GradientTransformation:
    """Multiplies updates by ``step_size_fn(count)``, ``count`` being 0 at the first update.

    Example:
        >>> import jax.numpy as jnp
        >>> tx = scale_by_schedule(lambda count: 1.0 / (count + 1))
        >>> state = tx.init(None)
        >>> _, state = tx.update(jnp.ones(1), state)
        >>> tx.update(jnp.ones(1), state)[0]
        Array([0.5], dtype=float32)
    """
    if not callable(step_size_fn):
        raise TypeError(f"step_size_fn must be a callable count -> scalar, got {step_size_fn!r}")

    def init(params):
        del params
        return ScaleByScheduleState(count=zero_count())

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        updates = _scale_leaves(updates, step_size_fn(state.count))
        return updates, ScaleByScheduleState(count=safe_increment(state.count))

    return GradientTransformation(init, update)


def scale_by_learning_rate(
    learning_rate: ScalarOrSchedule, *, flip_sign: bool = True
) -> GradientTransformation:
    """Multiplies updates by ``-learning_rate`` (``+`` with ``flip_sign=False``).

    Args:
        learning_rate: a non-negative float, a scalar array, or a schedule
            ``count -> lr`` (for example an Optax schedule).
        flip_sign: negate, so that adding the result descends.

    Returns:
        ``scale(-lr)`` for a constant, ``scale_by_schedule`` for a schedule.

    Example:
        >>> import jax.numpy as jnp
        >>> tx = scale_by_learning_rate(0.1)
        >>> tx.update(jnp.array([1.0, -2.0]), tx.init(None))[0]
        Array([-0.1,  0.2], dtype=float32)
    """
    checks.check_hyperparameter("learning_rate", learning_rate, allow_schedule=True)
    sign = -1 if flip_sign else 1
    if callable(learning_rate):
        return scale_by_schedule(lambda count: sign * learning_rate(count))
    return scale(sign * learning_rate)
