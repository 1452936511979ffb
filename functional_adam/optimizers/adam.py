r"""The Adam update, written once: ``scale_by_adam`` and ``scale_by_amsgrad``.

Adam (Kingma & Ba, 2014, https://arxiv.org/abs/1412.6980), step t = 1, 2, ...::

    m_t = b1·m_{t-1} + (1 - b1)·g_t
    v_t = b2·v_{t-1} + (1 - b2)·|g_t|²
    m̂_t = m_t / (1 - b1^t)              v̂_t = v_t / (1 - b2^t)
    u_t = m̂_t / (sqrt(v̂_t + eps_root) + eps)

AMSGrad (Reddi et al., 2018, https://openreview.net/forum?id=ryQu7f-RZ) uses
the running maximum of the second moment in the denominator; Nesterov
momentum (NAdam, Dozat 2016) looks the first moment one step ahead. Where
frameworks differ (epsilon placement, what the maximum is over) is a
:class:`~functional_adam.compat.conventions.Convention`.

The whole step for one leaf is :func:`adam_leaf`; the transformations map it
over the pytree. The arithmetic runs in float32 for 16-bit parameters (and in
the parameter's precision otherwise), so float16 never turns ``eps=1e-8`` into
0; moments are stored in the dtypes asked for and updates in the gradients'.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from functional_adam.compat.conventions import OPTAX, Convention, check_convention
from functional_adam.core import checks
from functional_adam.core.base import GradientTransformation, Updates
from functional_adam.core.lift import LeafOptimizer, Moment, lift
from functional_adam.core.numerics import compute_dtype, real_dtype, safe_increment, saturate


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam` (the fields of ``optax.ScaleByAdamState``)."""

    count: jax.Array  # int32 scalar, saturating
    mu: Updates
    nu: Updates


class ScaleByAmsgradState(NamedTuple):
    """State of :func:`scale_by_amsgrad` (the fields of ``optax.ScaleByAmsgradState``)."""

    count: jax.Array
    mu: Updates
    nu: Updates
    nu_max: Updates


class BiasCorrections(NamedTuple):
    """The scalars ``1 - b^t`` of one step, computed once and shared by all leaves."""

    bc1: jax.Array  # 1 - b1^t
    bc2: jax.Array  # 1 - b2^t
    bc1_next: jax.Array  # 1 - b1^(t+1), for Nesterov


@functools.partial(jax.jit, inline=True)
def one_minus_power(decay, count):
    """``1 - decay**count``, jitted as Optax's bias correction is (an eager ``b**t`` can differ
    from a jitted one by an ulp)."""
    return 1 - decay**count


def bias_corrections(
    b1, b2, count: jax.Array, *, correct_mu: bool = True, correct_nu: bool = True
) -> BiasCorrections:
    """``1 - b1^t``, ``1 - b2^t`` and ``1 - b1^(t+1)`` for step ``t = count`` (1 if switched off).

    Example:
        >>> import jax.numpy as jnp
        >>> round(float(bias_corrections(0.9, 0.999, jnp.array(1)).bc1), 6)
        0.1
    """
    one = jnp.ones([])
    return BiasCorrections(
        bc1=one_minus_power(b1, count) if correct_mu else one,
        bc2=one_minus_power(b2, count) if correct_nu else one,
        bc1_next=one_minus_power(b1, safe_increment(count)) if correct_mu else one,
    )


