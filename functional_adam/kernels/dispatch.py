"""``update_and_apply``: ``update`` then ``apply_updates``, in one kernel pass where one applies.

JAX pairs each donated input with an output of the same shape and dtype *in
order*, so donate the arguments in the order of the outputs, ``(params,
opt_state)``: with ``step(grads, opt_state, params)`` the buffer of ``m`` is
handed to the new ``params`` and XLA needs a temporary copy of the state.
"""

from __future__ import annotations

from typing import Any

from functional_adam.core.base import (
    GradientTransformation,
    OptState,
    Params,
    Updates,
    apply_updates,
)


def update_and_apply(
    tx: GradientTransformation,
    grads: Updates,
    state: OptState,
    params: Params,
    **extra_args: Any,
) -> tuple[Params, OptState]:
    """``tx.update`` then ``apply_updates``: returns ``(new_params, new_state)``.

    Under ``jax.jit`` XLA fuses the parameter update into the loop that
    computes Adam's direction, so each leaf's θ is read and written once.
    For ``adam``/``adamw``/``nadam``/``nadamw`` on float32 or float64 leaves
    on the CPU, the whole step is one pass of a compiled kernel over all leaves
    (:mod:`functional_adam.kernels.fused_adam`, :mod:`functional_adam.kernels.build`).
    Donate ``params`` and ``state`` (``jax.jit(..., donate_argnums=...)``) so
    the new values are written in place, with no second copy of either.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import functional_adam as fa
        >>> tx = fa.adam(0.1)
        >>> params = jnp.ones(2)
        >>> def step(params, state, grads):  # donated arguments in the order of the outputs
        ...     return fa.update_and_apply(tx, grads, state, params)
        >>> step = jax.jit(step, donate_argnums=(0, 1))
        >>> params, state = step(params, tx.init(params), jnp.array([1.0, -1.0]))
        >>> [round(float(x), 3) for x in params]
        [0.9, 1.1]
    """
    fused = getattr(tx.update, "fused_update_and_apply", None)
    if fused is not None:
        result = fused(grads, state, params, **extra_args)
        if result is not None:
            return result
    updates, state = tx.update(grads, state, params, **extra_args)
    return apply_updates(params, updates), state
