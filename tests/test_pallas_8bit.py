"""The Pallas 8-bit Adam kernel (GPU, Triton): interpreted on the CPU it equals the XLA path,
and it lowers to Triton for CUDA. Not timed here: there is no GPU (benchmarks/adam_8bit.py)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import functional_adam as fa
from functional_adam.kernels import adam8_cpu, adam8_gpu, fused_adam8
from tests.test_native_8bit import (
    SCALARS,
    ULPS,
    _assert_states_match,
    _grads,
    _kernel_inputs,
    _tree,
)
from tests.trees import (
    assert_within_ulps,
    cuda_module,
    kernel_and_xla_steps,
    plain_update_step,
    spy_leaf_counts,
    triton_launches,
)


def _assert_matches_reference(out, reference, leaves):
    states = lambda results: [r[1:] for r in results]  # noqa: E731
    assert _assert_states_match(states(out), states(reference), True) == 0
    for (p_k, *_), (p_r, *_), (p, *_) in zip(out, reference, leaves, strict=True):
        finite = jnp.isfinite(p_r)
        np.testing.assert_array_equal(jnp.isfinite(p_k), finite)
        assert_within_ulps(
            p_k[finite], p_r[finite], ULPS, scale_floor=np.abs(np.asarray(p[finite]))
        )


@pytest.mark.parametrize(
    "block, sizes, nesterov, code",
    [
        (256, (1000, 768, 20 * 256 + 7), False, "dynamic"),
        (64, (64 * 33 + 5, 64), True, "float"),
        (4096, (5000,), True, "dynamic"),
    ],
    ids=["256", "64-nesterov-float-codes", "4096-nesterov"],
)
def test_interpreted_kernel_equals_the_reference(block, sizes, nesterov, code):
    """Several leaves in one launch, partial last blocks and groups, inf/NaN/1e20 gradients."""
    leaves = [_kernel_inputs(block, n, seed=i, bad=i == 0, code=code) for i, n in enumerate(sizes)]
    decay = tuple(i % 2 == 0 for i in range(len(leaves)))
    step = jax.jit(adam8_gpu.adam8_step, static_argnums=(2, 3, 4, 5, 6))
    out = step(SCALARS, leaves, decay, nesterov, True, False, code)
    reference = jax.jit(adam8_cpu.reference_step, static_argnums=(2, 3, 4, 5))(
        SCALARS, leaves, decay, nesterov, False, code
    )
    _assert_matches_reference(out, reference, leaves)


def test_leaves_go_in_few_launches_and_lower_to_triton_for_cuda(monkeypatch):
    """Leaves of one block size share a launch (up to LEAVES_PER_CALL, here 2): 3 leaves of
    256 and one of 64, three launches; each lowers to a Triton kernel for CUDA."""
    monkeypatch.setattr(adam8_gpu, "LEAVES_PER_CALL", 2)
    leaves = [_kernel_inputs(256, 300 + 256 * i, seed=i, bad=False) for i in range(3)]
    leaves.append(_kernel_inputs(64, 100, seed=3))
    decay = (False, True, False, True)

    # The new θ, or the update over g (tx.update's kernel) with float codes.
    for updates, code in ((False, "dynamic"), (True, "float")):

        def step(scalars, leaves, updates=updates, code=code):
            return adam8_gpu.adam8_step(scalars, leaves, decay, False, False, updates, code)

        module = cuda_module(step, SCALARS, leaves)
        assert triton_launches(module) == 3
        assert "num_warps = 4" in module


CONFIGS = {
    "adam_8bit": lambda: fa.adam_8bit(1e-2),
    "adamw_8bit_mask_schedule": lambda: fa.adamw_8bit(
        optax.cosine_decay_schedule(1e-2, 50),
        weight_decay=0.1,
        mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
    ),
    "nadam_8bit_block_64": lambda: fa.adam_8bit(3e-3, nesterov=True, block_size=64),
    "adamw_8bit_float_codes": lambda: fa.adamw_8bit(1e-2, weight_decay=0.1, code="float"),
}


@pytest.fixture
def on_a_gpu(monkeypatch):
    """update_and_apply as on one GPU, with the Pallas kernel interpreted on this CPU; returns
    the list of the kernel's calls (number of leaves each)."""
    monkeypatch.setattr(fused_adam8, "_where", lambda: "gpu")
    monkeypatch.setattr(adam8_gpu, "INTERPRET", True)
    return spy_leaf_counts(monkeypatch, adam8_gpu, "adam8_step")


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_update_and_apply_on_a_gpu_equals_the_xla_path(config, on_a_gpu):
    tx = CONFIGS[config]()
    params = _tree()
    state = tx.init(params)
    kernel, xla = kernel_and_xla_steps(tx)
    update = plain_update_step(tx)  # the plain update takes the kernel too (the update over g)
    hlos = [step.lower(params, state, params).as_text() for step in (kernel, update)]
    assert on_a_gpu == [2, 2]  # one call of the Pallas kernel for the two 8-bit leaves, each
    assert not any("functional_adam_adam" in hlo for hlo in hlos)  # and none of the CPU kernels
    differ = 0
    for t, bad in enumerate([None, np.inf, None, 1e20]):
        grads = _grads(params, t, bad)
        p_x, s_x = xla(grads, state, params)
        for p_k, s_k in (kernel(grads, state, params), update(grads, state, params)):
            # Each program contracts (1 - b1)·g + b1·m into an fma its own way: the last bit
            # of a moment, so of a scale, may differ, and a code on a bin edge with it.
            differ += _assert_states_match(s_k, s_x, False)
            for k, x, b in zip(*(jax.tree.leaves(t) for t in (p_k, p_x, params)), strict=True):
                finite = jnp.isfinite(x)
                np.testing.assert_array_equal(jnp.isfinite(k), finite)
                assert_within_ulps(
                    k[finite], x[finite], ULPS, scale_floor=np.abs(np.asarray(b)[finite])
                )
        params, state = p_x, s_x
    chex.assert_trees_all_equal_structs(s_k, s_x)
    assert differ <= 0.001 * 4 * 2 * 2 * 14592
