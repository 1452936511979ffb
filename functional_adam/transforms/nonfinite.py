r"""Skipping steps with non-finite gradients: ``skip_nonfinite``.

One NaN or inf in a gradient makes that element's moments NaN or inf, and
with them its parameter, for the rest of the run. A gradient that is finite
but whose square overflows (``|g| > 1.8e19`` in float32) stores ``v = inf``:
the element's step is ``m/inf = 0`` from then on, and the parameter is frozen.
Mixed precision trainers skip such steps (``torch.amp.GradScaler``,
bitsandbytes' optimizers); ``skip_nonfinite`` does it for any transformation,
jitted, with the field names of ``optax.ApplyIfFiniteState``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from functional_adam.core.base import GradientTransformation, Params, _accepts_extra_args
from functional_adam.core.numerics import safe_increment, zero_count


class SkipNonfiniteState(NamedTuple):
    """State of :func:`skip_nonfinite` (the fields of ``optax.ApplyIfFiniteState``).

    Attributes:
        notfinite_count: int32, the number of consecutive skipped steps (0 after a taken one).
        last_finite: bool, whether the last step was taken.
        total_notfinite: int32, the number of skipped steps since ``init`` (saturating).
        inner_state: the wrapped transformation's state, as of the last taken step.
    """

    notfinite_count: jax.Array
    last_finite: jax.Array
    total_notfinite: jax.Array
    inner_state: Any


def all_finite(tree: Any) -> jax.Array:
    """A bool scalar: whether every float or complex element of ``tree`` is finite.

    Example:
        >>> import jax.numpy as jnp
        >>> bool(all_finite({"a": jnp.ones(2), "n": jnp.arange(3), "b": None}))
        True
        >>> bool(all_finite([jnp.array([1.0, jnp.nan])]))
        False
    """
    checks = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def skip_nonfinite(inner: GradientTransformation) -> GradientTransformation:
    r"""Wraps ``inner`` so that a step that would bring a non-finite value into it is skipped.

    Each step runs ``inner.update`` and keeps its result only if the
    gradients, the updates and the new inner state are all finite; otherwise
    it returns zero updates and the inner state unchanged (its step count
    included, so later steps are exactly those of a run that never saw the
    bad one), and counts the skip. The choice is a ``jnp.where`` select, so
    the step stays one jitted program. Checking the new state catches a
    gradient whose square overflows (``|g| > 1.8e19`` for float32 moments),
    which ``optax.apply_if_finite`` (it checks the gradients) lets through to
    freeze the parameter. Unlike ``optax.apply_if_finite`` it never gives up:
    a run whose every gradient is non-finite stands still, and
    ``notfinite_count`` says so.

    The check reads every gradient, update and state array once more per step;
    :func:`~functional_adam.update_and_apply` runs it on its XLA path.

    Args:
        inner: any transformation (this library's or Optax's).

    Returns:
        A ``GradientTransformation`` with state :class:`SkipNonfiniteState`.

    Example:
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> tx = fa.skip_nonfinite(fa.adam(0.1))
        >>> params = jnp.ones(2)
        >>> updates, state = tx.update(jnp.array([1.0, jnp.nan]), tx.init(params), params)
        >>> updates, int(state.total_notfinite), int(state.inner_state[0].count)
        (Array([0., 0.], dtype=float32), 1, 0)
    """
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        raise TypeError(
            "skip_nonfinite: inner must be a gradient transformation (an object with `init` "
            f"and `update`, e.g. fa.adam(1e-3)), got {inner!r}"
        )
    forward = _accepts_extra_args(inner.update)

    def init(params: Params) -> SkipNonfiniteState:
        return SkipNonfiniteState(
            notfinite_count=zero_count(),
            last_finite=jnp.array(True),
            total_notfinite=zero_count(),
            inner_state=inner.init(params),
        )

    def update(updates, state: SkipNonfiniteState, params=None, **extra_args):
        kwargs = extra_args if forward else {}
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **kwargs)
        finite = all_finite((updates, new_updates, new_inner))
        new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
        new_inner = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), new_inner, state.inner_state
        )
        return new_updates, SkipNonfiniteState(
            notfinite_count=jnp.where(finite, zero_count(), safe_increment(state.notfinite_count)),
            last_finite=finite,
            total_notfinite=jnp.where(
                finite, state.total_notfinite, safe_increment(state.total_notfinite)
            ),
            inner_state=new_inner,
        )

    return GradientTransformation(init, update)
