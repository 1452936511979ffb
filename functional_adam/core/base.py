"""The transformation protocol: ``GradientTransformation``, ``chain``, ``apply_updates``.

A gradient transformation is a pair of pure functions::

    init(params) -> state
    update(updates, state, params=None, **extra_args) -> (updates, state)

bundled in a ``NamedTuple`` with the fields ``init`` and ``update``, the same
shape as :class:`optax.GradientTransformation`, so transformations from either
library can be used inside the other's ``chain``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

Params = Any
"""A pytree of parameters (arrays, ``jax.ShapeDtypeStruct`` for ``init``, or ``None``)."""
Updates = Any
"""A pytree of updates (gradients on the way in), with the structure of ``Params``."""
OptState = Any
"""The state of a transformation: a pytree of arrays, usually a ``NamedTuple``."""
Schedule = Callable[[jax.Array], jax.Array]
"""A function from the int32 step count to a scalar (e.g. a learning rate)."""
ScalarOrSchedule = float | jax.Array | Schedule


class TransformInitFn(Protocol):
    def __call__(self, params: Params) -> OptState: ...


class TransformUpdateFn(Protocol):
    def __call__(
        self, updates: Updates, state: OptState, params: Params | None = None, **extra_args: Any
    ) -> tuple[Updates, OptState]: ...


class GradientTransformation(NamedTuple):
    """A pair of pure functions ``(init, update)``; see the module docstring.

    Example:
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> tx = fa.adam(learning_rate=0.1)
        >>> params = {"w": jnp.array([1.0, -2.0])}
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": jnp.array([0.5, -0.5])}, state, params)
        >>> fa.apply_updates(params, updates)["w"].round(4)
        Array([ 0.9, -1.9], dtype=float32)
    """

    init: TransformInitFn
    update: TransformUpdateFn


class EmptyState(NamedTuple):
    """The state of a transformation that keeps none (same as ``optax.EmptyState``)."""


def identity() -> GradientTransformation:
    """The transformation that returns its updates unchanged.

    Example:
        >>> import functional_adam as fa
        >>> fa.identity().update({"x": 1.0}, fa.EmptyState())[0]
        {'x': 1.0}
    """

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        return updates, state

    return GradientTransformation(init, update)


def _accepts_extra_args(update_fn: Callable) -> bool:
    """True when ``update_fn`` takes ``**kwargs`` (so extra arguments may be forwarded)."""
    try:
        parameters = inspect.signature(update_fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def chain(*transformations: GradientTransformation) -> GradientTransformation:
    """Applies transformations one after another; the state is a tuple of their states.

    Extra keyword arguments given to ``update`` (e.g. ``value=loss``) are forwarded
    to every transformation whose ``update`` accepts ``**kwargs``; the others
    (for example plain ``optax.GradientTransformation`` objects) do not see them.
    Optax transformations can be chained here, and the chain can be given to
    ``optax.chain``.

    Args:
        *transformations: ``GradientTransformation`` objects of this library or of Optax.

    Returns:
        A ``GradientTransformation`` whose state is the tuple of the inner states.

    Example:
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> tx = fa.chain(fa.scale_by_adam(), fa.scale_by_learning_rate(1e-3))
        >>> state = tx.init({"x": jnp.array(5.0)})
        >>> updates, state = tx.update({"x": jnp.array(10.0)}, state)
        >>> round(float(updates["x"]), 6)
        -0.001
    """
    for i, tx in enumerate(transformations):
        if not (hasattr(tx, "init") and hasattr(tx, "update")):
            raise TypeError(
                f"chain: argument {i} is {type(tx).__name__}, not a gradient transformation "
                "(an object with `init` and `update`)."
            )
    forwards = tuple(_accepts_extra_args(tx.update) for tx in transformations)

    def init(params: Params) -> tuple:
        return tuple(tx.init(params) for tx in transformations)

    def update(updates, state, params=None, **extra_args):
        if len(state) != len(transformations):
            raise ValueError(
                f"chain: the state holds {len(state)} inner states but the chain has "
                f"{len(transformations)} transformations; was it made by this chain's init?"
            )
        new_state = []
        for tx, inner_state, forward in zip(transformations, state, forwards, strict=True):
            kwargs = extra_args if forward else {}
            updates, inner_state = tx.update(updates, inner_state, params, **kwargs)
            new_state.append(inner_state)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


def apply_updates(params: Params, updates: Updates) -> Params:
    """Returns ``params + updates``, leaf by leaf, in each parameter's dtype.

    ``None`` parameters stay ``None``. Like :func:`optax.apply_updates`.

    Example:
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> p = {"a": jnp.ones(2, jnp.bfloat16), "b": None}
        >>> fa.apply_updates(p, {"a": jnp.full(2, 0.5), "b": None})
        {'a': Array([1.5, 1.5], dtype=bfloat16), 'b': None}
    """
    return jax.tree.map(
        lambda p, u: None if p is None else jnp.asarray(p + u).astype(jnp.asarray(p).dtype),
        params,
        updates,
        is_leaf=lambda x: x is None,
    )
