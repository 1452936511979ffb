"""The fused CPU Adam step: its scalars, its arithmetic in ``jax.numpy``, and its call.

The C++ kernel (``adam_cpu.cc``, built and loaded by :mod:`functional_adam.kernels.build`)
makes one pass over all leaves together, in place, on XLA's intra-op thread pool,
as ``torch.optim.Adam(fused=True)`` does: for each element it reads θ, g, m, v
once and writes θ, m, v once (28 bytes per float32 parameter).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from functional_adam.core.numerics import saturate, store
from functional_adam.kernels import per_shard
from functional_adam.kernels.build import TARGETS

# Leaves per kernel call: XLA's compile time grows about cubically with the number of
# aliased operands of one custom call, so long trees are cut into calls of this many.
LEAVES_PER_CALL = 32


class KernelScalars(NamedTuple):
    """The kernel's ``scalars`` operand, in the order of ``enum Scalar`` in ``adam_cpu.cc``.

    Built with :meth:`stack` and read back with ``KernelScalars(*array)``.
    """

    b1: jax.Array
    one_minus_b1: jax.Array
    b2: jax.Array
    one_minus_b2: jax.Array
    eps: jax.Array
    eps_root: jax.Array
    inv_bc1: jax.Array  # 1 / (1 - b1^t)
    inv_bc2: jax.Array  # 1 / (1 - b2^t)
    inv_bc1_next: jax.Array  # 1 / (1 - b1^(t+1)), for Nesterov
    neg_lr: jax.Array
    wd: jax.Array

    def stack(self, dtype) -> jax.Array:
        """The scalars as one 1-D array of ``dtype``, the kernel's operand."""
        return jnp.stack([jnp.asarray(x).astype(dtype) for x in self])


def reference_step(
    scalars: jax.Array,
    leaves: Sequence[tuple[jax.Array, jax.Array, jax.Array, jax.Array]],
    decay: Sequence[bool],
    nesterov: bool,
    updates: bool = False,
) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    """The kernel's arithmetic in ``jax.numpy``: its derivative rule, equal to it within rounding.

    Moments narrower than θ (bfloat16, for the GPU kernel of
    :mod:`functional_adam.kernels.adam_gpu`) are computed in θ's dtype and stored
    as the chain stores them (``saturate``/``store`` of :mod:`functional_adam.core.numerics`).
    ``updates``: the first result of each leaf is the update ``-lr·(u [+ wd·θ])``, not θ.

    Example:
        >>> import jax.numpy as jnp
        >>> one = jnp.ones(1)
        >>> s = jnp.array([0.9, 0.1, 0.999, 0.001, 1e-8, 0.0, 10.0, 1000.0, 1 / 0.19, -0.1, 0.0])
        >>> p, m, v = reference_step(s, [(one, one, 0 * one, 0 * one)], [False], False)[0]
        >>> [round(float(x[0]), 4) for x in (p, m, v)]  # p = 1 - 0.1 · m̂/sqrt(v̂), m̂ = v̂ = 1
        [0.9, 0.1, 0.001]
    """
    s = KernelScalars(*scalars)
    return [
        _reference_leaf(s, *leaf, decays, nesterov, updates)
        for leaf, decays in zip(leaves, decay, strict=True)
    ]


def _reference_leaf(s: KernelScalars, p, g, m_old, v_old, decays, nesterov, updates=False):
    """One leaf's ``(θ, m, v)`` (``updates``: the update for θ), computed in θ's dtype and
    stored in the moments' own dtypes."""
    g_sq = g * g
    if jnp.finfo(v_old.dtype).bits < jnp.finfo(g.dtype).bits:  # as the chain: keep v finite
        g_sq = saturate(g_sq, v_old.dtype)
    m = s.one_minus_b1 * g + s.b1 * m_old.astype(g.dtype)
    v = s.one_minus_b2 * g_sq + s.b2 * v_old.astype(g.dtype)
    step = s.neg_lr * direction(s, p, g, m, v, decays, nesterov)
    return step if updates else p + step, store(m, m_old), store(v, v_old)


