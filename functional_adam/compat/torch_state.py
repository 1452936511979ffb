r"""Convert Adam states between ``torch.optim.Adam``/``AdamW``/``Adamax``/``NAdam``/``RAdam``
and functional_adam.

A run can stop in PyTorch and go on here with :func:`~functional_adam.compat.torch_adam`
(or ``torch_adamw``, ``torch_adamax``, ``torch_nadam``, ``torch_radam``), and back, on
the same trajectory.

**Order.** PyTorch numbers its parameters 0, 1, ... in the order of its
``param_groups`` (for one group: the order of ``model.parameters()``).
Parameter ``i`` is the ``i``-th leaf of ``jax.tree.leaves(params)``. JAX sorts
dict keys, so build ``params`` as a list (or with keys that sort in PyTorch's
order) and keep torch's shapes (a ``Linear`` weight is ``(out, in)``).

**Fields.** ``exp_avg ↔ mu``, ``exp_avg_sq ↔ nu``, ``max_exp_avg_sq ↔ nu_max``
(the maximum over the raw second moment: the PyTorch convention), Adamax's
``exp_inf ↔ nu`` (its infinity norm), NAdam's ``mu_product ↔ mu_product`` (one
scalar here, one equal scalar per parameter there), and ``step ↔ count``. PyTorch keeps a step per parameter; here there is one count,
so the steps must agree. Complex parameters are refused: PyTorch's complex
Adam keeps separate second moments for the real and imaginary parts, and so
are 8-bit (block-quantized) and flat moments, which hold no float array per
parameter.

**Keys.** The state's keys are matched to the ids of ``param_groups`` as
strings too, so a state that went through JSON (keys ``"0"``, ``"1"``, ...)
reads as before; a key that matches no id is refused, never dropped.

**Step.** PyTorch stores ``step`` as a float tensor: float32 (float64 when
torch's default dtype is float64; always float32 for ``fused`` or
``capturable`` groups), and :func:`to_torch_state` writes it the same way.
A float32 step is exact up to ``2**24``; above, a count is written rounded to
float32 (PyTorch's own float32 step stops growing at ``2**24``), and a step of
``2**31 - 1`` or more reads back as the saturated count ``2**31 - 1`` (a
saturated count is written as ``2**31``). At such counts ``1 - b^t`` is 1 in
float32 for the usual betas, so the trajectory does not change.

The module does not import torch until :func:`to_torch_state` is called;
:func:`from_torch_state` reads anything ``numpy.asarray`` can (tensors too).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from functional_adam.compat.pytorch_family import scale_by_torch_nadam
from functional_adam.core.base import GradientTransformation, OptState, Params
from functional_adam.optimizers.adam import scale_by_adam, scale_by_amsgrad
from functional_adam.optimizers.adam_8bit import ScaleByAdam8bitState
from functional_adam.optimizers.adamax import scale_by_adamax
from functional_adam.storage.flat import FlatState

_ADAM_FIELDS = (
    ("count", "mu", "nu"),
    ("count", "mu", "nu", "nu_max"),
    ("count", "mu_product", "mu", "nu"),  # PyTorch's NAdam
)
_SCALARS = ("count", "mu_product")  # one value for the tree; the other fields hold one per leaf
_TORCH_KEYS = {"mu": "exp_avg", "nu": "exp_avg_sq", "nu_max": "max_exp_avg_sq"}
_ADAMAX_KEYS = _TORCH_KEYS | {"nu": "exp_inf"}
# Keys of the torch param_groups of Adam/AdamW, RAdam and NAdam; Adamax's have none of them.
_NOT_ADAMAX = ("amsgrad", "decoupled_weight_decay", "momentum_decay")


def _moment_fields(state: Any) -> tuple[str, ...]:
    return tuple(f for f in state._fields if f not in _SCALARS)


def _is_adamax_groups(param_groups: Sequence[Mapping]) -> bool:
    """Whether ``param_groups`` are ``torch.optim.Adamax``'s (as its ``state_dict()`` gives them)."""
    return all("betas" in g and not any(k in g for k in _NOT_ADAMAX) for g in param_groups)


