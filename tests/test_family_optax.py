"""The Adam family against Optax: updates and every state leaf bitwise over 100 steps.

Each case builds the same optimizer from functional_adam and from Optax
(``optax`` or ``optax.contrib``) with the same arguments; both are jitted and
fed the same 100 random gradient trees (``tests/trees.py``: scalars, vectors,
matrices, a zero-size array and ``None`` leaves). In float32 and float64 the
updates and the leaves of the final states are bitwise equal
(``chex.assert_trees_all_equal``): the per-leaf steps perform Optax's float
operations in Optax's order, with Python-float hyperparameters kept Python
floats, as Optax keeps them. Complex64 parameters agree to a few ulps where
Optax's algorithm is defined for them (our second moments are real arrays,
Optax's complex arrays with a zero imaginary part).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax import contrib

import functional_adam as fa
from tests.trees import gradient_stream, mixed_tree

STEPS = 100


def _matrices(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)


def _alpha_warmup(count):
    return 5.0 * jnp.minimum(count / 50.0, 1.0)


def _b3_warmup(count):
    return 0.9 + 0.0999 * jnp.minimum(count / 50.0, 1.0)


_COSINE = optax.cosine_decay_schedule(1e-2, STEPS)

# name -> (factory taking the module that has the optimizer: fa, or optax / optax.contrib)
CASES = {
    "adamax": (lambda m: m.adamax(1e-2), optax),
    "adamaxw_mask": (lambda m: m.adamaxw(1e-2, weight_decay=0.1, mask=_matrices), optax),
    "radam": (lambda m: m.radam(1e-2), optax),
    "radam_nesterov": (lambda m: m.radam(1e-2, b2=0.99, threshold=6.0, nesterov=True), optax),
    "adabelief": (lambda m: m.adabelief(1e-2), optax),
    "adabelief_nesterov": (
        lambda m: m.adabelief(1e-2, 0.8, 0.99, 1e-8, 1e-12, nesterov=True),
        optax,
    ),
    "yogi": (lambda m: m.yogi(1e-2), optax),
    "yogi_hyper": (lambda m: m.yogi(3e-3, b1=0.8, b2=0.99, eps=1e-4), optax),
    "lamb": (lambda m: m.lamb(1e-2), optax),
    "lamb_wd_mask": (lambda m: m.lamb(1e-2, weight_decay=0.1, mask=_matrices), optax),
    "lion": (lambda m: m.lion(1e-3), optax),
    "lion_schedule": (lambda m: m.lion(_COSINE, b1=0.8, b2=0.95, weight_decay=0.1), optax),
    "lion_smooth": (lambda m: m.scale_by_lion(mode="smooth", smooth_beta=2.0), optax),
    "lion_refined": (lambda m: m.scale_by_lion(mode="refined"), optax),
    "adan": (lambda m: m.adan(1e-2), optax),
    "adan_wd_mask": (lambda m: m.adan(1e-2, weight_decay=0.1, mask=_matrices), optax),
    "adopt": (lambda m: m.adopt(1e-2), contrib),
    "adopt_nesterov_no_clip": (lambda m: m.adopt(1e-2, nesterov=True, use_clipping=False), contrib),
    "adopt_clip_fn": (
        lambda m: m.adopt(1e-2, b2=0.99, clip_value_fn=lambda c: 0.5 * c**0.3),
        contrib,
    ),
    "ademamix": (lambda m: m.ademamix(1e-2), contrib),
    "ademamix_schedules": (
        lambda m: m.ademamix(1e-2, b3=_b3_warmup, alpha=_alpha_warmup, weight_decay=0.1),
        contrib,
    ),
    "simplified_ademamix": (lambda m: m.simplified_ademamix(1e-3), contrib),
    "simplified_ademamix_alpha": (
        lambda m: m.simplified_ademamix(1e-3, alpha=_alpha_warmup),
        contrib,
    ),
    "schedule_free_adamw": (lambda m: m.schedule_free_adamw(1e-2), contrib),
    "schedule_free_warmup_wd": (
        lambda m: m.schedule_free_adamw(1e-2, warmup_steps=30, b1=0.95, weight_decay=0.1),
        contrib,
    ),
}

# Optax's complex arithmetic is defined (and ours agrees to a few ulps) for these.
COMPLEX_CASES = ["adamax", "radam", "adabelief", "yogi", "lamb", "ademamix", "adan", "lion"]


def _trajectory(tx, params, grads):
    update = jax.jit(tx.update)
    state, updates = tx.init(params), []
    for g in grads:
        u, state = update(g, state, params)
        updates.append(u)
    return updates, state


def _real(theirs, ours):
    """Optax's complex second moments as real arrays (their imaginary parts must be 0)."""
    if jnp.iscomplexobj(theirs) and not jnp.iscomplexobj(ours):
        np.testing.assert_array_equal(np.asarray(theirs.imag), 0)
        return theirs.real
    return theirs


