"""Checks with messages that name the leaf and both shardings."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding, Sharding


def _placement(sharding: Sharding) -> Any:
    """What must be equal for two leaves to live together: the mesh, or the device set."""
    if isinstance(sharding, NamedSharding):
        return sharding.mesh
    return frozenset(sharding.device_set)


def check_same_placement(entries: list[tuple[str, Sharding]]) -> None:
    """All parameters on one mesh (or one device): else ``ValueError`` naming two of them.

    Example:
        >>> import jax
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> a = NamedSharding(jax.make_mesh((1,), ("data",)), P())
        >>> b = NamedSharding(jax.make_mesh((1,), ("model",)), P())
        >>> check_same_placement([("params['w']", a), ("params['b']", b)])
        Traceback (most recent call last):
        ...
        ValueError: params['b'] has sharding NamedSharding(...'model'...) but params['w'] has NamedSharding(...'data'...): the parameters must all be on one mesh.
    """
    if not entries:
        return
    first_path, first = entries[0]
    for path, sharding in entries[1:]:
        same_kind = isinstance(sharding, NamedSharding) == isinstance(first, NamedSharding)
        if not same_kind or _placement(sharding) != _placement(first):
            raise ValueError(
                f"{path} has sharding {sharding} but {first_path} has {first}: "
                "the parameters must all be on one mesh."
            )


def check_axis(axis: str, sharding: Sharding | None, argument: str) -> None:
    """``axis`` must be a name of the parameters' mesh.

    Example:
        >>> import jax
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> check_axis("dp", NamedSharding(jax.make_mesh((1,), ("data",)), P()), "zero1_axis")
        Traceback (most recent call last):
        ...
        ValueError: zero1_axis='dp' is not an axis of the parameters' mesh, whose axes are ('data',).
    """
    if not isinstance(sharding, NamedSharding):
        raise ValueError(
            f"{argument}={axis!r} needs parameters placed with NamedSharding on a mesh, "
            f"got {sharding}."
        )
    names = tuple(sharding.mesh.axis_names)
    if axis not in names:
        raise ValueError(
            f"{argument}={axis!r} is not an axis of the parameters' mesh, whose axes are {names}."
        )


def _mesh_words(actual: Sharding, expected: Sharding) -> str:
    if isinstance(actual, NamedSharding) and isinstance(expected, NamedSharding):
        if actual.mesh != expected.mesh:
            return (
                f" (a state laid out for another mesh: {dict(actual.mesh.shape)} on devices "
                f"{actual.mesh.device_ids.ravel().tolist()}, the parameters are on "
                f"{dict(expected.mesh.shape)} on {expected.mesh.device_ids.ravel().tolist()})"
            )
    return ""


def first_mismatch(state: Any, expected: Any) -> str | None:
    """The first leaf of ``state`` not placed as ``expected`` says, in words; ``None`` if all are.

    ``expected`` is a tree of shardings shaped like ``state`` (``None`` accepts anything).
    """
    actual_structure = jax.tree.structure(state)
    expected_structure = jax.tree.structure(expected, is_leaf=lambda x: isinstance(x, Sharding))
    if actual_structure != expected_structure:
        return (
            "the state does not have the structure of tx.init(params): "
            f"{actual_structure} vs {expected_structure}"
        )
    entries = jax.tree_util.tree_flatten_with_path(state)[0]
    wanted = jax.tree.leaves(expected, is_leaf=lambda x: isinstance(x, Sharding))
    for (path, leaf), sharding in zip(entries, wanted, strict=True):
        if sharding is None:
            continue
        actual = getattr(leaf, "sharding", None)
        where = f"state{jax.tree_util.keystr(path)}"
        if actual is None:
            return f"{where} has no sharding (a {type(leaf).__name__}); expected {sharding}"
        if not actual.is_equivalent_to(sharding, len(leaf.shape)):
            return f"{where} has sharding {actual} where {sharding} was expected" + _mesh_words(
                actual, sharding
            )
    return None


def first_shape_mismatch(state: Any, abstract: Any) -> str | None:
    """The first leaf of ``state`` whose shape differs from ``abstract``'s, in words.

    8-bit codes laid out for other shards than the parameters' have other shapes
    (:mod:`functional_adam.storage.shard_blocks`): the message says so.
    """
    if jax.tree.structure(state) != jax.tree.structure(abstract):
        return None  # first_mismatch reports the structure
    entries = jax.tree_util.tree_flatten_with_path(state)[0]
    for (path, leaf), want in zip(entries, jax.tree.leaves(abstract), strict=True):
        shape, expected = tuple(getattr(leaf, "shape", ())), tuple(want.shape)
        if shape != expected:
            where = f"state{jax.tree_util.keystr(path)}"
            words = ""
            if where.endswith((".codes", ".scale")):
                words = (
                    " (8-bit blocks laid out per shard: the state was built for parameters "
                    "split otherwise)"
                )
            actual = getattr(leaf, "sharding", None)
            return (
                f"{where} has shape {shape} and sharding {actual} where shape {expected} and "
                f"sharding {want.sharding} were expected{words}"
            )
    return None