def _is_adam_state(x: Any) -> bool:
    return isinstance(x, tuple) and getattr(x, "_fields", None) in _ADAM_FIELDS


def _is_counter_state(x: Any) -> bool:
    return isinstance(x, tuple) and getattr(x, "_fields", None) == ("count",)


def _find_adam_state(state: OptState) -> Any:
    """The one ``(count, mu, nu[, nu_max])`` NamedTuple inside ``state`` (or ``state`` itself).

    Raises:
        ValueError: when there is not exactly one, or when its moments are not one
            float array per parameter (8-bit or flat moments).
    """
    found = [x for x in jax.tree.leaves(state, is_leaf=_is_adam_state) if _is_adam_state(x)]
    if len(found) != 1:
        raise ValueError(
            "expected exactly one Adam state (a NamedTuple with fields count, mu, nu[, nu_max], "
            f"or count, mu_product, mu, nu) in the optimizer state, found {len(found)}."
        )
    flat = [x for x in jax.tree.leaves(state, is_leaf=_is_flat) if _is_flat(x)]
    for what, refused in [("8-bit", isinstance(found[0], ScaleByAdam8bitState)), ("flat", flat)]:
        if refused:
            raise ValueError(
                f"{what} moments cannot be mapped to PyTorch's exp_avg/exp_avg_sq, which are one "
                "float tensor per parameter: convert to or from the state of compat.torch_adam "
                "or compat.torch_adamw (or fa.adam without flat=True)."
            )
    return found[0]


def _is_flat(x: Any) -> bool:
    return isinstance(x, FlatState)


def _named_leaves(params: Params) -> list[tuple[str, Any]]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    named = [(f"params{jax.tree_util.keystr(path)}", leaf) for path, leaf in flat]
    for name, leaf in named:
        if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
            raise ValueError(
                f"{name} is complex: PyTorch's complex Adam keeps separate second moments for "
                "the real and imaginary parts, which this state cannot hold."
            )
    return named


def _torch_ids(param_groups: Any, n_leaves: int) -> list[Any]:
    """The torch parameter ids in order, checked against the number of leaves."""
    if not isinstance(param_groups, Sequence) or not all(
        isinstance(g, Mapping) and "params" in g for g in param_groups
    ):
        raise ValueError(
            "param_groups must be a list of dicts with a 'params' key, as in "
            "optimizer.state_dict()['param_groups']."
        )
    ids = [i for group in param_groups for i in group["params"]]
    if len(ids) != n_leaves:
        raise ValueError(
            f"the torch optimizer has {len(ids)} parameters (in {len(param_groups)} param "
            f"groups) but params has {n_leaves} leaves; parameter i must be the i-th leaf of "
            "jax.tree.leaves(params)."
        )
    return ids


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; numpy has no bfloat16, so widen it
        value = value.detach().cpu()
        if not value.dtype.is_complex:
            value = value.float() if value.dtype.itemsize < 4 else value
    # A copy: PyTorch steps its tensors in place, and an array that shares their memory
    # (numpy's view, which JAX can keep without copying) would change under the state.
    return np.asarray(value).copy()


def _read_entry(entry: Mapping, key: str, i: int, name: str, shape: tuple) -> np.ndarray:
    if key not in entry:
        raise ValueError(
            f"the torch state of parameter {i} ({name}) has no {key!r} (it has "
            f"{sorted(entry)}); was the optimizer an Adam/AdamW with these options?"
        )
    array = _to_numpy(entry[key])
    if array.shape != tuple(shape):
        raise ValueError(
            f"{key} of torch parameter {i} has shape {array.shape} but {name} has shape "
            f"{tuple(shape)}; parameter i must be the i-th leaf of jax.tree.leaves(params)."
        )
    return array


def _torch_amsgrad(groups: Sequence[Mapping], entries: list[Mapping | None]) -> bool:
    flags = {bool(g["amsgrad"]) for g in groups if "amsgrad" in g}
    if len(flags) > 1:
        raise ValueError("the torch param_groups disagree on amsgrad; convert them separately.")
    if flags:
        return flags.pop()
    return any(e is not None and "max_exp_avg_sq" in e for e in entries)


