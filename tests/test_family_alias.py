"""Optax's own alias and contrib tests, with our optimizers substituted.

Reproduces the key checks of ``optax/_src/alias_test.py`` (``test_optimization``
on the parabola and Rosenbrock problems with Optax's hyperparameters, 10,000
steps, float32 and complex64, also for Lion and Adan, which Optax's test leaves out of
complex64; ``test_preserve_dtype``;
``test_explicit_dtype``; ``test_optimizers_can_be_wrapped_in_inject_hyperparams``)
and of ``optax/contrib/_common_test.py`` (``test_optimizers``: four targets,
30,000 steps, the schedule-free ones evaluated at
``schedule_free_eval_params``). The steps run in one ``jax.lax.scan``; the
tolerance is Optax's (``rtol = atol = 3e-2``).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import functional_adam as fa

# name, kwargs: Optax's _OPTIMIZERS_UNDER_TEST (alias_test.py) entries for these optimizers.
ALIAS = [
    ("adabelief", {"learning_rate": 1e-2}),
    ("adamax", {"learning_rate": 1e-1}),
    ("adamaxw", {"learning_rate": 1e-1}),
    ("adan", {"learning_rate": 1e-1}),
    ("lamb", {"learning_rate": 1e-3}),
    ("lion", {"learning_rate": 1e-2, "weight_decay": 1e-4}),
    ("radam", {"learning_rate": 5e-3}),
    ("yogi", {"learning_rate": 1e-1}),
]
# contrib/_common_test.py's _MAIN_OPTIMIZERS_UNDER_TEST entries.
CONTRIB = [
    ("ademamix", {"learning_rate": 1e-3}),
    ("simplified_ademamix", {"learning_rate": 1e-3}),
    ("adopt", {"learning_rate": 1e-2}),
    ("schedule_free_adamw", {"learning_rate": 1e-2, "warmup_steps": 5000}),
]
ALL = ALIAS + CONTRIB + [("lion_8bit", {"learning_rate": 1e-2, "weight_decay": 1e-4}),
                         ("ademamix_8bit", {"learning_rate": 1e-3})]  # fmt: skip


def _abs_sq(x):
    return (x.conj() * x).real


def parabola(dtype):
    initial = jnp.array([-1.0, 10.0, 1.0], dtype=dtype)
    final = jnp.array([1.0, -1.0, 1.0], dtype=dtype)
    if jnp.iscomplexobj(initial):
        final = final * (1 + 1j)
    return initial, final, lambda p: jnp.sum(_abs_sq(p - final))


def rosenbrock(dtype):
    a, b = 1.0, 100.0
    if jnp.issubdtype(dtype, jnp.complexfloating):
        a *= 1 + 1j
    initial = jnp.array([0.0, 0.0], dtype=dtype)
    final = jnp.array([a, a**2], dtype=dtype)
    return initial, final, lambda p: _abs_sq(a - p[0]) + b * _abs_sq(p[1] - p[0] ** 2)


def matrix_parabola(dtype):
    initial = jnp.zeros((2, 2), dtype=dtype)
    final = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype=dtype)
    return initial, final, lambda p: jnp.sum(_abs_sq(p - final))


def mixed_tensors(dtype):
    final = (jnp.array([1.0, -1.0, 2.0], dtype), jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype))
    initial = (jnp.zeros(3, dtype), jnp.zeros((2, 2), dtype))

    def objective(params):
        return sum(jnp.sum(_abs_sq(p - f)) for p, f in zip(params, final, strict=True))

    return initial, final, objective


def _minimise(tx, target, dtype, steps):
    initial, final, objective = target(dtype)

    def step(carry, _):
        params, state = carry
        grads = jax.tree.map(jnp.conj, jax.grad(objective)(params))  # Optax conjugates too
        updates, state = tx.update(grads, state, params)
        return (fa.apply_updates(params, updates), state), None

    params, state = jax.jit(lambda c: jax.lax.scan(step, c, length=steps)[0])(
        (initial, tx.init(initial))
    )
    return params, state, final


@pytest.mark.parametrize("dtype", ["float32", "complex64"])
@pytest.mark.parametrize("target", [parabola, rosenbrock], ids=["parabola", "rosenbrock"])
@pytest.mark.parametrize(("name", "kwargs"), ALIAS, ids=[n for n, _ in ALIAS])
def test_optimization(name, kwargs, target, dtype):
    """alias_test.py's test_optimization: 10,000 steps reach the minimum within 3e-2."""
    params, _, final = _minimise(getattr(fa, name)(**kwargs), target, jnp.dtype(dtype), 10_000)
    chex.assert_trees_all_close(params, final, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize(
    "target", [parabola, rosenbrock, matrix_parabola, mixed_tensors],
    ids=["parabola", "rosenbrock", "matrix_parabola", "mixed_tensors"],
)  # fmt: skip
@pytest.mark.parametrize(("name", "kwargs"), CONTRIB, ids=[n for n, _ in CONTRIB])
def test_contrib_optimizers(name, kwargs, target):
    """contrib/_common_test.py's test_optimizers: 30,000 steps, float32."""
    params, state, final = _minimise(getattr(fa, name)(**kwargs), target, jnp.float32, 30_000)
    if name.startswith("schedule_free"):
        params = fa.schedule_free_eval_params(state, params)
    chex.assert_trees_all_close(params, final, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize(("name", "kwargs"), ALL, ids=[n for n, _ in ALL])
def test_preserve_dtype(name, kwargs, dtype):
    """Updates have the gradients' dtype (alias_test.py's test_preserve_dtype)."""
    tx = getattr(fa, name)(**kwargs)
    params = jnp.array([1.0, 2.0], dtype=dtype)
    grads = jax.grad(lambda x: jnp.sum(x**2))(params)
    updates, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
    assert updates.dtype == grads.dtype


WITH_MU_DTYPE = ["adamax", "adamaxw", "radam", "adabelief", "yogi", "lamb", "lion", "adan",
                 "adopt", "ademamix", "simplified_ademamix"]  # fmt: skip
MOMENT = {"ademamix": "m1", "adan": "m", "simplified_ademamix": "m"}


@pytest.mark.parametrize("state_dtype", ["bfloat16", "float32", "complex64", None])
@pytest.mark.parametrize("params_dtype", ["bfloat16", "float32", "complex64", None])
@pytest.mark.parametrize("name", WITH_MU_DTYPE)
def test_explicit_dtype(name, params_dtype, state_dtype):
    """The first moment has ``mu_dtype``, else the parameters' dtype (test_explicit_dtype)."""
    tx = getattr(fa, name)(0.1, mu_dtype=state_dtype)
    params_dtype = jax.dtypes.canonicalize_dtype(params_dtype)
    state = tx.init(jnp.array([0.0, 0.0], dtype=params_dtype))
    expected = params_dtype if state_dtype is None else jnp.dtype(state_dtype)
    if jnp.issubdtype(params_dtype, jnp.complexfloating):  # a complex parameter's mu is complex
        expected = jnp.result_type(expected, jnp.complex64)
    assert optax.tree_utils.tree_get(state, MOMENT.get(name, "mu")).dtype == expected


# Arguments that are not hyperparameters (a function of the count, sizes of the 8-bit layout)
# are named static, as Optax's test does for adafactor's min_dim_size_to_factor.
_SIZES = ("block_size", "min_8bit_size")
INJECT_STATIC = {"adopt": ("clip_value_fn",), "lion_8bit": _SIZES, "ademamix_8bit": _SIZES}


@pytest.mark.parametrize(("name", "kwargs"), ALL, ids=[n for n, _ in ALL])
def test_wrapped_in_inject_hyperparams(name, kwargs):
    """Numeric hyperparameters injected as arrays: the same updates and state (rtol 1e-5)."""
    factory = getattr(fa, name)
    injected = optax.inject_hyperparams(factory, static_args=INJECT_STATIC.get(name, ()))(**kwargs)
    plain = factory(**kwargs)
    params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
    grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]
    u, s = jax.jit(plain.update)(grads, jax.jit(plain.init)(params), params)
    u_inj, s_inj = jax.jit(injected.update)(grads, jax.jit(injected.init)(params), params)
    chex.assert_trees_all_close(u_inj, u, rtol=1e-5)
    chex.assert_trees_all_close(s_inj.inner_state, s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["adam_8bit", "adamw_8bit", "lion_8bit", "ademamix_8bit"])
def test_8bit_sizes_injected_as_int_arrays(name):
    """Without ``static_args`` inject_hyperparams passes block_size and min_8bit_size as int
    arrays: init takes their values, a jitted update (where they are traced) the state's
    shapes; a jitted init cannot, and its error names the argument and ``static_args``."""
    factory = getattr(fa, name)
    kwargs = {"learning_rate": 1e-2, "block_size": 64, "min_8bit_size": 100}
    injected, plain = optax.inject_hyperparams(factory)(**kwargs), factory(**kwargs)
    params = [jnp.linspace(-1.0, 1.0, 300).reshape(3, 100), jnp.ones(7)]  # 8-bit, plain
    grads = [jnp.cos(params[0]), -jnp.ones(7)]
    state = injected.init(params)
    chex.assert_trees_all_equal(state.inner_state, plain.init(params))  # blocks of 64
    u, s = jax.jit(plain.update)(grads, plain.init(params), params)
    u_inj, s_inj = jax.jit(injected.update)(grads, state, params)
    chex.assert_trees_all_close(u_inj, u, rtol=1e-5)
    chex.assert_trees_all_close(s_inj.inner_state, s, rtol=1e-5, atol=1e-6)
    p_fused, _ = jax.jit(lambda g, s, p: fa.update_and_apply(injected, g, s, p))(
        grads, state, params
    )
    chex.assert_trees_all_close(p_fused, optax.apply_updates(params, u), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"block_size is traced.*static_args"):
        jax.jit(injected.init)(params)
