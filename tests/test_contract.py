"""The contract every optimizer of the package keeps, checked on each one of tests/optimizers.py.

Under transformations: compiles once, jit equals no jit, vmap over independent
states, scan over steps. State: dtypes and shapes stable across steps, abstract
init, 8-bit codes where asked, an Orbax round trip. Zero gradients stay finite. Entry points: ``update_and_apply`` equals ``update``
then ``apply_updates``; ``update`` without ``params``. Bad input: a missing
gradient leaf, an integer parameter, a gradient of the wrong shape; ``None``
leaves pass through.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import functional_adam as fa
from tests.optimizers import CASES, LR, MIN_8BIT_SIZE, OPTIMIZERS
from tests.trees import assert_within_ulps, gradient_stream

STEPS = 3
BIAS_PATH = "['dense']['bias']"
CLOSE = {"rtol": 1e-5, "atol": 1e-6}  # a few ulps of the O(1) parameters and moments


def _tree(dtype=jnp.float32, seed: int = 0) -> dict:
    """A leaf large enough for 8-bit moments, a matrix, a bias and a frozen (None) leaf."""
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(dtype)
    return {
        "embed": jnp.asarray(rng.normal(size=MIN_8BIT_SIZE + 4000), dtype),
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(4, 3)), dtype),
            "bias": jnp.asarray(rng.normal(size=3), dtype),
        },
        "frozen": None,
    }


def _mixed_tree(case) -> dict:
    """The dtypes the case takes in one tree: bfloat16 (8-bit sized), float16, complex64, float32."""
    rng = np.random.default_rng(1)
    low = jnp.bfloat16 if case.supports_16bit else jnp.float32
    tree = {
        "embed": jnp.asarray(rng.normal(size=MIN_8BIT_SIZE + 4000), low),
        "kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
        "frozen": None,
    }
    if case.supports_16bit:
        tree["half"] = jnp.asarray(rng.normal(size=3), jnp.float16)
    if case.supports_complex:
        tree["phase"] = jnp.asarray(rng.normal(size=2) + 1j * rng.normal(size=2), jnp.complex64)
    return tree


def _step_fn(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return fa.apply_updates(params, updates), state, updates

    return step


class _Shared(NamedTuple):
    tx: fa.GradientTransformation
    step: Callable  # jitted _step_fn(tx), called on _tree() shaped float32 inputs only
    traces: list[int]  # how many times step was traced


_SHARED: dict[str, _Shared] = {}


def _shared(case) -> _Shared:
    """One transformation and one jitted step per case, so that the tests share the compilation."""
    if case.name not in _SHARED:
        tx, traces = case.make(), [0]

        def step(params, state, grads):
            traces[0] += 1
            return _step_fn(tx)(params, state, grads)

        _SHARED[case.name] = _Shared(tx, jax.jit(step), traces)
    return _SHARED[case.name]


def _run(tx, params, grads, step):
    """``params, state`` after feeding ``grads`` through ``step`` from ``tx.init(params)``."""
    state = tx.init(params)
    for g in grads:
        params, state, _ = step(params, state, g)
    return params, state


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _assert_same_types(tree, reference):
    """Same tree structure, and leaf by leaf the same shapes and dtypes."""
    assert jax.tree.structure(tree) == jax.tree.structure(reference)
    chex.assert_trees_all_equal_shapes_and_dtypes(tree, reference)


def test_case_names_are_unique():
    names = [case.name for case in OPTIMIZERS]
    assert len(set(names)) == len(names), names


@pytest.mark.parametrize("case", CASES)
def test_jitted_step_is_traced_once(case):
    """Five more steps of the step shared by this module's tests: no new trace."""
    tx, step, traces = _shared(case)
    params = _tree()
    _run(tx, params, gradient_stream(params, 5), step)
    assert traces[0] == 1


@pytest.mark.parametrize("case", CASES)
def test_jit_equals_no_jit(case):
    tx, step, _ = _shared(case)
    params = _tree()
    grads = gradient_stream(params, STEPS)
    eager = _run(tx, params, grads, _step_fn(tx))
    chex.assert_trees_all_close(_run(tx, params, grads, step), eager, **CLOSE)


