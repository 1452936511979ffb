"""Input checks that turn bad input into clear errors at construction or trace time.

Each check names the argument, the leaf path or the dtype at fault. Checks of
hyperparameters run on concrete values only: a traced value (inside ``jax.jit``,
``optax.inject_hyperparams`` under jit, ``jax.vmap``) is not checked, since its
value is not known when the check runs.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from functional_adam.core.layout import layout_difference

_NOT_CONCRETE = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerBoolConversionError,
)


def static_int(value: Any) -> Any:
    """``value`` as a Python int where it is a concrete integer, else ``value`` unchanged.

    Concrete integers are Python and numpy integers and 0-d integer arrays (numpy or
    JAX), the form in which ``optax.inject_hyperparams`` passes a size such as
    ``block_size``; bools, floats, tracers and anything else are returned as they are,
    for the caller's check to accept or name.

    Example:
        >>> import jax.numpy as jnp
        >>> static_int(jnp.asarray(256)), static_int(np.int64(8)), static_int(2.0)
        (256, 8, 2.0)
    """
    if isinstance(value, bool | np.bool_ | jax.core.Tracer):
        return value
    if isinstance(value, np.integer):
        return int(value)
    is_array = isinstance(value, np.ndarray | jax.Array)
    if is_array and value.ndim == 0 and jnp.issubdtype(value.dtype, jnp.integer):
        return int(value)
    return value


def concrete_values(value: Any) -> np.ndarray | None:
    """The value as a float64 numpy array, or ``None`` if it is traced."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return np.asarray(value, dtype=np.float64)
    except _NOT_CONCRETE:
        return None
    except (TypeError, ValueError) as err:
        raise TypeError(f"expected a number or an array of numbers, got {value!r}") from err


def check_hyperparameter(
    name: str,
    value: Any,
    *,
    low: float = 0.0,
    high: float = math.inf,
    high_inclusive: bool = False,
    allow_schedule: bool = False,
) -> None:
    """Raises ``ValueError`` unless every concrete value lies in ``[low, high)`` (or ``[low, high]``).

    Args:
        name: the argument's name, used in the message.
        value: a Python number, an array, a tracer (not checked) or, when
            ``allow_schedule``, a callable schedule (not checked).
        low: the smallest allowed value.
        high: the bound above.
        high_inclusive: whether ``high`` itself is allowed.
        allow_schedule: whether a callable is accepted.

    Example:
        >>> check_hyperparameter("b1", 1.5, high=1.0)
        Traceback (most recent call last):
        ...
        ValueError: b1 must be in [0.0, 1.0), got 1.5
    """
    if callable(value):
        if allow_schedule:
            return
        raise TypeError(f"{name} must be a number or an array, got the callable {value!r}")
    if isinstance(value, bool) or not isinstance(
        value, int | float | np.number | np.ndarray | jax.Array
    ):
        raise TypeError(f"{name} must be a number or an array, got {value!r}")
    try:
        values = concrete_values(value)
    except TypeError as err:
        raise TypeError(f"{name}: {err}") from None
    if values is None:
        return
    closing = "]" if high_inclusive else ")"
    above = values > high if high_inclusive else values >= high
    if np.isnan(values).any() or (values < low).any() or above.any():
        shown = value if np.ndim(values) == 0 else values
        raise ValueError(f"{name} must be in [{low}, {high}{closing}, got {shown}")


def check_decays(**decays: Any) -> None:
    """Each named decay rate (``b1=0.9, b2=...``) must lie in ``[0, 1)``.

    Example:
        >>> check_decays(b1=0.9, b2=1.0)
        Traceback (most recent call last):
        ...
        ValueError: b2 must be in [0.0, 1.0), got 1.0
    """
    for name, value in decays.items():
        check_hyperparameter(name, value, high=1.0)


