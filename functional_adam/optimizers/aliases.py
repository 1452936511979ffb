"""The optimizers users call: ``adam``, ``adamw``, ``amsgrad``, ``nadam``, ``nadamw``.

Each is a short chain of :mod:`functional_adam.optimizers.adam`,
:mod:`functional_adam.transforms.weight_decay` and :mod:`functional_adam.transforms.learning_rate`,
with the signature and defaults of the Optax function of the same name.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from functional_adam.core.base import GradientTransformation, Params, ScalarOrSchedule, chain
from functional_adam.kernels.fused_adam import adam_chain
from functional_adam.optimizers.adam import scale_by_adam, scale_by_amsgrad
from functional_adam.storage.flat import flatten
from functional_adam.transforms.learning_rate import scale_by_learning_rate
from functional_adam.transforms.weight_decay import add_decayed_weights


def _check_flat(flat: bool) -> bool:
    if not isinstance(flat, bool):
        raise TypeError(f"flat must be a bool, got {flat!r}")
    return flat


def adam(
    learning_rate: ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    mu_dtype: Any | None = None,
    *,
    nesterov: bool = False,
    nu_dtype: Any | None = None,
    flat: bool = False,
) -> GradientTransformation:
    r"""Adam (Kingma & Ba, 2014): ``θ ← θ - lr · m̂ / (sqrt(v̂ + eps_root) + eps)``.

    Same signature, defaults, state and (in float32) bitwise the same updates
    as :func:`optax.adam`. See :func:`functional_adam.scale_by_adam` for the math.

    Args:
        learning_rate: a non-negative float, array, or schedule ``count -> lr``.
        b1, b2, eps, eps_root, mu_dtype, nu_dtype, nesterov: see ``scale_by_adam``.
        flat: keep the moments in one contiguous buffer per dtype
            (:func:`functional_adam.flatten`): one set of Adam loops for all
            leaves. Moments bitwise the default path's, updates within a few
            ulps (so long runs drift apart as any reordering of float math
            does). On XLA:CPU it pays only for many tiny leaves (BENCHMARKS.md).

    Returns:
        ``chain(scale_by_adam(...), scale_by_learning_rate(learning_rate))``.

    Example (the quadratic f(x) = x², x0 = 5: the first step moves x by about lr):
        >>> import jax, jax.numpy as jnp
        >>> import functional_adam as fa
        >>> x = jnp.array(5.0)
        >>> tx = fa.adam(learning_rate=1e-3)
        >>> state = tx.init(x)
        >>> updates, state = tx.update(jax.grad(lambda x: x**2)(x), state, x)
        >>> round(float(fa.apply_updates(x, updates)), 6)
        4.999
    """
    hyper = dict(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    if _check_flat(flat):
        return chain(
            flatten(scale_by_adam(**hyper, nesterov=nesterov)),
            scale_by_learning_rate(learning_rate),
        )
    return adam_chain(**hyper, nesterov=nesterov, learning_rate=learning_rate)


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    mu_dtype: Any | None = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any | Callable[[Params], Any] | None = None,
    *,
    nesterov: bool = False,
    nu_dtype: Any | None = None,
    flat: bool = False,
) -> GradientTransformation:
    r"""AdamW (Loshchilov & Hutter, 2019): ``θ ← θ - lr · (u_adam + weight_decay · θ)``.

    Decoupled weight decay with Optax's signature and defaults (``weight_decay``
    1e-4; PyTorch's default is 1e-2, see :mod:`functional_adam.compat`).

    Args:
        learning_rate: a non-negative float, array, or schedule.
        b1, b2, eps, eps_root, mu_dtype, nu_dtype, nesterov: see ``scale_by_adam``.
        weight_decay: non-negative rate (or schedule) of the decoupled decay.
        mask: which parameters to decay; see :func:`add_decayed_weights`.
        flat: moments in one buffer per dtype; see :func:`adam`.

    Returns:
        ``chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)``.

    Example:
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> params = {"w": jnp.ones(2), "b": jnp.ones(2)}
        >>> tx = fa.adamw(1e-3, weight_decay=0.1, mask={"w": True, "b": False})
        >>> updates, _ = tx.update({"w": jnp.zeros(2), "b": jnp.zeros(2)}, tx.init(params), params)
        >>> updates["w"], updates["b"]
        (Array([-0.0001, -0.0001], dtype=float32), Array([-0., -0.], dtype=float32))
    """
    hyper = dict(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    if _check_flat(flat):
        return chain(
            flatten(scale_by_adam(**hyper, nesterov=nesterov)),
            add_decayed_weights(weight_decay, mask),
            scale_by_learning_rate(learning_rate),
        )
    return adam_chain(
        **hyper,
        nesterov=nesterov,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        mask=mask,
    )


def amsgrad(
    learning_rate: ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    mu_dtype: Any | None = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    *,
    nu_dtype: Any | None = None,
    flat: bool = False,
) -> GradientTransformation:
    r"""AMSGrad (Reddi et al., 2018): Adam with ``max`` of the second moment in the denominator.

    Same signature and defaults as :func:`optax.amsgrad`; see
    :func:`functional_adam.scale_by_amsgrad`.

    Example:
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> tx = fa.amsgrad(0.1)
        >>> updates, state = tx.update(jnp.array([1.0]), tx.init(jnp.zeros(1)))
        >>> round(float(updates[0]), 4)  # the first step moves by about lr
        -0.1
    """
    direction = scale_by_amsgrad(
        b1, b2, eps, eps_root, mu_dtype, bias_correction_mu, bias_correction_nu, nu_dtype
    )
    return chain(
        flatten(direction) if _check_flat(flat) else direction,
        scale_by_learning_rate(learning_rate),
    )


nadam = functools.partial(adam, nesterov=True)
nadam.__doc__ = """NAdam (Dozat, 2016): :func:`adam` with ``nesterov=True``, as ``optax.nadam``."""
nadamw = functools.partial(adamw, nesterov=True)
nadamw.__doc__ = """NAdamW: :func:`adamw` with ``nesterov=True``, as ``optax.nadamw``."""