def direction(s: KernelScalars, p, g, m, v, decays: bool, nesterov: bool) -> jax.Array:
    """``m̂/(sqrt(v̂ + eps_root) + eps) [+ wd·θ]`` from this step's moments, as the kernels order it.

    (``1/(1 - b^t)`` is a multiplier, as XLA:CPU rewrites the chain's division.)
    """
    if nesterov:
        m_hat = s.b1 * (m * s.inv_bc1_next) + s.one_minus_b1 * (g * s.inv_bc1)
    else:
        m_hat = m * s.inv_bc1
    u = m_hat / (jnp.sqrt(v * s.inv_bc2 + s.eps_root) + s.eps)
    return u + s.wd * p if decays else u


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def adam_step(
    scalars: jax.Array,
    leaves: Sequence[tuple[jax.Array, jax.Array, jax.Array, jax.Array]],
    decay: tuple[bool, ...],
    nesterov: bool,
) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    """Calls the kernel: ``(p, g, m, v)`` per leaf in, ``(p, m, v)`` per leaf out, in place.

    ``scalars`` holds :class:`KernelScalars` (stacked) in the leaves' dtype; every array of every
    leaf has that dtype. ``p``, ``m`` and ``v`` are aliased to their results, so
    with donated inputs the step writes into the buffers it reads. Leaves go in
    calls of :data:`LEAVES_PER_CALL`. With several devices each device runs the
    kernel on its shards (:mod:`functional_adam.kernels.per_shard`: ``g``, ``m``
    and ``v`` take the sharding of ``p``). Differentiable (through
    :func:`reference_step`) and batchable (``jax.vmap`` calls the kernel once per
    batch element).
    """
    return _call_kernel(scalars, list(leaves), tuple(decay), nesterov)


@adam_step.defjvp
def _adam_step_jvp(decay, nesterov, primals, tangents):
    return jax.jvp(lambda s, x: reference_step(s, x, decay, nesterov), primals, tangents)


def _call_kernel(scalars, leaves, decay, nesterov):
    if len(leaves) > LEAVES_PER_CALL:  # XLA's compile time grows ~cubically in aliases per call
        return [
            out
            for i in range(0, len(leaves), LEAVES_PER_CALL)
            for out in _call_kernel(
                scalars,
                leaves[i : i + LEAVES_PER_CALL],
                decay[i : i + LEAVES_PER_CALL],
                nesterov,
            )
        ]
    if jax.device_count() > 1:  # the arrays may be sharded: one call per device, on its shards
        kind = per_shard.Elementwise((0, 2, 3), unlinked=frozenset({1}))  # p, m, v; g resharded
        return per_shard.per_shard_call(_one_call, (decay, nesterov), scalars, leaves, kind)
    return _one_call(scalars, leaves, decay, nesterov)


def _one_call(scalars, leaves, decay, nesterov):
    """The kernel's ``jax.ffi`` call on these arrays."""
    dtype = scalars.dtype
    operands = [scalars]
    results = []
    aliases = {}
    for k, (p, g, m, v) in enumerate(leaves):
        operands += [p, g, m, v]  # any shape: the kernel sees element counts (no reshape,
        results += [jax.ShapeDtypeStruct(p.shape, dtype)] * 3  # which would cost a copy)
        aliases |= {1 + 4 * k: 3 * k, 3 + 4 * k: 3 * k + 1, 4 + 4 * k: 3 * k + 2}
    call = jax.ffi.ffi_call(
        TARGETS[np.dtype(dtype).name],
        results,
        input_output_aliases=aliases,
        vmap_method="sequential",  # under jax.vmap: one call per batch element
    )
    flat = call(*operands, decay=np.asarray(decay, np.int64), nesterov=bool(nesterov))
    return [tuple(flat[3 * k : 3 * k + 3]) for k in range(len(leaves))]
