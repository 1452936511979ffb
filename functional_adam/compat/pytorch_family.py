r"""PyTorch's Adamax, RAdam and NAdam as gradient transformations, with PyTorch's signatures.

Each is the chain of :mod:`functional_adam.compat.pytorch`::

    [negate] → [add_decayed_weights] → direction → scale_by_learning_rate → [decoupled decay]

(bracketed pieces are ``identity`` when switched off; the decoupled decay
rounds θ as PyTorch's in-place ``param.mul_(1 - lr·wd)`` does). The
directions, from ``torch/optim/{adamax,radam,nadam}.py``' single-tensor code:

- ``torch_adamax``: :func:`functional_adam.scale_by_adamax`, the same math as
  Optax's (``u = max(b2·u, |g| + eps)``, step ``lr/(1 - b1^t)·m/u``).
- ``torch_radam``: :func:`functional_adam.scale_by_radam` with PyTorch's epsilon
  on ``sqrt(v)`` (``m̂·sqrt(1 - b2^t)/(sqrt(v) + eps)·r``, rectified where ``ρ_t > 5``).
- ``torch_nadam``: not Optax's NAdam. Dozat's momentum schedule
  ``μ_t = b1·(1 - 0.5·0.96^(t·ψ))`` (``ψ = momentum_decay``) and its running
  product ``Π_t = μ_1···μ_t``::

      u = (1 - μ_t)/(1 - Π_t) · g/(sqrt(v̂) + eps) + μ_{t+1}/(1 - Π_t·μ_{t+1}) · m/(sqrt(v̂) + eps)

  ``Π_t`` is one scalar of state for all leaves, which the lift's per-leaf
  state cannot hold, so :func:`scale_by_torch_nadam` is a small hand-written
  transformation around a lifted per-leaf step (its scalars come from the state).

PyTorch forms the step's scalars in Python's float64. Where float32 would
lose to cancellation the package computes them another way: ``1 - b^t`` as
``-expm1(t·log b)`` (:func:`one_minus_power_accurate`) and RAdam's ``ρ_t``
without subtracting two numbers near 2000 (:func:`torch_radam_scalars`;
Optax's float32 ``ρ_1`` is 0.974, not 1). PyTorch's NAdam adds its gradient
and momentum terms to θ with two in-place ``addcdiv_``, rounding θ after each;
``torch_nadam`` does the same (:func:`~functional_adam.compat.staged.staged_steps`):
one rounding instead ends 4e-5 of the displacement away after 500 steps at
the defaults. Measured over 500 float32 steps (``python -m
tests.test_compat_torch_family``): within 2.7e-6 of the displacement.
Complex parameters follow the package's convention (``|g|²``, a real second
moment), not PyTorch's ``view_as_real`` (componentwise moments).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from functional_adam.compat import args as compat_args
from functional_adam.compat.conventions import Convention
from functional_adam.compat.pytorch import negate, torch_chain
from functional_adam.compat.staged import staged_steps
from functional_adam.core import checks
from functional_adam.core.base import GradientTransformation, ScalarOrSchedule, chain, identity
from functional_adam.core.lift import LeafOptimizer, Moment, lift
from functional_adam.core.numerics import safe_increment
from functional_adam.optimizers._common import abs_sq_for, compute_dtypes
from functional_adam.optimizers.adam import BiasCorrections, ScaleByAdamState
from functional_adam.optimizers.adamax import scale_by_adamax
from functional_adam.optimizers.radam import RAdamScalars, radam_optimizer, radam_scalars
from functional_adam.transforms.weight_decay import add_decayed_weights

Scalar = float | jax.Array
TORCH_RADAM = Convention(epsilon="hat", amsgrad_max="raw")
"""``torch.optim.RAdam``'s epsilon: added to ``sqrt(v)``, the bias correction in the step size."""


def _log(b: Any) -> Any:
    """``log(b)``: in Python's float64 for a Python number (PyTorch's precision), else traced."""
    if isinstance(b, int | float):
        return math.log(b) if b > 0 else -math.inf
    return jnp.log(b)


def one_minus_power_accurate(b: Any, count: jax.Array, dtype: Any) -> jax.Array:
    """``1 - b^t`` as ``-expm1(t·log b)``, within an ulp or two in ``dtype``.

    PyTorch forms ``1 - b^t`` in float64. ``1 - b**t`` in float32 starts from
    float32's ``0.999`` (``1 - 0.999`` is then 1.3e-5 off, relative);
    ``log b`` taken in float64 avoids it.

    Example:
        >>> import jax.numpy as jnp
        >>> accurate = one_minus_power_accurate(0.999, jnp.array(1), jnp.float32)
        >>> direct = 1 - jnp.float32(0.999) ** 1
        >>> f"{float(accurate) / 1e-3 - 1:.0e} {float(direct) / 1e-3 - 1:.0e}"
        '-2e-07 -1e-05'
    """
    return -jnp.expm1(count.astype(dtype) * _log(b))


