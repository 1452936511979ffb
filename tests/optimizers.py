"""Every optimizer of the package, in one list that feeds the contract tests.

Modelled on ``optax/contrib/_common_test.py``'s ``_MAIN_OPTIMIZERS_UNDER_TEST``:
each :class:`Case` names an optimizer, builds a fresh ``GradientTransformation``
with no argument, and carries the flags the tests need. Adding an optimizer is
one line in :data:`OPTIMIZERS`; every test that draws from it (``tests/test_contract.py``
and the modules that parametrize over :data:`CASES`) then runs on it too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import optax
import pytest

import functional_adam as fa
from functional_adam.compat import (
    keras_adam,
    keras_adamw,
    tf1_adam,
    torch_adam,
    torch_adamax,
    torch_adamw,
    torch_nadam,
    torch_radam,
)

LR = 1e-2
MIN_8BIT_SIZE = 1024
"""Leaves of at least this many elements get 8-bit moments in the 8-bit cases: the
contract tests' tree has one such leaf (quantized) and smaller ones (kept unquantized)."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One optimizer under test.

    Attributes:
        name: the test id.
        make: a zero-argument callable returning a fresh ``GradientTransformation``.
        needs_params: ``update`` raises a ``ValueError`` without ``params``
            (otherwise ``params`` is optional and ignored by the direction).
        quantized: some moments are stored 8-bit (:class:`fa.ScaleByAdam8bitState`).
        supports_complex: complex64 parameters are accepted.
        supports_16bit: bfloat16 and float16 parameters are accepted.
        direction_only: the update is the direction itself, with no learning rate and
            no minus sign (``scale_by_adam``): applying it ascends the loss.
    """

    name: str
    make: Callable[[], fa.GradientTransformation]
    needs_params: bool = False
    quantized: bool = False
    supports_complex: bool = True
    supports_16bit: bool = True
    direction_only: bool = False

    def __repr__(self) -> str:
        return f"Case({self.name})"


# fmt: off
OPTIMIZERS: tuple[Case, ...] = (
    Case("adam", lambda: fa.adam(LR)),
    Case("adamw", lambda: fa.adamw(LR, weight_decay=0.1), needs_params=True),
    Case("amsgrad", lambda: fa.amsgrad(LR)),
    Case("nadam", lambda: fa.nadam(LR)),
    Case("nadamw", lambda: fa.nadamw(LR, weight_decay=0.1), needs_params=True),
    Case("adam_flat", lambda: fa.adam(LR, flat=True)),
    Case("adamw_flat", lambda: fa.adamw(LR, weight_decay=0.1, flat=True), needs_params=True),
    Case("amsgrad_flat", lambda: fa.amsgrad(LR, flat=True)),
    Case("nadam_flat", lambda: fa.nadam(LR, flat=True)),
    Case("nadamw_flat", lambda: fa.nadamw(LR, weight_decay=0.1, flat=True), needs_params=True),
    Case("adam_bf16_moments", lambda: fa.adam(LR, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)),
    Case("adam_8bit", lambda: fa.adam_8bit(LR, min_8bit_size=MIN_8BIT_SIZE), quantized=True),
    Case("adamw_8bit", lambda: fa.adamw_8bit(LR, weight_decay=0.1, min_8bit_size=MIN_8BIT_SIZE),
         needs_params=True, quantized=True),
    Case("master_weights_adam", lambda: fa.with_master_weights(fa.adam(LR)), needs_params=True),
    Case("torch_adam", lambda: torch_adam(lr=LR)),
    Case("torch_adam_amsgrad_l2", lambda: torch_adam(lr=LR, amsgrad=True, weight_decay=0.1),
         needs_params=True),
    Case("torch_adamw", lambda: torch_adamw(lr=LR), needs_params=True),
    Case("keras_adam", lambda: keras_adam(learning_rate=LR)),
    Case("keras_adamw", lambda: keras_adamw(learning_rate=LR), needs_params=True),
    Case("tf1_adam", lambda: tf1_adam(learning_rate=LR)),
    Case("scale_by_adam", lambda: fa.scale_by_adam(), direction_only=True),
    Case("scale_by_amsgrad", lambda: fa.scale_by_amsgrad(), direction_only=True),
    Case("scale_by_adam_8bit", lambda: fa.scale_by_adam_8bit(min_8bit_size=MIN_8BIT_SIZE),
         quantized=True, direction_only=True),
    Case("clip_then_adamw", lambda: fa.chain(optax.clip_by_global_norm(1.0),
                                             fa.adamw(LR, weight_decay=0.1)), needs_params=True),
    Case("adamax", lambda: fa.adamax(LR)),
    Case("adamaxw", lambda: fa.adamaxw(LR, weight_decay=0.1), needs_params=True),
    Case("radam", lambda: fa.radam(LR)),
    Case("radam_nesterov_bf16_moments", lambda: fa.radam(LR, nesterov=True, mu_dtype=jnp.bfloat16)),
    Case("adabelief", lambda: fa.adabelief(LR)),
    Case("yogi", lambda: fa.yogi(LR)),
    Case("lamb", lambda: fa.lamb(LR, weight_decay=0.1), needs_params=True),
    Case("lion", lambda: fa.lion(LR / 10), needs_params=True),
    Case("lion_8bit", lambda: fa.lion_8bit(LR / 10, min_8bit_size=MIN_8BIT_SIZE), needs_params=True,
         quantized=True),
    Case("adan", lambda: fa.adan(LR, weight_decay=0.1), needs_params=True),
    Case("adopt", lambda: fa.adopt(LR)),
    Case("ademamix", lambda: fa.ademamix(LR, weight_decay=0.1), needs_params=True),
    Case("ademamix_8bit", lambda: fa.ademamix_8bit(LR, min_8bit_size=MIN_8BIT_SIZE),
         needs_params=True, quantized=True),
    Case("simplified_ademamix", lambda: fa.simplified_ademamix(LR / 10), needs_params=True),
    Case("schedule_free_adamw", lambda: fa.schedule_free_adamw(LR), needs_params=True),
    Case("cautious_adamw", lambda: fa.chain(fa.cautious(fa.scale_by_adam()), fa.add_decayed_weights(
        0.1), fa.scale_by_learning_rate(LR)), needs_params=True),
    Case("cautious_lion", lambda: fa.chain(fa.cautious(fa.scale_by_lion()),
                                           fa.scale_by_learning_rate(LR / 10))),
    Case("master_weights_lion", lambda: fa.with_master_weights(fa.lion(LR / 10)), needs_params=True),
    Case("scale_by_adan", lambda: fa.scale_by_adan(), direction_only=True),
    Case("torch_adamax", lambda: torch_adamax(lr=LR)),
    Case("torch_radam_decoupled", lambda: torch_radam(lr=LR, weight_decay=0.1,
                                                      decoupled_weight_decay=True), needs_params=True),
    Case("torch_nadam", lambda: torch_nadam(lr=LR), needs_params=True),
    Case("torch_nadam_l2", lambda: torch_nadam(lr=LR, weight_decay=0.1),
         needs_params=True),
)
# fmt: on


def cases(where: Callable[[Case], bool] | None = None) -> list:
    """``pytest.param`` of each case (``where(case)`` true, if given), with its name as id."""
    return [pytest.param(c, id=c.name) for c in OPTIMIZERS if where is None or where(c)]


CASES = cases()
"""``@pytest.mark.parametrize("case", CASES)``: one test per optimizer."""


def by_name(name: str) -> Case:
    """The case called ``name`` (``KeyError`` if there is none)."""
    for case in OPTIMIZERS:
        if case.name == name:
            return case
    raise KeyError(name)