@pytest.mark.parametrize("case", CASES)
def test_vmap_over_independent_states(case):
    """A batch of three problems under vmap equals three separate runs."""
    tx, step, _ = _shared(case)
    problems = [_tree(seed=seed) for seed in range(3)]
    streams = [gradient_stream(p, STEPS, seed=10 + i) for i, p in enumerate(problems)]
    params, state = _stack(problems), jax.vmap(tx.init)(_stack(problems))
    vstep = jax.jit(jax.vmap(_step_fn(tx)))
    for g in zip(*streams, strict=True):
        params, state, _ = vstep(params, state, _stack(g))
    for i, (p, gs) in enumerate(zip(problems, streams, strict=True)):
        row = jax.tree.map(lambda a, i=i: a[i], (params, state))
        chex.assert_trees_all_close(row, _run(tx, p, gs, step), **CLOSE)


@pytest.mark.parametrize("case", CASES)
def test_scan_equals_python_loop(case):
    tx, step, _ = _shared(case)
    params = _tree()
    grads = gradient_stream(params, STEPS)

    def body(carry, g):
        params, state, _ = _step_fn(tx)(*carry, g)
        return (params, state), None

    scanned = jax.jit(lambda c, gs: jax.lax.scan(body, c, gs)[0])(
        (params, tx.init(params)), _stack(grads)
    )
    chex.assert_trees_all_close(scanned, _run(tx, params, grads, step), **CLOSE)


def _assert_types_kept(tx, params0, step):
    """Over a few steps the state, the parameters and the updates keep their types."""
    state0 = tx.init(params0)
    params, state = params0, state0
    for g in gradient_stream(params0, STEPS):
        params, state, updates = step(params, state, g)
        _assert_same_types(state, state0)
        _assert_same_types(params, params0)
        _assert_same_types(updates, params0)  # updates in the parameters' dtypes
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((params, state)))


@pytest.mark.parametrize("case", CASES)
def test_dtypes_and_shapes_are_kept_for_mixed_precision_trees(case):
    """float32, bfloat16 (large enough for 8-bit moments), float16 and complex64 leaves.

    The mixed tree runs op by op, without jit: the types are the same, a compilation is spared.
    """
    tx, step, _ = _shared(case)
    _assert_types_kept(tx, _tree(), step)
    _assert_types_kept(tx, _mixed_tree(case), _step_fn(tx))


@pytest.mark.parametrize("case", CASES)
def test_dtypes_and_shapes_are_kept_for_float64(case):
    """Under x64, without jit (op by op) to spare a compilation per optimizer."""
    with jax.enable_x64(True):
        tx = case.make()
        _assert_types_kept(tx, _tree(jnp.float64), _step_fn(tx))


@pytest.mark.parametrize("case", CASES)
def test_abstract_init_has_the_concrete_structure_shapes_and_dtypes(case):
    tx, params = case.make(), _tree()
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    from_abstract = jax.eval_shape(tx.init, abstract)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(from_abstract))
    _assert_same_types(from_abstract, jax.eval_shape(tx.init, params))
    _assert_same_types(from_abstract, tx.init(params))


@pytest.mark.parametrize("case", CASES)
def test_quantized_state_holds_int8_codes_for_the_large_leaf(case):
    """``Case.quantized`` is true exactly when the state holds 8-bit codes (MIN_8BIT_SIZE fits)."""
    state = jax.eval_shape(case.make().init, _tree())
    assert any(x.dtype == jnp.int8 for x in jax.tree.leaves(state)) == case.quantized


@pytest.mark.parametrize("case", CASES)
def test_zero_gradients_keep_everything_finite(case):
    """0 / (0 + eps) is no NaN, also for float16 leaves, where eps = 1e-8 rounds to 0."""
    tx, params = case.make(), _mixed_tree(case)
    state, zeros = tx.init(params), jax.tree.map(jnp.zeros_like, params)
    for _ in range(2):
        params, state, updates = _step_fn(tx)(params, state, zeros)
        for x in jax.tree.leaves((params, state, updates)):
            assert bool(jnp.all(jnp.isfinite(x))), (params, state, updates)


