"""Bad input gets a clear error that names the argument, the leaf path or the dtype."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax
import pytest

import functional_adam as fa

NAN = float("nan")


@pytest.mark.parametrize(
    ("make", "name", "value"),
    [
        (lambda: fa.adam(1e-3, b1=1.0), "b1", "1.0"),
        (lambda: fa.adam(1e-3, b1=-0.1), "b1", "-0.1"),
        (lambda: fa.adam(1e-3, b2=1.5), "b2", "1.5"),
        (lambda: fa.adam(1e-3, b2=NAN), "b2", "nan"),
        (lambda: fa.adam(1e-3, eps=-1e-8), "eps", "-1e-08"),
        (lambda: fa.adam(1e-3, eps_root=-1.0), "eps_root", "-1.0"),
        (lambda: fa.adam(-1e-3), "learning_rate", "-0.001"),
        (lambda: fa.adam(NAN), "learning_rate", "nan"),
        (lambda: fa.adam(jnp.asarray(-0.5)), "learning_rate", "-0.5"),
        (lambda: fa.adamw(1e-3, weight_decay=-0.1), "weight_decay", "-0.1"),
        (lambda: fa.amsgrad(1e-3, b2=1.0), "b2", "1.0"),
        (lambda: fa.nadamw(1e-3, b1=2.0), "b1", "2.0"),
        (lambda: fa.scale_by_adam(eps=NAN), "eps", "nan"),
    ],
)
def test_invalid_hyperparameters_name_argument_and_value(make, name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be in .*got {re.escape(value)}"):
        make()


def test_eps_and_eps_root_both_zero_is_refused():
    with pytest.raises(ValueError, match="eps and eps_root are both 0"):
        fa.adam(1e-3, eps=0.0)
    fa.adam(1e-3, eps=0.0, eps_root=1e-12)  # allowed: no 0/0


def test_hyperparameter_of_wrong_type():
    with pytest.raises(TypeError, match="b1"):
        fa.adam(1e-3, b1="0.9")
    with pytest.raises(TypeError, match="b1"):
        fa.adam(1e-3, b1=True)


def test_traced_hyperparameters_are_not_checked():
    """Under jit the value is unknown at construction: no error, no check."""
    params = jnp.ones(2)

    @jax.jit
    def step(lr, b1):
        tx = fa.adam(lr, b1=b1)
        return tx.update(jnp.ones(2), tx.init(params), params)[0]

    assert step(jnp.asarray(-1e-3), jnp.asarray(0.9)).shape == (2,)
    # optax.inject_hyperparams passes arrays (traced under jit) to the factory.
    tx = optax.inject_hyperparams(fa.adam)(learning_rate=1e-3)
    jax.jit(tx.update)(jnp.ones(2), tx.init(params), params)


@pytest.mark.parametrize("argument", ["mu_dtype", "nu_dtype"])
@pytest.mark.parametrize("dtype", [jnp.int8, jnp.uint8, jnp.bool_, "not-a-dtype"])
def test_moment_dtype_must_be_float(argument, dtype):
    with pytest.raises(ValueError, match=argument):
        fa.scale_by_adam(**{argument: dtype})


def test_gradient_tree_differs_from_state():
    tx = fa.adam(1e-3)
    params = {"encoder": {"w": jnp.ones(2)}, "head": {"b": jnp.ones(1), "w": jnp.ones(2)}}
    state = tx.init(params)
    grads = {"encoder": {"w": jnp.ones(2)}, "head": {"bias": jnp.ones(1), "w": jnp.ones(2)}}
    with pytest.raises(ValueError, match=r"first difference at \['head'\]\['bias'\]"):
        tx.update(grads, state, params)
    with pytest.raises(ValueError, match=r"\['head'\]\['w'\] is only in the optimizer state"):
        tx.update({"encoder": {"w": jnp.ones(2)}, "head": {"b": jnp.ones(1)}}, state, params)
    # Also under jit, where it is raised while tracing.
    with pytest.raises(ValueError, match="do not have the structure of the optimizer state"):
        jax.jit(tx.update)(grads, state, params)


def test_none_where_state_has_an_array():
    tx = fa.scale_by_adam()
    state = tx.init({"a": jnp.ones(2), "b": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"at \['b'\] the leaf is None in the updates only"):
        tx.update({"a": jnp.ones(2), "b": None}, state)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.uint8])
def test_integer_or_boolean_params_name_the_leaf(dtype):
    params = {"layer": [jnp.ones(2), jnp.zeros(2, dtype)]}
    with pytest.raises(TypeError, match=r"params\['layer'\]\[1\] has dtype"):
        fa.adam(1e-3).init(params)


def test_integer_gradients_name_the_leaf():
    tx = fa.scale_by_adam()
    state = tx.init({"w": jnp.ones(2)})
    with pytest.raises(TypeError, match=r"updates\['w'\] has dtype int32"):
        tx.update({"w": jnp.ones(2, jnp.int32)}, state)


def test_chain_of_something_else():
    with pytest.raises(TypeError, match="argument 1 is function"):
        fa.chain(fa.scale_by_adam(), lambda g: g)


def test_chain_state_of_wrong_length():
    tx = fa.adam(1e-3)
    with pytest.raises(ValueError, match="the state holds 1 inner states but the chain has 2"):
        tx.update(jnp.ones(1), (tx.init(jnp.ones(1))[0],))


def test_weight_decay_needs_params_and_bool_masks():
    tx = fa.add_decayed_weights(0.1)
    with pytest.raises(ValueError, match="add_decayed_weights needs params"):
        tx.update(jnp.ones(1), tx.init(jnp.ones(1)))
    with pytest.raises(TypeError, match=r"mask\['w'\] is 1"):
        fa.add_decayed_weights(0.1, mask={"w": 1})


def test_schedule_must_be_callable():
    with pytest.raises(TypeError, match="step_size_fn must be a callable"):
        fa.scale_by_schedule(0.1)


@pytest.mark.parametrize("nu_dtype", [jnp.float16, jnp.bfloat16, None])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("make", [fa.adam, fa.amsgrad, fa.nadam, fa.adamw])
def test_no_silent_nan_for_zero_or_overflowing_gradients(make, dtype, nu_dtype):
    """Zero gradients (0/(0+eps)) stay finite, and so does a gradient whose square
    overflows a 16-bit second moment: |g|² is capped so that v stays finite instead of
    holding inf (which NAdam's look-ahead turns into inf/inf = NaN). A float32 v
    overflows only for |g| > 1.8e19, as in Optax: then no NaN either, and v may be inf."""
    tx = make(1e-3, nu_dtype=nu_dtype)
    params = jnp.ones(4, dtype)
    state = tx.init(params)
    big = 60000.0 if dtype == jnp.float16 else 1e30
    grads = [jnp.zeros(4, dtype)] * 5 + [jnp.full(4, big, dtype)] + [jnp.ones(4, dtype)] * 3
    narrow_v = jnp.finfo(state[0].nu.dtype).bits < 32
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = fa.apply_updates(params, updates)
        assert bool(jnp.all(jnp.isfinite(updates))), (g, updates)
        assert not any(bool(jnp.any(jnp.isnan(x))) for x in jax.tree.leaves(state)), state
        if narrow_v:
            assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state)), state
