"""Keras 3 and TF1 Adam as gradient transformations: ``keras_adam``, ``keras_adamw``, ``tf1_adam``.

See :mod:`functional_adam.compat` for the conventions and the chains.
"""

from __future__ import annotations

import jax.numpy as jnp

from functional_adam.compat import args as compat_args
from functional_adam.compat.conventions import KERAS, TF1, Convention
from functional_adam.compat.pytorch import Scalar
from functional_adam.compat.staged import staged_update
from functional_adam.core import checks
from functional_adam.core.base import GradientTransformation, ScalarOrSchedule, chain, identity
from functional_adam.optimizers.adam import scale_by_adam, scale_by_amsgrad
from functional_adam.transforms.learning_rate import scale_by_learning_rate


def _adam_core(b1, b2, eps, amsgrad: bool, convention: Convention) -> GradientTransformation:
    if amsgrad:
        return scale_by_amsgrad(b1, b2, eps, convention=convention)
    return scale_by_adam(b1, b2, eps, convention=convention)


def keras_learning_rate_and_decay(
    learning_rate: ScalarOrSchedule, weight_decay: Scalar
) -> GradientTransformation:
    r"""Keras' decoupled decay ``θ ← θ - θ·wd·lr`` and then the step ``θ ← θ - lr·u``, each rounded.

    Keras' base optimizer assigns ``θ - θ·wd·lr`` (``_apply_weight_decay``,
    ``lr`` of the current iteration, both cast to θ's dtype) and the Adam
    ``update_step`` then assigns ``θ - lr_t·m/(sqrt(v)+eps)``: two roundings of
    θ. This takes the Adam direction ``u``, multiplies it by ``-lr`` as
    :func:`~functional_adam.scale_by_learning_rate` does (same state), and
    returns ``(round(θ - θ·wd·lr) - lr·u) - θ`` (see
    :func:`~functional_adam.compat.staged.staged_update` for when
    ``apply_updates`` then gives Keras' θ bit for bit).

    Args:
        learning_rate: non-negative rate or schedule ``count -> lr``.
        weight_decay: non-negative decoupled decay rate.

    Returns:
        A ``GradientTransformation``; its ``update`` needs ``params``.

    Example (zero direction: only the decay acts, 2 - 2·0.5·0.1):
        >>> import jax.numpy as jnp
        >>> tx = keras_learning_rate_and_decay(0.1, 0.5)
        >>> params = jnp.array([2.0])
        >>> updates, _ = tx.update(jnp.zeros(1), tx.init(params), params)
        >>> round(float(updates[0]), 6)
        -0.1
    """
    scale_lr = scale_by_learning_rate(learning_rate)

    def update(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "keras_learning_rate_and_decay needs params: update(u, state, params)."
            )
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        updates, state = scale_lr.update(updates, state)

        def decay(p):
            return p - p * jnp.asarray(weight_decay, p.dtype) * jnp.asarray(lr, p.dtype)

        return staged_update(updates, params, decay), state

    return GradientTransformation(scale_lr.init, update)


def _keras_chain(
    learning_rate, beta_1, beta_2, epsilon, amsgrad, weight_decay
) -> GradientTransformation:
    compat_args.check_common("learning_rate", learning_rate, "epsilon", epsilon, weight_decay)
    checks.check_hyperparameter("beta_1", beta_1, high=1.0)
    checks.check_hyperparameter("beta_2", beta_2, high=1.0)
    amsgrad = compat_args.check_bool("amsgrad", amsgrad)
    return chain(
        _adam_core(beta_1, beta_2, epsilon, amsgrad, KERAS),
        identity(),  # the slot of the decay: the state keeps its structure
        scale_by_learning_rate(learning_rate)
        if weight_decay is None or compat_args.is_zero(weight_decay)
        else keras_learning_rate_and_decay(learning_rate, weight_decay),
    )


