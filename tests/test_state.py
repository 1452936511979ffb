"""States: abstract init, Optax's state utilities, dtypes and shapes kept through update."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import functional_adam as fa
from tests.optimizers import CASES
from tests.trees import gradient_stream, mixed_tree

# Four optimizers through the full dtype matrix below; tests/test_contract.py checks the
# dtypes of every optimizer of tests/optimizers.py.
FACTORIES = {
    "adam": lambda: fa.adam(1e-2),
    "adamw": lambda: fa.adamw(optax.linear_schedule(1e-2, 0.0, 10), weight_decay=0.1),
    "amsgrad": lambda: fa.amsgrad(1e-2),
    "nadam_mixed_dtypes": lambda: fa.nadam(1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.float32),
}
DTYPES = ["float16", "bfloat16", "float32", "float64", "complex64", "complex128"]


@pytest.mark.parametrize("case", CASES)
def test_init_from_shape_dtype_structs(case):
    tx = case.make()
    params = mixed_tree(jnp.float32)
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    concrete_state = tx.init(params)
    chex.assert_trees_all_equal_shapes_and_dtypes(tx.init(abstract), concrete_state)
    shapes = jax.eval_shape(tx.init, abstract)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
    chex.assert_trees_all_equal_shapes_and_dtypes(shapes, concrete_state)


def test_optax_state_utilities_find_our_fields():
    params = mixed_tree(jnp.float32)
    tx = fa.adam(1e-3)
    state = tx.init(params)
    chex.assert_trees_all_equal_shapes_and_dtypes(optax.tree_utils.tree_get(state, "mu"), params)
    assert int(optax.tree_utils.tree_get(state, "count")) == 0

    # tree_map_params maps a function over the parameter-shaped parts only, as used to
    # derive sharding specs for the state.
    specs = optax.tree_utils.tree_map_params(
        tx, lambda p: f"spec{p.shape}", state, transform_non_params=lambda _: "replicated"
    )
    assert specs[0].count == "replicated"
    assert specs[0].mu["dense"]["w"] == "spec(4, 3)"
    assert specs[0].nu["layers"][1][1] == "spec(2, 2, 2)"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_keeps_shape_and_dtype_through_cond_and_scan(name, dtype):
    with jax.enable_x64(dtype in ("float64", "complex128")):
        tx = FACTORIES[name]()
        params = mixed_tree(jnp.dtype(dtype))
        state0 = tx.init(params)
        grads = jax.tree.map(lambda *g: jnp.stack(g), *gradient_stream(params, 4))

        def body(carry, g):
            p, s = carry
            updates, new_s = tx.update(g, s, p)
            # lax.cond needs both branches to have identical types: the new state must
            # have the old state's shapes and dtypes, leaf by leaf.
            s = jax.lax.cond(jnp.all(jnp.isfinite(updates["dense"]["w"])), lambda: new_s, lambda: s)
            return (fa.apply_updates(p, updates), s), updates

        (p, state), updates = jax.jit(lambda c, g: jax.lax.scan(body, c, g))(
            (params, state0), grads
        )
        chex.assert_trees_all_equal_shapes_and_dtypes(state, state0)
        chex.assert_trees_all_equal_shapes_and_dtypes(p, params)
        # Updates have the gradients' dtype (here the params' dtype).
        chex.assert_trees_all_equal_dtypes(jax.tree.map(lambda u: u[0], updates), params)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "complex64"])
def test_moment_dtypes_are_the_ones_asked_for(dtype):
    params = mixed_tree(jnp.dtype(dtype))
    state = fa.scale_by_adam(mu_dtype=jnp.bfloat16, nu_dtype=jnp.float32).init(params)
    for mu, nu, p in zip(
        jax.tree.leaves(state.mu), jax.tree.leaves(state.nu), jax.tree.leaves(params), strict=True
    ):
        if jnp.iscomplexobj(p):
            assert mu.dtype == jnp.complex64  # a complex moment of at least bf16 precision
        else:
            assert mu.dtype == jnp.bfloat16
        assert nu.dtype == jnp.float32  # |g|^2 is real, also for complex params


def test_complex_second_moment_is_real_and_holds_abs_squared():
    g = jnp.array([3.0 + 4.0j, 1.0j])
    tx = fa.scale_by_adam()
    _, state = tx.update(g, tx.init(jnp.zeros(2, jnp.complex64)))
    assert state.nu.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(state.nu), 0.001 * np.array([25.0, 1.0]), rtol=1e-6)


def test_counter_is_int32_and_saturates():
    tx = fa.adam(1e-3)
    params = {"x": jnp.ones(3)}
    state = tx.init(params)
    assert state[0].count.dtype == jnp.int32
    top = jnp.iinfo(jnp.int32).max
    state = (state[0]._replace(count=jnp.asarray(top - 1, jnp.int32)), state[1])
    for _ in range(3):
        updates, state = tx.update({"x": jnp.ones(3)}, state, params)
    assert int(state[0].count) == top
    assert bool(jnp.all(jnp.isfinite(updates["x"])))


def test_schedule_counter_saturates():
    tx = fa.scale_by_learning_rate(lambda count: 1.0 / (count.astype(jnp.float32) + 1.0))
    state = fa.ScaleByScheduleState(count=jnp.asarray(jnp.iinfo(jnp.int32).max, jnp.int32))
    _, state = tx.update(jnp.ones(1), state)
    assert int(state.count) == jnp.iinfo(jnp.int32).max
