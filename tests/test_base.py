"""The protocol: GradientTransformation, chain, identity, apply_updates, scaling."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import functional_adam as fa


def test_gradient_transformation_has_optax_shape():
    tx = fa.adam(1e-3)
    assert tx._fields == optax.GradientTransformation._fields == ("init", "update")
    init, update = tx  # unpacks like Optax's
    assert callable(init) and callable(update)


def test_identity_passes_updates_and_state_through():
    tx = fa.identity()
    updates = {"a": jnp.arange(3.0), "b": None}
    state = tx.init(updates)
    out, new_state = tx.update(updates, state, value=1.0)
    assert out is updates and new_state == state


def test_chain_order_and_state():
    tx = fa.chain(fa.scale(2.0), fa.scale_by_learning_rate(0.5))
    state = tx.init(jnp.ones(2))
    assert isinstance(state, tuple) and len(state) == 2
    out, _ = tx.update(jnp.array([1.0, -3.0]), state)
    chex.assert_trees_all_equal(out, jnp.array([-1.0, 3.0]))


def test_chain_forwards_extra_args_only_to_those_that_take_them():
    seen = {}

    def init(params):
        return fa.EmptyState()

    def update(updates, state, params=None, **extra_args):
        seen.update(extra_args)
        return updates, state

    def strict_update(updates, state, params=None):  # an Optax-style update without **kwargs
        return updates, state

    tx = fa.chain(
        fa.GradientTransformation(init, update), fa.GradientTransformation(init, strict_update)
    )
    tx.update(jnp.ones(1), tx.init(jnp.ones(1)), None, value=3.0, key="k")
    assert seen == {"value": 3.0, "key": "k"}


def test_chain_nests():
    inner = fa.chain(fa.scale_by_adam(), fa.scale(2.0))
    outer = fa.chain(inner, fa.scale_by_learning_rate(1e-2))
    flat = fa.chain(fa.scale_by_adam(), fa.scale(2.0), fa.scale_by_learning_rate(1e-2))
    g = jnp.array([1.0, -2.0])
    a, _ = outer.update(g, outer.init(g))
    b, _ = flat.update(g, flat.init(g))
    chex.assert_trees_all_equal(a, b)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.complex64])
def test_apply_updates_keeps_param_dtype_and_none(dtype):
    params = {"w": jnp.ones(3, dtype), "frozen": None, "nested": [jnp.zeros((), dtype)]}
    updates = {
        "w": jnp.full(3, 0.25, jnp.float32),
        "frozen": None,
        "nested": [jnp.asarray(0.5, jnp.float32)],
    }
    new = fa.apply_updates(params, updates)
    assert new["frozen"] is None
    chex.assert_trees_all_equal_dtypes(new, params)
    chex.assert_trees_all_close(new["w"], jnp.full(3, 1.25, dtype))


def test_learning_rate_schedule_is_called_with_the_count():
    counts = []

    def schedule(count):
        counts.append(count)
        return 0.1 * (count + 1)

    tx = fa.scale_by_learning_rate(schedule)
    state = tx.init(None)
    outs = []
    for _ in range(3):
        u, state = tx.update(jnp.ones(1), state)
        outs.append(float(u[0]))
    assert [int(c) for c in counts] == [0, 1, 2]
    assert outs == pytest.approx([-0.1, -0.2, -0.3])


def test_learning_rate_keeps_update_dtype():
    tx = fa.scale_by_learning_rate(jnp.asarray(0.5, jnp.float32))
    u, _ = tx.update(jnp.ones(2, jnp.bfloat16), tx.init(None))
    assert u.dtype == jnp.bfloat16


def test_flip_sign():
    tx = fa.scale_by_learning_rate(0.5, flip_sign=False)
    u, _ = tx.update(jnp.ones(1), tx.init(None))
    assert float(u[0]) == 0.5


def test_weight_decay_mask_prefix_and_callable():
    params = {"enc": {"w": jnp.ones(2), "b": jnp.ones(2)}, "head": jnp.ones(2)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    prefix = fa.add_decayed_weights(0.5, mask={"enc": True, "head": False})
    out, _ = prefix.update(zeros, prefix.init(params), params)
    assert float(out["enc"]["b"][0]) == 0.5 and float(out["head"][0]) == 0.0
    by_fn = fa.add_decayed_weights(0.5, mask=lambda p: jax.tree.map(lambda x: x is p["head"], p))
    out, _ = by_fn.update(zeros, by_fn.init(params), params)
    assert float(out["head"][0]) == 0.5 and float(out["enc"]["w"][0]) == 0.0


def test_weight_decay_schedule_counts():
    tx = fa.add_decayed_weights(lambda count: 0.1 * count)
    params = jnp.ones(1)
    state = tx.init(params)
    outs = []
    for _ in range(3):
        u, state = tx.update(jnp.zeros(1), state, params)
        outs.append(float(u[0]))
    assert outs == pytest.approx([0.0, 0.1, 0.2])
