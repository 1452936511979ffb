"""The layout of a pytree in flat buffers: where each leaf lives, and its fingerprint.

A layout is a tuple of :class:`LeafSpec`, one per non-``None`` leaf, static
(hashable) so that it can be pytree metadata; checks compare layouts and name
the first leaf where two differ, and a checkpoint stores a layout's
:func:`layout_fingerprint` as an array.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class LeafSpec(NamedTuple):
    """Where one leaf lives: its buffer's key, and its offset there (static, hashable).

    The key is the leaf's dtype name (``"float32"``), or ``"label/float32"`` for a
    :class:`~functional_adam.FlatParams` group.
    """

    path: str
    shape: tuple[int, ...]
    buffer: str
    offset: int


class Layout(tuple):
    """A tuple of :class:`LeafSpec` that hashes once.

    A layout is static pytree metadata, so ``jax.jit`` hashes and compares it on
    every call to find the compiled step; a plain tuple of 1,000 specs is hashed
    anew each time, this one once.
    """

    def __new__(cls, specs=()):
        layout = super().__new__(cls, specs)
        layout._hash = tuple.__hash__(layout)
        return layout

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other


@functools.lru_cache(maxsize=256)
def _fingerprint(layout: tuple[LeafSpec, ...]) -> np.ndarray:
    hashes = [
        hashlib.blake2b(f"{s.path}|{s.shape}|{s.buffer}".encode(), digest_size=4).digest()
        for s in layout
    ]
    array = np.array([int.from_bytes(h, "little") for h in hashes], np.uint32)
    array.setflags(write=False)
    return array


def layout_fingerprint(layout: tuple[LeafSpec, ...]) -> jax.Array:
    """One uint32 per leaf: a hash of its path, shape and dtype (or buffer key), for checkpoints.

    Example:
        >>> import jax.numpy as jnp
        >>> layout_fingerprint(tree_layout({"a": jnp.ones(2), "b": jnp.ones(3)})).shape
        (2,)
    """
    return jnp.asarray(_fingerprint(layout))


def fingerprint_difference(layout: tuple[LeafSpec, ...], saved: Any) -> str | None:
    """The first leaf of ``layout`` that the ``saved`` fingerprint does not describe, in words.

    ``None`` when ``saved`` is :func:`layout_fingerprint` of ``layout``.
    """
    expected, saved = _fingerprint(layout), np.asarray(saved)
    if saved.shape == expected.shape and np.array_equal(saved, expected):
        return None
    if saved.ndim != 1:
        return f"the saved fingerprint has shape {saved.shape}, not one entry per leaf"
    words = []
    if len(saved) != len(expected):
        words.append(f"the saved fingerprint has {len(saved)} leaves but the layout {len(layout)}")
    for spec, mine, theirs in zip(layout, expected, saved, strict=False):
        if mine != theirs:
            words.append(
                f"leaf {spec.path} ({spec.buffer}{list(spec.shape)}) is not the leaf saved in "
                "its place (its path, shape or dtype differ)"
            )
            break
    return "; ".join(words)


def tree_layout(tree: Any) -> tuple[LeafSpec, ...]:
    """The static layout of ``tree``'s non-None leaves, grouped by dtype in order of appearance."""
    offsets: dict[str, int] = {}
    specs = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = jnp.dtype(leaf.dtype).name
        size = int(jnp.size(leaf)) if not isinstance(leaf, jax.ShapeDtypeStruct) else leaf.size
        specs.append(
            LeafSpec(jax.tree_util.keystr(path), tuple(leaf.shape), dtype, offsets.get(dtype, 0))
        )
        offsets[dtype] = offsets.get(dtype, 0) + size
    return Layout(specs)


def layout_difference(expected: tuple[LeafSpec, ...], actual: tuple[LeafSpec, ...]) -> str | None:
    """The first leaf where two layouts differ, in words; ``None`` if they are equal."""
    if expected == actual:
        return None
    for old, new in zip(expected, actual, strict=False):
        if old != new:
            return (
                f"leaf {new.path} is {new.buffer}{list(new.shape)} where init saw {old.path} "
                f"as {old.buffer}{list(old.shape)}"
            )
    longer, which = (actual, "the new tree") if len(actual) > len(expected) else (expected, "init")
    return f"leaf {longer[min(len(actual), len(expected))].path} is only in {which}"


def check_same_device(entries: list[tuple[str, str, Any]], who: str) -> None:
    """Leaves sharing a buffer must share a placement (checked on concrete arrays only).

    ``entries`` are ``(path, buffer key, leaf)``; ``who`` starts the error message.
    """
    first: dict[str, tuple[str, Any]] = {}
    for path, key, leaf in entries:
        sharding = getattr(leaf, "sharding", None) if isinstance(leaf, jax.Array) else None
        if sharding is None or isinstance(leaf, jax.core.Tracer):
            continue
        name, seen = first.setdefault(key, (path, sharding))
        if seen != sharding:
            raise ValueError(
                f"{who}: {path} is placed on {sharding} but {name} (same buffer) on {seen}; "
                "put the parameters on one device (or one sharding) first, or do not flatten."
            )
