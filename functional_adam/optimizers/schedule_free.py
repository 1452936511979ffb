r"""Schedule-Free AdamW (Defazio et al., NeurIPS 2024, "The Road Less Scheduled",
https://arxiv.org/abs/2405.15682): no learning-rate decay; an averaged iterate instead.

Three sequences: ``z`` (the base optimizer's iterate, in the state), ``x`` (a
weighted average of the ``z``, the point to evaluate) and ``y`` (the point
where gradients are taken, the parameters the caller holds)::

    z_t = z_{t-1} + base_update(g_t)                          (an AdamW step without momentum)
    c_t = w_t / Σ_{i<=t} w_i,  w_t = max_{i<=t}(lr_i)^weight_lr_power
    x_t = (1 - c_t)·x_{t-1} + c_t·z_t
    y_t = b1·x_t + (1 - b1)·z_t                                (the new parameters)

``x_{t-1}`` is recomputed from ``y`` and ``z`` as ``(y - (1 - b1)·z)/b1``
rather than stored; :func:`schedule_free_eval_params` gives ``x`` for
evaluation. The base of :func:`schedule_free_adamw` is Optax's: Adam without
its first moment (``u = g/(sqrt(v̂) + eps)``, lifted), decoupled weight
decay, the learning rate (linearly warmed up over ``warmup_steps``).

:func:`schedule_free` is a hand-written wrapper, not a lifted step: its state
holds scalars of its own (``weight_sum``, ``max_lr``, a step count starting at
1) next to the base optimizer's state and ``z``, a copy of the parameters
(not zeros), and its step needs the parameters. The state is Optax's
``ScheduleFreeState``; the order of float operations is
``optax.contrib.schedule_free``'s, so float32 and float64 results under
``jax.jit`` are bitwise Optax's. 16-bit parameters are interpolated in float32
(Optax: in 16 bits) and the state's scalars are float32 for them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from functional_adam.core import checks
from functional_adam.core.base import (
    GradientTransformation,
    OptState,
    Params,
    ScalarOrSchedule,
    _accepts_extra_args,
    chain,
)
from functional_adam.core.lift import LeafOptimizer, Moment, lift
from functional_adam.core.numerics import compute_dtype, real_dtype, safe_increment
from functional_adam.optimizers._common import abs_sq_for, compute_dtypes, tree_where_not_none
from functional_adam.optimizers.adam import one_minus_power
from functional_adam.transforms.learning_rate import scale_by_learning_rate
from functional_adam.transforms.weight_decay import add_decayed_weights


class ScheduleFreeState(NamedTuple):
    """State of :func:`schedule_free` (the fields of ``optax.contrib.ScheduleFreeState``)."""

    b1: jax.Array
    weight_sum: jax.Array
    step_count: jax.Array  # int32, 1 at the first update
    max_lr: jax.Array
    base_optimizer_state: OptState
    z: Params


class ScaleByRmsWithCountState(NamedTuple):
    """State of the base's direction (the fields of ``optax.ScaleByRmsWithCountState``)."""

    count: jax.Array
    nu: Any


def rms_optimizer(decay=0.999, eps=1e-8, nu_dtype=None) -> LeafOptimizer:
    """``u = g / (sqrt(v̂) + eps)``, Optax's ``scale_by_rms(decay, eps, eps_in_sqrt=False,
    bias_correction=True)``: Adam without its first moment."""
    checks.check_decays(b2=decay)
    checks.check_positive("eps", eps)  # a zero gradient at step 1: 0/(0 + eps)
    moments = (Moment("nu", True, checks.check_float_dtype("nu_dtype", nu_dtype)),)

    def step(g, moments, bc):
        (v,) = moments
        dtype, real = compute_dtypes(g, [], [v])
        g = g.astype(dtype)
        v = (1 - decay) * abs_sq_for(g, v, real) + decay * v.astype(real)
        scaling = 1 / (jnp.sqrt(v / bc.astype(real)) + eps)
        return scaling * g, (v,)

    return LeafOptimizer(
        ScaleByRmsWithCountState, moments, lambda count: one_minus_power(decay, count), step
    )


def _lowest_dtype(params: Params) -> jnp.dtype:
    """The real compute dtype of the lowest-precision leaf (float32 for 16-bit leaves)."""
    dtypes = {jnp.result_type(p) for p in jax.tree.leaves(params)}
    if not dtypes:
        return jnp.dtype(jnp.float32)
    return min((real_dtype(compute_dtype(d)) for d in dtypes), key=lambda d: d.itemsize)


