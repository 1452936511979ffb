"""The grouped Pallas Adam kernel (GPU, Triton): interpreted on the CPU it equals the XLA path
for float32 and bfloat16 moments, and it lowers to Triton for CUDA in few launches.
Not timed here: there is no GPU (``python benchmarks/update_step.py --gpu-grouped``)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import functional_adam as fa
from functional_adam.kernels import adam_cpu, adam_gpu, fused_adam
from tests.trees import (
    assert_within_ulps,
    cuda_module,
    kernel_and_xla_steps,
    spy_leaf_counts,
    triton_launches,
)

# θ within ULPS of max(|θ|, STEP), STEP bounding lr·|u|: the programs contract multiply-adds
# into fmas their own ways, and the XLA path divides by the bias corrections where the kernel
# multiplies by their inverses.
ULPS, STEP = 4, 0.5
SCALARS = jnp.array([0.9, 0.1, 0.999, 0.001, 1e-8, 0.0, 10.0, 1000.0, 1 / 0.19, -0.1, 0.01])


def _tree(seed=0):
    """Leaves of several sizes (one spanning programs with a partial last one, one empty)."""
    rng = np.random.default_rng(seed)
    shapes = {"w": (64, 100), "emb": (9000,), "b": (100,), "s": (), "empty": (0, 3)}
    tree = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    return tree | {"none": None}


def _grads(params, seed):
    rng = np.random.default_rng(seed)
    one = lambda p: jnp.asarray(rng.normal(size=p.shape) * np.exp(rng.uniform(-8, 2, p.shape)))  # noqa: E731
    return jax.tree.map(lambda p: one(p).astype(jnp.float32), params)


@pytest.mark.parametrize("moments", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("nesterov", [False, True])
def test_interpreted_kernel_equals_the_reference(moments, nesterov):
    """Several leaves in one launch, the moments stored in their own dtype (a huge gradient
    saturates a bfloat16 moment instead of storing inf)."""
    params = [x for x in jax.tree.leaves(_tree()) if x.size]
    grads = jax.tree.leaves(_grads(params, 1))
    if moments == jnp.bfloat16:  # g² overflows: v saturates at half bfloat16's max, not inf
        grads[0] = grads[0].at[0].set(1e20)  # "b"
    leaves = [
        (p, g, (0.1 * g).astype(moments), (0.2 * g * g).astype(moments))
        for p, g in zip(params, grads, strict=True)
    ]
    decay = tuple(i % 2 == 0 for i in range(len(leaves)))
    out = jax.jit(adam_gpu.adam_step, static_argnums=(2, 3, 4))(
        SCALARS, leaves, decay, nesterov, True
    )
    reference = jax.jit(adam_cpu.reference_step, static_argnums=(2, 3))(
        SCALARS, leaves, decay, nesterov
    )
    for (p, m, v), (p_r, m_r, v_r), (p0, *_) in zip(out, reference, leaves, strict=True):
        assert m.dtype == v.dtype == moments
        assert_within_ulps((m, v), (m_r, v_r), 1)
        assert_within_ulps(p, p_r, ULPS, scale_floor=np.maximum(np.abs(np.asarray(p0)), STEP))
        assert np.isfinite(np.asarray(v, np.float32)).all()


def test_leaves_go_in_few_launches_and_lower_to_triton_for_cuda(monkeypatch):
    """Four non-empty leaves in launches of three: two Triton kernels (the empty leaf none)."""
    monkeypatch.setattr(adam_gpu, "LEAVES_PER_CALL", 3)
    params = [x for x in jax.tree.leaves(_tree())]
    leaves = [(p, p, p, p * p) for p in params]
    decay = (False,) * len(leaves)

    def step(scalars, leaves):
        return adam_gpu.adam_step(scalars, leaves, decay, False, False)

    module = cuda_module(step, SCALARS, leaves)
    assert triton_launches(module) == 2
    assert "num_warps = 4" in module


CONFIGS = {
    "adam": lambda: fa.adam(1e-2),
    "adamw_bf16_moments_mask_schedule": lambda: fa.adamw(
        optax.cosine_decay_schedule(1e-2, 50),
        weight_decay=0.1,
        mu_dtype=jnp.bfloat16,
        nu_dtype=jnp.bfloat16,
        mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
    ),
    "nadamw_bf16_mu": lambda: fa.nadamw(3e-3, mu_dtype=jnp.bfloat16),
}


@pytest.fixture
def on_a_gpu(monkeypatch):
    """update_and_apply as on one GPU with the grouped kernel on, interpreted on this CPU;
    returns the list of the kernel's calls (number of leaves each)."""
    monkeypatch.setattr(fused_adam, "cpu_kernel_applies", lambda: False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setenv("FUNCTIONAL_ADAM_GPU_GROUPED", "1")
    monkeypatch.setattr(adam_gpu, "INTERPRET", True)
    return spy_leaf_counts(monkeypatch, adam_gpu, "adam_step")


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_update_and_apply_on_a_gpu_equals_the_xla_path(config, on_a_gpu):
    tx = CONFIGS[config]()
    params = _tree()
    state = tx.init(params)
    kernel, xla = kernel_and_xla_steps(tx)
    hlo = kernel.lower(params, state, params).as_text()
    assert on_a_gpu == [5]  # one call with the five array leaves (None has no moments)
    assert "functional_adam_adam" not in hlo  # and none of the CPU kernels
    for t in range(4):
        grads = _grads(params, t)
        (p_k, s_k), (p_x, s_x) = kernel(grads, state, params), xla(grads, state, params)
        chex.assert_trees_all_equal_dtypes(s_k, s_x)
        assert_within_ulps(jax.tree.leaves(s_k), jax.tree.leaves(s_x), 1)
        for k, x, b in zip(*(jax.tree.leaves(t) for t in (p_k, p_x, params)), strict=True):
            assert_within_ulps(k, x, ULPS, scale_floor=np.maximum(np.abs(np.asarray(b)), STEP))
        params, state = p_x, s_x


def test_opt_in_on_a_gpu(monkeypatch):
    """Without FUNCTIONAL_ADAM_GPU_GROUPED=1 a GPU keeps XLA's per-leaf fusions."""
    monkeypatch.setattr(fused_adam, "cpu_kernel_applies", lambda: False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.delenv("FUNCTIONAL_ADAM_GPU_GROUPED", raising=False)
    assert fused_adam._where() is None
    monkeypatch.setenv("FUNCTIONAL_ADAM_GPU_GROUPED", "1")
    assert fused_adam._where() == "gpu"
