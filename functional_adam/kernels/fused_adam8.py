"""8-bit Adam and AdamW as a chain that ``update_and_apply`` runs in one kernel pass.

:func:`adam8_chain` builds ``chain(scale_by_adam_8bit, [add_decayed_weights],
scale_by_learning_rate)`` and, with it, the step that computes the same chain and
the parameter update in one pass (and, for a plain ``update`` on one device, the same
pass writing the update ``-lr·(u [+ wd·θ])`` over the gradient instead of θ; the
float32-moment leaves then in ``jax.numpy``): on the CPU the C++ kernels (8-bit
leaves: :mod:`functional_adam.kernels.adam8_cpu`; leaves below ``min_8bit_size``,
which keep float32 moments: :mod:`functional_adam.kernels.adam_cpu`), on GPUs
the Pallas kernel (:mod:`functional_adam.kernels.adam8_gpu`; the float32-moment
leaves in ``jax.numpy``). They share the chain's state, so they can alternate;
the codes and scales equal the chain's and the parameters are within a few ulps
(``tests/test_native_8bit.py``, ``tests/test_pallas_8bit.py``).

The kernel step applies where every parameter and gradient is float32, every
plain moment float32, every hyperparameter a scalar, and the devices are CPUs
whose kernel was built with its AVX-512 code (its scalar code, for other CPUs,
is slower than XLA's loops), or GPUs; anything else takes the chain, which
also gives the errors for bad input. With several devices each runs the
kernels on its shards (:mod:`functional_adam.kernels.per_shard`): an 8-bit leaf
laid out per shard (:mod:`functional_adam.storage.shard_blocks`), or flat with its
blocks along its parameter's first-axis shards, steps there, any other on gathered
arrays (:class:`functional_adam.kernels.adam8_cpu.Blocks`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from functional_adam.core.base import GradientTransformation, ScalarOrSchedule, chain
from functional_adam.core.numerics import safe_increment
from functional_adam.kernels import adam8_cpu, adam_cpu, build, per_shard
from functional_adam.kernels.dispatch import fusable
from functional_adam.kernels.fused_adam import cpu_kernel_applies, step_scalars
from functional_adam.storage import shard_blocks
from functional_adam.storage.quantized import BlockQuantized
from functional_adam.transforms.learning_rate import scale_by_learning_rate
from functional_adam.transforms.weight_decay import add_decayed_weights

_MAX_BLOCK = 4096  # the kernel keeps a block's float32 moments on its stack


def _is_f32(x: Any, shape: tuple[int, ...]) -> bool:
    return getattr(x, "dtype", None) == jnp.float32 and getattr(x, "shape", None) == shape


def _fits_blocks(shape: tuple[int, ...], mu: Any, nu: Any) -> bool:
    """Whether ``mu``/``nu`` are the int8/uint8 blocks of a leaf of ``shape``: flat, or
    shard-major (:mod:`functional_adam.storage.shard_blocks`)."""
    if not (isinstance(mu, BlockQuantized) and isinstance(nu, BlockQuantized)):
        return False
    if mu.codes.dtype != jnp.int8 or nu.codes.dtype != jnp.uint8:
        return False
    block = mu.codes.shape[-1]
    shapes_match = nu.codes.shape == mu.codes.shape and (
        mu.scale.shape == nu.scale.shape == mu.codes.shape[:-1]
    )
    scales_f32 = mu.scale.dtype == nu.scale.dtype == jnp.float32
    if not (shapes_match and scales_f32 and 0 < block <= _MAX_BLOCK):
        return False
    if len(shape) and mu.codes.ndim == len(shape) + 2:
        return shard_blocks.layout_error(shape, mu.codes.shape, block, None) is None
    if mu.codes.ndim != 2:
        return False
    blocks, size = mu.codes.shape[0], math.prod(shape)
    return (blocks - 1) * block < size <= blocks * block or size == blocks == 0


def kernel_leaves(grads: Any, state: Any, params: Any):
    """``(treedef, leaves)`` with each leaf ``(θ, g, mu, nu)``, or ``None`` if a kernel cannot take them.

    A leaf's ``mu``/``nu`` are either :class:`BlockQuantized` (8-bit) or float32 arrays.
    """
    p_leaves, treedef = jax.tree.flatten(params)
    if not p_leaves or jax.tree.structure(grads) != treedef:
        return None
    try:
        mu, nu = (treedef.flatten_up_to(t) for t in (state.mu, state.nu))
    except (ValueError, TypeError):
        return None
    leaves = list(zip(p_leaves, jax.tree.leaves(grads), mu, nu, strict=True))
    for p, g, m, v in leaves:
        if not (_is_f32(p, p.shape) and _is_f32(g, p.shape)):
            return None
        plain = _is_f32(m, p.shape) and _is_f32(v, p.shape)
        if not (plain or _fits_blocks(p.shape, m, v)):
            return None
    return treedef, leaves


def _where() -> str | None:
    """Where the one-pass step runs: ``"cpu"`` (C++ kernels), ``"gpu"`` (Pallas), or ``None``."""
    backend = jax.default_backend()
    if backend == "cpu":  # with several devices, each on its shards (kernels/per_shard.py)
        # The kernel's scalar code (CPUs without AVX-512) is slower than XLA's loops.
        return "cpu" if cpu_kernel_applies() and build.has_8bit_simd() else None
    return "gpu" if backend == "gpu" else None  # with several, each on its shards


def _kernel_step(scalars, leaves, flags, nesterov, where, updates=False, code="dynamic"):
    """New ``(θ, mu, nu)`` of every leaf (``updates``: the update instead of θ): 8-bit leaves
    in one kernel, plain ones in another (on a GPU, and for updates: in ``jax.numpy``,
    which XLA fuses into one loop per leaf)."""
    out = [None] * len(leaves)
    groups = {True: [], False: []}
    for i, leaf in enumerate(leaves):
        groups[isinstance(leaf[2], BlockQuantized)].append(i)
    if where == "gpu":
        from functional_adam.kernels import adam8_gpu  # imports Pallas: only where it runs

        steps = {
            True: lambda *args: adam8_gpu.adam8_step(*args, adam8_gpu.INTERPRET, updates, code),
            False: lambda *args: adam_cpu.reference_step(*args, updates),
        }
    else:
        steps = {
            True: lambda *args: adam8_cpu.adam8_step(*args, True, updates, code),
            False: (lambda *args: adam_cpu.reference_step(*args, True))
            if updates
            else adam_cpu.adam_step,
        }
    stacked = scalars.stack(jnp.float32)
    for quantized, index in groups.items():
        if not index:
            continue
        step = steps[quantized]
        results = step(
            stacked, [leaves[i] for i in index], tuple(flags[i] for i in index), nesterov
        )
        for i, result in zip(index, results, strict=True):
            out[i] = result
    return out


def adam8_chain(
    direction: GradientTransformation,
    state_type: type,
    *,
    b1: Any,
    b2: Any,
    eps: Any,
    eps_root: Any,
    nesterov: bool,
    learning_rate: ScalarOrSchedule,
    weight_decay: ScalarOrSchedule | None = None,
    mask: Any = None,
    code: str = "dynamic",
) -> GradientTransformation:
    """``chain(direction, [add_decayed_weights,] scale_by_learning_rate)``, fusable.

    ``direction`` is ``scale_by_adam_8bit`` with these hyperparameters (Optax's
    convention) and 8-bit ``code``, whose state is a ``state_type``; ``weight_decay=None``
    leaves the decay stage out (Adam).
    """
    decay = () if weight_decay is None else (add_decayed_weights(weight_decay, mask),)
    lr_tx = scale_by_learning_rate(learning_rate)
    tx = chain(direction, *decay, lr_tx)

    def fused(grads, state, params, updates=False, **extra_args):
        del extra_args
        if not (isinstance(state, tuple) and len(state) == 2 + len(decay)):
            return None
        adam_state, *decay_state, lr_state = state
        where = _where()
        if not isinstance(adam_state, state_type) or where is None:
            return None
        if updates and jax.device_count() > 1:
            return None  # on a mesh a plain update takes the chain (and its layout checks)
        found = kernel_leaves(grads, adam_state, params)
        if found is None:
            return None
        treedef, leaves = found
        if jax.device_count() > 1 and not per_shard.supported([jax.tree.leaves(x) for x in leaves]):
            return None  # a mesh of Auto and Explicit axes together
        count = safe_increment(adam_state.count)
        hyper = dict(b1=b1, b2=b2, eps=eps, eps_root=eps_root, weight_decay=weight_decay, mask=mask)
        found = step_scalars(hyper, count, lr_tx, lr_state, decay_state, params, jnp.float32)
        if found is None:
            return None  # per-leaf or vector hyperparameters: the chain broadcasts them
        scalars, flags, decay_state, lr_state = found
        out = _kernel_step(scalars, leaves, flags, nesterov, where, updates, code)
        first, mu, nu = (treedef.unflatten([o[i] for o in out]) for i in range(3))
        return first, (state_type(count, mu, nu), *decay_state, lr_state)

    def fused_updates(grads, state, params, **extra_args):
        return fused(grads, state, params, updates=True, **extra_args)

    return fusable(tx, fused, fused_updates)
