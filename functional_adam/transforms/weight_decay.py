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


def _decay(mask_leaf: Any, updates: Any, params: Any, rate: Any) -> Any:
    """``u + rate·θ`` over a subtree, or ``u`` unchanged where the mask is False."""
    if not mask_leaf:
        return updates
    return jax.tree.map(
        lambda u, p: None if u is None else u + (rate * p).astype(u.dtype),
        updates,
        params,
        is_leaf=lambda x: x is None,
    )


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
        if callable(weight_decay):
            rate, state = (
                weight_decay(state.count),
                WeightDecaySchedule(safe_increment(state.count)),
            )
        else:
            rate = weight_decay
        tree_mask = mask(params) if callable(mask) else mask
        if tree_mask is None:
            return _decay(True, updates, params, rate), state
        try:
            decayed = jax.tree.map(
                lambda m, u, p: _decay(m, u, p, rate),
                tree_mask,
                updates,
                params,
                is_leaf=lambda x: x is None,
            )
        except ValueError as err:
            raise ValueError(
                "add_decayed_weights: the mask must have the structure of the params or of a "
                f"prefix of it. {err}"
            ) from None
        return decayed, state

    return GradientTransformation(init, update)
