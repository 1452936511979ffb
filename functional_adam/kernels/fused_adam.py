"""Adam, AdamW, NAdam and NAdamW as a chain that ``update_and_apply`` runs in one kernel pass.

:func:`adam_chain` builds ``chain(scale_by_adam, [add_decayed_weights],
scale_by_learning_rate)`` and, with it, the step that computes the same chain
and the parameter update in one call of the C++ kernel
(:mod:`functional_adam.kernels.adam_cpu`). The two share the state, so they can
alternate, and the arithmetic and its order (equal within a rounding of the
last bit, tested in ``tests/test_native.py``). The chain is a
:class:`~functional_adam.kernels.dispatch.Fusable`: ``update_and_apply`` finds
its kernel step through ``chain``, ``optax.chain`` and
``optax.inject_hyperparams``.

The kernel step applies where every parameter, gradient and moment is float32
(or every one float64), every hyperparameter is a scalar, and the devices are
CPUs; or, with ``FUNCTIONAL_ADAM_GPU_GROUPED=1``, on one GPU with float32
parameters and float32 or bfloat16 moments (the grouped Pallas kernel of
:mod:`functional_adam.kernels.adam_gpu`). Anything else (bf16 moments on a CPU,
several GPUs, a tree that does not match the state) takes the chain, which also
gives the errors for bad input. With several CPU devices each runs the kernel on
its shards of each leaf, with the gradient resharded to its parameter's sharding
where they differ (:mod:`functional_adam.kernels.per_shard`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from functional_adam.core.base import GradientTransformation, ScalarOrSchedule, chain
from functional_adam.core.numerics import safe_increment
from functional_adam.kernels import adam_cpu, build, per_shard
from functional_adam.kernels.dispatch import fusable
from functional_adam.optimizers.adam import ScaleByAdamState, bias_corrections, scale_by_adam
from functional_adam.transforms.learning_rate import scale_by_learning_rate
from functional_adam.transforms.weight_decay import (
    WeightDecaySchedule,
    add_decayed_weights,
    decay_flags,
)


def _kernel_leaves(grads, adam_state, params, where: str):
    """The ``(p, g, m, v)`` of each leaf and its dtype, or ``None`` if the kernel cannot take them.

    The CPU kernel takes float32 or float64 everywhere; the GPU kernel float32
    θ and g with float32 or bfloat16 moments.
    """
    p_leaves, treedef = jax.tree.flatten(params)
    trees = (grads, adam_state.mu, adam_state.nu)
    if any(jax.tree.structure(t) != treedef for t in trees) or not p_leaves:
        return None
    leaves = list(zip(p_leaves, *(treedef.flatten_up_to(t) for t in trees), strict=True))
    dtype = jnp.dtype(p_leaves[0].dtype)
    if dtype.name not in build.TARGETS or (where == "gpu" and dtype != jnp.float32):
        return None
    moment_dtypes = {dtype, jnp.dtype(jnp.bfloat16)} if where == "gpu" else {dtype}
    for p, g, m, v in leaves:
        if any(x.shape != p.shape for x in (g, m, v)) or {p.dtype, g.dtype} != {dtype}:
            return None
        if not {m.dtype, v.dtype} <= moment_dtypes:
            return None
    return leaves, treedef, dtype


def _where() -> str | None:
    """Where ``update_and_apply`` runs the one-pass step: ``"cpu"``, ``"gpu"`` or ``None`` (the chain)."""
    if cpu_kernel_applies():
        return "cpu"
    if jax.default_backend() == "gpu" and jax.device_count() == 1:
        from functional_adam.kernels import adam_gpu  # imports Pallas: only where it runs

        return "gpu" if adam_gpu.enabled() else None
    return None


def cpu_kernel_applies() -> bool:
    """Whether a CPU kernel may run the step: the devices are CPUs, and the kernel loads.

    On an accelerator XLA fuses the step. With several CPU devices the kernel runs
    on each device's shards (:mod:`functional_adam.kernels.per_shard`).
    """
    return jax.default_backend() == "cpu" and build.available()


def decay_rate(weight_decay: ScalarOrSchedule, decay_state: Any) -> tuple[Any, Any]:
    """This step's weight decay and ``add_decayed_weights``' next state."""
    if not callable(weight_decay):
        return weight_decay, decay_state
    return weight_decay(decay_state.count), WeightDecaySchedule(safe_increment(decay_state.count))


def step_scalars(hyper: dict, count, lr_tx, lr_state, decay_state: list, params, dtype):
    """This step's :class:`~functional_adam.kernels.adam_cpu.KernelScalars` and decay flags.

    Runs the learning-rate (and weight-decay) stages of the chain on their
    scalars: returns ``(scalars, flags, decay_state, lr_state)`` with their new
    states, or ``None`` where a hyperparameter is not a scalar (the chain
    broadcasts it; the kernel cannot). ``hyper`` holds ``b1, b2, eps, eps_root``
    and, with a decay stage (``decay_state`` not empty), ``weight_decay, mask``.
    """
    b1, b2 = hyper["b1"], hyper["b2"]
    bc = bias_corrections(b1, b2, count)
    neg_lr, lr_state = lr_tx.update(jnp.ones([], dtype), lr_state)  # exactly -lr
    rate, flags = 0.0, [False] * len(jax.tree.leaves(params))
    if decay_state:
        rate, decay_state[0] = decay_rate(hyper["weight_decay"], decay_state[0])
        flags = decay_flags(hyper["mask"], params)
    scalars = adam_cpu.KernelScalars(
        b1, 1 - b1, b2, 1 - b2, hyper["eps"], hyper["eps_root"],
        *(1 / jnp.asarray(x).astype(dtype) for x in bc),
        neg_lr, rate,
    )  # fmt: skip
    if any(jnp.ndim(x) != 0 for x in scalars):
        return None
    return scalars, flags, decay_state, lr_state


def adam_chain(
    *,
    b1: Any,
    b2: Any,
    eps: Any,
    eps_root: Any,
    mu_dtype: Any,
    nu_dtype: Any,
    nesterov: bool,
    learning_rate: ScalarOrSchedule,
    weight_decay: ScalarOrSchedule | None = None,
    mask: Any = None,
) -> GradientTransformation:
    """``chain(scale_by_adam, [add_decayed_weights,] scale_by_learning_rate)``, fusable.

    ``weight_decay=None`` leaves the decay stage out (Adam, NAdam).
    """
    direction = scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nu_dtype, nesterov=nesterov)
    decay = () if weight_decay is None else (add_decayed_weights(weight_decay, mask),)
    lr_tx = scale_by_learning_rate(learning_rate)
    tx = chain(direction, *decay, lr_tx)

    def fused(grads, state, params, **extra_args):
        del extra_args
        where = _where()
        if not (isinstance(state, tuple) and len(state) == 2 + len(decay)) or where is None:
            return None
        adam_state, *decay_state, lr_state = state
        if not isinstance(adam_state, ScaleByAdamState):
            return None
        found = _kernel_leaves(grads, adam_state, params, where)
        if found is None:
            return None
        leaves, treedef, dtype = found
        if jax.device_count() > 1 and not per_shard.supported(leaves):
            return None  # a mesh of Auto and Explicit axes together
        count = safe_increment(adam_state.count)
        hyper = dict(b1=b1, b2=b2, eps=eps, eps_root=eps_root, weight_decay=weight_decay, mask=mask)
        found = step_scalars(hyper, count, lr_tx, lr_state, decay_state, params, dtype)
        if found is None:
            return None  # per-leaf or vector hyperparameters: the chain broadcasts them
        scalars, flags, decay_state, lr_state = found
        if where == "gpu":
            from functional_adam.kernels import adam_gpu

            step = functools.partial(adam_gpu.adam_step, interpret=adam_gpu.INTERPRET)
        else:
            step = adam_cpu.adam_step
        out = step(scalars.stack(dtype), leaves, tuple(flags), nesterov)
        new_params, mu, nu = (treedef.unflatten([o[i] for o in out]) for i in range(3))
        return new_params, (ScaleByAdamState(count, mu, nu), *decay_state, lr_state)

    return fusable(tx, fused)
