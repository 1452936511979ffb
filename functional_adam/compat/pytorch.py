"""PyTorch's Adam and AdamW as gradient transformations: ``torch_adam``, ``torch_adamw``.

See :mod:`functional_adam.compat` for the conventions and the chains.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from functional_adam.compat import args as compat_args
from functional_adam.compat.conventions import PYTORCH, Convention
from functional_adam.compat.staged import staged_update
from functional_adam.core import checks
from functional_adam.core.base import (
    EmptyState,
    GradientTransformation,
    ScalarOrSchedule,
    chain,
    identity,
)
from functional_adam.core.numerics import safe_increment, zero_count
from functional_adam.optimizers.adam import scale_by_adam, scale_by_amsgrad
from functional_adam.transforms.learning_rate import scale, scale_by_learning_rate
from functional_adam.transforms.weight_decay import WeightDecaySchedule, add_decayed_weights

Scalar = float | jax.Array


def negate() -> GradientTransformation:
    """Flips the sign of the updates (PyTorch's ``maximize=True``: ascend instead of descend).

    Example:
        >>> import jax.numpy as jnp
        >>> tx = negate()
        >>> tx.update(jnp.array([1.0, -2.0]), tx.init(None))[0]
        Array([-1.,  2.], dtype=float32)
    """
    return scale(-1.0)


def torch_decoupled_weight_decay(
    lr: ScalarOrSchedule, weight_decay: Scalar
) -> GradientTransformation:
    r"""PyTorch's AdamW decay ``θ ← θ·(1 - lr·wd)``, then the step, each rounded as PyTorch does.

    Place it *after* ``scale_by_learning_rate``: it takes the step
    ``u = -lr·direction`` and returns ``(θ·c + u) - θ`` with ``c = 1 - lr·wd``,
    where ``θ·c`` is rounded to θ's dtype first, as PyTorch's in-place
    ``param.mul_(c)`` before ``param.addcdiv_(...)`` (see :func:`staged_update`
    for when ``apply_updates`` then gives PyTorch's θ bit for bit). ``c`` is
    formed in Python's float64 for a constant ``lr``, as in PyTorch, and in the
    compute dtype for a schedule or traced ``lr``.

    Args:
        lr: the learning rate or schedule ``count -> lr`` (``count`` 0 at the first update).
        weight_decay: non-negative decay rate.

    Returns:
        A ``GradientTransformation``; its ``update`` needs ``params``.

    Example:
        >>> import jax.numpy as jnp
        >>> tx = torch_decoupled_weight_decay(0.1, 0.5)
        >>> params = jnp.array([2.0])
        >>> updates, _ = tx.update(jnp.zeros(1), tx.init(params), params)
        >>> round(float(updates[0]), 6)  # 2·(1 - 0.05) - 2
        -0.1
    """
    checks.check_hyperparameter("lr", lr, allow_schedule=True)
    checks.check_hyperparameter("weight_decay", weight_decay)
    fixed = None
    if not callable(lr) and checks.concrete_values(lr) is not None:
        fixed = 1.0 - float(lr) * float(weight_decay)  # a Python float, as torch's mul_ gets it

    def init(params):
        del params
        return WeightDecaySchedule(zero_count()) if callable(lr) else EmptyState()

    def update(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("torch_decoupled_weight_decay needs params: update(u, state, params).")
        if callable(lr):
            factor = 1 - lr(state.count) * weight_decay
            state = WeightDecaySchedule(safe_increment(state.count))
        else:
            factor = fixed if fixed is not None else 1 - lr * weight_decay
        return staged_update(updates, params, lambda p: p * jnp.asarray(factor, p.dtype)), state

    return GradientTransformation(init, update)


def _adam_core(b1, b2, eps, amsgrad: bool, convention: Convention) -> GradientTransformation:
    if amsgrad:
        return scale_by_amsgrad(b1, b2, eps, convention=convention)
    return scale_by_adam(b1, b2, eps, convention=convention)


def torch_chain(
    direction: GradientTransformation,
    lr: ScalarOrSchedule,
    weight_decay: Scalar,
    maximize: bool,
    decoupled: bool,
) -> GradientTransformation:
    """PyTorch's order of operations around a ``direction`` (``scale_by_*``) transformation.

    ``g ← -g`` if ``maximize``; ``g ← g + wd·θ`` (L2, coupled) unless ``decoupled``;
    ``u ← -lr·direction(g)``; ``u ← u - lr·wd·θ`` (PyTorch rounds ``1 - lr·wd`` to
    the parameter dtype) if ``decoupled``. Shared by every ``torch_*`` optimizer.
    """
    maximize = compat_args.check_bool("maximize", maximize)
    decoupled = compat_args.check_bool("decoupled_weight_decay", decoupled)
    no_decay = compat_args.is_zero(weight_decay)
    return chain(
        negate() if maximize else identity(),
        identity() if decoupled or no_decay else add_decayed_weights(weight_decay),
        direction,
        scale_by_learning_rate(lr),
        torch_decoupled_weight_decay(lr, weight_decay)
        if decoupled and not no_decay
        else identity(),
    )


def _torch_adam_chain(
    lr, betas, eps, weight_decay, amsgrad, maximize, decoupled
) -> GradientTransformation:
    compat_args.check_common("lr", lr, "eps", eps, weight_decay)
    b1, b2 = compat_args.check_pair("betas", betas)
    amsgrad = compat_args.check_bool("amsgrad", amsgrad)
    direction = _adam_core(b1, b2, eps, amsgrad, PYTORCH)
    return torch_chain(direction, lr, weight_decay, maximize, decoupled)


@compat_args.reject_unknown_options
def torch_adam(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0,
    amsgrad: bool = False,
    *,
    foreach: bool | None = None,
    maximize: bool = False,
    capturable: bool = False,
    differentiable: bool = False,
    fused: bool | None = None,
    decoupled_weight_decay: bool = False,
) -> GradientTransformation:
    r"""``torch.optim.Adam`` as a gradient transformation (same arguments and defaults).

    PyTorch's ``_single_tensor_adam`` (``torch/optim/adam.py``), step t::

        g ← -g if maximize;  g ← g + wd·θ          (coupled L2, if weight_decay)
        m ← b1·m + (1-b1)·g;  v ← b2·v + (1-b2)·g²
        v_max ← max(v_max, v)                      (if amsgrad; raw v)
        θ ← θ - lr/(1-b1^t) · m / (sqrt(v or v_max)/sqrt(1-b2^t) + eps)

    With ``decoupled_weight_decay=True`` it is :func:`torch_adamw`.
    ``foreach``, ``fused``, ``capturable`` and ``differentiable`` choose a
    PyTorch kernel, not the math: they are accepted and have no effect.

    Args:
        lr: non-negative learning rate or schedule ``count -> lr``.
        betas: the pair ``(beta1, beta2)``, each in [0, 1).
        eps: non-negative, added to ``sqrt(v̂)``.
        weight_decay: non-negative L2 coefficient, added to the gradient.
        amsgrad: use the running maximum of ``v``.
        maximize: ascend the objective (negate the gradient).
        decoupled_weight_decay: decay ``θ ← θ(1 - lr·wd)`` instead (AdamW).
        foreach, capturable, differentiable, fused: ignored (PyTorch kernels).

    Returns:
        A ``GradientTransformation``; its ``update`` needs ``params`` when
        ``weight_decay`` is non-zero.

    Example (``torch.optim.Adam(model.parameters(), lr=0.1)`` becomes):
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> tx = fa.compat.torch_adam(lr=0.1)
        >>> params = jnp.array([1.0, -1.0])
        >>> updates, state = tx.update(jnp.array([0.5, -2.0]), tx.init(params), params)
        >>> fa.apply_updates(params, updates).round(5)  # the first step moves each coordinate by lr
        Array([ 0.9, -0.9], dtype=float32)
    """
    del foreach, capturable, differentiable, fused
    return _torch_adam_chain(
        lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay
    )


@compat_args.reject_unknown_options
def torch_adamw(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 1e-2,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
    foreach: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
    fused: bool | None = None,
) -> GradientTransformation:
    r"""``torch.optim.AdamW`` as a gradient transformation (same arguments and defaults).

    As :func:`torch_adam`, but the decay is decoupled (Loshchilov & Hutter,
    2019) and taken first, with the learning rate of the current step::

        θ ← θ·(1 - lr·wd);  then the Adam step of torch_adam without L2

    which is ``θ ← θ - lr·(u + wd·θ_old)``: ``add_decayed_weights`` after the
    Adam direction. The default ``weight_decay`` is PyTorch's 1e-2 (Optax's
    ``adamw`` uses 1e-4).

    Args:
        lr, betas, eps, amsgrad, maximize: as in :func:`torch_adam`.
        weight_decay: non-negative decoupled decay rate.
        foreach, capturable, differentiable, fused: ignored (PyTorch kernels).

    Returns:
        A ``GradientTransformation``; its ``update`` needs ``params``.

    Example (zero gradient: only the decay acts, θ·(1 - 0.1·0.5)):
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> tx = fa.compat.torch_adamw(lr=0.1, weight_decay=0.5)
        >>> params = jnp.array([2.0])
        >>> updates, _ = tx.update(jnp.zeros(1), tx.init(params), params)
        >>> fa.apply_updates(params, updates)
        Array([1.9], dtype=float32)
    """
    del foreach, capturable, differentiable, fused
    return _torch_adam_chain(lr, betas, eps, weight_decay, amsgrad, maximize, True)
