r"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms",
https://arxiv.org/abs/2302.06675): the sign of an interpolated momentum.

Step t, one moment ``m`` (Optax's ``mu``)::

    u_t = sign((1 - b1)·g_t + b1·m_{t-1})       (the update: ±1 per element)
    m_t = (1 - b2)·g_t + b2·m_{t-1}
    θ_t = θ_{t-1} - lr·(u_t + wd·θ_{t-1})

``mode="smooth"`` takes ``tanh(smooth_beta·x)`` instead of ``sign(x)`` and
``mode="refined"`` keeps ``x`` where ``|x| < 1`` (Optax's options). Each update
element has size 1, so Lion's learning rate is usually 3-10x smaller than
AdamW's and its weight decay larger. The order of float operations is Optax's
``scale_by_lion``: float32 and float64 results under ``jax.jit`` are bitwise
Optax's. :func:`lion_8bit` stores ``m`` in 8-bit blocks
(:class:`~functional_adam.storage.blockwise.BlockStorage`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from functional_adam.core import checks
from functional_adam.core.base import GradientTransformation, Params, ScalarOrSchedule, chain
from functional_adam.core.lift import PLAIN, LeafOptimizer, Moment, Storage, lift
from functional_adam.optimizers._common import compute_dtypes
from functional_adam.storage.blockwise import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_MIN_8BIT_SIZE,
    BlockStorage,
)
from functional_adam.transforms.learning_rate import scale_by_learning_rate
from functional_adam.transforms.weight_decay import add_decayed_weights

MODES = ("hard", "smooth", "refined")


class ScaleByLionState(NamedTuple):
    """State of :func:`scale_by_lion` (the fields of ``optax.ScaleByLionState``)."""

    count: jax.Array  # int32 scalar, saturating
    mu: Any


def lion_leaf(g, m, *, b1, b2, mode: str = "hard", smooth_beta=1.0):
    """One Lion step for one leaf: ``(u, m)`` in the compute dtype (see the module docstring)."""
    dtype, _ = compute_dtypes(g, [m])
    g, m = g.astype(dtype), m.astype(dtype)
    x = (1.0 - b1) * g + b1 * m
    if mode == "hard":
        u = jnp.sign(x)
    elif mode == "smooth":
        u = jnp.tanh(smooth_beta * x)
    else:  # refined: linear near 0, the sign beyond
        u = jnp.where(jnp.abs(x) < 1.0, x, jnp.sign(x))
    return u, (1 - b2) * g + b2 * m


def lion_optimizer(
    b1=0.9, b2=0.99, mu_dtype=None, *, mode: str = "hard", smooth_beta=1.0
) -> LeafOptimizer:
    """Lion as a :class:`~functional_adam.core.lift.LeafOptimizer`; checks its hyperparameters."""
    checks.check_decays(b1=b1, b2=b2)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    checks.check_hyperparameter("smooth_beta", smooth_beta)
    mu_dtype = checks.check_moment_dtype("mu_dtype", mu_dtype)

    def step(g, moments, scalars):
        del scalars
        u, m = lion_leaf(g, moments[0], b1=b1, b2=b2, mode=mode, smooth_beta=smooth_beta)
        return u, (m,)

    return LeafOptimizer(ScaleByLionState, (Moment("mu", False, mu_dtype),), lambda c: None, step)


def scale_by_lion(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.99,
    mu_dtype: Any | None = None,
    *,
    mode: Literal["hard", "smooth", "refined"] = "hard",
    smooth_beta: float = 1.0,
) -> GradientTransformation:
    r"""Rescales updates by Lion's ``sign((1 - b1)·g + b1·m)`` (see the module docstring).

    Args:
        b1: weight of the momentum in the update, in [0, 1).
        b2: decay of the momentum, in [0, 1).
        mu_dtype: dtype to store the momentum in (``None``: the parameter's).
        mode: ``"hard"`` (sign), ``"smooth"`` (tanh) or ``"refined"``.
        smooth_beta: the tanh's slope for ``mode="smooth"``.

    Returns:
        A ``GradientTransformation`` with state :class:`ScaleByLionState`.

    Example:
        >>> import jax.numpy as jnp
        >>> tx = scale_by_lion()
        >>> u, state = tx.update(jnp.array([0.3, -2.0]), tx.init(jnp.zeros(2)))
        >>> u, state.mu  # sign of 0.1·g; m = 0.01·g
        (Array([ 1., -1.], dtype=float32), Array([ 0.003, -0.02 ], dtype=float32))
    """
    return lift(lion_optimizer(b1, b2, mu_dtype, mode=mode, smooth_beta=smooth_beta))


def _lion_chain(storage: Storage, learning_rate, b1, b2, mu_dtype, weight_decay, mask):
    return chain(
        lift(lion_optimizer(b1, b2, mu_dtype), storage),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def lion(
    learning_rate: ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.99,
    mu_dtype: Any | None = None,
    weight_decay: ScalarOrSchedule = 1e-3,
    mask: Any | Callable[[Params], Any] | None = None,
) -> GradientTransformation:
    r"""Lion: ``θ ← θ - lr·(sign((1 - b1)·g + b1·m) + wd·θ)``; ``optax.lion``'s signature.

    Args:
        learning_rate: a non-negative float, array, or schedule ``count -> lr``.
        b1, b2, mu_dtype: see :func:`scale_by_lion`.
        weight_decay: non-negative decoupled decay rate (or schedule).
        mask: which parameters to decay; see :func:`functional_adam.add_decayed_weights`.

    Returns:
        ``chain(scale_by_lion, add_decayed_weights, scale_by_learning_rate)``.

    Example (every coordinate moves by lr, whatever the gradient's size):
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> params = jnp.array([1.0, 1.0])
        >>> tx = fa.lion(1e-2, weight_decay=0.0)
        >>> updates, _ = tx.update(jnp.array([1e-3, -50.0]), tx.init(params), params)
        >>> updates
        Array([-0.01,  0.01], dtype=float32)
    """
    return _lion_chain(PLAIN, learning_rate, b1, b2, mu_dtype, weight_decay, mask)


def lion_8bit(
    learning_rate: ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.99,
    mu_dtype: Any | None = None,
    weight_decay: ScalarOrSchedule = 1e-3,
    mask: Any | Callable[[Params], Any] | None = None,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    min_8bit_size: int = DEFAULT_MIN_8BIT_SIZE,
    code: str = "dynamic",
) -> GradientTransformation:
    r"""Lion with its momentum in 8-bit blocks: :func:`lion`'s signature plus ``block_size``.

    ``lift(lion_optimizer(...), BlockStorage(block_size, min_8bit_size, code))``: about
    1 byte of state per parameter instead of 4 (leaves of fewer than
    ``min_8bit_size`` elements keep a plain momentum, of ``mu_dtype`` if given).
    ``code``: the 8-bit format, as in :func:`functional_adam.scale_by_adam_8bit`.

    Example:
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> tx = fa.lion_8bit(1e-3, min_8bit_size=1000)
        >>> state = tx.init({"w": jnp.zeros(4096), "b": jnp.zeros(3)})
        >>> state[0].mu["w"].codes.dtype, state[0].mu["b"].dtype
        (dtype('int8'), dtype('float32'))
    """
    storage = BlockStorage(block_size, min_8bit_size, code).checked()
    return _lion_chain(storage, learning_rate, b1, b2, mu_dtype, weight_decay, mask)
