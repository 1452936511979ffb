"""A framework's two in-place stages, decay then step, rounded as that framework rounds them.

PyTorch's and Keras' AdamW decay θ in place (θ rounded to its dtype) and only
then add the step (rounded again). Summing the decay and the step before they
reach θ rounds once instead; at a small ``lr·wd`` (PyTorch's defaults: 1e-5,
about a hundred ulps of a θ of 1.5 per step) the two trajectories drift apart
by 3e-4 of the displacement over 500 steps, far more than the rest of the
float32 noise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from functional_adam.core.numerics import compute_dtype


def _rounded(x: jax.Array, theta: jax.Array) -> jax.Array:
    """``x``, kept from fusing into the next add: XLA would contract ``a·b + c`` into one FMA.

    The select returns ``x`` wherever θ is a number (and θ where it is NaN, where
    ``x`` is NaN as well); XLA cannot remove it, so a product in ``x`` is rounded
    before the add, as in the framework's separate kernels.
    """
    return jnp.where(jnp.isnan(theta), theta, x)


def staged_update(updates: Any, params: Any, decay: Callable[[jax.Array], jax.Array]) -> Any:
    r"""``(θ' + u) - θ`` per leaf with ``θ' = decay(θ)``: decay in place, then step, as a framework does.

    Per leaf, in the compute dtype
    (:func:`~functional_adam.core.numerics.compute_dtype`)::

        θ' = round(decay(θ))             # the framework's in-place decay, stored in θ's dtype
        θ_new = round(θ' + u)            # then its step, stored again
        return θ_new - θ

    ``apply_updates(θ, update)`` is then ``θ_new`` bit for bit whenever
    ``θ_new - θ`` is exact, which Sterbenz' lemma guarantees whenever
    ``θ/2 <= θ_new <= 2θ``: a step that moves θ by less than half its size.
    Otherwise (θ crossing or near 0) ``θ_new - θ`` rounds, and
    ``apply_updates`` lands within one ulp of ``max(|θ|, |θ_new|)``, one
    rounding of the framework's own size.

    Args:
        updates: the step ``u = -lr·direction`` (a pytree; ``None`` leaves pass).
        params: θ, the same structure.
        decay: ``θ -> θ'`` on one leaf in the compute dtype.

    Returns:
        The updates, in the dtypes of ``updates``.

    Example:
        >>> import jax.numpy as jnp
        >>> theta, step = jnp.array([1.5]), jnp.array([-1e-3])
        >>> u = staged_update(step, theta, lambda p: p * jnp.float32(1 - 1e-5))
        >>> bool((theta + u)[0] == (theta * jnp.float32(1 - 1e-5))[0] + step[0])
        True
    """

    def leaf(u: jax.Array, p: jax.Array) -> jax.Array:
        dtype = compute_dtype(p.dtype)
        theta = p.astype(dtype)
        decayed = decay(theta).astype(p.dtype).astype(dtype)
        new = _rounded(decayed, theta) + _rounded(u.astype(dtype), theta)
        return (new.astype(p.dtype).astype(dtype) - theta).astype(u.dtype)

    return jax.tree.map(leaf, updates, params)


def staged_steps(
    params: Any, parts: Any, decay: Callable[[jax.Array], jax.Array] | None = None
) -> Any:
    r"""Like :func:`staged_update` with several in-place steps: ``θ ← round(θ + part)`` for each.

    ``parts`` holds, per leaf, a tuple of steps added one after another (as
    PyTorch's NAdam adds its gradient and momentum terms with two ``addcdiv_``);
    ``decay`` (or none) comes first. Returns ``θ_new - θ`` per leaf, in θ's dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> theta = jnp.array([1.0])
        >>> u = staged_steps(theta, (jnp.array([2**-24]), jnp.array([2**-24])))
        >>> bool((theta + u)[0] == 1.0)  # each half-ulp step rounds back to 1 (ties to even)
        True
    """

    def leaf(p: jax.Array, steps: tuple) -> jax.Array:
        dtype = compute_dtype(p.dtype)
        theta = p.astype(dtype)
        new = theta if decay is None else decay(theta).astype(p.dtype).astype(dtype)
        for step in steps:
            new = _rounded(new, theta) + _rounded(step.astype(dtype), theta)
            new = new.astype(p.dtype).astype(dtype)
        return (new - theta).astype(p.dtype)

    leaves, treedef = jax.tree.flatten(params)
    steps = treedef.flatten_up_to(parts)
    return treedef.unflatten([leaf(p, s) for p, s in zip(leaves, steps, strict=True)])