def adam_leaf(
    g: jax.Array,
    m: jax.Array,
    v: jax.Array,
    v_max: jax.Array | None,
    bc: BiasCorrections,
    *,
    b1,
    b2,
    eps,
    eps_root,
    nesterov: bool = False,
    convention: Convention = OPTAX,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """One Adam step for one leaf: returns ``(u, m, v, v_max)`` in the compute dtype.

    ``bc`` holds this step's bias corrections. ``v_max`` is ``None`` for Adam and
    the running maximum for AMSGrad. The order of operations is Optax's, so
    float32 results under ``jax.jit`` are bitwise Optax's. This is the function
    to change to prototype a variant; the transformations map it over leaves.

    Example (step 1 of f(x) = x² at x = 5, in float64):
        >>> import jax, jax.numpy as jnp
        >>> with jax.enable_x64(True):
        ...     g = jnp.array(10.0, jnp.float64)
        ...     bc = bias_corrections(0.9, 0.999, jnp.array(1))
        ...     u, m, v, _ = adam_leaf(g, 0 * g, 0 * g, None, bc, b1=0.9, b2=0.999, eps=1e-8,
        ...                            eps_root=0.0)
        >>> [round(float(x), 6) for x in (u, m, v)]  # u = m̂/(sqrt(v̂)+eps) = 10/(10+1e-8)
        [1.0, 1.0, 0.1]
    """
    dtype = jnp.result_type(compute_dtype(g.dtype), compute_dtype(m.dtype))
    v_dtype = jnp.result_type(real_dtype(dtype), compute_dtype(v.dtype))
    v_storage = v.dtype
    g, m, v = g.astype(dtype), m.astype(dtype), v.astype(v_dtype)
    g_sq = (g.conj() * g).real if jnp.iscomplexobj(g) else g**2
    m = (1 - b1) * g + b1 * m
    if jnp.finfo(v_storage).bits < jnp.finfo(v_dtype).bits:  # a narrower v: keep it finite
        g_sq = saturate(g_sq, v_storage)
    v = (1 - b2) * g_sq + b2 * v
    bc1, bc2 = bc.bc1.astype(m.dtype), bc.bc2.astype(v_dtype)

    if convention.epsilon == "hat":  # TF1/Keras: lr_t = lr·sqrt(1-b2^t)/(1-b1^t), eps on raw v
        if v_max is not None:
            v_max = jnp.maximum(v_max.astype(v_dtype), v)
        v_den = v if v_max is None else v_max
        step = (jnp.sqrt(bc2) / bc.bc1.astype(v_dtype)).astype(m.dtype)
        return m * step / (jnp.sqrt(v_den + eps_root) + eps), m, v, v_max

    if v_max is None:
        v_hat = v / bc2
    elif convention.amsgrad_max == "raw":  # PyTorch: max over raw v, then corrected
        v_max = jnp.maximum(v_max.astype(v_dtype), v)
        v_hat = v_max / bc2
    else:  # Optax: max over the corrected v̂
        v_max = v_hat = jnp.maximum(v_max.astype(v_dtype), v / bc2)
    if nesterov:
        m_hat = b1 * (m / bc.bc1_next.astype(m.dtype)) + (1 - b1) * (g / bc1)
    else:
        m_hat = m / bc1
    u = m_hat / (jnp.sqrt(v_hat + eps_root) + eps)
    return u, m, v, v_max


class AdamHyperparameters(NamedTuple):
    """Adam's hyperparameters, the static part of its per-leaf step."""

    b1: Any = 0.9
    b2: Any = 0.999
    eps: Any = 1e-8
    eps_root: Any = 0.0
    nesterov: bool = False
    convention: Convention = OPTAX

    def checked(self) -> AdamHyperparameters:
        """These hyperparameters, or a ``ValueError``/``TypeError`` naming the one at fault."""
        checks.check_decays(b1=self.b1, b2=self.b2)
        checks.check_epsilons(self.eps, self.eps_root)
        convention = check_convention(self.convention)
        if self.nesterov and convention.epsilon == "hat":
            raise ValueError("nesterov=True is not defined with convention.epsilon='hat'.")
        return self._replace(convention=convention)


def adam_optimizer(
    hyper: AdamHyperparameters,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    *,
    amsgrad: bool = False,
    correct_mu: bool = True,
    correct_nu: bool = True,
) -> LeafOptimizer:
    """Adam (or AMSGrad) as a :class:`~functional_adam.core.lift.LeafOptimizer`: :func:`adam_leaf`."""
    hyper = hyper.checked()
    mu_dtype = checks.check_moment_dtype("mu_dtype", mu_dtype)
    nu_dtype = checks.check_float_dtype("nu_dtype", nu_dtype)
    moments = (Moment("mu", False, mu_dtype), Moment("nu", True, nu_dtype))
    if amsgrad:
        moments += (Moment("nu_max", True, nu_dtype),)
    kwargs = dict(hyper._asdict())

    def scalars(count: jax.Array) -> BiasCorrections:
        return bias_corrections(
            hyper.b1, hyper.b2, count, correct_mu=correct_mu, correct_nu=correct_nu
        )

    def step(g, moments, bc):
        m, v, *v_max = moments
        u, m, v, v_max = adam_leaf(g, m, v, v_max[0] if amsgrad else None, bc, **kwargs)
        return u, (m, v, v_max) if amsgrad else (m, v)

    state_type = ScaleByAmsgradState if amsgrad else ScaleByAdamState
    return LeafOptimizer(state_type, moments, scalars, step)


def scale_by_adam(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    mu_dtype: Any | None = None,
    nu_dtype: Any | None = None,
    *,
    nesterov: bool = False,
    convention: Convention = OPTAX,
) -> GradientTransformation:
    r"""Rescales updates by Adam's ``m̂ / (sqrt(v̂ + eps_root) + eps)`` (see the module docstring).

    Like :func:`optax.scale_by_adam`, plus ``nu_dtype`` and ``convention``.

    Args:
        b1: decay of the first moment, in [0, 1).
        b2: decay of the second moment, in [0, 1).
        eps: added to ``sqrt(v̂)``; >= 0.
        eps_root: added to ``v̂`` inside the square root; >= 0.
        mu_dtype: dtype to store the first moment in (``None``: the parameter's).
        nu_dtype: dtype to store the second moment in (``None``: the parameter's
            real dtype; complex parameters keep a real second moment).
        nesterov: use Nesterov momentum (NAdam, Dozat 2016).
        convention: where epsilon goes (:mod:`functional_adam.compat.conventions`).

    Returns:
        A ``GradientTransformation`` with state :class:`ScaleByAdamState`.

    Example:
        >>> import jax.numpy as jnp
        >>> tx = scale_by_adam()
        >>> state = tx.init(jnp.array(5.0))
        >>> u, state = tx.update(jnp.array(10.0), state)
        >>> float(state.mu), round(float(state.nu), 6)  # m1 = 0.1·10, v1 = 0.001·100
        (1.0, 0.1)
        >>> round(float(u), 4)  # m̂/(sqrt(v̂)+eps) = 10/(10+1e-8), up to float32 rounding
        1.0
    """
    hyper = AdamHyperparameters(b1, b2, eps, eps_root, nesterov, convention)
    return lift(adam_optimizer(hyper, mu_dtype, nu_dtype))


def scale_by_amsgrad(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    mu_dtype: Any | None = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    nu_dtype: Any | None = None,
    *,
    convention: Convention = OPTAX,
) -> GradientTransformation:
    r"""Rescales updates by AMSGrad: Adam with the running maximum of the second moment.

    With the Optax convention ``v_max_t = max(v_max_{t-1}, v̂_t)`` and
    ``u_t = m̂_t / (sqrt(v_max_t + eps_root) + eps)``; with ``convention.amsgrad_max
    == "raw"`` (PyTorch, Keras) the maximum is over the raw ``v_t`` and is bias
    corrected afterwards. Like :func:`optax.scale_by_amsgrad`, plus ``nu_dtype``.

    Args:
        b1, b2, eps, eps_root, mu_dtype, nu_dtype: as in :func:`scale_by_adam`.
        bias_correction_mu: divide the first moment by ``1 - b1^t``.
        bias_correction_nu: divide the second moment by ``1 - b2^t``.
        convention: see :mod:`functional_adam.compat.conventions`.

    Returns:
        A ``GradientTransformation`` with state :class:`ScaleByAmsgradState`.

    Example:
        >>> import jax.numpy as jnp
        >>> tx = scale_by_amsgrad()
        >>> state = tx.init(jnp.zeros(2))
        >>> _, state = tx.update(jnp.array([3.0, 0.0]), state)
        >>> u, state = tx.update(jnp.array([0.0, 0.0]), state)  # v̂ fell, v_max did not
        >>> state.nu_max.round(3)  # v̂ = 9 after step 1; v̂ of step 2 is lower
        Array([9., 0.], dtype=float32)
    """
    hyper = AdamHyperparameters(b1, b2, eps, eps_root, convention=convention)
    optimizer = adam_optimizer(
        hyper,
        mu_dtype,
        nu_dtype,
        amsgrad=True,
        correct_mu=bias_correction_mu,
        correct_nu=bias_correction_nu,
    )
    return lift(optimizer)