def check_epsilons(eps: Any, eps_root: Any, names: tuple[str, str] = ("eps", "eps_root")) -> None:
    """``eps`` and ``eps_root`` must be non-negative and not both 0 (0/0 for a zero gradient).

    Example:
        >>> check_epsilons(0.0, 0.0)
        Traceback (most recent call last):
        ...
        ValueError: eps and eps_root are both 0: a zero gradient would give 0/0 = NaN. Set eps > 0 (usual) or eps_root > 0.
    """
    check_hyperparameter(names[0], eps)
    check_hyperparameter(names[1], eps_root)
    values = [concrete_values(x) for x in (eps, eps_root)]
    if all(v is not None and not v.any() for v in values):
        raise ValueError(
            f"{names[0]} and {names[1]} are both 0: a zero gradient would give 0/0 = NaN. "
            f"Set {names[0]} > 0 (usual) or {names[1]} > 0."
        )


def check_moment_dtype(name: str, dtype: Any) -> jnp.dtype | None:
    """Like :func:`check_float_dtype`, also accepting complex dtypes (as Optax's ``mu_dtype``).

    Example:
        >>> check_moment_dtype("mu_dtype", "complex64")
        dtype('complex64')
    """
    if dtype is not None:
        try:
            if jnp.issubdtype(jnp.dtype(dtype), jnp.complexfloating):
                return jnp.dtype(dtype)
        except TypeError:
            pass
    return check_float_dtype(name, dtype)


def check_float_dtype(name: str, dtype: Any) -> jnp.dtype | None:
    """Returns the canonical dtype, raising ``ValueError`` unless it is a float dtype.

    Example:
        >>> check_float_dtype("mu_dtype", "bfloat16")
        dtype(bfloat16)
        >>> check_float_dtype("nu_dtype", "int8")
        Traceback (most recent call last):
        ...
        ValueError: nu_dtype must be a floating-point dtype (float16, bfloat16, float32, float64), got int8
    """
    if dtype is None:
        return None
    try:
        canonical = jnp.dtype(dtype)
    except TypeError as err:
        raise ValueError(f"{name} must be a floating-point dtype, got {dtype!r}") from err
    if not jnp.issubdtype(canonical, jnp.floating):
        raise ValueError(
            f"{name} must be a floating-point dtype (float16, bfloat16, float32, float64), "
            f"got {canonical}"
        )
    return canonical


def check_float_leaves(tree: Any, what: str) -> None:
    """Raises ``TypeError`` naming the first leaf of ``tree`` whose dtype is not float or complex.

    Example:
        >>> import jax.numpy as jnp
        >>> check_float_leaves({"w": jnp.zeros(2), "step": jnp.array(3)}, "params")
        Traceback (most recent call last):
        ...
        TypeError: params['step'] has dtype int32; Adam needs floating-point or complex leaves (keep integer state such as step counters out of the optimized tree, or mask it).
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = jnp.result_type(leaf) if not hasattr(leaf, "dtype") else leaf.dtype
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{what}{jax.tree_util.keystr(path)} has dtype {dtype}; Adam needs floating-point "
                "or complex leaves (keep integer state such as step counters out of the "
                "optimized tree, or mask it)."
            )


def check_shapes(updates: Any, reference: Any, what: str = "parameter") -> None:
    """Raises ``ValueError`` naming the first leaf whose shape differs from ``reference``'s.

    ``reference`` has the structure of ``updates`` (or a different one, then nothing
    is checked: :func:`check_same_structure` reports that); its leaves without a
    ``shape`` (stored blocks, ``None``) are not checked.

    Example:
        >>> import jax.numpy as jnp
        >>> check_shapes({"w": jnp.zeros((3, 1))}, {"w": jnp.zeros(3)})
        Traceback (most recent call last):
        ...
        ValueError: updates['w'] has shape (3, 1) but its parameter has shape (3,); gradients must have the shape of their parameter.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    try:
        references = treedef.flatten_up_to(reference)
    except (ValueError, TypeError):
        return
    for (path, leaf), ref in zip(leaves, references, strict=True):
        shape = getattr(ref, "shape", None)
        if shape is None or isinstance(ref, tuple):  # None, or a stored moment such as 8-bit blocks
            continue
        if tuple(jnp.shape(leaf)) != tuple(shape):
            raise ValueError(
                f"updates{jax.tree_util.keystr(path)} has shape {tuple(jnp.shape(leaf))} but its "
                f"{what} has shape {tuple(shape)}; gradients must have the shape of their {what}."
            )


