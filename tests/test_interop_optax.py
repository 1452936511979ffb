"""functional_adam inside Optax's combinators, and Optax inside functional_adam's chain."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import functional_adam as fa
from tests.trees import gradient_stream

STEPS = 30


def _params():
    rng = np.random.default_rng(0)
    return {
        "encoder": {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
        "head": {
            "w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
            "b": jnp.zeros(2, jnp.float32),
        },
    }


def _trajectory(tx, grads=None, params=None, **extra):
    """Params after applying ``tx`` to a fixed gradient stream, with a jitted update."""
    params = _params() if params is None else params
    grads = gradient_stream(params, STEPS, scale=3.0) if grads is None else grads
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads:
        updates, state = update(g, state, params, **extra)
        params = optax.apply_updates(params, updates)
    return params, state


def _same(ours, theirs):
    chex.assert_trees_all_close(ours, theirs, rtol=0, atol=0)


def test_inside_optax_chain_with_clipping_and_schedule():
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 5, STEPS)
    ours = optax.chain(optax.clip_by_global_norm(1.0), fa.adam(schedule))
    theirs = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    _same(_trajectory(ours)[0], _trajectory(theirs)[0])


def test_optax_transformations_inside_our_chain():
    schedule = optax.exponential_decay(1e-2, 10, 0.5)
    ours = fa.chain(
        optax.clip_by_global_norm(1.0),
        fa.scale_by_adam(),
        optax.add_decayed_weights(1e-3),
        optax.scale_by_learning_rate(schedule),
    )
    theirs = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.scale_by_adam(),
        optax.add_decayed_weights(1e-3),
        optax.scale_by_learning_rate(schedule),
    )
    _same(_trajectory(ours)[0], _trajectory(theirs)[0])


def test_our_chain_forwards_extra_args_to_optax():
    """``value=`` reaches optax.contrib.reduce_on_plateau through our chain."""
    losses = iter(jnp.full(STEPS, 1.0))  # a loss that never improves: the lr is cut

    def run(tx):
        params, state = _params(), tx.init(_params())
        update = jax.jit(tx.update)
        for g in gradient_stream(params, STEPS):
            updates, state = update(g, state, params, value=next(losses, 1.0))
            params = optax.apply_updates(params, updates)
        return params, state

    ours = fa.chain(fa.adam(1e-2), optax.contrib.reduce_on_plateau(patience=2, cooldown=0))
    theirs = optax.chain(optax.adam(1e-2), optax.contrib.reduce_on_plateau(patience=2, cooldown=0))
    (p_ours, s_ours), (p_theirs, s_theirs) = run(ours), run(theirs)
    assert float(s_ours[1].scale) < 1.0  # the plateau was seen
    _same(p_ours, p_theirs)
    _same(s_ours[1].scale, s_theirs[1].scale)


def test_multi_steps():
    ours, theirs = optax.MultiSteps(fa.adam(1e-2), 3), optax.MultiSteps(optax.adam(1e-2), 3)
    (p_ours, s_ours), (p_theirs, _) = _trajectory(ours), _trajectory(theirs)
    _same(p_ours, p_theirs)
    assert int(s_ours.inner_opt_state[0].count) == STEPS // 3


def test_inject_hyperparams_traced_and_changed_mid_run():
    def run(factory):
        tx = optax.inject_hyperparams(factory)(learning_rate=1e-2, b1=0.9, b2=0.999, eps=1e-8)
        params = _params()
        state = tx.init(params)
        update = jax.jit(tx.update)
        for i, g in enumerate(gradient_stream(params, STEPS)):
            if i == STEPS // 2:  # change every hyperparameter between steps, no recompile
                new = {"learning_rate": 3e-3, "b1": 0.8, "b2": 0.99, "eps": 1e-6}
                for key, value in new.items():
                    state.hyperparams[key] = jnp.full_like(state.hyperparams[key], value)
            updates, state = update(g, state, params)
            params = optax.apply_updates(params, updates)
        assert update._cache_size() == 1
        return params

    chex.assert_trees_all_close(run(fa.adam), run(optax.adam), rtol=1e-6, atol=1e-8)


def test_masked():
    mask = {"encoder": {"w": False}, "head": {"w": True, "b": True}}
    ours, theirs = optax.masked(fa.adam(1e-2), mask), optax.masked(optax.adam(1e-2), mask)
    p_ours, p_theirs = _trajectory(ours)[0], _trajectory(theirs)[0]
    _same(p_ours, p_theirs)
    # Masked-out leaves get the raw gradients through, as in Optax; the others moved by Adam.
    assert not np.allclose(p_ours["head"]["w"], _params()["head"]["w"])


def test_apply_if_finite_skips_nan_steps():
    params = _params()
    grads = gradient_stream(params, STEPS)
    grads[5] = jax.tree.map(lambda g: g.at[..., 0].set(jnp.nan), grads[5])
    ours = optax.apply_if_finite(fa.adam(1e-2), max_consecutive_errors=3)
    theirs = optax.apply_if_finite(optax.adam(1e-2), max_consecutive_errors=3)
    (p_ours, s_ours), (p_theirs, _) = _trajectory(ours, grads), _trajectory(theirs, grads)
    _same(p_ours, p_theirs)
    assert int(s_ours.total_notfinite) == 1
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p_ours))


def test_multi_transform():
    labels = {"encoder": {"w": "slow"}, "head": {"w": "fast", "b": "fast"}}
    ours = optax.multi_transform({"fast": fa.adam(1e-2), "slow": optax.sgd(1e-3)}, labels)
    theirs = optax.multi_transform({"fast": optax.adam(1e-2), "slow": optax.sgd(1e-3)}, labels)
    _same(_trajectory(ours)[0], _trajectory(theirs)[0])


def test_tree_get_finds_count_and_moments():
    params = _params()
    tx = fa.adamw(1e-2)
    _, state = _trajectory(tx)
    assert int(optax.tree_utils.tree_get(state, "count")) == STEPS
    mu = optax.tree_utils.tree_get(state, "mu")
    chex.assert_trees_all_equal_shapes_and_dtypes(mu, params)
