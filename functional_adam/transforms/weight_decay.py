"""Weight decay: ``add_decayed_weights``, coupled or decoupled by where it sits in a chain.

``u += wd·θ`` placed *before* Adam is coupled L2 regularisation (PyTorch's
``Adam(weight_decay=...)``): the decay goes through the moments. Placed *after*
Adam and before the learning rate it is decoupled weight decay (AdamW,
Loshchilov & Hutter, 2019, https://arxiv.org/abs/1711.05101):
``θ ← θ - lr·(u + wd·θ)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from functional_adam.core import checks
from functional_adam.core.base import EmptyState, GradientTransformation, Params, ScalarOrSchedule
from functional_adam.core.numerics import safe_increment, zero_count


class WeightDecaySchedule(NamedTuple):
    """State of :func:`add_decayed_weights` with a scheduled decay (as in Optax)."""

    count: jax.Array


def decay_flags(mask: Any | Callable[[Params], Any] | None, params: Params) -> list[bool]:
    """One bool per (non-``None``) parameter leaf: whether ``mask`` decays it.

    ``mask`` is ``None`` (decay all), a pytree of bools with the structure of the
    params or a prefix of it (a flag covers its whole subtree), or a callable
    ``params -> such a pytree``.

    Example:
        >>> import jax.numpy as jnp
        >>> decay_flags({"w": True, "norm": False}, {"w": jnp.ones(2), "norm": {"a": 1.0, "b": 2.0}})
        [False, False, True]
    """
    tree_mask = mask(params) if callable(mask) else mask
    if tree_mask is None:
        return [True] * len(jax.tree.leaves(params))
    try:
        full = jax.tree.map(
            lambda flag, sub: jax.tree.map(lambda _: bool(flag), sub),
            tree_mask,
            params,
            is_leaf=lambda x: x is None,
        )
    except ValueError as err:
        raise ValueError(
            "add_decayed_weights: the mask must have the structure of the params or of a "
            f"prefix of it. {err}"
        ) from None
    return jax.tree.leaves(full)


def add_decayed_weights(
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any | Callable[[Params], Any] | None = None,
) -> GradientTransformation:
    """Adds ``weight_decay · params`` to the updates, where ``mask`` allows.

    Args:
        weight_decay: a non-negative rate, array, or schedule ``count -> rate``.
        mask: ``None`` (decay everything), a pytree of bools with the structure
            of the params or a prefix of it, or a callable ``params -> such a
            pytree``. ``True`` marks the leaves (subtrees) to decay.

    Returns:
        A ``GradientTransformation``; its ``update`` needs ``params``.

    Example:
        >>> import jax.numpy as jnp
        >>> params = {"w": jnp.array([2.0]), "b": jnp.array([2.0])}
        >>> tx = add_decayed_weights(0.1, mask={"w": True, "b": False})
        >>> tx.update({"w": jnp.zeros(1), "b": jnp.zeros(1)}, tx.init(params), params)[0]
        {'b': Array([0.], dtype=float32), 'w': Array([0.2], dtype=float32)}
    """
    checks.check_hyperparameter("weight_decay", weight_decay, allow_schedule=True)
    if mask is not None and not callable(mask):
        for path, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]:
            if not isinstance(leaf, bool):
                raise TypeError(
                    f"mask{jax.tree_util.keystr(path)} is {leaf!r}; mask leaves must be Python "
                    "bools (True: decay this leaf or subtree)."
                )

    def init(params: Params):
        del params
        return WeightDecaySchedule(zero_count()) if callable(weight_decay) else EmptyState()

    def update(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "add_decayed_weights needs params: call update(updates, state, params)."
            )
        checks.check_same_structure(updates, params, "the params")
        checks.check_shapes(updates, params)
        if callable(weight_decay):
            rate, state = (
                weight_decay(state.count),
                WeightDecaySchedule(safe_increment(state.count)),
            )
        else:
            rate = weight_decay
        if isinstance(rate, int | float) and rate == 0:  # as Optax: a constant 0 adds nothing
            return updates, state
        flags = decay_flags(mask, params)
        u_leaves, treedef = jax.tree.flatten(updates)
        decayed = [
            u + (rate * p).astype(u.dtype) if flag else u
            for u, p, flag in zip(u_leaves, treedef.flatten_up_to(params), flags, strict=True)
        ]
        return treedef.unflatten(decayed), state

    return GradientTransformation(init, update)
