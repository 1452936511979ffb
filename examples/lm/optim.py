"""The optimizer of a run: a functional_adam optimizer behind Optax's gradient clipping.

    tx = fa.chain(optax.clip_by_global_norm(clip_norm), [fa.with_master_weights](adam...))

with the learning rate ``optax.warmup_cosine_decay_schedule`` (0 -> peak over the warm-up,
cosine down to ``min_lr_ratio · peak`` at the last step). An Optax transformation in a
functional_adam chain: the two libraries' transformations have the same shape.

Weight decay (the AdamW variants) applies to matrices and embeddings only, not to biases
and LayerNorm parameters (GPT-2's recipe); with ``--flat`` the parameters are kept in two
buffers per dtype for that (``FlatParams`` groups ``"decay"`` and ``""``). The optimizers of
``functional_adam.compat`` take their framework's conventions and decay everything.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import functional_adam as fa
from functional_adam import compat

FA_OPTIMIZERS: tuple[str, ...] = (
    "adam",
    "adamw",
    "amsgrad",
    "nadam",
    "nadamw",
    "adam_8bit",
    "adamw_8bit",
)
"""functional_adam's own optimizers offered by ``--optimizer``."""

MOMENTS: tuple[str, ...] = ("float32", "bfloat16", "8bit", "8bit_float")
"""Moment storage: ``8bit`` the dynamic map's codes, ``8bit_float`` float codes
(``code="float"``)."""

EIGHT_BIT = {"adam": ("adam_8bit", False), "adamw": ("adamw_8bit", False)}
EIGHT_BIT |= {"nadam": ("adam_8bit", True), "nadamw": ("adamw_8bit", True)}
EIGHT_BIT |= {"adam_8bit": ("adam_8bit", False), "adamw_8bit": ("adamw_8bit", False)}
"""``--moments 8bit``: the 8-bit optimizer and its ``nesterov`` flag for each name."""


class OptimizerError(ValueError):
    """An optimizer option that cannot be honoured; the message names the flag."""


def compat_optimizers() -> dict[str, Callable[..., fa.GradientTransformation]]:
    """The Adam constructors of ``functional_adam.compat`` (``torch_adamw``, ``keras_adam``...)."""
    return {
        name: getattr(compat, name)
        for name in compat.__all__
        if name.endswith(("adam", "adamw")) and callable(getattr(compat, name))
    }


def optimizer_names() -> list[str]:
    """Every name ``--optimizer`` accepts."""
    return [*FA_OPTIMIZERS, *sorted(compat_optimizers())]


def decay_group(path: tuple, leaf: Any) -> str:
    """The ``FlatParams`` group of a parameter: ``"decay"`` for matrices, ``""`` otherwise."""
    del path
    return "decay" if leaf.ndim >= 2 else ""


def decay_mask(params: Any) -> Any:
    """``True`` where weight decay applies (matrices/embeddings), for plain or flat params."""
    if isinstance(params, fa.FlatParams):
        return params.group_mask("decay")
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def schedule(
    learning_rate: float, steps: int, warmup_steps: int, min_lr_ratio: float
) -> optax.Schedule:
    """Linear warm-up from 0 to ``learning_rate``, then cosine decay to ``min_lr_ratio`` of it."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=max(steps, warmup_steps + 1),
        end_value=learning_rate * min_lr_ratio,
    )


def _fa_optimizer(name: str, moments: str, lr: Any, weight_decay: float):
    if name.endswith("_8bit") and moments == "bfloat16":
        raise OptimizerError(f"--moments bfloat16: --optimizer {name} keeps 8-bit moments")
    if moments.startswith("8bit") or name.endswith("_8bit"):
        if name not in EIGHT_BIT:
            raise OptimizerError(f"--moments {moments}: no 8-bit variant of --optimizer {name}")
        name, nesterov = EIGHT_BIT[name]
        code = "float" if moments == "8bit_float" else "dynamic"
        kwargs: dict[str, Any] = {"nesterov": nesterov, "code": code}
    else:
        dtype = jnp.bfloat16 if moments == "bfloat16" else jnp.float32
        kwargs = {"mu_dtype": dtype, "nu_dtype": dtype}
    if name.startswith(("adamw", "nadamw")):
        kwargs |= {"weight_decay": weight_decay, "mask": decay_mask}
    return getattr(fa, name)(lr, **kwargs)


def _compat_optimizer(name: str, moments: str, lr: Any, weight_decay: float):
    if moments != "float32":
        raise OptimizerError(
            f"--moments {moments} works with {', '.join(FA_OPTIMIZERS)}; --optimizer {name} "
            "keeps its framework's float32 moments"
        )
    constructor = compat_optimizers()[name]
    names = inspect.signature(constructor).parameters
    kwargs = {"lr" if "lr" in names else "learning_rate": lr}
    if name.endswith("adamw"):
        kwargs["weight_decay"] = weight_decay
    return constructor(**kwargs)


def make_optimizer(
    name: str,
    *,
    learning_rate: Any,
    weight_decay: float = 0.1,
    moments: str = "float32",
    master_weights: bool = False,
    clip_norm: float = 1.0,
) -> fa.GradientTransformation:
    """The run's optimizer (see the module docstring).

    Args:
      name: one of :func:`optimizer_names`.
      learning_rate: a float or a schedule ``count -> lr``.
      weight_decay: the decoupled decay of the AdamW variants.
      moments: ``"float32"``, ``"bfloat16"`` (both moments stored in bfloat16), ``"8bit"``
        (block-quantized, :func:`functional_adam.adam_8bit`) or ``"8bit_float"`` (the same
        with ``code="float"``).
      master_weights: wrap in :func:`functional_adam.with_master_weights` (a float32 copy of
        each 16-bit parameter in the state).
      clip_norm: clip gradients to this global norm first (0: no clipping).

    Raises:
      OptimizerError: an unknown name, or moments the optimizer does not offer.
    """
    if moments not in MOMENTS:
        raise OptimizerError(f"--moments must be one of {list(MOMENTS)}, got {moments!r}")
    if name in FA_OPTIMIZERS:
        tx = _fa_optimizer(name, moments, learning_rate, weight_decay)
    elif name in compat_optimizers():
        tx = _compat_optimizer(name, moments, learning_rate, weight_decay)
    else:
        raise OptimizerError(f"--optimizer must be one of {optimizer_names()}, got {name!r}")
    if master_weights:
        tx = fa.with_master_weights(tx)
    if clip_norm > 0:
        tx = fa.chain(optax.clip_by_global_norm(clip_norm), tx)
    return tx
