"""The transformations compose and compile: jit without recompiling, vmap, grad, scan."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import functional_adam as fa
from tests.optimizers import CASES, cases

DESCENDING = cases(lambda case: not case.direction_only)  # a step lowers the loss


def _loss(params, x, y):
    pred = x @ params["w"] + params["b"]
    return jnp.mean((pred - y) ** 2)


def _problem(seed=0, n=32, d=4):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(n,)), jnp.float32)
    params = {"w": jnp.zeros(d), "b": jnp.zeros(())}
    return params, x, y


def _step_fn(tx):
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return fa.apply_updates(params, updates), state, loss

    return step


@functools.cache
def _jitted(case):
    """One transformation and its jitted step per case, shared by the tests (one compilation)."""
    tx = case.make()
    return tx, jax.jit(_step_fn(tx))


@pytest.mark.parametrize("case", CASES)
def test_jit_compiles_once(case):
    tx, step = _jitted(case)
    params, x, y = _problem()
    state = tx.init(params)
    for _ in range(5):
        params, state, _ = step(params, state, x, y)
    assert step._cache_size() == 1  # the state's shapes, dtypes and structure never change


def test_jit_compiles_once_with_compile_log(caplog):
    """JAX's own compilation log shows one compilation of the step for ten calls."""
    tx = fa.adam(1e-2)
    params, x, y = _problem()
    state = tx.init(params)
    step = jax.jit(_step_fn(tx))
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        for _ in range(10):
            params, state, _ = step(params, state, x, y)
    compiled_steps = [
        r
        for r in caplog.records
        if r.getMessage().startswith("Finished XLA compilation of jit(step)")
    ]
    assert len(compiled_steps) == 1, [r.getMessage() for r in compiled_steps]


@pytest.mark.parametrize("case", DESCENDING)
def test_scan_equals_python_loop(case):
    tx, jitted = _jitted(case)
    params, x, y = _problem()
    step = _step_fn(tx)

    def body(carry, _):
        p, s = carry
        p, s, loss = step(p, s, x, y)
        return (p, s), loss

    (scan_params, scan_state), scan_losses = jax.jit(
        lambda c: jax.lax.scan(body, c, None, length=50)
    )((params, tx.init(params)))

    p, s, losses = params, tx.init(params), []
    for _ in range(50):
        p, s, loss = jitted(p, s, x, y)
        losses.append(loss)
    chex.assert_trees_all_close(scan_params, p, rtol=1e-6)
    chex.assert_trees_all_close(jax.tree.leaves(scan_state), jax.tree.leaves(s), rtol=1e-6)
    chex.assert_trees_all_close(scan_losses, jnp.stack(losses), rtol=1e-6)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("case", CASES)
def test_vmap_over_independent_optimizers(case):
    """A batch of 3 problems optimised at once under vmap equals 3 separate runs."""
    tx, single = _jitted(case)
    problems = [_problem(seed) for seed in range(3)]
    batched = jax.tree.map(lambda *xs: jnp.stack(xs), *problems)
    params, x, y = batched
    state = jax.vmap(tx.init)(params)
    step = jax.jit(jax.vmap(_step_fn(tx)))
    for _ in range(20):
        params, state, _ = step(params, state, x, y)

    for i, (p, xi, yi) in enumerate(problems):
        s = tx.init(p)
        for _ in range(20):
            p, s, _ = single(p, s, xi, yi)
        row = jax.tree.map(lambda a, i=i: a[i], params)
        chex.assert_trees_all_close(row, p, rtol=1e-5, atol=1e-7)


def test_hypergradient_of_learning_rate():
    """d loss(θ_2) / d lr through two Adam updates agrees with a finite difference."""

    def loss_after_two_steps(lr):
        tx = fa.adam(lr)
        state = tx.init(params)
        p = params
        for g in (grads0, grads0):
            updates, state = tx.update(g, state, p)
            p = fa.apply_updates(p, updates)
        return _loss(p, x, y)

    with jax.enable_x64(True):
        params, x, y = jax.tree.map(lambda a: a.astype(jnp.float64), _problem())
        grads0 = jax.grad(_loss)(params, x, y)
        lr = jnp.asarray(0.05, jnp.float64)
        hypergrad = jax.grad(loss_after_two_steps)(lr)
        h = 1e-6
        finite = (loss_after_two_steps(lr + h) - loss_after_two_steps(lr - h)) / (2 * h)
    assert jnp.isfinite(hypergrad) and abs(float(hypergrad)) > 1e-3
    np.testing.assert_allclose(float(hypergrad), float(finite), rtol=1e-5)


def test_grad_through_update_with_respect_to_gradients():
    """update is differentiable in the gradients too (needs eps_root > 0 at zero)."""
    tx = fa.scale_by_adam(eps_root=1e-8)
    state = tx.init(jnp.zeros(3))
    g = jnp.array([0.5, -1.0, 2.0])
    jac = jax.jacobian(lambda g: tx.update(g, state)[0])(g)
    # Step 1: u = g / (|g| + eps) elementwise, so the Jacobian is diagonal, ~0 away from g=0.
    np.testing.assert_allclose(np.asarray(jac), np.zeros((3, 3)), atol=1e-3)
    assert bool(jnp.all(jnp.isfinite(jac)))