def _rho_accurate(b2: float, count: jax.Array, dtype: Any) -> jax.Array:
    """RAdam's ``ρ_t = ρ∞ - 2t·b2^t/(1 - b2^t)`` without the cancellation of the direct form.

    With ``a = -log b2`` and ``x = a·t``, ``2t·b2^t/(1 - b2^t) = (2/a)·x/expm1(x)``
    and ``x/expm1(x) = 1 - x/2 + R(x)``, so ``ρ_t = K + t - (2/a)·R(x)`` with
    ``K = ρ∞ - 2/a`` (float64) and ``R(x) = x²/12 - x⁴/720 + x⁶/30240 - x⁸/1209600``
    below 1 (error < 3e-7·R), ``x/expm1(x) - 1 + x/2`` above. In float32 the direct
    form loses four digits for b2 = 0.999 (``ρ_1 = 0.974``), enough to move the
    first rectified step.
    """
    if b2 == 0:
        return jnp.ones([], dtype)  # ρ∞ = 1 = ρ_t: never rectified
    a = -math.log(b2)
    t = count.astype(dtype)
    x = t * a
    series = x * x * (1 / 12 - x * x * (1 / 720 - x * x * (1 / 30240 - x * x / 1209600)))
    direct = x / jnp.expm1(jnp.maximum(x, 1.0)) - 1 + x / 2
    k = 2 / (1 - b2) - 1 - 2 / a
    return k + t - (2 / a) * jnp.where(x < 1, series, direct)


def torch_radam_scalars(b1: Any, b2: Any, count: jax.Array) -> RAdamScalars:
    """RAdam's per-step scalars to the accuracy of PyTorch's float64 ones (Python-number decays;
    traced decays take Optax's formulas, :func:`~functional_adam.optimizers.radam.radam_scalars`).

    Example:
        >>> import jax.numpy as jnp
        >>> round(float(torch_radam_scalars(0.9, 0.999, jnp.array(1)).rho), 5)
        1.0
    """
    if not (isinstance(b1, int | float) and isinstance(b2, int | float)):
        return radam_scalars(b1, b2, count)
    dtype = jnp.result_type(float)
    bc1 = one_minus_power_accurate(b1, count, dtype)
    bc = BiasCorrections(bc1, one_minus_power_accurate(b2, count, dtype), bc1)
    rho = _rho_accurate(b2, count, dtype)
    rho_inf = 2 / (1 - b2) - 1
    r = ((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)) ** 0.5
    return RAdamScalars(bc, rho, r)


@compat_args.reject_unknown_options
def torch_adamax(
    lr: ScalarOrSchedule = 2e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0,
    foreach: bool | None = None,
    *,
    maximize: bool = False,
    differentiable: bool = False,
    capturable: bool = False,
) -> GradientTransformation:
    r"""``torch.optim.Adamax`` as a gradient transformation (same arguments and defaults).

    ``g ← ±g (+ wd·θ)``, ``m ← b1·m + (1-b1)·g``, ``u ← max(b2·u, |g| + eps)``,
    ``θ ← θ - lr/(1 - b1^t)·m/u``. ``foreach``, ``differentiable`` and
    ``capturable`` choose a PyTorch kernel: accepted, no effect.

    Args:
        lr: non-negative learning rate or schedule ``count -> lr``.
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: added to ``|g|``; > 0.
        weight_decay: non-negative L2 coefficient, added to the gradient.
        maximize: ascend the objective.

    Returns:
        A ``GradientTransformation``; its ``update`` needs ``params`` when ``weight_decay`` is set.

    Example (``torch.optim.Adamax(model.parameters(), lr=0.1)`` becomes):
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> tx = fa.compat.torch_adamax(lr=0.1)
        >>> params = jnp.array([1.0, -1.0])
        >>> updates, _ = tx.update(jnp.array([0.5, -2.0]), tx.init(params), params)
        >>> fa.apply_updates(params, updates).round(5)
        Array([ 0.9, -0.9], dtype=float32)
    """
    del foreach, differentiable, capturable
    compat_args.check_common("lr", lr, "eps", eps, weight_decay)
    b1, b2 = compat_args.check_pair("betas", betas)
    return torch_chain(scale_by_adamax(b1, b2, eps), lr, weight_decay, maximize, False)


