"""``update_and_apply``: ``update`` then ``apply_updates``, as one kernel pass where one applies.

A transformation that can compute the new parameters itself, in one pass (a
compiled kernel), is a :class:`Fusable`: a ``GradientTransformation`` whose
``update`` is the ordinary one and which carries a ``fused`` function. Inside
:func:`update_and_apply` its ``update`` runs ``fused`` instead, records the new
parameters it produced, and returns ``new_params - params`` as its updates.
When those very updates reach the end of ``tx.update`` untouched, that is, every
transformation after the fusable one passed them through (``chain``,
``optax.inject_hyperparams``, ``optax.chain``), :func:`update_and_apply` returns
the recorded parameters; a transformation before it (such as
``optax.clip_by_global_norm``) only changes the gradients it is given. Where a
later transformation changed the updates, or the parameters handed to the
fusable one were not the caller's (``with_master_weights``), the updates are
applied as usual, and under ``jax.jit`` the unused results cost nothing.

A fusable may also carry a kernel for its plain ``update`` (``fused_updates``, which
returns the updates themselves, as ``GradientTransformation.update`` does): the
8-bit Adam aliases do, so that ``tx.update`` + ``optax.apply_updates`` (Flax's
``TrainState.apply_gradients``, an ``optax.chain``) runs their kernel too. Inside
:func:`reference_path` neither kernel is taken: every step is the transformation's
own ``jax.numpy`` path, the reference the kernels are tested against.

JAX pairs each donated input with an output of the same shape and dtype *in
order*, so donate the arguments in the order of the outputs, ``(params,
opt_state)``: with ``step(grads, opt_state, params)`` the buffer of ``m`` is
handed to the new ``params`` and XLA needs a temporary copy of the state.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax

from functional_adam.core.base import (
    GradientTransformation,
    OptState,
    Params,
    Updates,
    apply_updates,
)

FusedStep = Callable[..., "tuple[Params, OptState] | None"]
"""``(grads, state, params) -> (new_params, new_state)``, or ``None`` where it does not apply.
(``fused_updates``: ``(updates, new_state)`` of the same form.)"""


class _Record(NamedTuple):
    params: list  # the leaves of the params given to the fused step
    updates: list  # the leaves of the updates it returned
    new_params: Any


class _Applying(threading.local):
    records: list[_Record] | None = None
    reference: bool = False


_APPLYING = _Applying()


@contextlib.contextmanager
def reference_path() -> Iterator[None]:
    """While active, fusable transformations step by their own ``jax.numpy`` path, no kernel.

    It acts where a step is *traced*: enter it inside the function that ``jax.jit`` traces
    (around ``tx.update``), or create and first call the jitted function inside it, since
    ``jax.jit`` reuses a trace made outside. For comparing a kernel with the reference
    path, or for results that do not depend on which kernel this machine built.

    Example:
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> tx, p = fa.adam_8bit(0.1, min_8bit_size=0), jnp.ones(4)
        >>> with fa.reference_path():
        ...     u, _ = tx.update(jnp.ones(4), tx.init(p), p)
        >>> [round(float(x), 3) for x in u]
        [-0.1, -0.1, -0.1, -0.1]
    """
    outer, _APPLYING.reference = _APPLYING.reference, True
    try:
        yield
    finally:
        _APPLYING.reference = outer


@contextlib.contextmanager
def _recording() -> Iterator[list[_Record]]:
    outer, _APPLYING.records = _APPLYING.records, []
    try:
        yield _APPLYING.records
    finally:
        _APPLYING.records = outer


def _fused_result(records: list[_Record], params: Params, updates: Updates) -> Any:
    """The recorded new params whose updates are ``updates`` and whose params are ``params``."""
    p_leaves, u_leaves = jax.tree.leaves(params), jax.tree.leaves(updates)
    for record in records:
        same_params = len(record.params) == len(p_leaves) and all(
            a is b for a, b in zip(record.params, p_leaves, strict=True)
        )
        same_updates = len(record.updates) == len(u_leaves) and all(
            a is b for a, b in zip(record.updates, u_leaves, strict=True)
        )
        if same_params and same_updates:
            return record.new_params
    return None


class Fusable(GradientTransformation):
    """A ``GradientTransformation`` that can also compute the new parameters in one pass.

    ``init`` and ``update`` are the transformation's own (the reference path);
    ``fused(grads, state, params)`` returns ``(new_params, new_state)`` with the
    same state, or ``None`` where it does not apply (another backend, dtypes it
    does not take, ...). Use it anywhere a ``GradientTransformation`` goes; only
    :func:`update_and_apply` calls ``fused``.
    """

    __slots__ = ()


def fusable(
    tx: GradientTransformation, fused: FusedStep, fused_updates: FusedStep | None = None
) -> GradientTransformation:
    """``tx`` whose ``update`` takes the one-pass ``fused`` step inside :func:`update_and_apply`.

    Outside :func:`update_and_apply` (a plain ``tx.update``) it is ``tx``, or, where
    given and applicable, ``fused_updates`` (a kernel that returns the updates and the
    new state). Inside :func:`reference_path`, ``tx`` always. The result is a
    ``GradientTransformation`` (and a :class:`Fusable`), so it goes into ``chain``,
    ``optax.chain`` or ``optax.inject_hyperparams`` like ``tx``.
    """

    def update(updates: Updates, state: OptState, params: Params | None = None, **extra_args):
        records = _APPLYING.records
        result = None
        if _APPLYING.reference or params is None:
            pass
        elif records is not None:
            result = fused(updates, state, params, **extra_args)
        elif fused_updates is not None:
            found = fused_updates(updates, state, params, **extra_args)
            if found is not None:
                return found
        if result is None:
            return tx.update(updates, state, params, **extra_args)
        new_params, new_state = result
        delta = jax.tree.map(lambda new, old: new - old, new_params, params)
        records.append(_Record(jax.tree.leaves(params), jax.tree.leaves(delta), new_params))
        return delta, new_state

    update.__doc__ = tx.update.__doc__
    return Fusable(tx.init, update)


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
    For ``adam``/``adamw``/``nadam``/``nadamw`` with float32 or float64 leaves
    on the CPU, the whole step is one pass of a compiled kernel over all leaves
    (:mod:`functional_adam.kernels.fused_adam`; with several devices, each runs it
    on its shards), and for ``adam_8bit`` and ``adamw_8bit`` with float32 leaves
    (:mod:`functional_adam.kernels.fused_adam8`), also when the optimizer
    sits in a ``chain`` (after, say, ``optax.clip_by_global_norm``) or in
    ``optax.inject_hyperparams``. Donate ``params`` and ``state``
    (``jax.jit(..., donate_argnums=...)``) so the new values are written in
    place, with no second copy of either.

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
    with _recording() as records:
        updates, state = tx.update(grads, state, params, **extra_args)
    new_params = _fused_result(records, params, updates)
    if new_params is not None:
        return new_params, state
    return apply_updates(params, updates), state