@pytest.mark.parametrize("case", CASES)
def test_orbax_round_trip_continues_identically(case, tmp_path):
    tx, step, _ = _shared(case)
    params = _tree()
    grads = gradient_stream(params, STEPS + 2)
    params, state = _run(tx, params, grads[:STEPS], step)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", state)
    checkpointer.wait_until_finished()
    # Restored into numpy arrays: committed jax.Arrays would make the step compile again.
    restored = checkpointer.restore(tmp_path / "state", jax.tree.map(np.asarray, state))
    _assert_same_types(restored, state)
    chex.assert_trees_all_equal(restored, state)
    p_a, p_b = params, params
    for g in grads[STEPS:]:
        p_a, state, u_a = step(p_a, state, g)
        p_b, restored, u_b = step(p_b, restored, g)
        chex.assert_trees_all_equal((p_a, state, u_a), (p_b, restored, u_b))


def _assert_within_ulps_or_equal(actual, expected, ulps, scale_floor=0.0):
    """Inexact leaves within ``ulps`` (see ``assert_within_ulps``), the others equal."""
    _assert_same_types(actual, expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        if jnp.issubdtype(a.dtype, jnp.inexact):
            assert_within_ulps(a, e, ulps, scale_floor)
        else:
            chex.assert_trees_all_equal(a, e)


@pytest.mark.parametrize("case", CASES)
def test_update_and_apply_equals_update_then_apply_updates(case):
    """Step by step from the same point; the CPU kernel may round the last bits differently."""
    tx, step, _ = _shared(case)
    params = _tree()
    state = tx.init(params)
    fused = jax.jit(lambda p, s, g: fa.update_and_apply(tx, g, s, p))
    for g in gradient_stream(params, STEPS):
        p_fused, s_fused = fused(params, state, g)
        p_plain, s_plain, _ = step(params, state, g)
        # Parameters: a few ulps of the step's scale (|θ_new - θ| <~ lr).
        _assert_within_ulps_or_equal(p_fused, p_plain, 4, scale_floor=LR)
        _assert_within_ulps_or_equal(s_fused, s_plain, 4)
        params, state = p_fused, s_fused


@pytest.mark.parametrize("case", CASES)
def test_update_without_params(case):
    """An optimizer that needs ``params`` says so; the others ignore them."""
    tx, params = case.make(), _tree()
    state, g = tx.init(params), gradient_stream(params, 1)[0]
    if case.needs_params:
        with pytest.raises(ValueError, match="needs params"):
            tx.update(g, state)
    else:
        chex.assert_trees_all_equal(tx.update(g, state), tx.update(g, state, params))


@pytest.mark.parametrize("case", CASES)
def test_none_leaves_pass_through(case):
    tx, step, _ = _shared(case)
    params = _tree()
    state, g = tx.init(params), gradient_stream(params, 1)[0]
    new_params, _, updates = step(params, state, g)
    assert updates["frozen"] is None and new_params["frozen"] is None
    new_params, _ = fa.update_and_apply(tx, g, state, params)
    assert new_params["frozen"] is None


@pytest.mark.parametrize("case", CASES)
def test_missing_gradient_leaf_names_its_path(case):
    tx, params = case.make(), _tree()
    state, g = tx.init(params), gradient_stream(params, 1)[0]
    del g["dense"]["bias"]
    with pytest.raises(ValueError, match=re.escape(BIAS_PATH)):
        tx.update(g, state, params)


@pytest.mark.parametrize("case", CASES)
def test_integer_parameter_names_the_leaf(case):
    params = {**_tree(), "step": jnp.asarray(3, jnp.int32)}
    with pytest.raises((TypeError, ValueError), match=re.escape("['step']")):
        case.make().init(params)


@pytest.mark.parametrize("entry", ["update", "update_and_apply"])
@pytest.mark.parametrize("case", CASES)
def test_gradient_of_the_wrong_shape_names_leaf_and_shapes(case, entry):
    """A (3, 1) gradient for a (3,) parameter must not broadcast: ValueError naming both."""
    tx, params = case.make(), _tree()
    state, g = tx.init(params), gradient_stream(params, 1)[0]
    g["dense"]["bias"] = g["dense"]["bias"][:, None]
    with pytest.raises(ValueError) as info:
        if entry == "update":
            tx.update(g, state, params)
        else:
            fa.update_and_apply(tx, g, state, params)
    message = str(info.value)
    assert BIAS_PATH in message, message
    assert re.search(r"\(3, 1\)|\[3, ?1\]", message), message  # the gradient's shape
    assert re.search(r"\(3,\)|\[3\]", message), message  # the parameter's shape