def _both(name, dtype):
    make, reference = CASES[name]
    params = mixed_tree(jnp.dtype(dtype))
    grads = gradient_stream(params, STEPS)
    ours = _trajectory(make(fa), params, grads)
    theirs = _trajectory(make(reference), params, grads)
    return ours, theirs


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_bitwise_optax(name, dtype):
    with jax.enable_x64(dtype == "float64"):
        (our_updates, our_state), (their_updates, their_state) = _both(name, dtype)
        chex.assert_trees_all_equal(our_updates, their_updates)
        chex.assert_trees_all_equal(jax.tree.leaves(our_state), jax.tree.leaves(their_state))
        assert all(x.dtype == jnp.dtype(dtype) for x in jax.tree.leaves(our_updates))


@pytest.mark.parametrize("name", COMPLEX_CASES)
def test_complex64_within_ulps_of_optax(name):
    (our_updates, our_state), (their_updates, their_state) = _both(name, "complex64")
    chex.assert_trees_all_close(our_updates, their_updates, rtol=2e-5, atol=1e-7)
    ours = jax.tree.leaves(our_state)
    theirs = [_real(t, o) for t, o in zip(jax.tree.leaves(their_state), ours, strict=True)]
    chex.assert_trees_all_close(ours, theirs, rtol=2e-5, atol=1e-7)


# The direction of each alias against Optax's: the same NamedTuple name and fields, so
# Optax's state utilities (tree_get, tree_map_params) find the same things.
STATES = {
    "scale_by_adamax": optax.scale_by_adamax,
    "scale_by_radam": optax.scale_by_radam,
    "scale_by_belief": optax.scale_by_belief,
    "scale_by_yogi": optax.scale_by_yogi,
    "scale_by_lion": optax.scale_by_lion,
    "scale_by_adan": optax.scale_by_adan,
    "scale_by_adopt": contrib.scale_by_adopt,
    "scale_by_ademamix": contrib.scale_by_ademamix,
    "scale_by_simplified_ademamix": contrib.scale_by_simplified_ademamix,
    "schedule_free_adamw": contrib.schedule_free_adamw,
}


def _types(state):
    """(type name, fields) of every NamedTuple in ``state``, outermost first."""
    found = []

    def visit(x):
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            found.append((type(x).__name__, x._fields))
        if isinstance(x, tuple):
            for y in x:
                visit(y)

    visit(state)
    return found


@pytest.mark.parametrize("name", sorted(STATES))
def test_state_types_are_optax(name):
    params = mixed_tree(jnp.float32)
    ours = getattr(fa, name)().init(params)
    theirs = STATES[name]().init(params)
    assert _types(ours) == _types(theirs)
    chex.assert_trees_all_equal_shapes_and_dtypes(jax.tree.leaves(ours), jax.tree.leaves(theirs))
    for field in type(theirs)._fields:  # Optax's tree_get finds the same things in both
        found = [optax.tree_utils.tree_get(state, field) for state in (ours, theirs)]
        chex.assert_trees_all_equal_shapes_and_dtypes(*map(jax.tree.leaves, found))


def test_schedule_free_eval_params_is_optax():
    params = mixed_tree(jnp.float32)
    grads = gradient_stream(params, 10)
    results = []
    for module in (fa, contrib):
        tx, p = module.schedule_free_adamw(1e-2, warmup_steps=5), params
        state = tx.init(p)
        for g in grads:
            u, state = jax.jit(tx.update)(g, state, p)
            p = optax.apply_updates(p, u)
        results.append(jax.jit(module.schedule_free_eval_params)(state, p))
    chex.assert_trees_all_equal(*results)
