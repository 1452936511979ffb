"""update_and_apply finds the fused kernel step through wrappers, and steps aside where it must."""

from __future__ import annotations

import re
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import functional_adam as fa
from functional_adam.kernels import adam_cpu
from functional_adam.kernels import build as native
from tests.trees import assert_within_ulps, mixed_tree

TARGET = 'custom_call_target="functional_adam_adam_f32"'

WRAPPED = {
    "fa.chain(adam)": lambda: fa.chain(fa.adam(1e-2)),
    "fa.chain(clip, adamw)": lambda: fa.chain(optax.clip_by_global_norm(1.0), fa.adamw(1e-2)),
    "optax.chain(clip, adamw)": lambda: optax.chain(optax.clip_by_global_norm(1.0), fa.adamw(1e-2)),
    "inject_hyperparams(adam)": lambda: optax.inject_hyperparams(fa.adam)(learning_rate=1e-2),
    "inject_hyperparams(nadamw)": lambda: optax.inject_hyperparams(fa.nadamw)(
        learning_rate=1e-2, weight_decay=0.1
    ),
}


def _params():
    return {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(4)}


def _grads(t):
    return jax.tree.map(lambda p: jnp.sin(p * (t + 1.0)), _params())


def _fused(tx):
    return jax.jit(lambda g, s, p: fa.update_and_apply(tx, g, s, p))


def _reference(tx):
    def step(g, s, p):
        updates, s = tx.update(g, s, p)
        return fa.apply_updates(p, updates), s

    return jax.jit(step)


@pytest.mark.parametrize("name", sorted(WRAPPED))
def test_the_kernel_is_taken_through_wrappers(name):
    tx = WRAPPED[name]()
    params = _params()
    state = tx.init(params)
    hlo = _fused(tx).lower(_grads(0), state, params).compile().as_text()
    assert hlo.count(TARGET) == 1, name
    p1, s1, p2, s2 = params, state, params, state
    for t in range(5):
        p1, s1 = _fused(tx)(_grads(t), s1, p1)
        p2, s2 = _reference(tx)(_grads(t), s2, p2)
    assert_within_ulps(p1, p2, 8)
    chex.assert_trees_all_equal_structs(s1, s2)


def test_a_transformation_after_the_kernel_step_is_honoured():
    """``optax.scale(0.5)`` after Adam changes the updates: they are applied, not the kernel's θ."""
    tx = fa.chain(fa.adam(1e-2), optax.scale(0.5))
    params = _params()
    state = tx.init(params)
    new, _ = _fused(tx)(_grads(0), state, params)
    expected, _ = _reference(tx)(_grads(0), state, params)
    assert_within_ulps(new, expected, 4)
    moved = jax.tree.map(lambda a, b: jnp.abs(a - b).max(), new, params)
    assert float(moved["b"]) == pytest.approx(0.5e-2, rel=1e-3)  # half a step of lr


def test_master_weights_do_not_take_the_inner_kernel_for_the_caller_params():
    tx = fa.with_master_weights(fa.adam(1e-2))
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), _params())
    state = tx.init(params)
    grads = jax.tree.map(lambda g: g.astype(jnp.bfloat16), _grads(0))
    chex.assert_trees_all_equal(
        _fused(tx)(grads, state, params), _reference(tx)(grads, state, params)
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: fa.adam(jnp.array([1e-2, 2e-2, 3e-2, 4e-2])),
        lambda: fa.adam(lambda count: jnp.full(4, 1e-2) / (count + 1)),
        lambda: fa.adamw(1e-2, weight_decay=jnp.array([0.0, 0.1, 0.2, 0.3])),
    ],
    ids=["vector_lr", "vector_schedule", "vector_weight_decay"],
)
def test_vector_hyperparameters_take_the_xla_path_as_update_does(make):
    tx = make()
    params = {"b": jnp.ones(4)}
    state = tx.init(params)
    grads = {"b": jnp.array([1.0, -1.0, 2.0, -2.0])}
    assert TARGET not in _fused(tx).lower(grads, state, params).compile().as_text()
    chex.assert_trees_all_equal(
        fa.update_and_apply(tx, grads, state, params), _reference(tx)(grads, state, params)
    )


def test_kernel_scalars_follow_the_cpp_enum():
    source = (Path(native.__file__).parent / "adam_cpu.cc").read_text()
    body = re.search(r"enum Scalar \{(.*?)\};", source, re.S).group(1)
    names = [name.strip() for name in body.split(",") if name.strip()]
    assert names[-1] == "kNumScalars"

    def camel(field: str) -> str:
        return "k" + "".join(part.capitalize() for part in field.split("_"))

    assert names[:-1] == [camel(f) for f in adam_cpu.KernelScalars._fields]


def test_mask_errors_are_raised_not_swallowed_by_the_kernel_path():
    tx = fa.adamw(1e-2, weight_decay=0.1, mask={"w": True, "nope": False})
    params = _params()
    with pytest.raises(ValueError, match="mask"):
        fa.update_and_apply(tx, _grads(0), tx.init(params), params)


def test_kernel_path_equals_xla_path_on_a_mixed_tree():
    tx = fa.adamw(1e-2, weight_decay=0.1)
    params = jax.tree.map(lambda x: x, mixed_tree(jnp.float32))
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    p1, s1 = _fused(tx)(grads, state, params)
    p2, s2 = _reference(tx)(grads, state, params)
    assert_within_ulps(p1, p2, 4)
    chex.assert_trees_all_equal(s1, s2)  # moments are bitwise the chain's


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16, jnp.complex64])
def test_complex_mu_dtype_is_accepted_as_optax_does(param_dtype):
    params = jnp.zeros(2, param_dtype)
    for make in (fa.adam, fa.adamw):
        state = make(0.1, mu_dtype=jnp.complex64).init(params)
        assert state[0].mu.dtype == jnp.complex64
        assert state[0].nu.dtype != jnp.complex64  # |g|² stays real
    tx = fa.adam(0.1, mu_dtype=jnp.complex64)
    updates, _ = tx.update(jnp.ones(2, param_dtype), tx.init(params), params)
    assert updates.dtype == param_dtype


def test_integer_mu_dtype_is_still_refused():
    with pytest.raises(ValueError, match="mu_dtype"):
        fa.adam(0.1, mu_dtype=jnp.int8)
