"""Float codes (code="float"): nearest codes by an independent numpy reference, their error
bound, the state they make, and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import functional_adam as fa
from functional_adam.storage import float_codes
from functional_adam.storage import quantized as qz

# (mantissa bits, first exponent of code 0, codes) of each map, from the format's definition
# (not from float_codes): code q >= 1 is 2^(e - 127)·(1 + f/2^bits) with e·2^bits + f = q + base.
FORMATS = {True: (3, 889, 128), False: (4, 1777, 256)}


def values(signed: bool) -> np.ndarray:
    """The magnitude of every code, float64: 0, then increasing to 1."""
    bits, base, n = FORMATS[signed]
    q = np.arange(1, n) + base
    out = np.ldexp(1 + (q & (2**bits - 1)) / 2**bits, (q >> bits) - 127)
    return np.concatenate([[0.0], out])


def reference_codes(a: np.ndarray, signed: bool) -> np.ndarray:
    """The nearest code of each a in [0, 1] (ties to the larger); below the midpoint of the
    two smallest positive codes' neighbours (half a step under code 1), 0."""
    table = values(signed)
    upper = np.clip(np.searchsorted(table, a), 1, len(table) - 1)
    lower = upper - 1
    nearest = np.where(a - table[lower] < table[upper] - a, lower, upper)
    flush = a < table[1] - (table[2] - table[1]) / 2
    return np.where(flush, 0, nearest)


def _inputs(seed=0) -> np.ndarray:
    """Every code's value and the midpoints between codes, each with the four floats on
    either side; 2^18 log-uniform and 2^16 uniform values in [0, 1]."""
    edges = []
    for signed in (True, False):
        table = values(signed)
        edges += [table, (table[1:] + table[:-1]) / 2]
    bits = np.concatenate(edges).astype(np.float32).view(np.int32)[:, None] + np.arange(-4, 5)
    rng = np.random.default_rng(seed)
    random_bits = rng.integers(0, np.float32(1).view(np.int32), 2**18, dtype=np.int32)
    a = np.concatenate([bits.ravel(), random_bits]).view(np.float32)
    a = np.concatenate([a, rng.uniform(0, 1, 2**16).astype(np.float32), [0.0, 1.0]])
    return a[(a >= 0) & (a <= 1)]


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_codes_are_the_nearest_and_decode_to_the_formats_values(signed):
    a = _inputs()
    q = np.asarray(float_codes.encode(jnp.asarray(a), signed))
    np.testing.assert_array_equal(q, reference_codes(a.astype(np.float64), signed))
    n = FORMATS[signed][2]
    decoded = np.asarray(float_codes.decode(jnp.arange(n), signed))
    np.testing.assert_array_equal(decoded, values(signed).astype(np.float32))
    assert decoded[-1] == 1.0 and np.all(np.diff(decoded) > 0)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_relative_error_is_half_a_step_of_the_mantissa(signed):
    """|decode(encode(a)) - a| <= a/16 (3 mantissa bits) or a/32 (4) above 2^-15."""
    a = _inputs(1)
    a = a[a >= 2**-15]
    back = np.asarray(float_codes.decode(float_codes.encode(jnp.asarray(a), signed), signed))
    bound = a / (16 if signed else 32)
    assert np.all(np.abs(back - a) <= bound * (1 + 1e-6))


def test_quantize_round_trip_signs_saturation_and_zeros():
    x = jnp.array([[-2.0, 0.0, 0.5, 2.0, jnp.inf, -jnp.inf, jnp.nan, 1e-9]])
    q = qz.encode_blocks(x, signed=True, code="float")
    np.testing.assert_array_equal(q.scale, [2.0])
    np.testing.assert_array_equal(q.codes, [[-127, 0, 111, 127, 127, -127, 0, 0]])
    np.testing.assert_array_equal(
        qz.decode_blocks(q, signed=True, code="float"), [[-2, 0, 0.5, 2, 2, -2, 0, 0]]
    )
    v = qz.encode_second_moment(jnp.array([[4.0, 1.0, 0.0, 1e-30]]), code="float")
    np.testing.assert_array_equal(v.codes, [[255, 239, 0, 1]])  # a positive v: at least 1
    y = jnp.linspace(-3.0, 3.0, 1000)
    back = qz.dequantize(qz.quantize(y, 256, signed=True, code="float"), (1000,), signed=True,
                         code="float")  # fmt: skip
    assert float(jnp.max(jnp.abs(back - y) / jnp.maximum(jnp.abs(y), 3 * 2**-15))) <= 1 / 16


def test_adam_8bit_float_codes_state_and_one_step():
    """The state has the dynamic map's dtypes and shapes; one step is decode, Adam, encode."""
    tx = fa.adam_8bit(1e-2, code="float", min_8bit_size=0, block_size=64)
    p = jnp.linspace(-1.0, 1.0, 200)
    state = tx.init(p)
    dynamic = fa.adam_8bit(1e-2, min_8bit_size=0, block_size=64).init(p)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == jax.tree.map(
        lambda x: (x.shape, x.dtype), dynamic
    )
    g = jnp.sin(7 * p)
    u, state = tx.update(g, state, p)
    np.testing.assert_allclose(u, -1e-2 * jnp.sign(g), rtol=1e-4)  # m̂/sqrt(v̂) = ±1 (float32)
    m = qz.dequantize(state[0].mu, (200,), signed=True, code="float")
    np.testing.assert_allclose(m, 0.1 * g, rtol=1 / 16, atol=1e-7)


def test_inject_hyperparams_takes_the_code_as_a_static_argument():
    tx = optax.inject_hyperparams(fa.adamw_8bit)(learning_rate=0.01, code="float")
    params = {"w": jnp.ones(8192)}
    state = tx.init(params)
    u, _ = jax.jit(tx.update)({"w": jnp.ones(8192)}, state, params)
    np.testing.assert_allclose(u["w"], -0.01 * (1 + 1e-4), rtol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: fa.adam_8bit(1e-3, code="fp8"),
        lambda: fa.lion_8bit(1e-3, code=8),
        lambda: fa.ademamix_8bit(1e-3, code="Float"),
        lambda: qz.quantize(jnp.ones(4), 4, signed=True, code="e4m3"),
    ],
)
def test_an_unknown_code_is_refused_by_name(make):
    with pytest.raises(ValueError, match=r"code must be one of \('dynamic', 'float'\)"):
        make()


def test_lion_8bit_stores_its_momentum_in_float_codes():
    tx = fa.lion_8bit(1e-3, code="float", min_8bit_size=0, block_size=64)
    p = jnp.linspace(-1.0, 1.0, 128)
    g = jnp.cos(5 * p)
    _, state = tx.update(g, tx.init(p), p)
    mu = state[0].mu
    stored = qz.dequantize(mu, (128,), signed=True, code="float")
    np.testing.assert_allclose(stored, 0.01 * g, rtol=1 / 16, atol=1e-9)  # mu = (1 - b2)·g
    assert -128 not in np.asarray(mu.codes)  # the dynamic map's code of +1 (each block's max)