@compat_args.reject_unknown_options
def torch_radam(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0,
    decoupled_weight_decay: bool = False,
    *,
    foreach: bool | None = None,
    maximize: bool = False,
    capturable: bool = False,
    differentiable: bool = False,
) -> GradientTransformation:
    r"""``torch.optim.RAdam`` as a gradient transformation (same arguments and defaults).

    RAdam (see :mod:`functional_adam.optimizers.radam`) with PyTorch's epsilon on
    ``sqrt(v)``: ``θ ← θ - lr·m̂·sqrt(1 - b2^t)/(sqrt(v) + eps)·r_t`` where
    ``ρ_t > 5``, ``θ ← θ - lr·m̂`` before. ``decoupled_weight_decay=True`` decays
    ``θ ← θ(1 - lr·wd)`` first (RAdamW) instead of adding ``wd·θ`` to ``g``.

    Args:
        lr, betas, eps, weight_decay, maximize: as in :func:`torch_adamax`.
        decoupled_weight_decay: decoupled instead of coupled (L2) weight decay.
        foreach, capturable, differentiable: ignored (PyTorch kernels).

    Returns:
        A ``GradientTransformation``; its ``update`` needs ``params`` when ``weight_decay`` is set.

    Example (the first five steps are SGD with momentum):
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> tx = fa.compat.torch_radam(lr=0.1)
        >>> params = jnp.array([1.0])
        >>> updates, _ = tx.update(jnp.array([0.5]), tx.init(params), params)
        >>> fa.apply_updates(params, updates).round(5)  # θ - lr·m̂ = 1 - 0.1·0.5
        Array([0.95], dtype=float32)
    """
    del foreach, capturable, differentiable
    compat_args.check_common("lr", lr, "eps", eps, weight_decay)
    b1, b2 = compat_args.check_pair("betas", betas)
    optimizer = radam_optimizer(b1, b2, eps, 0.0, 5.0, convention=TORCH_RADAM)
    direction = lift(optimizer._replace(scalars=lambda count: torch_radam_scalars(b1, b2, count)))
    return torch_chain(direction, lr, weight_decay, maximize, decoupled_weight_decay)


class ScaleByTorchNAdamState(NamedTuple):
    """State of :func:`scale_by_torch_nadam`: PyTorch's ``step``, ``mu_product``,
    ``exp_avg`` and ``exp_avg_sq``, by Optax's names where they have one."""

    count: jax.Array
    mu_product: jax.Array  # Π_t = μ_1···μ_t, one scalar for all leaves
    mu: Any
    nu: Any


def _nadam_parts(b1, b2, eps):
    """The per-leaf step: new moments, and ``u`` = the stacked ``(g/d, m/d)``, d = sqrt(v̂) + eps."""

    def step(g, moments, bc2):
        m, v = moments
        dtype, real = compute_dtypes(g, [m], [v])
        g_sq = abs_sq_for(g.astype(dtype), v, real)
        g, m, v = g.astype(dtype), m.astype(dtype), v.astype(real)
        m = (1 - b1) * g + b1 * m
        v = (1 - b2) * g_sq + b2 * v
        denom = jnp.sqrt(v / bc2.astype(real)) + eps
        return jnp.stack([g / denom, m / denom]), (m, v)

    return step


def _torch_nadam(b1, b2, eps, momentum_decay, lr=None, weight_decay=None) -> GradientTransformation:
    """The NAdam direction (``lr`` None), or PyTorch's whole step: decay θ, then add the
    gradient term, then the momentum term, each rounded in place as PyTorch's kernels do."""
    checks.check_decays(b1=b1, b2=b2)
    checks.check_positive("eps", eps)  # eps = 0: a zero gradient divides 0 by 0
    checks.check_hyperparameter("momentum_decay", momentum_decay)
    moments = (Moment("mu"), Moment("nu", squared=True))
    step = _nadam_parts(b1, b2, eps)

    def init(params):
        inner = lift(LeafOptimizer(ScaleByAdamState, moments, lambda c: None, step)).init(params)
        product = jnp.ones([], jnp.result_type(float))  # float32, or float64 under x64
        return ScaleByTorchNAdamState(inner.count, product, inner.mu, inner.nu)

    def update(updates, state: ScaleByTorchNAdamState, params=None, **extra_args):
        del extra_args
        if lr is not None and params is None:
            raise ValueError("torch_nadam needs params: call update(updates, state, params).")
        count = safe_increment(state.count)
        t = count.astype(state.mu_product.dtype)
        mu = b1 * (1.0 - 0.5 * 0.96 ** (t * momentum_decay))
        mu_next = b1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * momentum_decay))
        product = state.mu_product * mu
        c_g, c_m = (1.0 - mu) / (1.0 - product), mu_next / (1.0 - product * mu_next)
        bc2 = one_minus_power_accurate(b2, count, t.dtype)
        leaf = LeafOptimizer(ScaleByAdamState, moments, lambda c: bc2, step)
        parts, inner = lift(leaf).update(updates, ScaleByAdamState(*state[:1], *state[2:]), params)
        new_state = ScaleByTorchNAdamState(inner.count, product, inner.mu, inner.nu)
        if lr is None:
            return jax.tree.map(
                lambda x: (c_g * x[0] + c_m * x[1]).astype(x.dtype), parts
            ), new_state
        rate = lr(state.count) if callable(lr) else lr
        steps = jax.tree.map(lambda x: ((-rate * c_g) * x[0], (-rate * c_m) * x[1]), parts)
        decay = None
        if weight_decay is not None:
            decay_factor = 1 - rate * weight_decay
            decay = lambda theta: theta * jnp.asarray(decay_factor, theta.dtype)  # noqa: E731
        return staged_steps(params, steps, decay), new_state

    return GradientTransformation(init, update)