def _entries(torch_state: Any, ids: list[Any]) -> list[Mapping | None]:
    """The state entry of each id (``None`` if not stepped); keys match ids as strings too."""
    if not isinstance(torch_state, Mapping):
        raise TypeError(
            "optimizer_state_dict['state'] must be a dict {parameter id: {'step', 'exp_avg', "
            f"...}} as optimizer.state_dict() gives it, got {type(torch_state).__name__}."
        )
    by_name = {}
    for key in torch_state:
        if str(key) in by_name:
            raise ValueError(f"the torch state has both {by_name[str(key)]!r} and {key!r} as keys.")
        by_name[str(key)] = key
    unmatched = set(by_name) - {str(i) for i in ids}
    if unmatched:
        keys = sorted((by_name[k] for k in unmatched), key=str)
        raise ValueError(
            f"the torch state has entries for {keys} that are not parameter ids of "
            f"param_groups ({ids}); was the state_dict edited or taken from another optimizer?"
        )
    return [torch_state[by_name[str(i)]] or None if str(i) in by_name else None for i in ids]


def _common_step(entries: list[Mapping | None], named: list[tuple[str, Any]]) -> int:
    steps = {}
    for i, ((name, _), entry) in enumerate(zip(named, entries, strict=True)):
        if entry is None or "step" not in entry:
            raise ValueError(
                f"the torch state of parameter {i} ({name}) has no 'step' while other "
                "parameters have one: every parameter must have been stepped equally often."
            )
        step = float(_to_numpy(entry["step"]))
        if not math.isfinite(step) or step < 0 or step != int(step):
            raise ValueError(
                f"torch step {step} of parameter {i} ({name}) is not a count (a whole number >= 0)."
            )
        steps[name] = step
    if len(set(steps.values())) > 1:
        raise ValueError(
            f"the torch parameters were stepped unequally often ({steps}); functional_adam "
            "keeps one step count for the tree."
        )
    return int(min(next(iter(steps.values())), 2**31 - 1))  # the int32 count saturates


def _default_direction(amsgrad: bool, adamax: bool, nadam: bool) -> GradientTransformation:
    """The direction whose state holds what the torch state holds (no ``tx`` given)."""
    if nadam:
        return scale_by_torch_nadam()
    if adamax:
        return scale_by_adamax()
    return scale_by_amsgrad() if amsgrad else scale_by_adam()


def _check_kind(template: Any, amsgrad: bool, nadam: bool) -> None:
    """A ``ValueError`` when ``tx``'s state cannot hold the torch state (amsgrad, NAdam)."""
    has_max, has_product = "nu_max" in template._fields, "mu_product" in template._fields
    if has_max != amsgrad:
        raise ValueError(
            f"the torch optimizer has amsgrad={amsgrad} but tx's state "
            f"{'has' if has_max else 'has no'} nu_max: build tx with amsgrad={amsgrad}."
        )
    if has_product != nadam:
        raise ValueError(
            f"the torch state {'has' if nadam else 'has no'} mu_product (NAdam's) but tx's state "
            f"{'has' if has_product else 'has no'}: convert a torch.optim.NAdam state with "
            "compat.torch_nadam, and other states with the matching compat optimizer."
        )


def _common_mu_product(entries: list[Mapping | None], named, dtype) -> jax.Array:
    """NAdam's ``mu_product``: one value for the tree, so every parameter's must be equal."""
    values = {
        name: float(_to_numpy(_read_entry(e, "mu_product", i, name, ())))
        for i, ((name, _), e) in enumerate(zip(named, entries, strict=True))
    }
    if len(set(values.values())) > 1:
        raise ValueError(
            f"the torch parameters have different mu_product values ({values}); "
            "functional_adam keeps one for the tree."
        )
    return jnp.asarray(next(iter(values.values())), dtype)


