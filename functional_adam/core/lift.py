r"""The lift: a per-leaf optimizer step made into a pytree ``GradientTransformation``.

An optimizer of this package is written as the math of one array, the way
``jax.example_libraries.optimizers``' ``@optimizer`` writes it:

* its **moments**, each a :class:`Moment` named like the field of its state
  (Optax's names: ``mu``, ``nu``, ``nu_max``, ...);
* its **per-step scalars**, ``scalars(count) -> pytree`` computed once per step
  from the incremented step count (bias corrections, a schedule's value);
* its **step**, ``step(g, moments, scalars) -> (u, moments)`` on one leaf.

:func:`lift` does everything else, once for all optimizers: the state
``NamedTuple`` (``count`` first, then one tree per moment), ``None`` leaves,
the checks of structure, shape and dtype with the leaf path in the message, the
saturating int32 step count, and the storage of the moments: plain arrays of
the dtypes asked for (:class:`PlainStorage`), or any other layer with the same
two methods, such as 8-bit blocks
(:class:`functional_adam.storage.blockwise.BlockStorage`).

The step runs in the compute dtype (float32 for 16-bit parameters); the lift
casts its results back to the storage dtype of each moment and ``u`` to the
gradient's dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from functional_adam.core import checks
from functional_adam.core.base import GradientTransformation, Params, Updates
from functional_adam.core.numerics import cast, moment_dtype, safe_increment, store, zero_count


class Moment(NamedTuple):
    """One per-leaf moment of an optimizer.

    Attributes:
        name: the state field that holds its tree (Optax's name where Optax has one).
        squared: whether it holds non-negative second-moment values (``|g|²``): it is
            real for complex parameters, and 8-bit storage encodes its square root.
        dtype: the storage dtype asked for, or ``None`` for the default policy of
            :func:`functional_adam.core.numerics.moment_dtype`.
        initial: the value every element starts from (Yogi's ``initial_accumulator_value``).
    """

    name: str
    squared: bool = False
    dtype: Any = None
    initial: float = 0.0


LeafStep = Callable[[jax.Array, tuple, Any], tuple[jax.Array, tuple]]


class LeafOptimizer(NamedTuple):
    """An optimizer written for one array; :func:`lift` maps it over pytrees.

    Attributes:
        state_type: a ``NamedTuple`` class with fields ``count`` and then one per moment,
            in the order of ``moments``.
        moments: the moments, each a :class:`Moment`.
        scalars: ``count -> pytree`` of this step's scalars (``count`` is 1 at the first step).
        step: ``(g, moments, scalars) -> (u, moments)`` for one leaf; elementwise in ``g``
            and the moments for every storage layer, since 8-bit storage runs it on slices.
    """

    state_type: type
    moments: tuple[Moment, ...]
    scalars: Callable[[jax.Array], Any]
    step: LeafStep


class Storage(Protocol):
    """How the moments of a leaf are kept: their zeros, and one step through them."""

    def init(self, param: Any, moment: Moment, layout: Any = None) -> Any:
        """The stored zeros of ``moment`` for ``param`` (an array or ``ShapeDtypeStruct``).

        ``layout``: the parameter's hint from :func:`layout_hints` (a ``Sharding``, or
        shard counts), passed only when one is given.
        """

    def step(self, step: LeafStep, g: jax.Array, stored: tuple, scalars: Any) -> tuple:
        """``(u, stored moments)`` after one ``step`` of the leaf with gradient ``g``."""

    def is_leaf(self, x: Any) -> bool:
        """Whether ``x`` is one stored moment of one parameter (for tree traversals)."""


class PlainStorage(NamedTuple):
    """Moments as arrays of the dtypes the :class:`Moment` asks for (the default layer)."""

    def init(self, param: Any, moment: Moment, layout: Any = None) -> jax.Array:
        del layout  # plain moments take the parameter's shape, whatever its sharding
        dtype = moment_dtype(param.dtype, moment.dtype, squared=moment.squared)
        return jnp.full_like(param, moment.initial, dtype=dtype)

    def step(self, step: LeafStep, g: jax.Array, stored: tuple, scalars: Any) -> tuple:
        u, moments = step(g, stored, scalars)
        return cast(u, g.dtype), tuple(map(store, moments, stored))

    def is_leaf(self, x: Any) -> bool:
        del x
        return False  # every array is one leaf's moment


class LeafError(ValueError):
    """Bad input found by a storage layer for one leaf; :func:`lift` adds the leaf's path."""


_LAYOUT_HINTS: contextvars.ContextVar[Any] = contextvars.ContextVar("layout_hints", default=None)


@contextlib.contextmanager
def layout_hints(hints: Any) -> Iterator[None]:
    """Inside the ``with``, ``init`` of lifted optimizers sees each parameter's layout hint.

    ``hints`` is a tree with the parameters' structure whose leaves are ``Sharding`` s,
    tuples of shard counts per dimension, or ``None``. A storage layer that lays out its
    state per shard (8-bit blocks, :mod:`functional_adam.storage.shard_blocks`) reads
    it where the parameter alone does not say how it is split: an abstract parameter, or
    a tracer under ``jax.jit`` with Auto mesh axes. An ``init`` whose parameters have
    another structure (inside :func:`~functional_adam.flatten`, ``optax.masked``) ignores
    the hints. :func:`~functional_adam.state_shardings` and
    :func:`~functional_adam.init_sharded` set them from the parameters' shardings.

    Example:
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> tx = fa.adam_8bit(1e-3, min_8bit_size=16)
        >>> with fa.layout_hints({"w": (1, 2)}):  # as if "w" were split in two along its columns
        ...     state = tx.init({"w": jnp.zeros((4, 8))})
        >>> state[0].mu["w"].codes.shape  # (1, 2) shards, 1 block of 256 each
        (1, 2, 1, 256)
    """
    token = _LAYOUT_HINTS.set(hints)
    try:
        yield
    finally:
        _LAYOUT_HINTS.reset(token)


def _hints_for(treedef: Any) -> list[Any] | None:
    """The active hints cut at the parameters' leaves, or ``None`` (none, or another structure)."""
    hints = _LAYOUT_HINTS.get()
    if hints is None:
        return None
    try:
        return treedef.flatten_up_to(hints)
    except (ValueError, TypeError):
        return None


def _init_leaf(storage: Storage, param: Any, moment: Moment, hint: Any) -> Any:
    if hint is None:
        return storage.init(param, moment)
    return storage.init(param, moment, layout=hint)


def _moment_trees(state: Any, moments: Sequence[Moment]) -> list[Any]:
    return [getattr(state, m.name) for m in moments]


PLAIN = PlainStorage()


def _step_leaf(storage: Storage, step: LeafStep, path: Any, g, stored: tuple, scalars) -> tuple:
    try:
        return storage.step(step, g, stored, scalars)
    except LeafError as e:
        raise LeafError(f"updates{jax.tree_util.keystr(path)}: {e}") from None


def lift(optimizer: LeafOptimizer, storage: Storage = PLAIN) -> GradientTransformation:
    """The ``GradientTransformation`` that runs ``optimizer.step`` on every leaf.

    Args:
        optimizer: the per-leaf optimizer (see :class:`LeafOptimizer`).
        storage: how its moments are stored (:class:`PlainStorage` by default).

    Returns:
        A ``GradientTransformation`` with state ``optimizer.state_type(count, *moments)``.

    Example (plain momentum, ``u = m = b·m + g``, in a few lines):
        >>> import jax.numpy as jnp
        >>> from typing import NamedTuple
        >>> class MomentumState(NamedTuple):
        ...     count: jnp.ndarray
        ...     trace: dict
        >>> momentum = LeafOptimizer(
        ...     MomentumState, (Moment("trace"),), scalars=lambda count: None,
        ...     step=lambda g, moments, s: (0.9 * moments[0] + g, (0.9 * moments[0] + g,)))
        >>> tx = lift(momentum)
        >>> state = tx.init({"w": jnp.zeros(2)})
        >>> u, state = tx.update({"w": jnp.ones(2)}, state)
        >>> u, state = tx.update({"w": jnp.ones(2)}, state)
        >>> u["w"], int(state.count)
        (Array([1.9, 1.9], dtype=float32), 2)
    """
    names = [m.name for m in optimizer.moments]
    if list(optimizer.state_type._fields) != ["count", *names]:
        raise TypeError(
            f"lift: {optimizer.state_type.__name__} has fields {optimizer.state_type._fields}; "
            f"expected ('count', {', '.join(map(repr, names))})."
        )

    def init(params: Params):
        checks.check_float_leaves(params, "params")
        leaves, treedef = jax.tree.flatten(params)
        hints = _hints_for(treedef) or [None] * len(leaves)
        trees = [
            treedef.unflatten(
                [_init_leaf(storage, p, moment, h) for p, h in zip(leaves, hints, strict=True)]
            )
            for moment in optimizer.moments
        ]
        return optimizer.state_type(zero_count(), *trees)

    def update(updates: Updates, state, params: Params | None = None, **extra_args: Any):
        del extra_args
        trees = _moment_trees(state, optimizer.moments)
        skeleton = jax.tree.map(lambda _: 0, trees[0], is_leaf=storage.is_leaf)
        checks.check_same_structure(updates, skeleton)
        checks.check_float_leaves(updates, "updates")
        checks.check_shapes(updates, params if params is not None else trees[0])
        count_inc = safe_increment(state.count)
        scalars = optimizer.scalars(count_inc)
        g_entries, treedef = jax.tree_util.tree_flatten_with_path(updates)
        stored = [treedef.flatten_up_to(tree) for tree in trees]
        results = [
            _step_leaf(storage, optimizer.step, path, g, tuple(leaf), scalars)
            for (path, g), *leaf in zip(g_entries, *stored, strict=True)
        ]
        new_updates = treedef.unflatten([u for u, _ in results])
        new_trees = [treedef.unflatten([r[1][i] for r in results]) for i in range(len(trees))]
        return new_updates, optimizer.state_type(count_inc, *new_trees)

    return GradientTransformation(init, update)