def _copy(p: Any, dtype: Any) -> Any:
    if isinstance(p, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(p.shape, dtype or p.dtype, sharding=p.sharding)
    return jnp.array(p, dtype=dtype, copy=True)  # a distinct buffer: params and z both donatable


def _new_z(z_old, u):
    dtype = compute_dtype(jnp.result_type(z_old, u))
    return jnp.asarray(z_old.astype(dtype) + u.astype(dtype)).astype(z_old.dtype)


def _new_params_update(p, z_old, z, g, b1, ck):
    """``y_new - y`` with ``x`` recomputed from ``y`` and the old ``z`` (Optax's order)."""
    dtype = compute_dtype(jnp.result_type(p, z_old))
    y, z_old, z = p.astype(dtype), z_old.astype(dtype), z.astype(dtype)
    prev_x = (y - (1.0 - b1) * z_old) / b1
    x = (1.0 - ck) * prev_x + ck * z
    new_params = b1 * x + (1.0 - b1) * z
    return (new_params - y).astype(g.dtype)


def schedule_free(
    base_optimizer: GradientTransformation,
    learning_rate: ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    weight_lr_power: float | jax.Array = 2.0,
    state_dtype: Any | None = None,
) -> GradientTransformation:
    r"""Makes ``base_optimizer`` schedule-free (see the module docstring).

    Args:
        base_optimizer: the optimizer of ``z`` (its updates include ``-lr``).
        learning_rate: the base's learning rate or schedule (``count`` from 1), for ``c_t``.
        b1: interpolation between ``x`` and ``z``, in (0, 1].
        weight_lr_power: exponent of the weights ``w_t``; >= 0.
        state_dtype: dtype of ``z`` (``None``: the parameters').

    Returns:
        A ``GradientTransformation`` with state :class:`ScheduleFreeState`; its
        ``update`` needs ``params``.

    Example:
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> tx = fa.schedule_free(fa.chain(fa.scale_by_adam(b1=0.0), fa.scale(-0.1)), 0.1)
        >>> params = jnp.array([1.0])
        >>> state = tx.init(params)
        >>> updates, state = tx.update(jnp.array([2.0]), state, params)
        >>> state.z.round(5), fa.apply_updates(params, updates).round(5)  # c_1 = 1: y = x = z
        (Array([0.9], dtype=float32), Array([0.9], dtype=float32))
    """
    if not (hasattr(base_optimizer, "init") and hasattr(base_optimizer, "update")):
        raise TypeError(f"base_optimizer must be a gradient transformation, got {base_optimizer!r}")
    checks.check_hyperparameter("learning_rate", learning_rate, allow_schedule=True)
    checks.check_positive(
        "b1", b1, high=1.0, high_inclusive=True
    )  # (0, 1]: x is recovered by dividing by b1
    checks.check_hyperparameter("weight_lr_power", weight_lr_power)
    state_dtype = checks.check_float_dtype("state_dtype", state_dtype)
    forward = _accepts_extra_args(base_optimizer.update)

    def init(params: Params) -> ScheduleFreeState:
        checks.check_float_leaves(params, "params")
        dtype = _lowest_dtype(params)
        return ScheduleFreeState(
            b1=jnp.asarray(b1, dtype=dtype),
            weight_sum=jnp.zeros([], dtype=dtype),
            step_count=jnp.ones([], dtype=jnp.int32),
            max_lr=jnp.zeros([], dtype=dtype),
            base_optimizer_state=base_optimizer.init(params),
            z=jax.tree.map(lambda p: _copy(p, state_dtype), params),
        )

    def update(grads, state: ScheduleFreeState, params=None, **extra_args):
        if params is None:
            raise ValueError("schedule_free needs params: call update(grads, state, params).")
        lr = learning_rate
        if callable(learning_rate):
            lr = jnp.asarray(learning_rate(state.step_count), dtype=state.max_lr.dtype)
        max_lr = jnp.maximum(state.max_lr, lr)
        weight = max_lr**weight_lr_power
        next_total_weight = state.weight_sum + weight
        ck = jnp.where(
            jnp.logical_or(jnp.isnan(weight), jnp.isnan(next_total_weight)),
            jnp.full(weight.shape, jnp.nan),
            jnp.nan_to_num(weight / next_total_weight, nan=0.0, posinf=jnp.inf),
        )
        base_updates, base_state = base_optimizer.update(
            grads, state.base_optimizer_state, params, **(extra_args if forward else {})
        )
        z = tree_where_not_none(_new_z, state.z, base_updates)
        updates = tree_where_not_none(
            lambda p, z_old, z_new, g: _new_params_update(p, z_old, z_new, g, b1, ck),
            params,
            state.z,
            z,
            grads,
        )
        new_state = ScheduleFreeState(
            state.b1, next_total_weight, safe_increment(state.step_count), max_lr, base_state, z
        )
        return updates, new_state

    return GradientTransformation(init, update)


def schedule_free_eval_params(state: OptState, params: Params) -> Params:
    """The averaged point ``x = (y - (1 - b1)·z) / b1`` to evaluate, from ``params`` = ``y``.

    ``state`` is a :class:`ScheduleFreeState` or any state holding exactly one
    (a ``chain``'s tuple, ``optax.inject_hyperparams``' state, ...).

    Example:
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> tx = fa.schedule_free_adamw(1e-2)
        >>> params = jnp.array([1.0, -1.0])
        >>> updates, state = tx.update(jnp.array([1.0, 1.0]), tx.init(params), params)
        >>> params = fa.apply_updates(params, updates)
        >>> fa.schedule_free_eval_params(state, params)  # x_1 = z_1 = θ_0 - lr·sign(g)
        Array([ 0.99, -1.01], dtype=float32)
    """
    found = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, ScheduleFreeState))
        if isinstance(s, ScheduleFreeState)
    ]
    if len(found) != 1:
        raise ValueError(
            "schedule_free_eval_params needs a state holding one ScheduleFreeState (the state of "
            f"schedule_free or schedule_free_adamw); found {len(found)}."
        )
    b1, z = found[0].b1, found[0].z

    def leaf(y, zi):
        dtype = compute_dtype(jnp.result_type(y, zi))
        b = b1.astype(dtype)
        return ((y.astype(dtype) - (1.0 - b) * zi.astype(dtype)) / b).astype(y.dtype)

    return tree_where_not_none(leaf, params, z)