def from_torch_state(
    optimizer_state_dict: Mapping[str, Any],
    params: Params,
    tx: GradientTransformation | None = None,
) -> OptState:
    r"""Reads a torch Adam/AdamW/Adamax/NAdam/RAdam ``state_dict()`` into a functional_adam state.

    Parameter ``i`` of PyTorch is the ``i``-th leaf of ``jax.tree.leaves(params)``
    (see the module docstring); ``exp_avg, exp_avg_sq, max_exp_avg_sq, step``
    become ``mu, nu, nu_max, count``.

    Args:
        optimizer_state_dict: ``optimizer.state_dict()`` of a torch Adam, AdamW,
            Adamax (``exp_inf`` becomes ``nu``), NAdam (with ``mu_product``) or RAdam
            (tensors or anything ``numpy.asarray`` reads).
        params: the parameters (arrays or ``jax.ShapeDtypeStruct``), in PyTorch's order.
        tx: the transformation to continue with, e.g. ``compat.torch_adam(...)``
            (``compat.torch_adamax``, ``torch_nadam``, ``torch_radam`` for the others).
            If given, returns ``tx.init(params)`` with its Adam state replaced and
            every other step counter (learning-rate or weight-decay schedule) set
            to the torch step; if ``None``, returns the Adam state alone
            (:class:`ScaleByAdamState`, :class:`ScaleByAmsgradState` for amsgrad,
            ``ScaleByTorchNAdamState`` for NAdam).

    Returns:
        The state, moments in the dtypes ``tx.init`` (or the params) give them.

    Raises:
        ValueError: naming the parameter (index and path) whose shape, keys or step
            do not match, the state keys that match no parameter id, or when the
            numbers of parameters differ, or ``tx`` has 8-bit or flat moments.
        TypeError: when ``optimizer_state_dict["state"]`` is not a dict.

    Example:
        >>> import numpy as np, jax.numpy as jnp
        >>> saved = {"state": {0: {"step": 3.0, "exp_avg": np.ones(2), "exp_avg_sq": np.ones(2)}},
        ...          "param_groups": [{"params": [0], "amsgrad": False}]}
        >>> state = from_torch_state(saved, [jnp.zeros(2)])
        >>> int(state.count), state.mu
        (3, [Array([1., 1.], dtype=float32)])
    """
    if not isinstance(optimizer_state_dict, Mapping) or not {"state", "param_groups"} <= set(
        optimizer_state_dict
    ):
        raise ValueError(
            "optimizer_state_dict must be a torch optimizer's state_dict(): a dict with "
            "'state' and 'param_groups'."
        )
    named = _named_leaves(params)
    groups = optimizer_state_dict["param_groups"]
    ids = _torch_ids(groups, len(named))
    entries = _entries(optimizer_state_dict["state"], ids)
    amsgrad = _torch_amsgrad(groups, entries)
    has = lambda key: any(e is not None and key in e for e in entries)  # noqa: E731
    adamax, nadam = has("exp_inf") or _is_adamax_groups(groups), has("mu_product")
    full = (tx or _default_direction(amsgrad, adamax, nadam)).init(params)
    template = _find_adam_state(full)
    _check_kind(template, amsgrad, nadam)
    if all(e is None for e in entries):
        return full if tx is not None else template
    step = _common_step(entries, named)
    treedef = jax.tree.structure(params)
    keys = _ADAMAX_KEYS if adamax else _TORCH_KEYS
    fields = {}
    for field in _moment_fields(template):
        likes = treedef.flatten_up_to(getattr(template, field))
        arrays = [
            jnp.asarray(_read_entry(e, keys[field], i, name, leaf.shape), like.dtype)
            for i, ((name, leaf), e, like) in enumerate(zip(named, entries, likes, strict=True))
        ]
        fields[field] = treedef.unflatten(arrays)
    if nadam:
        fields["mu_product"] = _common_mu_product(entries, named, template.mu_product.dtype)
    count = jnp.asarray(step, template.count.dtype)
    adam_state = type(template)(count=count, **fields)
    if tx is None:
        return adam_state

    def replace(x):
        if _is_adam_state(x):
            return adam_state
        if _is_counter_state(x):
            return type(x)(count=jnp.asarray(step, x.count.dtype))
        return x

    return jax.tree.map(replace, full, is_leaf=lambda x: _is_adam_state(x) or _is_counter_state(x))


def _to_tensor(array: jax.Array) -> Any:
    import torch  # only here: torch is not a dependency of the core

    array = np.asarray(array)
    if array.dtype == jnp.bfloat16:  # numpy cannot hand bfloat16 to torch
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(array.copy())


