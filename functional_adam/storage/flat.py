"""``flatten``: the moments of any elementwise transformation in one buffer per dtype.

An Adam step is memory-bound: in float32 it must read θ, g, m, v and write
θ, m, v, 28 bytes per parameter. Under ``jax.jit`` XLA fuses the per-leaf
arithmetic of :func:`functional_adam.adam_leaf` with ``apply_updates`` into a
few loops per leaf, but each loop is launched once per leaf: with thousands of
small leaves, launches and compile time grow with the number of leaves.

:func:`flatten` keeps the moments in one contiguous 1-D buffer per dtype, with
the tree's layout on the side (static, checked at every update, and as a
fingerprint array in the state for checkpoints), so the Adam arithmetic is one
set of loops however many leaves the model has. To keep the parameters in
flat buffers too, see :class:`functional_adam.FlatParams`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from functional_adam.core import checks
from functional_adam.core.base import (
    GradientTransformation,
    OptState,
    Params,
    Updates,
)
from functional_adam.core.layout import (
    LeafSpec,
    check_same_device,
    fingerprint_difference,
    layout_difference,
    layout_fingerprint,
    tree_layout,
)
from functional_adam.storage import flax_serialization


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FlatState:
    """State of :func:`flatten`: the inner state over ``{dtype: 1-D buffer}``, and the layout.

    ``layout`` is static pytree metadata (it is part of the tree structure seen
    by ``jax.jit``, not an array), so the state checkpoints and shards like any
    pytree of arrays. A checkpoint saves only arrays, so ``fingerprint``
    (:func:`layout_fingerprint`: one uint32 per leaf) travels with the buffers:
    restored into a state of another layout, even one whose buffers have the
    same sizes, it no longer matches, and :func:`functional_adam.check_layout`
    (or an update outside ``jax.jit``) raises ``ValueError`` naming the first
    leaf that differs.
    """

    inner_state: OptState
    layout: tuple[LeafSpec, ...] = dataclasses.field(metadata={"static": True})
    fingerprint: jax.Array

    @classmethod
    def of(cls, inner_state: OptState, layout: tuple[LeafSpec, ...]) -> FlatState:
        """The state for ``layout``, with its fingerprint."""
        return cls(inner_state, layout, layout_fingerprint(layout))

    def check(self, who: str = "flatten") -> None:
        """Raises ``ValueError`` if the fingerprint is not the layout's (concrete arrays only)."""
        if isinstance(self.fingerprint, jax.core.Tracer | jax.ShapeDtypeStruct):
            return
        difference = fingerprint_difference(self.layout, self.fingerprint)
        if difference is not None:
            raise ValueError(
                f"{who}: the flat state was saved for another layout: {difference}. Restore it "
                "into a state initialised for the tree it was saved with."
            )


def _to_state_dict(serialization, state: FlatState) -> dict:
    return {
        "inner_state": serialization.to_state_dict(state.inner_state),
        "fingerprint": np.asarray(state.fingerprint),
    }


def _from_state_dict(serialization, target: FlatState, data: dict) -> FlatState:
    restored = FlatState(
        serialization.from_state_dict(target.inner_state, data["inner_state"]),
        target.layout,
        data["fingerprint"],
    )
    restored.check("flax.serialization")
    return restored


flax_serialization.register(FlatState, _to_state_dict, _from_state_dict)


def _check_layout(expected: tuple[LeafSpec, ...], actual: tuple[LeafSpec, ...], what: str) -> None:
    difference = layout_difference(expected, actual)
    if difference is not None:
        raise ValueError(
            f"flatten: the {what} changed since init: {difference}. "
            "A flat state is tied to the tree it was made for; call init again."
        )


def flatten_tree(tree: Any) -> dict[str, jax.Array]:
    """``{dtype name: 1-D concatenation of the leaves of that dtype}`` (``None`` leaves skipped).

    ``jax.ShapeDtypeStruct`` leaves give ``ShapeDtypeStruct`` buffers.

    Example:
        >>> import jax.numpy as jnp
        >>> flatten_tree({"a": jnp.ones((2, 2)), "b": None, "c": jnp.zeros(1)})
        {'float32': Array([1., 1., 1., 1., 0.], dtype=float32)}
    """
    groups: dict[str, list[Any]] = {}
    for leaf in jax.tree.leaves(tree):
        groups.setdefault(jnp.dtype(leaf.dtype).name, []).append(leaf)
    flat = {}
    for dtype, leaves in groups.items():
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
            flat[dtype] = jax.ShapeDtypeStruct((sum(x.size for x in leaves),), jnp.dtype(dtype))
        else:
            flat[dtype] = jnp.concatenate([jnp.ravel(x) for x in leaves])
    return flat