def _paths(tree: Any) -> list[tuple[str, bool]]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return [(jax.tree_util.keystr(path), leaf is None) for path, leaf in flat]


def check_same_structure(
    updates: Any, reference: Any, what: str = "the optimizer state", name: str = "updates"
) -> None:
    """Raises ``ValueError`` naming the first path where ``updates`` and ``reference`` differ.

    Example:
        >>> check_same_structure({"a": 1.0, "c": 2.0}, {"a": 0.0, "b": 0.0})
        Traceback (most recent call last):
        ...
        ValueError: the updates do not have the structure of the optimizer state: first difference at ['c'] (updates) vs ['b'] (the optimizer state). Were the params' tree structure changed after init?
    """
    if jax.tree.structure(updates) == jax.tree.structure(reference):
        return
    mine, theirs = _paths(updates), _paths(reference)
    detail = None
    for (path_u, none_u), (path_r, none_r) in zip(mine, theirs, strict=False):
        if path_u != path_r:
            detail = f"first difference at {path_u} ({name}) vs {path_r} ({what})"
            break
        if none_u != none_r:
            which = name if none_u else what
            detail = f"at {path_u} the leaf is None in the {which} only"
            break
    if detail is None and len(mine) != len(theirs):
        longer, owner = (mine, name) if len(mine) > len(theirs) else (theirs, what)
        detail = f"{longer[min(len(mine), len(theirs))][0]} is only in {owner}"
    layouts = getattr(updates, "layout", None), getattr(reference, "layout", None)
    if detail is None and None not in layouts:  # FlatParams: the leaves behind the buffers
        detail = layout_difference(layouts[1], layouts[0])
    if detail is None:
        detail = (
            f"same paths but different containers: {jax.tree.structure(updates)} vs "
            f"{jax.tree.structure(reference)}"
        )
    raise ValueError(
        f"the {name} do not have the structure of {what}: {detail}. "
        "Were the params' tree structure changed after init?"
    )


def check_positive(
    name: str, value: Any, *, high: float = math.inf, high_inclusive: bool = False
) -> None:
    """Raises ``ValueError`` unless every concrete value lies in ``(0, high)`` (or ``(0, high]``).

    Example:
        >>> check_positive("eps", 0.0)
        Traceback (most recent call last):
        ...
        ValueError: eps must be > 0, got 0.0
    """
    check_hyperparameter(name, value, high=high, high_inclusive=high_inclusive)
    values = concrete_values(value)
    if values is not None and (values <= 0).any():
        shown = value if np.ndim(values) == 0 else values
        raise ValueError(f"{name} must be > 0, got {shown}")


SCHEDULE_PROBES = (0, 1, 2, 10, 100, 1_000, 10_000, 100_000, 1_000_000)
"""The step counts at which :func:`check_schedule` evaluates a schedule."""


def check_schedule(
    name: str, value: Any, *, low: float = 0.0, high: float = math.inf, high_inclusive: bool = False
) -> None:
    """Like :func:`check_hyperparameter`, and a schedule is checked at :data:`SCHEDULE_PROBES`.

    A schedule that cannot be evaluated outside ``jax.jit`` (or returns a traced
    value) is not checked.

    Example:
        >>> check_schedule("b3", lambda count: 0.9 + count * 1e-3, high=1.0)
        Traceback (most recent call last):
        ...
        ValueError: b3 must be in [0.0, 1.0), got 1.0 at step 100 (a schedule)
    """
    if not callable(value):
        check_hyperparameter(name, value, low=low, high=high, high_inclusive=high_inclusive)
        return
    for count in SCHEDULE_PROBES:
        try:
            out = value(jnp.asarray(count, jnp.int32))
            values = concrete_values(out)
        except Exception:
            return
        if values is None:
            return
        above = values > high if high_inclusive else values >= high
        if np.isnan(values).any() or (values < low).any() or above.any():
            closing = "]" if high_inclusive else ")"
            shown = float(values) if np.ndim(values) == 0 else values
            raise ValueError(
                f"{name} must be in [{low}, {high}{closing}, got {shown} at step {count} "
                "(a schedule)"
            )
