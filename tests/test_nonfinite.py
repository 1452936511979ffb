"""``skip_nonfinite``: a step with a non-finite gradient (or one that would overflow the state) is
skipped, counted, and leaves no trace in later steps."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import functional_adam as fa
from functional_adam import compat

BAD = {"nan": np.nan, "inf": -np.inf, "1e20": 1e20}  # 1e20 is finite, but g² = inf in float32

OPTIMIZERS = {
    "adam": (lambda: fa.adam(1e-2), jnp.float32),
    "adamw": (lambda: fa.adamw(1e-2, weight_decay=0.1), jnp.float32),
    "adamw_8bit": (lambda: fa.adamw_8bit(1e-2, block_size=64, min_8bit_size=64), jnp.float32),
    "master_weights_adam": (lambda: fa.with_master_weights(fa.adam(1e-2)), jnp.bfloat16),
    "torch_adamw": (lambda: compat.torch_adamw(lr=1e-2), jnp.float32),
    "keras_adamw": (lambda: compat.keras_adamw(1e-2), jnp.float32),
    "adam_flat": (lambda: fa.adam(1e-2, flat=True), jnp.float32),
}


def _params(dtype):
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.normal(size=(8, 16)), dtype),
        "b": jnp.asarray(rng.normal(size=16), dtype),
    }


def _grads(params, steps, seed=1):
    rng = np.random.default_rng(seed)
    return [
        jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        for _ in range(steps)
    ]


def _poisoned(grads, value):
    w = np.asarray(grads["w"], np.float32).copy()
    w[3, 5] = value
    return {**grads, "w": jnp.asarray(w, grads["w"].dtype)}


def _run(tx, params, stream, step):
    state = tx.init(params)
    history = []
    for grads in stream:
        params, state, updates = step(grads, state, params)
        history.append((params, state, updates))
    return history


def _update_then_apply(tx):
    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return fa.apply_updates(params, updates), state, updates

    return step


def _update_and_apply(tx):
    def step(grads, state, params):
        new_params, state = fa.update_and_apply(tx, grads, state, params)
        return new_params, state, jax.tree.map(lambda a, b: a - b, new_params, params)

    return step


# An 8-bit state takes a gradient whose square overflows without a non-finite value (the
# element saturates, test_8bit_state_absorbs_an_overflowing_gradient): nothing to skip.
CASES = [
    (name, bad, "update")
    for name in OPTIMIZERS
    for bad in BAD
    if (name, bad) != ("adamw_8bit", "1e20")
]
CASES += [(name, bad, "update_and_apply") for name in ("adam", "adamw") for bad in BAD]
APPLY = {"update": _update_then_apply, "update_and_apply": _update_and_apply}


@pytest.mark.parametrize(("name", "bad", "apply"), CASES)
def test_bad_step_is_skipped_counted_and_forgotten(name, bad, apply):
    make, dtype = OPTIMIZERS[name]
    params = _params(dtype)
    good = _grads(params, 5)
    stream = [*good[:2], _poisoned(good[2], BAD[bad]), *good[2:]]
    tx = fa.skip_nonfinite(make())
    step = jax.jit(APPLY[apply](tx))
    history = _run(tx, params, stream, step)
    clean = _run(tx, params, good, step)

    skipped_params, skipped_state, skipped_updates = history[2]
    chex.assert_trees_all_equal(skipped_params, history[1][0])  # the step did not move θ
    chex.assert_trees_all_equal(skipped_state.inner_state, history[1][1].inner_state)
    for u in jax.tree.leaves(skipped_updates):
        assert not np.any(np.asarray(u, np.float32))
    assert (int(skipped_state.notfinite_count), bool(skipped_state.last_finite)) == (1, False)
    assert int(skipped_state.total_notfinite) == 1

    final_params, final_state, _ = history[-1]
    chex.assert_trees_all_equal(final_params, clean[-1][0])
    chex.assert_trees_all_equal(final_state, clean[-1][1]._replace(total_notfinite=1))
    assert (int(final_state.notfinite_count), bool(final_state.last_finite)) == (0, True)
    chex.assert_tree_all_finite(final_params)
    assert step._cache_size() == 1  # one program for good and bad steps: no Python branching


def test_without_it_a_bad_gradient_poisons_the_state_for_good():
    """What skip_nonfinite prevents: NaN stays NaN, and a 1e20 gradient freezes the entry."""
    params = _params(jnp.float32)
    good = _grads(params, 4)
    for bad, frozen in [(np.nan, "nan"), (1e20, "inf")]:
        tx = fa.adam(1e-2)
        stream = [_poisoned(good[0], bad), *good[1:]]
        history = _run(tx, params, stream, jax.jit(_update_then_apply(tx)))
        (_, state, updates) = history[-1]
        nu = np.asarray(state[0].nu["w"])[3, 5]
        assert np.isnan(nu) if frozen == "nan" else np.isposinf(nu)
        if frozen == "inf":  # v = inf: every later step of that entry is 0
            assert float(updates["w"][3, 5]) == 0.0


def test_optax_apply_if_finite_misses_the_overflowing_gradient():
    """It checks the gradient only; skip_nonfinite also checks the new state."""
    params = _params(jnp.float32)
    grads = _poisoned(_grads(params, 1)[0], 1e20)
    theirs = optax.apply_if_finite(fa.adam(1e-2), max_consecutive_errors=5)
    _, state = theirs.update(grads, theirs.init(params), params)
    assert bool(state.last_finite) and np.isposinf(np.asarray(state.inner_state[0].nu["w"])[3, 5])
    ours = fa.skip_nonfinite(fa.adam(1e-2))
    _, state = ours.update(grads, ours.init(params), params)
    assert not bool(state.last_finite)
    chex.assert_tree_all_finite(state.inner_state)


def test_8bit_state_absorbs_an_overflowing_gradient():
    """|g| = 1e20 in an 8-bit block: the element's moments saturate within the block's range
    (functional_adam.storage.quantized), so the new state is finite and the step is taken."""
    make, dtype = OPTIMIZERS["adamw_8bit"]
    params = _params(dtype)
    good = _grads(params, 2)
    tx = fa.skip_nonfinite(make())
    step = jax.jit(_update_then_apply(tx))
    history = _run(tx, params, [good[0], _poisoned(good[1], 1e20)], step)
    new_params, state, _ = history[-1]
    assert (int(state.notfinite_count), int(state.total_notfinite)) == (0, 0)
    chex.assert_tree_all_finite((new_params, state))
    before, after = np.asarray(history[0][0]["w"]), np.asarray(new_params["w"])
    assert np.all(after != before)
    # The overflowing element's Adam direction is m / sqrt(inf) = 0: only the decay moves it.
    np.testing.assert_allclose(after[3, 5], before[3, 5] * (1 - 1e-2 * 1e-4), rtol=1e-7)


def test_state_fields_mirror_optax():
    state = fa.skip_nonfinite(fa.adam(1e-3)).init({"w": jnp.ones(3)})
    assert isinstance(state, fa.SkipNonfiniteState)
    assert state._fields == optax.ApplyIfFiniteState._fields
    assert state.notfinite_count.dtype == jnp.int32 and state.last_finite.dtype == jnp.bool_


def test_counts_saturate_and_extra_args_pass_through():
    seen = {}

    def init(params):
        return fa.EmptyState()

    def update(updates, state, params=None, **extra_args):
        seen.update(extra_args)
        return updates, state

    tx = fa.skip_nonfinite(fa.GradientTransformation(init, update))
    top = jnp.array(2**31 - 1, jnp.int32)
    state = tx.init(jnp.ones(1))._replace(notfinite_count=top, total_notfinite=top)
    _, state = tx.update(jnp.array([jnp.nan]), state, jnp.ones(1), value=3.0)
    assert int(state.notfinite_count) == int(state.total_notfinite) == 2**31 - 1
    assert seen == {"value": 3.0}


def test_refuses_what_is_not_a_transformation():
    with pytest.raises(TypeError, match="skip_nonfinite: inner must be a gradient transformation"):
        fa.skip_nonfinite(optax.adam)
