"""``FlatParams``: parameters that live in one contiguous buffer per dtype (and group).

Opt-in, for models with many leaves. ``FlatParams.of(params)`` copies the leaves
into one 1-D buffer per dtype and keeps the tree structure on the side, as
static pytree metadata. It is a pytree whose leaves are the buffers, so every
optimizer works on it unchanged, and its moments are flat too: with
:func:`functional_adam.update_and_apply` the whole Adam step is one pass over
one buffer, so the step's speed and compile time do not depend on the number of
leaves (BENCHMARKS.md). The model reads its parameters through
:meth:`FlatParams.tree`, and ``jax.grad`` with respect to a ``FlatParams``
returns a ``FlatParams`` of gradients::

    flat = fa.FlatParams.of(params)
    state = tx.init(flat)
    grads = jax.grad(lambda f: loss(f.tree(), batch))(flat)
    flat, state = fa.update_and_apply(tx, grads, state, flat)

Groups split a dtype's buffer by a label, so that a transformation can treat
groups differently, for example weight decay on matrices only::

    flat = fa.FlatParams.of(params, groups=lambda path, leaf: "decay" if leaf.ndim > 1 else "")
    tx = fa.adamw(1e-3, mask=lambda f: f.group_mask("decay"))

Cost: the model's forward pass slices the buffer into leaves, and on XLA:CPU
cutting one buffer into thousands of slices compiles slowly (BENCHMARKS.md,
"Update step"); with tens of leaves the slices cost little (not measured on a
GPU).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from functional_adam.core.layout import (
    Layout,
    LeafSpec,
    check_same_device,
    fingerprint_difference,
    layout_fingerprint,
)
from functional_adam.storage import flax_serialization
from functional_adam.storage.flat import FlatState

Grouping = Callable[[tuple, jax.Array], str]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FlatParams:
    """One 1-D buffer per ``"group/dtype"`` key; ``layout`` and ``treedef`` say where each leaf is.

    Example:
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> flat = fa.FlatParams.of({"w": jnp.ones((2, 2)), "b": jnp.zeros(2), "frozen": None})
        >>> flat.buffers
        {'float32': Array([0., 0., 1., 1., 1., 1.], dtype=float32)}
        >>> flat.tree()["w"]
        Array([[1., 1.],
               [1., 1.]], dtype=float32)
    """

    buffers: dict[str, jax.Array]
    layout: tuple[LeafSpec, ...] = dataclasses.field(metadata={"static": True})
    treedef: Any = dataclasses.field(metadata={"static": True})

    @classmethod
    def of(cls, params: Any, groups: Grouping | None = None) -> FlatParams:
        """Copies ``params``'s leaves into one buffer per dtype, or per (group, dtype).

        Args:
            params: a pytree of arrays (``None`` leaves are kept as ``None``).
            groups: ``(path, leaf) -> label``; leaves with the same label and dtype share
                a buffer (key ``"label/dtype"``, or ``"dtype"`` for the label ``""``).

        Raises:
            TypeError: for a leaf that is not an array, or a label that is not a string.
            ValueError: for a sharded leaf (see :func:`refuse_sharded`), or leaves of one
                buffer placed on different devices.
        """
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        chunks: dict[str, list[jax.Array]] = {}
        offsets: dict[str, int] = {}
        specs, entries = [], []
        for path, leaf in flat:
            if not hasattr(leaf, "dtype") or not hasattr(leaf, "shape"):
                raise TypeError(
                    f"FlatParams.of: params{jax.tree_util.keystr(path)} is "
                    f"{type(leaf).__name__}, not an array."
                )
            label = groups(path, leaf) if groups is not None else ""
            if not isinstance(label, str):
                raise TypeError(
                    f"FlatParams.of: groups returned {label!r} for "
                    f"params{jax.tree_util.keystr(path)}; labels must be strings."
                )
            refuse_sharded(path, leaf)
            dtype = jnp.dtype(leaf.dtype).name
            key = f"{label}/{dtype}" if label else dtype
            specs.append(
                LeafSpec(jax.tree_util.keystr(path), tuple(leaf.shape), key, offsets.get(key, 0))
            )
            offsets[key] = offsets.get(key, 0) + math.prod(leaf.shape)
            chunks.setdefault(key, []).append(leaf)
            entries.append((jax.tree_util.keystr(path), key, leaf))
        check_same_device(entries, "FlatParams.of")
        buffers = {
            key: jnp.concatenate([jnp.ravel(jnp.asarray(x)) for x in parts])
            for key, parts in chunks.items()
        }
        return cls(buffers, Layout(specs), treedef)

    def tree(self) -> Any:
        """The parameters as the original pytree (slices of the buffers, reshaped)."""
        leaves = []
        for spec in self.layout:
            end = spec.offset + math.prod(spec.shape)
            piece = jax.lax.slice(self.buffers[spec.buffer], (spec.offset,), (end,))
            leaves.append(piece.reshape(spec.shape))
        return self.treedef.unflatten(leaves)

    def fingerprint(self) -> jax.Array:
        """One uint32 per leaf (hash of path, shape, buffer): save it next to the buffers.

        A ``FlatParams`` has no array leaf of its own besides its buffers (each
        leaf is a parameter to the optimizer and to ``jax.grad``), so a
        checkpoint holds only the buffers, and restoring them into a
        ``FlatParams`` of another layout with the same buffer sizes would
        succeed silently. Save ``{"params": flat, "layout": flat.fingerprint()}``
        and after restoring call :func:`check_layout` ``(params, layout)``.
        """
        return layout_fingerprint(self.layout)

    def group_mask(self, *labels: str) -> FlatParams:
        """A mask for this structure: ``True`` for the buffers of the given group labels.

        For ``mask=`` arguments, e.g. ``adamw(..., mask=lambda f: f.group_mask("decay"))``.
        """
        known = {key.rpartition("/")[0] for key in self.buffers}
        unknown = set(labels) - known
        if unknown:
            raise ValueError(
                f"FlatParams.group_mask: no group {sorted(unknown)}; the groups are {sorted(known)}."
            )
        mask = {key: key.rpartition("/")[0] in labels for key in self.buffers}
        return dataclasses.replace(self, buffers=mask)


def _sharding_of(leaf: Any) -> Any:
    """A leaf's sharding if it splits the leaf across devices, else ``None``."""
    if isinstance(leaf, jax.core.Tracer):  # only Explicit mesh axes show in a traced type
        sharding = getattr(jax.typeof(leaf), "sharding", None)
        spec = getattr(sharding, "spec", ())
        return sharding if any(axes is not None for axes in spec) else None
    sharding = getattr(leaf, "sharding", None) if isinstance(leaf, jax.Array) else None
    return None if sharding is None or sharding.is_fully_replicated else sharding