@compat_args.reject_unknown_options
def keras_adam(
    learning_rate: ScalarOrSchedule = 0.001,
    beta_1: Scalar = 0.9,
    beta_2: Scalar = 0.999,
    epsilon: Scalar = 1e-7,
    amsgrad: bool = False,
    weight_decay: Scalar | None = None,
    *,
    name: str | None = None,
) -> GradientTransformation:
    r"""``keras.optimizers.Adam`` (Keras 3) as a gradient transformation.

    Keras' ``Adam.update_step`` with "epsilon hat" (Kingma & Ba, before §2.1)::

        m ← m + (g - m)·(1-b1);  v ← v + (g² - v)·(1-b2)
        v ← max(v_hat, v)                           (if amsgrad; raw v)
        θ ← θ - lr·sqrt(1-b2^t)/(1-b1^t) · m / (sqrt(v) + epsilon)

    A ``weight_decay`` is decoupled, as in :func:`keras_adamw` (Keras applies
    ``θ ← θ - θ·wd·lr`` in the base optimizer before the step).

    Args:
        learning_rate: non-negative rate or schedule ``count -> lr``.
        beta_1, beta_2: moment decays in [0, 1).
        epsilon: non-negative "epsilon hat", added to ``sqrt(v)``.
        amsgrad: use the running maximum of ``v``.
        weight_decay: ``None`` or a non-negative decoupled decay rate.
        name: ignored (Keras' optimizer name).

    Returns:
        A ``GradientTransformation``.

    Example (the first step moves by about lr; epsilon weighs sqrt(1-b2) more):
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> tx = fa.compat.keras_adam(learning_rate=0.1)
        >>> updates, _ = tx.update(jnp.array([1e-3]), tx.init(jnp.zeros(1)))
        >>> updates.round(4)  # -0.1 · 1e-3/(1e-3 + 1e-7/sqrt(0.001))
        Array([-0.0997], dtype=float32)
    """
    del name
    return _keras_chain(learning_rate, beta_1, beta_2, epsilon, amsgrad, weight_decay)


@compat_args.reject_unknown_options
def keras_adamw(
    learning_rate: ScalarOrSchedule = 0.001,
    weight_decay: Scalar = 0.004,
    beta_1: Scalar = 0.9,
    beta_2: Scalar = 0.999,
    epsilon: Scalar = 1e-7,
    amsgrad: bool = False,
    *,
    name: str | None = None,
) -> GradientTransformation:
    r"""``keras.optimizers.AdamW`` (Keras 3) as a gradient transformation.

    Keras' base optimizer decays with the learning rate of the current step
    (``θ ← θ - θ·wd·lr``, ``lr = schedule(iterations)``) and then takes the
    :func:`keras_adam` step, so ``θ ← θ - lr·wd·θ - lr·sqrt(1-b2^t)/(1-b1^t)·m/(sqrt(v)+eps)``.
    Argument order and defaults are Keras' (``weight_decay`` second, 0.004).

    Args:
        learning_rate, beta_1, beta_2, epsilon, amsgrad: as in :func:`keras_adam`.
        weight_decay: non-negative decoupled decay rate.
        name: ignored.

    Returns:
        A ``GradientTransformation``; its ``update`` needs ``params``.

    Example (zero gradient: only the decay acts, θ·(1 - 0.1·0.5)):
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> tx = fa.compat.keras_adamw(learning_rate=0.1, weight_decay=0.5)
        >>> params = jnp.array([2.0])
        >>> updates, _ = tx.update(jnp.zeros(1), tx.init(params), params)
        >>> fa.apply_updates(params, updates)
        Array([1.9], dtype=float32)
    """
    del name
    return _keras_chain(learning_rate, beta_1, beta_2, epsilon, amsgrad, weight_decay)


@compat_args.reject_unknown_options
def tf1_adam(
    learning_rate: ScalarOrSchedule = 0.001,
    beta1: Scalar = 0.9,
    beta2: Scalar = 0.999,
    epsilon: Scalar = 1e-8,
    use_locking: bool = False,
    name: str = "Adam",
) -> GradientTransformation:
    r"""``tf.compat.v1.train.AdamOptimizer`` as a gradient transformation.

    TF1's documented update ("epsilon hat", Kingma & Ba before §2.1)::

        lr_t = lr·sqrt(1-b2^t)/(1-b1^t)
        m ← b1·m + (1-b1)·g;  v ← b2·v + (1-b2)·g²
        θ ← θ - lr_t · m / (sqrt(v) + epsilon)

    the Keras convention with TF1's default ``epsilon=1e-8`` (no AMSGrad, no
    weight decay). ``use_locking`` and ``name`` are accepted and ignored. TF1
    keeps ``b^t`` as a running float32 product (``beta1_power *= beta1``),
    where this computes the power: the two differ by float32 rounding only.
    Checked against TF1's formula in float64 (TensorFlow is not a test
    dependency), not against TensorFlow itself.

    Args:
        learning_rate: non-negative rate or schedule ``count -> lr``.
        beta1, beta2: moment decays in [0, 1).
        epsilon: non-negative "epsilon hat".
        use_locking, name: ignored.

    Returns:
        A ``GradientTransformation``.

    Example:
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> tx = fa.compat.tf1_adam(learning_rate=0.1)
        >>> updates, _ = tx.update(jnp.array([2.0]), tx.init(jnp.zeros(1)))
        >>> round(float(updates[0]), 5)
        -0.1
    """
    del use_locking, name
    compat_args.check_common("learning_rate", learning_rate, "epsilon", epsilon, None)
    checks.check_hyperparameter("beta1", beta1, high=1.0)
    checks.check_hyperparameter("beta2", beta2, high=1.0)
    return chain(
        _adam_core(beta1, beta2, epsilon, False, TF1),
        identity(),
        scale_by_learning_rate(learning_rate),
    )