def unflatten_tree(flat: dict[str, jax.Array], like: Any) -> Any:
    """The inverse of :func:`flatten_tree`: slices of ``flat`` shaped as the leaves of ``like``.

    Example:
        >>> import jax.numpy as jnp
        >>> like = {"a": jnp.ones((2, 2)), "b": None, "c": jnp.zeros(1)}
        >>> unflatten_tree(flatten_tree(like), like)["a"]
        Array([[1., 1.],
               [1., 1.]], dtype=float32)
    """
    leaves, treedef = jax.tree.flatten(like)
    out = []
    for spec, leaf in zip(tree_layout(like), leaves, strict=True):
        size = int(jnp.size(leaf))
        out.append(flat[spec.buffer][spec.offset : spec.offset + size].reshape(spec.shape))
    return treedef.unflatten(out)


def flatten(inner: GradientTransformation) -> GradientTransformation:
    """Runs an elementwise transformation on one contiguous buffer per dtype.

    The updates (and params) are concatenated per dtype, ``inner`` sees
    ``{dtype name: 1-D array}``, and its updates are cut back into the tree.
    The state holds ``inner``'s state over the buffers and the static layout
    of the tree; an update whose tree differs from the one given to ``init``
    raises ``ValueError`` naming the first differing leaf. ``None`` leaves are
    skipped. Results equal ``inner`` applied leaf by leaf (bitwise, for
    elementwise transformations such as :func:`~functional_adam.scale_by_adam`).
    Masks belong outside (``chain(flatten(scale_by_adam()),
    add_decayed_weights(wd, mask), ...)``), where the tree is the user's.

    On XLA:CPU cutting the flat update back into thousands of leaves compiles
    slowly (BENCHMARKS.md, "Update step"), so there it only pays for many tiny
    leaves. To make the parameters flat as
    well, and the step one pass, see :class:`functional_adam.FlatParams`.

    Args:
        inner: an elementwise transformation (Adam's direction, scaling, ...).

    Returns:
        A ``GradientTransformation`` with state :class:`FlatState`.

    Example:
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> tx = fa.flatten(fa.scale_by_adam())
        >>> params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
        >>> state = tx.init(params)
        >>> state.inner_state.mu["float32"].shape
        (9,)
        >>> updates, state = tx.update({"w": jnp.ones((2, 3)), "b": -jnp.ones(3)}, state)
        >>> updates["b"].round(3)
        Array([-1., -1., -1.], dtype=float32)
    """

    def init(params: Params) -> FlatState:
        checks.check_float_leaves(params, "params")
        entries = jax.tree_util.tree_flatten_with_path(params)[0]
        check_same_device(
            [(jax.tree_util.keystr(p), jnp.dtype(x.dtype).name, x) for p, x in entries], "flatten"
        )
        return FlatState.of(inner.init(flatten_tree(params)), tree_layout(params))

    def update(updates: Updates, state: FlatState, params: Params | None = None, **extra_args):
        state.check()
        _check_layout(state.layout, tree_layout(updates), "updates")
        flat_params = None
        if params is not None:
            _check_layout(state.layout, tree_layout(params), "params")
            flat_params = flatten_tree(params)
        # The barriers keep XLA from fusing a many-operand concatenate (or the slices) into
        # the Adam loops, which would test every element against every leaf boundary.
        flat_updates, inner_state = inner.update(
            jax.lax.optimization_barrier(flatten_tree(updates)),
            state.inner_state,
            flat_params,
            **extra_args,
        )
        flat_updates = jax.lax.optimization_barrier(flat_updates)
        return unflatten_tree(flat_updates, updates), dataclasses.replace(
            state, inner_state=inner_state
        )

    return GradientTransformation(init, update)
