"""Property tests (hypothesis) against a float64 Adam written plainly in numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import functional_adam as fa


def reference_adam(grads, lr, b1, b2, eps, eps_root, amsgrad=False, weight_decay=0.0, params=None):
    """Adam/AMSGrad (Optax convention) and AdamW in float64 numpy: returns the final params."""
    theta = np.array(params, np.float64)
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    v_max = np.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        if amsgrad:
            v_max = np.maximum(v_max, v_hat)
            v_hat = v_max
        u = m_hat / (np.sqrt(v_hat + eps_root) + eps) + weight_decay * theta
        theta = theta - lr * u
    return theta


hyperparameters = st.fixed_dictionaries(
    {
        "lr": st.floats(1e-4, 1e-1),
        "b1": st.floats(0.0, 0.99),
        "b2": st.floats(0.5, 0.9999),
        "eps": st.floats(1e-8, 1e-3),
        "eps_root": st.sampled_from([0.0, 1e-12, 1e-6]),
    }
)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple),
    steps=st.integers(1, 12),
    hp=hyperparameters,
    variant=st.sampled_from(["adam", "amsgrad", "adamw"]),
    seed=st.integers(0, 2**16),
)
def test_matches_float64_reference(shape, steps, hp, variant, seed):
    rng = np.random.default_rng(seed)
    params = rng.normal(size=shape)
    grads = [rng.normal(size=shape) * rng.uniform(0.01, 10.0) for _ in range(steps)]
    wd = 0.01 if variant == "adamw" else 0.0
    expected = reference_adam(
        grads, **hp, amsgrad=variant == "amsgrad", weight_decay=wd, params=params
    )
    with jax.enable_x64(True):
        common = dict(b1=hp["b1"], b2=hp["b2"], eps=hp["eps"], eps_root=hp["eps_root"])
        if variant == "adamw":
            tx = fa.adamw(hp["lr"], weight_decay=wd, **common)
        else:
            tx = getattr(fa, variant)(hp["lr"], **common)
        theta = jnp.asarray(params, jnp.float64)
        state = tx.init(theta)
        step = jax.jit(tx.update)
        for g in grads:
            updates, state = step(jnp.asarray(g), state, theta)
            theta = fa.apply_updates(theta, updates)
        np.testing.assert_allclose(np.asarray(theta), expected, rtol=1e-10, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(steps=st.integers(1, 8), hp=hyperparameters, seed=st.integers(0, 2**16))
def test_float32_tracks_float64_reference(steps, hp, seed):
    """In float32 the error stays within a few ulps of the parameters per step."""
    rng = np.random.default_rng(seed)
    params = rng.normal(size=(16,))
    grads = [rng.normal(size=(16,)) for _ in range(steps)]
    expected = reference_adam(grads, **hp, params=params)
    tx = fa.adam(hp["lr"], b1=hp["b1"], b2=hp["b2"], eps=hp["eps"], eps_root=hp["eps_root"])
    theta = jnp.asarray(params, jnp.float32)
    state = tx.init(theta)
    for g in grads:
        updates, state = tx.update(jnp.asarray(g, jnp.float32), state, theta)
        theta = fa.apply_updates(theta, updates)
    np.testing.assert_allclose(
        np.asarray(theta, np.float64),
        expected,
        rtol=0,
        atol=steps * 4e-6 * (1 + np.abs(expected).max()),
    )
