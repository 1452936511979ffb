"""Adam for many leaves in few launches: a Pallas kernel for GPUs (Triton lowering).

XLA compiles the per-leaf Adam step into one fused loop per leaf: a tree of
hundreds of leaves is hundreds of launches, each with its tail. This kernel
steps up to :data:`LEAVES_PER_CALL` leaves in one launch, as PyTorch's
multi-tensor ``fused=True`` Adam does: one program per
:data:`ELEMENTS_PER_PROGRAM` elements of a leaf (each program finds its leaf
from its index), reading θ, g, m, v once and writing θ, m, v once. Moments are
float32 or bfloat16 (``mu_dtype``/``nu_dtype``), computed in float32 and stored
as the chain stores them (a narrower ``v`` takes ``min(g², max/2)``, and a
narrower moment saturates at its dtype's largest value,
:mod:`functional_adam.core.numerics`). The arithmetic is
:func:`functional_adam.kernels.adam_cpu.reference_leaf`'s::

    m ← (1-b1)·g + b1·m        v ← (1-b2)·g² + b2·v
    θ ← θ - lr·(m̂/(sqrt(v̂ + eps_root) + eps) + wd·θ)

``interpret=True`` runs the same kernel with Pallas' interpreter on any backend
(how the tests check it on a CPU); on a GPU Triton compiles it.
``fa.update_and_apply`` takes it on a GPU when ``FUNCTIONAL_ADAM_GPU_GROUPED=1``
is set (see :func:`enabled`); otherwise XLA's per-leaf fusions run the step.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from functional_adam.kernels.adam_cpu import KernelScalars, reference_step

LEAVES_PER_CALL = 16  # leaves per launch (each leaf is a branch of the kernel)
ELEMENTS_PER_PROGRAM = 4096
NUM_WARPS = 4
INTERPRET = False  # update_and_apply's Pallas calls run interpreted (tests on a CPU set it)
MOMENT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def enabled() -> bool:
    """Whether ``update_and_apply`` takes the grouped kernel on a GPU (``FUNCTIONAL_ADAM_GPU_GROUPED=1``).

    Opt-in until it is timed against XLA's per-leaf fusions on a GPU
    (``python benchmarks/update_step.py --gpu-grouped`` prints both).
    """
    return os.environ.get("FUNCTIONAL_ADAM_GPU_GROUPED", "0") == "1"


def _kernel(starts, sizes, decay, nesterov, scalars_ref, *refs):
    """Program ``i`` steps one run of elements of the leaf whose programs ``starts`` cover ``i``."""
    n_leaves = len(sizes)
    ins, outs = refs[: 4 * n_leaves], refs[4 * n_leaves :]
    s = KernelScalars(*(scalars_ref[j] for j in range(len(KernelScalars._fields))))
    i = pl.program_id(0)
    offsets = jnp.arange(ELEMENTS_PER_PROGRAM)
    for k, size in enumerate(sizes):

        @pl.when((i >= starts[k]) & (i < starts[k + 1]))
        def _(k=k, size=size):
            p_ref, g_ref, m_ref, v_ref = ins[4 * k : 4 * k + 4]
            p_out, m_out, v_out = outs[3 * k : 3 * k + 3]
            first = (i - starts[k]) * ELEMENTS_PER_PROGRAM
            ok = first + offsets < size
            run = pl.ds(first, ELEMENTS_PER_PROGRAM)
            p, g, m, v = (
                plt.load(r.at[run], mask=ok, other=0) for r in (p_ref, g_ref, m_ref, v_ref)
            )
            ((p, m, v),) = reference_step(s, [(p, g, m, v)], (decay[k],), nesterov)
            for ref, x in ((p_out, p), (m_out, m), (v_out, v)):
                plt.store(ref.at[run], x, mask=ok)


def _call(scalars, leaves, decay, nesterov, interpret):
    programs = [pl.cdiv(p.size, ELEMENTS_PER_PROGRAM) for p, *_ in leaves]
    starts = tuple(int(x) for x in np.concatenate([[0], np.cumsum(programs)]))
    sizes = tuple(int(p.size) for p, *_ in leaves)
    operands, out_shape, aliases = [scalars], [], {}
    for k, leaf in enumerate(leaves):
        p, g, m, v = (x.reshape(-1) for x in leaf)
        operands += [p, g, m, v]
        out_shape += [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (p, m, v)]
        aliases |= {1 + 4 * k: 3 * k, 3 + 4 * k: 3 * k + 1, 4 + 4 * k: 3 * k + 2}
    any_space = pl.BlockSpec(memory_space=pl.ANY)
    flat = pl.pallas_call(
        functools.partial(_kernel, starts, sizes, decay, nesterov),
        out_shape=out_shape,
        grid=(starts[-1],),
        in_specs=[any_space] * len(operands),
        out_specs=[any_space] * len(out_shape),
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
        interpret=interpret,
        name="functional_adam_adam_grouped",
    )(*operands)
    return [
        tuple(x.reshape(p.shape) for x in flat[3 * k : 3 * k + 3])
        for k, (p, *_) in enumerate(leaves)
    ]


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def adam_step(
    scalars: jax.Array,
    leaves: Sequence[tuple[jax.Array, jax.Array, jax.Array, jax.Array]],
    decay: tuple[bool, ...],
    nesterov: bool,
    interpret: bool = False,
) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    """:func:`functional_adam.kernels.adam_cpu.adam_step` as grouped Pallas launches.

    ``(θ, g, m, v)`` per leaf in (θ and g float32, m and v float32 or bfloat16),
    ``(θ, m, v)`` per leaf out, aliased to their inputs. Leaves go in launches of
    :data:`LEAVES_PER_CALL`. Differentiable through
    :func:`~functional_adam.kernels.adam_cpu.reference_step`.

    Example (interpreted, so it runs on a CPU too):
        >>> import jax.numpy as jnp
        >>> one = jnp.ones(3)
        >>> s = jnp.array([0.9, 0.1, 0.999, 0.001, 1e-8, 0.0, 10.0, 1000.0, 1 / 0.19, -0.1, 0.0])
        >>> p, m, v = adam_step(s, [(one, one, 0 * one, 0 * one)], (False,), False, True)[0]
        >>> p  # θ - 0.1·m̂/sqrt(v̂) with m̂ = v̂ = 1
        Array([0.9, 0.9, 0.9], dtype=float32)
    """
    out = [(p, m, v) for p, _, m, v in leaves]  # empty leaves stay as they are
    index = [i for i, (p, *_) in enumerate(leaves) if p.size]
    for c in range(0, len(index), LEAVES_PER_CALL):
        part = index[c : c + LEAVES_PER_CALL]
        results = _call(
            scalars, [leaves[i] for i in part], tuple(decay[i] for i in part), nesterov, interpret
        )
        for i, result in zip(part, results, strict=True):
            out[i] = result
    return out


@adam_step.defjvp
def _adam_step_jvp(decay, nesterov, interpret, primals, tangents):
    del interpret
    return jax.jvp(lambda s, x: reference_step(s, x, decay, nesterov), primals, tangents)