def to_torch_state(
    state: OptState, params: Params, param_groups: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    r"""Writes a functional_adam Adam state as a torch Adam/AdamW/Adamax/NAdam/RAdam ``state_dict``.

    The inverse of :func:`from_torch_state`: ``mu, nu, nu_max, count`` become
    ``exp_avg, exp_avg_sq, max_exp_avg_sq, step`` of torch parameter ``i`` = the
    ``i``-th leaf of ``jax.tree.leaves(params)``. Load the result with
    ``optimizer.load_state_dict(...)``.

    Args:
        state: the state of ``compat.torch_adam``/``torch_adamw`` (or the
            :class:`ScaleByAdamState`/:class:`ScaleByAmsgradState` inside it).
        params: the parameters, in PyTorch's order.
        param_groups: ``optimizer.state_dict()["param_groups"]`` of the torch
            optimizer that will load the result; copied into it, since
            ``load_state_dict`` takes the hyperparameters from there. Groups of a
            ``torch.optim.Adamax`` (no ``amsgrad``, ``decoupled_weight_decay`` or
            ``momentum_decay`` key) get ``exp_inf`` for ``nu``.

    Returns:
        ``{"state": {i: {"step", "exp_avg", "exp_avg_sq"[, "max_exp_avg_sq"]}},
        "param_groups": ...}`` with torch tensors (``"state"`` is empty at count 0).

    Raises:
        ValueError: naming the leaf whose shape differs, or when the state and
            ``param_groups`` disagree on the number of parameters or on amsgrad.

    Example:
        >>> import jax.numpy as jnp
        >>> from functional_adam import compat
        >>> params = [jnp.zeros(2)]
        >>> tx = compat.torch_adam(lr=0.1)
        >>> _, state = tx.update([jnp.ones(2)], tx.init(params), params)
        >>> saved = to_torch_state(state, params, [{"params": [0], "amsgrad": False}])
        >>> saved["state"][0]["step"], saved["state"][0]["exp_avg"]
        (tensor(1.), tensor([0.1000, 0.1000]))
    """
    adam_state = _find_adam_state(state)
    named = _named_leaves(params)
    ids = _torch_ids(param_groups, len(named))
    amsgrad = "nu_max" in adam_state._fields
    keys = _ADAMAX_KEYS if _is_adamax_groups(param_groups) else _TORCH_KEYS
    flags = {bool(g["amsgrad"]) for g in param_groups if "amsgrad" in g}
    if flags and flags != {amsgrad}:
        raise ValueError(
            f"the state {'has' if amsgrad else 'has no'} nu_max but the torch param_groups say "
            f"amsgrad={flags.pop()}."
        )
    treedef = jax.tree.structure(params)
    leaves = {}
    for field in _moment_fields(adam_state):
        try:
            leaves[field] = treedef.flatten_up_to(getattr(adam_state, field))
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"state.{field} does not have the structure of params: {err}"
            ) from None
        for (name, leaf), moment in zip(named, leaves[field], strict=True):
            if tuple(moment.shape) != tuple(leaf.shape):
                raise ValueError(
                    f"state.{field} at {name} has shape {tuple(moment.shape)} but the parameter "
                    f"has shape {tuple(leaf.shape)}."
                )
    import torch

    step = int(adam_state.count)
    groups = {i: g for g in param_groups for i in g["params"]}
    torch_state = {}
    if step > 0:
        for j, i in enumerate(ids):
            fused = groups[i].get("fused") or groups[i].get("capturable")
            wide = torch.get_default_dtype() == torch.float64 and not fused
            dtype = torch.float64 if wide else torch.float32  # as torch.optim.Adam writes it
            entry = {"step": torch.tensor(float(step), dtype=dtype)}
            if "mu_product" in adam_state._fields:
                entry["mu_product"] = torch.tensor(float(adam_state.mu_product), dtype=dtype)
            for field in _moment_fields(adam_state):
                entry[keys[field]] = _to_tensor(leaves[field][j])
            torch_state[i] = entry
    return {"state": torch_state, "param_groups": copy.deepcopy(list(param_groups))}