def refuse_sharded(path: tuple, leaf: Any) -> None:
    """Raises a ``ValueError`` for a leaf sharded across devices, naming it and what to use.

    A flat buffer holds its leaves one after another, so a leaf's shards are runs of
    the buffer that do not fall where the buffer's own shards do, for every leaf but
    the first: flattening sharded leaves moves elements between devices when the
    buffer is made, and again in every :meth:`FlatParams.tree`.
    """
    sharding = _sharding_of(leaf)
    if sharding is None:
        return
    spec = getattr(sharding, "spec", sharding)
    raise ValueError(
        f"FlatParams.of: params{jax.tree_util.keystr(path)} is sharded ({spec} on "
        f"{getattr(sharding, 'mesh', 'its devices')}). A flat buffer concatenates its leaves, "
        "so their shards would not stay on their devices. Keep sharded parameters as a tree "
        "and place the optimizer state like them (fa.init_sharded(tx, params), "
        "fa.state_shardings); or flatten replicated leaves (or leaves on one device) and "
        "shard the buffers themselves: jax.device_put(flat, NamedSharding(mesh, P('data')))."
    )


def _to_state_dict(serialization, flat: FlatParams) -> dict:
    return {
        "buffers": serialization.to_state_dict(flat.buffers),
        "fingerprint": np.asarray(flat.fingerprint()),
    }


def _from_state_dict(serialization, target: FlatParams, data: dict) -> FlatParams:
    _raise_if_different(target.layout, data["fingerprint"], "flax.serialization")
    buffers = serialization.from_state_dict(target.buffers, data["buffers"])
    return dataclasses.replace(target, buffers=buffers)


flax_serialization.register(FlatParams, _to_state_dict, _from_state_dict)


def _raise_if_different(layout: tuple[LeafSpec, ...], saved: Any, who: str) -> None:
    difference = fingerprint_difference(layout, saved)
    if difference is not None:
        raise ValueError(
            f"{who}: the flat buffers were saved for another layout: {difference}. Restore "
            "them into FlatParams (or a state) made for the tree they were saved with."
        )


def check_layout(tree: Any, fingerprint: Any = None) -> None:
    """Checks that restored flat buffers are cut as they were when they were saved.

    Each :class:`~functional_adam.FlatState` in ``tree`` (the state of
    ``flat=True`` optimizers) is checked against the fingerprint it carries;
    each :class:`FlatParams` (parameters, or moments over them) against
    ``fingerprint``, the :meth:`FlatParams.fingerprint` saved next to it. Call
    it after restoring a checkpoint: a checkpoint holds arrays only, and
    buffers of the same sizes restore into another layout without complaint.
    (An update outside ``jax.jit`` checks its FlatState by itself.)

    Args:
        tree: a restored pytree (parameters, optimizer state, or both).
        fingerprint: the saved :meth:`FlatParams.fingerprint`; needed if ``tree``
            holds a ``FlatParams``.

    Raises:
        ValueError: naming the first leaf whose path, shape or dtype differ, or when
            ``tree`` holds a ``FlatParams`` and no ``fingerprint`` is given.

    Example:
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> saved = fa.FlatParams.of({"a": jnp.ones(2), "b": jnp.ones(3)}).fingerprint()
        >>> fa.check_layout(fa.FlatParams.of({"a": jnp.ones(3), "b": jnp.ones(2)}), saved)
        Traceback (most recent call last):
        ...
        ValueError: check_layout: the flat buffers were saved for another layout: leaf ['a'] (float32[3]) is not the leaf saved in its place (its path, shape or dtype differ). Restore them into FlatParams (or a state) made for the tree they were saved with.
    """
    nodes = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, FlatState | FlatParams))
    for node in nodes:
        if isinstance(node, FlatState):
            node.check("check_layout")
        elif isinstance(node, FlatParams):
            if fingerprint is None:
                raise ValueError(
                    "check_layout: a FlatParams carries no fingerprint of its own; pass the "
                    "one saved next to it: check_layout(tree, saved_flat_params.fingerprint())."
                )
            _raise_if_different(node.layout, fingerprint, "check_layout")
