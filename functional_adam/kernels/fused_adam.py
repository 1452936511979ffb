"""``update_and_apply`` for ``adam``/``adamw``/``nadam``/``nadamw`` in one kernel call on the CPU.

The aliases attach the function made here to the ``update`` of the chain they
return; :func:`functional_adam.update_and_apply` calls it, and it runs the
whole step (moments, direction, decoupled weight decay, learning rate and the
parameter update) for all leaves in one call of the C++ kernel of
:mod:`functional_adam.kernels.build`. It reads and writes the same state as the
chain, so the two paths can alternate, and it computes the same arithmetic in
the same order (equal to the chain's results within a rounding of the last bit,
tested in ``tests/test_native.py``).

It applies where every parameter, gradient and moment is float32 (or every one
float64) and the step runs on a machine whose only device is one CPU; anything
else (bf16 moments, a GPU, several CPU devices that may shard the state, a tree
that does not match the state) takes the XLA path, which also gives the errors
for bad input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from functional_adam.core.base import GradientTransformation, OptState, Params, Updates
from functional_adam.core.numerics import safe_increment
from functional_adam.kernels import adam_cpu, build
from functional_adam.optimizers.adam import ScaleByAdamState, bias_corrections
from functional_adam.transforms.learning_rate import scale_by_learning_rate
from functional_adam.transforms.weight_decay import WeightDecaySchedule

FusedApply = Callable[..., "tuple[Params, OptState] | None"]


def attach(tx: GradientTransformation, fused: FusedApply) -> GradientTransformation:
    """``tx`` whose ``update`` carries ``fused`` for :func:`functional_adam.update_and_apply`.

    ``fused(grads, state, params)`` returns ``(new_params, new_state)``, or
    ``None`` where it does not apply; ``tx`` itself is unchanged.
    """

    def update(updates: Updates, state: OptState, params: Params | None = None, **extra_args):
        return tx.update(updates, state, params, **extra_args)

    update.__doc__ = tx.update.__doc__
    update.fused_update_and_apply = fused  # type: ignore[attr-defined]
    return GradientTransformation(tx.init, update)


def _decay_flags(mask: Any, params: Params) -> list[bool]:
    """One bool per parameter leaf: whether weight decay applies (mask: tree, prefix or callable)."""
    tree_mask = mask(params) if callable(mask) else mask
    if tree_mask is None:
        return [True] * len(jax.tree.leaves(params))
    full = jax.tree.map(
        lambda flag, sub: jax.tree.map(lambda _: bool(flag), sub),
        tree_mask,
        params,
        is_leaf=lambda x: x is None,
    )
    return jax.tree.leaves(full)


def _kernel_leaves(grads, state, params):
    """The ``(p, g, m, v)`` of each leaf and its dtype, or ``None`` if the kernel cannot take them."""
    p_leaves, treedef = jax.tree.flatten(params)
    trees = (grads, state.mu, state.nu)
    if any(jax.tree.structure(t) != treedef for t in trees) or not p_leaves:
        return None
    leaves = list(zip(p_leaves, *(treedef.flatten_up_to(t) for t in trees), strict=True))
    dtype = jnp.dtype(p_leaves[0].dtype)
    if dtype.name not in build.TARGETS:
        return None
    for leaf in leaves:
        if any(jnp.dtype(x.dtype) != dtype or x.shape != leaf[0].shape for x in leaf):
            return None
    return leaves, treedef, dtype


def fused_adam(
    *,
    b1: Any,
    b2: Any,
    eps: Any,
    eps_root: Any,
    learning_rate: Any,
    nesterov: bool,
    weight_decay: Any = None,
    mask: Any = None,
) -> FusedApply:
    """The kernel-backed ``update_and_apply`` of ``chain(scale_by_adam,
    [add_decayed_weights,] scale_by_learning_rate)`` with these hyperparameters
    (``weight_decay=None``: no decay stage).
    """
    lr_tx = scale_by_learning_rate(learning_rate)
    decoupled = weight_decay is not None

    def kernel_step(found, state, flags):
        adam_state, lr_state = state[0], state[-1]
        leaves, treedef, dtype = found
        count = safe_increment(adam_state.count)
        bc = bias_corrections(b1, b2, count)
        neg_lr, lr_state = lr_tx.update(jnp.ones([], dtype), lr_state)  # exactly -lr
        rate, middle = 0.0, ()
        if decoupled:
            wd_state, rate = state[1], weight_decay
            if callable(weight_decay):
                rate = weight_decay(wd_state.count)
                wd_state = WeightDecaySchedule(safe_increment(wd_state.count))
            middle = (wd_state,)
        inverse = [1 / jnp.asarray(x).astype(dtype) for x in (bc.mu, bc.nu, bc.mu_next)]
        values = (b1, 1 - b1, b2, 1 - b2, eps, eps_root, *inverse, neg_lr, rate)
        scalars = jnp.stack([jnp.asarray(x).astype(dtype) for x in values])
        out = adam_cpu.adam_step(scalars, leaves, tuple(flags), nesterov)
        new_params, mu, nu = (treedef.unflatten([o[i] for o in out]) for i in range(3))
        return new_params, (ScaleByAdamState(count, mu, nu), *middle, lr_state)

    def fused(grads, state, params, **extra_args):
        del extra_args
        if params is None or jax.default_backend() != "cpu":
            return None  # an accelerator is the default: XLA fuses the step there
        if jax.device_count() > 1:
            return None  # several CPU devices: the state may be sharded, and XLA cannot
            # partition the kernel's call (it would gather every array onto each device)
        expected = 3 if decoupled else 2
        if not (isinstance(state, tuple) and len(state) == expected):
            return None
        if not isinstance(state[0], ScaleByAdamState) or not build.available():
            return None
        found = _kernel_leaves(grads, state[0], params)
        if found is None:
            return None
        try:
            flags = _decay_flags(mask, params) if decoupled else [False] * len(found[0])
        except (ValueError, TypeError):
            return None  # a mask that does not fit: the XLA path says so
        return kernel_step(found, state, flags)

    return fused
