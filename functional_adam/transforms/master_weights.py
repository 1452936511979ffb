r"""Training bfloat16/float16 parameters without losing small updates: ``with_master_weights``.

A bfloat16 parameter near 1 has an ulp of ``2^-7 ≈ 0.0078``: an Adam step of
``lr = 1e-3`` is less than half an ulp, so ``θ + u`` rounds back to ``θ`` and
the parameter never moves. The remedy kept here is the classic one of mixed
precision training (Micikevicius et al., "Mixed Precision Training", 2018,
https://arxiv.org/abs/1710.03740): a float32 *master copy* of each 16-bit
parameter lives in the optimizer state; the wrapped optimizer sees float32
gradients and the float32 master, the master accumulates every update exactly,
and the update handed back is the difference that brings the 16-bit parameter
to the master rounded to 16 bits::

    master ← master + inner_update(float32(g), master)
    u      = round16(master) - θ            (computed in float32, returned in θ's dtype)

so ``apply_updates(θ, u) == round16(master)``: exactly whenever ``u`` is exact
in 16 bits, which Sterbenz's lemma guarantees while a step changes ``θ`` by
less than a factor of two, and to within one rounding otherwise. The rounding
never accumulates, since the next step starts again from the master.
Parameters of 32 bits or more are passed through to the inner optimizer
unchanged and get no copy. Costs 4 more bytes per 16-bit parameter.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from functional_adam.core import checks
from functional_adam.core.base import GradientTransformation, OptState, Params, Updates


class MasterWeightsState(NamedTuple):
    """State of :func:`with_master_weights`: the float32 copies and the inner state."""

    master: Params  # master_dtype copy of each 16-bit parameter; None for the others
    inner_state: OptState


def _is_low_precision(x: Any) -> bool:
    dtype = jnp.result_type(x)
    return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4


def with_master_weights(
    inner: GradientTransformation, master_dtype: Any = jnp.float32
) -> GradientTransformation:
    r"""Wraps ``inner`` so that 16-bit parameters are trained through a float32 master copy.

    See the module docstring for the math. The master is authoritative: the
    update returned moves the parameters given to ``update`` onto the rounded
    master, so pass the parameters that ``apply_updates`` produced last step.

    Args:
        inner: the optimizer, e.g. ``adam(1e-3)``; it sees float32 gradients and
            parameters (so its moments are float32 unless asked otherwise).
        master_dtype: the dtype of the master copy (float32, or float64 with x64).

    Returns:
        A ``GradientTransformation`` with state :class:`MasterWeightsState`; its
        ``update`` needs ``params``.

    Example (lr = 1e-3 on a bfloat16 parameter at 1.0, where plain Adam cannot move it):
        >>> import jax.numpy as jnp
        >>> import functional_adam as fa
        >>> theta = jnp.ones(1, jnp.bfloat16)
        >>> plain, wrapped = fa.adam(1e-3), fa.with_master_weights(fa.adam(1e-3))
        >>> p1, s1, p2, s2 = theta, plain.init(theta), theta, wrapped.init(theta)
        >>> for _ in range(10):
        ...     g = jnp.ones(1, jnp.bfloat16)
        ...     u, s1 = plain.update(g, s1, p1); p1 = fa.apply_updates(p1, u)
        ...     u, s2 = wrapped.update(g, s2, p2); p2 = fa.apply_updates(p2, u)
        >>> float(p1[0]), float(p2[0]), round(float(s2.master[0]), 4)  # bf16(0.99) = 0.98828125
        (1.0, 0.98828125, 0.99)
    """
    master_dtype = checks.check_float_dtype("master_dtype", master_dtype)
    if master_dtype is None or master_dtype.itemsize < 4:
        raise ValueError(f"master_dtype must be float32 or float64, got {master_dtype}")

    def init(params: Params) -> MasterWeightsState:
        checks.check_float_leaves(params, "params")
        master = jax.tree.map(
            lambda p: jnp.asarray(p, master_dtype) if _is_low_precision(p) else None, params
        )
        return MasterWeightsState(master, inner.init(_full(master, params)))

    def update(updates: Updates, state: MasterWeightsState, params=None, **extra_args: Any):
        if params is None:
            raise ValueError(
                "with_master_weights needs params: call update(updates, state, params)."
            )
        checks.check_same_structure(updates, params, "the params")
        checks.check_shapes(updates, params)
        master = _full(state.master, params)
        grads = jax.tree.map(
            lambda g, m: g.astype(m.dtype) if _is_low_precision(g) else g, updates, master
        )
        inner_updates, inner_state = inner.update(grads, state.inner_state, master, **extra_args)
        treedef = jax.tree.structure(params)
        new_master, out = [], []
        for p, m, u, kept in zip(
            treedef.flatten_up_to(params),
            treedef.flatten_up_to(master),
            treedef.flatten_up_to(inner_updates),
            treedef.flatten_up_to(state.master),
            strict=True,
        ):
            if kept is None:
                new_master.append(None)
                out.append(u)
                continue
            m = m + u.astype(m.dtype)
            target = m.astype(p.dtype).astype(m.dtype)  # the master rounded to 16 bits
            new_master.append(m)
            out.append((target - p.astype(m.dtype)).astype(p.dtype))
        new_state = MasterWeightsState(treedef.unflatten(new_master), inner_state)
        return treedef.unflatten(out), new_state

    return GradientTransformation(init, update)


def _full(master: Params, params: Params) -> Params:
    """The master where there is one, the parameter itself elsewhere."""
    treedef = jax.tree.structure(params)
    leaves = [
        p if m is None else m
        for p, m in zip(treedef.flatten_up_to(params), treedef.flatten_up_to(master), strict=True)
    ]
    return treedef.unflatten(leaves)
