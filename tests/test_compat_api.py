"""The compat constructors as an API: bad input, and how they compose (no other framework needed)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import functional_adam as fa
from functional_adam import compat

CONSTRUCTORS = {
    "torch_adam": compat.torch_adam,
    "torch_adamw": compat.torch_adamw,
    "keras_adam": compat.keras_adam,
    "keras_adamw": compat.keras_adamw,
    "tf1_adam": compat.tf1_adam,
}
LR_NAME = {"torch_adam": "lr", "torch_adamw": "lr"}
EPS_NAME = {"torch_adam": "eps", "torch_adamw": "eps"}


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_unknown_options_raise_type_error_naming_them(name):
    with pytest.raises(TypeError, match=rf"{name}\(\) got unexpected .*'momentum', 'nesterov'"):
        CONSTRUCTORS[name](nesterov=True, momentum=0.9)


def test_unknown_option_hints():
    with pytest.raises(TypeError, match=r"'global_clipnorm' .*optax.clip_by_global_norm"):
        compat.keras_adam(global_clipnorm=1.0)
    with pytest.raises(TypeError, match=r"'params' .*init\(params\)"):
        compat.torch_adam(params=[jnp.zeros(2)])


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_negative_learning_rate_and_epsilon_raise(name):
    lr, eps = LR_NAME.get(name, "learning_rate"), EPS_NAME.get(name, "epsilon")
    with pytest.raises(ValueError, match=rf"^{lr} must be in \[0.0, inf\), got -0.1"):
        CONSTRUCTORS[name](**{lr: -0.1})
    with pytest.raises(ValueError, match=rf"^{eps} must be in \[0.0, inf\), got -1e-08"):
        CONSTRUCTORS[name](**{eps: -1e-8})


@pytest.mark.parametrize("name", ["torch_adam", "torch_adamw", "keras_adam", "keras_adamw"])
def test_negative_weight_decay_raises(name):
    with pytest.raises(ValueError, match=r"^weight_decay must be in \[0.0, inf\), got -0.01"):
        CONSTRUCTORS[name](weight_decay=-0.01)


@pytest.mark.parametrize(
    ("betas", "error", "message"),
    [
        (0.9, TypeError, r"betas must be a pair \(beta1, beta2\), got 0.9"),
        ((0.9,), ValueError, r"betas must be a pair .*got 1 values"),
        ((0.9, 0.99, 0.999), ValueError, r"betas must be a pair .*got 3 values"),
        ((0.9, 1.0), ValueError, r"betas\[1\] must be in \[0.0, 1.0\), got 1.0"),
        ((-0.1, 0.9), ValueError, r"betas\[0\] must be in \[0.0, 1.0\), got -0.1"),
    ],
)
@pytest.mark.parametrize("name", ["torch_adam", "torch_adamw"])
def test_betas_must_be_a_pair_in_range(name, betas, error, message):
    with pytest.raises(error, match=message):
        CONSTRUCTORS[name](betas=betas)


@pytest.mark.parametrize("flag", ["maximize", "amsgrad"])
@pytest.mark.parametrize("value", [1, "yes", None])
def test_flags_must_be_bools(flag, value):
    with pytest.raises(TypeError, match=rf"{flag} must be a bool .*got {value!r}"):
        compat.torch_adam(**{flag: value})
    if flag == "amsgrad":
        with pytest.raises(TypeError, match="amsgrad must be a bool"):
            compat.keras_adam(amsgrad=value)


def test_keras_betas_are_checked_by_their_names():
    with pytest.raises(ValueError, match=r"beta_2 must be in \[0.0, 1.0\)"):
        compat.keras_adamw(beta_2=1.5)
    with pytest.raises(ValueError, match=r"beta1 must be in \[0.0, 1.0\)"):
        compat.tf1_adam(beta1=-0.5)


def test_weight_decay_schedules_are_refused():
    """The frameworks' weight_decay is a number; scheduling goes through lr."""
    with pytest.raises(TypeError, match="weight_decay must be a number"):
        compat.torch_adamw(weight_decay=lambda count: 0.1)


def test_implementation_options_are_accepted_and_change_nothing():
    g, p = jnp.array([0.3, -2.0]), jnp.array([1.0, 2.0])
    plain = compat.torch_adam(weight_decay=0.1)
    fused = compat.torch_adam(weight_decay=0.1, fused=True, capturable=True, differentiable=True)
    chex.assert_trees_all_equal(
        plain.update(g, plain.init(p), p), fused.update(g, fused.init(p), p)
    )


def _states_structure(tx, params):
    return jax.tree.structure(tx.init(params))


def test_state_structure_does_not_depend_on_decay_or_maximize():
    """Options switched off become ``identity``, so checkpoints and converters see one layout."""
    params = {"w": jnp.ones(3)}
    reference = _states_structure(compat.torch_adam(), params)
    for tx in [
        compat.torch_adam(weight_decay=0.1, maximize=True),
        compat.torch_adamw(),
        compat.torch_adamw(weight_decay=0.0),
    ]:
        assert _states_structure(tx, params) == reference


def test_maximize_ascends():
    x = jnp.array(1.0)
    tx = compat.torch_adam(lr=0.1, maximize=True)
    updates, _ = tx.update(jax.grad(lambda x: x**2)(x), tx.init(x), x)  # ascend x²: away from 0
    assert float(fa.apply_updates(x, updates)) == pytest.approx(1.1, rel=1e-5)


def test_negate():
    tree = {"a": jnp.array([1.0, -2.0]), "b": None}
    tx = compat.negate()
    out, _ = tx.update(tree, tx.init(tree))
    chex.assert_trees_all_equal(out, {"a": jnp.array([-1.0, 2.0]), "b": None})


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_constructors_work_in_optax_chain_and_inject_hyperparams(name):
    """An ordinary GradientTransformation: optax.chain, optax.inject_hyperparams, jit."""
    make = CONSTRUCTORS[name]
    lr = LR_NAME.get(name, "learning_rate")
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads = [{"w": jnp.array([0.5, -0.1, 2.0]) * (i + 1)} for i in range(5)]

    def run(tx):
        state = tx.init(params)
        p = params
        for g in grads:
            updates, state = jax.jit(tx.update)(g, state, p)
            p = optax.apply_updates(p, updates)
        return p

    direct = run(make(**{lr: 1e-2}))
    chained = run(optax.chain(optax.identity(), make(**{lr: 1e-2})))
    injected = run(optax.inject_hyperparams(make)(**{lr: 1e-2}))
    chex.assert_trees_all_close(chained, direct, rtol=0, atol=0)
    chex.assert_trees_all_close(injected, direct, rtol=1e-6)
    assert not np.allclose(direct["w"], params["w"])
