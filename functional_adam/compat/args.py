"""Argument checks of the :mod:`functional_adam.compat` constructors.

Other frameworks' names in the messages (``lr``, ``betas[1]``, ``epsilon``),
and one ``TypeError`` that names every unexpected option at once.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

from functional_adam.core import checks
from functional_adam.core.base import GradientTransformation

_HINTS = {
    "global_clipnorm": "chain optax.clip_by_global_norm(...) before it",
    "clipvalue": "chain optax.clip(...) before it",
    "gradient_accumulation_steps": "wrap it in optax.MultiSteps(...)",
    "params": "give the parameters to init(params), not to the constructor",
}


def reject_unknown_options(constructor: Callable[..., GradientTransformation]):
    """Wraps ``constructor`` so that all unexpected keyword arguments are named in one ``TypeError``.

    The wrapper keeps the explicit signature (``inspect.signature`` follows
    ``__wrapped__``), which ``optax.inject_hyperparams`` reads.
    """
    known = set(inspect.signature(constructor).parameters)

    @functools.wraps(constructor)
    def wrapper(*args: Any, **kwargs: Any) -> GradientTransformation:
        reject_unknown(constructor.__name__, [k for k in kwargs if k not in known])
        return constructor(*args, **kwargs)

    return wrapper


def reject_unknown(fn_name: str, unknown: list[str]) -> None:
    """Raises ``TypeError`` naming every unexpected keyword argument (with a hint where one helps).

    Example:
        >>> reject_unknown("keras_adam", ["use_ema", "clipvalue"])
        Traceback (most recent call last):
        ...
        TypeError: keras_adam() got unexpected keyword argument(s) 'clipvalue', 'use_ema' (for 'clipvalue', chain optax.clip(...) before it). See help(functional_adam.compat) for the supported options.
    """
    if not unknown:
        return
    names = ", ".join(repr(k) for k in sorted(unknown))
    hints = "; ".join(f"for {k!r}, {_HINTS[k]}" for k in sorted(unknown) if k in _HINTS)
    raise TypeError(
        f"{fn_name}() got unexpected keyword argument(s) {names}"
        + (f" ({hints})" if hints else "")
        + ". See help(functional_adam.compat) for the supported options."
    )


def check_bool(name: str, value: Any) -> bool:
    """Returns ``value`` as a bool, raising ``TypeError`` unless it is one (no truthy ints).

    Example:
        >>> check_bool("maximize", 1)
        Traceback (most recent call last):
        ...
        TypeError: maximize must be a bool (True or False), got 1
    """
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}")
    return bool(value)


def check_pair(name: str, value: Any) -> tuple[Any, Any]:
    """Returns ``(beta1, beta2)``: a tuple or list of two values, each in [0, 1).

    Example:
        >>> check_pair("betas", (0.9, 0.999, 0.5))
        Traceback (most recent call last):
        ...
        ValueError: betas must be a pair (beta1, beta2), got 3 values: (0.9, 0.999, 0.5)
    """
    if not isinstance(value, tuple | list):
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {value!r}")
    if len(value) != 2:
        raise ValueError(
            f"{name} must be a pair (beta1, beta2), got {len(value)} values: {value!r}"
        )
    for i, beta in enumerate(value):
        checks.check_hyperparameter(f"{name}[{i}]", beta, high=1.0)
    return value[0], value[1]


def is_zero(value: Any) -> bool:
    """True for a concrete 0 (so the decay can be left out); traced values count as non-zero."""
    concrete = checks.concrete_values(value)
    return concrete is not None and concrete.size == 1 and float(concrete) == 0.0


def check_common(lr_name: str, lr: Any, eps_name: str, eps: Any, weight_decay: Any) -> None:
    """Checks the learning rate (or schedule), epsilon and weight decay (or ``None``) are >= 0.

    Example:
        >>> check_common("lr", 1e-3, "eps", -1.0, None)
        Traceback (most recent call last):
        ...
        ValueError: eps must be in [0.0, inf), got -1.0
    """
    checks.check_hyperparameter(lr_name, lr, allow_schedule=True)
    checks.check_hyperparameter(eps_name, eps)
    if weight_decay is not None:
        checks.check_hyperparameter("weight_decay", weight_decay)