def _warmup_constant(peak: Any, warmup_steps: Any):
    """Optax's ``warmup_constant_schedule(0, peak, warmup_steps)``, operation for operation."""

    def schedule(count):
        count = jnp.clip(count - 0, 0, warmup_steps)
        frac = 1 - count / warmup_steps
        return (0 - peak) * (frac**1) + peak

    return schedule


def schedule_free_adamw(
    learning_rate: float | jax.Array = 0.0025,
    warmup_steps: int | None = None,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    weight_decay: float | jax.Array = 0.0,
    weight_lr_power: float | jax.Array = 2.0,
    state_dtype: Any | None = None,
) -> GradientTransformation:
    r"""Schedule-Free AdamW; ``optax.contrib.schedule_free_adamw``'s signature and defaults.

    Evaluate (and checkpoint for inference) :func:`schedule_free_eval_params`,
    not the parameters being trained.

    Args:
        learning_rate: the peak learning rate; >= 0.
        warmup_steps: ``None`` or a positive int: the learning rate rises linearly from 0.
        b1: interpolation between ``x`` and ``z`` (the momentum), in (0, 1].
        b2: decay of the second moment, in [0, 1).
        eps: added to ``sqrt(v̂)``; > 0.
        weight_decay: non-negative decoupled decay, applied at ``y``.
        weight_lr_power, state_dtype: see :func:`schedule_free`.

    Returns:
        A ``GradientTransformation`` with state :class:`ScheduleFreeState`.

    Example (step 1 moves y by lr, as Adam's first step):
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> tx = fa.schedule_free_adamw(1e-2)
        >>> params = jnp.array([1.0])
        >>> updates, _ = tx.update(jnp.array([3.0]), tx.init(params), params)
        >>> updates.round(6)
        Array([-0.01], dtype=float32)
    """
    checks.check_hyperparameter("learning_rate", learning_rate)
    if warmup_steps is not None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int | jax.Array):
            raise TypeError(f"warmup_steps must be None or a positive int, got {warmup_steps!r}")
        checks.check_positive("warmup_steps", warmup_steps)  # 0: Optax's lr would stay 0
        learning_rate = _warmup_constant(learning_rate, warmup_steps)
    base = chain(
        lift(rms_optimizer(b2, eps)),
        add_decayed_weights(weight_decay),
        scale_by_learning_rate(learning_rate),
    )
    return schedule_free(base, learning_rate, b1, weight_lr_power, state_dtype)