def scale_by_torch_nadam(
    b1: Scalar = 0.9, b2: Scalar = 0.999, eps: Scalar = 1e-8, momentum_decay: Scalar = 4e-3
) -> GradientTransformation:
    r"""Rescales updates by PyTorch's NAdam direction (see the module docstring).

    Args:
        b1, b2: the decays, each in [0, 1).
        eps: added to ``sqrt(v̂)``; > 0.
        momentum_decay: ``ψ`` of the momentum schedule; >= 0.

    Returns:
        A ``GradientTransformation`` with state :class:`ScaleByTorchNAdamState`.

    Example (step 1: Π_1 = μ_1, so u = sign(g) + μ_2/(1 - μ_1·μ_2)·0.1·sign(g)):
        >>> import jax.numpy as jnp
        >>> tx = scale_by_torch_nadam()
        >>> u, state = tx.update(jnp.array([2.0]), tx.init(jnp.zeros(1)))
        >>> u.round(3), round(float(state.mu_product), 4)
        (Array([1.056], dtype=float32), 0.4501)
    """
    return _torch_nadam(b1, b2, eps, momentum_decay)


@compat_args.reject_unknown_options
def torch_nadam(
    lr: ScalarOrSchedule = 2e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0,
    momentum_decay: Scalar = 4e-3,
    decoupled_weight_decay: bool = False,
    *,
    foreach: bool | None = None,
    maximize: bool = False,
    capturable: bool = False,
    differentiable: bool = False,
) -> GradientTransformation:
    r"""``torch.optim.NAdam`` as a gradient transformation (same arguments and defaults).

    Not :func:`functional_adam.nadam` (Optax's NAdam): PyTorch's has Dozat's
    momentum schedule ``μ_t`` and its running product (see the module docstring).

    Args:
        lr, betas, eps, weight_decay, maximize: as in :func:`torch_adamax`.
        momentum_decay: ``ψ`` of ``μ_t = b1·(1 - 0.5·0.96^(t·ψ))``; >= 0.
        decoupled_weight_decay: decay ``θ ← θ(1 - lr·wd)`` first (NAdamW).
        foreach, capturable, differentiable: ignored (PyTorch kernels).

    Returns:
        ``chain([negate], [add_decayed_weights], step)`` where the step adds the
        gradient and the momentum terms to θ one after the other, rounding θ after
        each as PyTorch's two ``addcdiv_`` do (after the decoupled decay, if any);
        its ``update`` needs ``params``.

    Example:
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> tx = fa.compat.torch_nadam(lr=0.1)
        >>> params = jnp.array([1.0])
        >>> updates, _ = tx.update(jnp.array([2.0]), tx.init(params), params)
        >>> fa.apply_updates(params, updates).round(4)  # 1 - 0.1·1.0564, as torch.optim.NAdam
        Array([0.8944], dtype=float32)
    """
    del foreach, capturable, differentiable
    compat_args.check_common("lr", lr, "eps", eps, weight_decay)
    b1, b2 = compat_args.check_pair("betas", betas)
    maximize = compat_args.check_bool("maximize", maximize)
    decoupled = compat_args.check_bool("decoupled_weight_decay", decoupled_weight_decay)
    no_decay = compat_args.is_zero(weight_decay)
    step = _torch_nadam(
        b1, b2, eps, momentum_decay, lr, weight_decay if decoupled and not no_decay else None
    )
    return chain(
        negate() if maximize else identity(),
        identity() if decoupled or no_decay else add_decayed_weights(weight_decay),
        step,
    )
