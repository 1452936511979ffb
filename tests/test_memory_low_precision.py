"""Moment dtypes, float32 arithmetic for 16-bit params, float16-safe eps, master weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import functional_adam as fa

LOW = [jnp.bfloat16, jnp.float16]


def _run(tx, params, grads_fn, steps):
    state = tx.init(params)
    for t in range(steps):
        updates, state = tx.update(grads_fn(t), state, params)
        params = fa.apply_updates(params, updates)
    return params, state, updates


@pytest.mark.parametrize("param_dtype", LOW)
@pytest.mark.parametrize("mu_dtype", [None, jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("nu_dtype", [None, jnp.bfloat16, jnp.float32])
def test_moments_are_stored_in_the_dtypes_asked_for(param_dtype, mu_dtype, nu_dtype):
    p = jnp.ones(5, param_dtype)
    tx = fa.adam(1e-3, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
    _, state, updates = _run(tx, p, lambda t: jnp.full(5, 0.5 + t, param_dtype), 3)
    adam_state = state[0]
    assert adam_state.mu.dtype == (mu_dtype or param_dtype)
    # float16 cannot hold |g|² > 65504: its default second moment is float32.
    default_nu = jnp.float32 if param_dtype == jnp.float16 else param_dtype
    assert adam_state.nu.dtype == (nu_dtype or default_nu)
    assert updates.dtype == param_dtype


@pytest.mark.parametrize("param_dtype", LOW)
def test_16bit_params_with_float32_moments_compute_in_float32(param_dtype):
    """bf16/fp16 params + float32 moments: moments equal float32 Adam fed the same gradients."""
    rng = np.random.default_rng(0)
    grads = [jnp.asarray(rng.standard_normal(64), param_dtype) for _ in range(20)]
    p = jnp.zeros(64, param_dtype)
    low = fa.scale_by_adam(mu_dtype=jnp.float32, nu_dtype=jnp.float32)
    ref = fa.scale_by_adam()
    s_low, s_ref = low.init(p), ref.init(p.astype(jnp.float32))
    for g in grads:
        u_low, s_low = low.update(g, s_low)
        u_ref, s_ref = ref.update(g.astype(jnp.float32), s_ref)
    np.testing.assert_allclose(s_low.mu, s_ref.mu, rtol=1e-6)
    np.testing.assert_allclose(s_low.nu, s_ref.nu, rtol=1e-6)
    assert u_low.dtype == param_dtype  # the float32 result cast once, at the end
    np.testing.assert_array_equal(u_low, u_ref.astype(param_dtype))


def test_independent_moment_dtypes_differ_where_precision_matters():
    """A bf16 second moment rounds (1-b2)·g² accumulations that a float32 one keeps."""
    g = jnp.full(4, 1.001)
    s_bf, s_32 = (
        fa.scale_by_adam(mu_dtype=jnp.float32, nu_dtype=dtype).init(jnp.zeros(4))
        for dtype in (jnp.bfloat16, jnp.float32)
    )
    for _ in range(50):
        _, s_bf = fa.scale_by_adam(mu_dtype=jnp.float32, nu_dtype=jnp.bfloat16).update(g, s_bf)
        _, s_32 = fa.scale_by_adam(mu_dtype=jnp.float32, nu_dtype=jnp.float32).update(g, s_32)
    assert s_bf.mu.dtype == jnp.float32 and s_bf.nu.dtype == jnp.bfloat16
    np.testing.assert_array_equal(s_bf.mu, s_32.mu)  # mu_dtype is the same: same first moment
    assert not np.array_equal(np.asarray(s_bf.nu, np.float32), np.asarray(s_32.nu))


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("make", [fa.adam, fa.nadam, fa.adamw, fa.amsgrad])
def test_float16_zero_gradients_stay_finite(make, steps):
    """eps = 1e-8 is 0 in float16 (a naive 0/(0+0) is NaN); the denominator is float32."""
    assert float(jnp.float16(1e-8)) == 0.0
    naive = jnp.zeros(3, jnp.float16) / (jnp.sqrt(jnp.zeros(3, jnp.float16)) + jnp.float16(1e-8))
    assert jnp.isnan(naive).all()  # what the test guards against
    p = jnp.array([1.0, -2.0, 0.0], jnp.float16)
    tx = make(1e-3)
    params, state, updates = _run(tx, p, lambda t: jnp.zeros(3, jnp.float16), steps)
    assert updates.dtype == jnp.float16
    for leaf in jax.tree.leaves((params, state, updates)):
        assert jnp.isfinite(leaf).all()
    decay = 1e-3 * 1e-4 * np.abs(np.asarray(p, np.float32)) * steps
    np.testing.assert_allclose(
        np.asarray(params, np.float32), np.asarray(p, np.float32), atol=decay.max() + 1e-3
    )


def test_float16_zero_then_nonzero_gradients_stay_finite():
    p = jnp.ones(4, jnp.float16)

    def grads(t):
        return jnp.zeros(4, jnp.float16) if t < 5 else jnp.full(4, 1e-4, jnp.float16)

    params, state, updates = _run(fa.adam(1e-3), p, grads, 10)
    assert all(jnp.isfinite(x).all() for x in jax.tree.leaves((params, state, updates)))
    assert float(updates[0]) < 0  # the small gradient still moves the parameter


def _regression(dtype, seed=0, n=256, d=32):
    kx, kw, k0 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (n, d))
    y = x @ (1.0 + jax.random.normal(kw, (d,)))
    w0 = 1.0 + 0.5 * jax.random.normal(k0, (d,))  # |w| ~ 1: bf16 ulp ~ 0.008 > lr

    def grad(w):
        g = jax.grad(lambda w: jnp.mean((x @ w - y) ** 2))(w.astype(jnp.float32))
        return g.astype(dtype)  # gradients in the parameters' dtype, as a bf16 model gives

    return w0.astype(dtype), grad


@functools.partial(jax.jit, static_argnums=(0, 1))
def _trajectory(wrap: bool, dtype, steps=400):
    w0, grad = _regression(dtype)
    tx = fa.adam(1e-3)
    tx = fa.with_master_weights(tx) if wrap else tx

    def body(carry, _):
        w, s = carry
        u, s = tx.update(grad(w), s, w)
        return (fa.apply_updates(w, u), s), None

    (w, _), _ = jax.lax.scan(body, (w0, tx.init(w0)), None, length=steps)
    return w0.astype(jnp.float32), w.astype(jnp.float32)


def test_master_weights_make_bfloat16_follow_the_float32_trajectory():
    """Measure: |w_bf16 - w_fp32| / |w_fp32 - w_0| after 400 Adam steps, lr = 1e-3."""
    w0, w32 = _trajectory(False, jnp.float32)
    _, plain = _trajectory(False, jnp.bfloat16)
    _, master = _trajectory(True, jnp.bfloat16)
    travelled = float(jnp.linalg.norm(w32 - w0))
    assert travelled > 1.0
    plain_distance = float(jnp.linalg.norm(plain - w32)) / travelled
    master_distance = float(jnp.linalg.norm(master - w32)) / travelled
    assert plain_distance > 0.5  # plain bf16: most updates are below half an ulp and vanish
    assert master_distance < 0.02  # the master copy: only bf16 rounding of the params remains
    assert master_distance < plain_distance / 20


def test_master_weights_land_on_the_rounded_master():
    p = {"w": jnp.array([1.0, 300.0, -0.01], jnp.bfloat16), "f": jnp.ones(2)}
    start = np.asarray(p["w"], np.float32)
    tx = fa.with_master_weights(fa.adam(1e-3))
    state = tx.init(p)
    assert state.master["w"].dtype == jnp.float32 and state.master["f"] is None
    for _ in range(30):
        u, state = tx.update({"w": jnp.ones(3, jnp.bfloat16), "f": jnp.ones(2)}, state, p)
        assert u["w"].dtype == jnp.bfloat16 and u["f"].dtype == jnp.float32
        p = fa.apply_updates(p, u)
        np.testing.assert_array_equal(p["w"], state.master["w"].astype(jnp.bfloat16))
    np.testing.assert_allclose(state.master["w"], start - 0.03, rtol=1e-4)
    np.testing.assert_allclose(p["f"], 1 - 0.03, rtol=1e-5)  # float32 leaves: plain Adam


def test_master_weights_jit_none_leaves_and_errors():
    p = {"w": jnp.ones(3, jnp.float16), "skip": None}
    tx = fa.with_master_weights(fa.adamw(1e-2, weight_decay=0.1))
    state = tx.init(p)
    u, state = jax.jit(tx.update)({"w": jnp.ones(3, jnp.float16), "skip": None}, state, p)
    assert u["skip"] is None and u["w"].dtype == jnp.float16
    abstract = jax.eval_shape(tx.init, p)
    assert abstract.master["w"].dtype == jnp.float32
    with pytest.raises(ValueError, match="needs params"):
        tx.update({"w": jnp.ones(3, jnp.float16), "skip": None}, state)
    with pytest.raises(ValueError, match="master_dtype"):
        fa.with_master_weights(fa.adam(1e-3), master_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="master_dtype"):
        fa.with_master_weights(fa.adam(1e-3), master_dtype=jnp.int32)


@pytest.mark.parametrize("name", ["mu_dtype", "nu_dtype"])
@pytest.mark.parametrize("bad", [jnp.int8, "int32", jnp.uint8, "not_a_dtype"])
def test_integer_or_unknown_moment_dtypes_are_rejected(name, bad):
    with pytest.raises(ValueError, match=name):
        fa.adam(1e-3, **{name: bad})


@pytest.mark.parametrize("grad", [300.0, 3000.0, 60000.0])
def test_float16_params_take_steps_of_about_lr_whatever_the_gradient(grad):
    """With float16 params and default moments, the first step moves each entry by about lr."""
    p = jnp.zeros(4, jnp.float16)
    tx = fa.adam(0.1)
    updates, _ = tx.update(jnp.full(4, grad, jnp.float16), tx.init(p), p)
    moved = jnp.abs(fa.apply_updates(p, updates).astype(jnp.float32))
    np.testing.assert_allclose(moved, 0.1, rtol=1e-2)
