r"""Cautious optimizers (Liang et al., 2024, "Cautious Optimizers: Improving Training with One
Line of Code", https://arxiv.org/abs/2411.16085): drop the coordinates where the momentum's
direction disagrees with the current gradient.

For each leaf, with ``u`` the direction of a momentum optimizer (Adam's
``m̂/(sqrt(v̂) + eps)``, Lion's sign, ...) and ``g`` the gradient::

    φ = 1[u·g > 0]                     (elementwise; Re(conj(u)·g) > 0 for complex)
    u ← u · φ / max(mean(φ), 1e-3)     (the mean over the leaf)

so the kept coordinates are scaled up by the fraction dropped, as in the
authors' reference code (``mask.div_(mask.mean().clamp_(min=1e-3))``, the
normalisation of the timm and C-Optim implementations). The mean makes the mask
a function of the whole leaf, so it is a stage of its own, wrapped around the
direction, not part of a lifted per-leaf step.

**Wrap the direction, not the full optimizer**: the mask compares ``u`` with
``g`` as they point up the loss, and the reference masks the momentum term
only, not the weight decay. Cautious AdamW is::

    chain(cautious(scale_by_adam()), add_decayed_weights(wd), scale_by_learning_rate(lr))

and a wrapped full optimizer (whose updates carry ``-lr``) would keep exactly the
wrong coordinates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from functional_adam.core.base import GradientTransformation, _accepts_extra_args
from functional_adam.core.numerics import compute_dtype, real_dtype
from functional_adam.optimizers._common import tree_where_not_none

MIN_FRACTION = 1e-3
"""The reference's floor on the kept fraction: an all-dropped leaf scales by 1000, not ∞."""


def cautious_mask(u: jax.Array, g: jax.Array) -> jax.Array:
    """``u · φ / max(mean(φ), 1e-3)`` with ``φ = 1[u·g > 0]`` for one leaf (in ``u``'s dtype).

    Example:
        >>> import jax.numpy as jnp
        >>> cautious_mask(jnp.array([1.0, 1.0, 2.0, 0.5]), jnp.array([1.0, -1.0, 1.0, -1.0]))
        Array([2., 0., 4., 0.], dtype=float32)
    """
    dtype = compute_dtype(jnp.result_type(u, g))
    u_c, g_c = u.astype(dtype), g.astype(dtype)
    agree = (u_c.conj() * g_c).real > 0 if jnp.iscomplexobj(u_c) else u_c * g_c > 0
    mask = agree.astype(real_dtype(dtype))
    # sum/n as the reference's mean() rounds it: XLA would turn a division by the constant n
    # into a product with 1/n, an ulp off; the barrier keeps n opaque.
    size = jax.lax.optimization_barrier(jnp.asarray(mask.size, mask.dtype))
    mask = mask / jnp.maximum(mask.sum() / size, MIN_FRACTION)
    return (u_c * mask).astype(u.dtype)


def cautious(direction: GradientTransformation) -> GradientTransformation:
    r"""``direction`` with the cautious mask applied to its updates (see the module docstring).

    Args:
        direction: a transformation whose updates point up the loss, like the
            gradient: ``scale_by_adam()``, ``scale_by_lion()``, ``scale_by_adan()``, ...

    Returns:
        A ``GradientTransformation`` with ``direction``'s state.

    Example (Cautious Lion: coordinates where sign(interpolation) disagrees with g are dropped):
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> tx = fa.chain(fa.cautious(fa.scale_by_lion()), fa.scale_by_learning_rate(0.1))
        >>> state = tx.init(jnp.zeros(2))
        >>> _, state = tx.update(jnp.array([1.0, 1.0]), state)  # m = 0.01·g
        >>> tx.update(jnp.array([1.0, -0.01]), state)[0]  # u = (1, 1); only coordinate 0 agrees
        Array([-0.2, -0. ], dtype=float32)
    """
    if not (hasattr(direction, "init") and hasattr(direction, "update")):
        raise TypeError(f"cautious: expected a gradient transformation, got {direction!r}")
    forward = _accepts_extra_args(direction.update)

    def update(updates, state, params=None, **extra_args):
        new, state = direction.update(updates, state, params, **(extra_args if forward else {}))
        return tree_where_not_none(cautious_mask, new, updates), state

    return GradientTransformation(direction.init, update)
