"""The codec's tables (jax.numpy path) give exactly the rule the C++ and Pallas kernels compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from functional_adam.storage import codec as cd


def _probe_points(codec: cd.Codec, seed: int = 0) -> np.ndarray:
    """Random a over nine decades, every midpoint, the float32 just below each, and the ends."""
    rng = np.random.default_rng(seed)
    mids = codec.midpoints[:-1]
    below = np.nextafter(mids, np.float32(0))
    ends = np.array([0.0, 1e-30, 1.0, np.nextafter(np.float32(1), np.float32(2)), 2.0], np.float32)
    uniform = np.exp(rng.uniform(np.log(1e-9), 0.0, 20000)).astype(np.float32)
    return np.concatenate([uniform, mids, below, codec.thresholds, ends]).astype(np.float32)


@pytest.mark.parametrize("signed", [True, False])
def test_table_look_ups_and_jax_rule_give_the_rule(signed):
    codec = cd.make_codec(signed)
    a = _probe_points(codec)
    rule = cd.index_rule(a, codec)  # numpy, the fma in float64
    np.testing.assert_array_equal(np.asarray(cd.nearest_index(jnp.asarray(a), codec)), rule)
    by_rule = jax.jit(lambda a: cd.nearest_index_by_rule(a, codec))(jnp.asarray(a))
    np.testing.assert_array_equal(np.asarray(by_rule), rule)


@pytest.mark.parametrize("signed", [True, False])
def test_decode_by_arithmetic_is_the_table(signed):
    codec = cd.make_codec(signed)
    codes = jnp.arange(256).astype(jnp.uint8)
    codes = jax.lax.bitcast_convert_type(codes, jnp.int8) if signed else codes
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda c: cd.decode_codes_by_rule(c, codec))(codes)),
        np.asarray(cd.decode_codes(codes, codec)),
    )


@pytest.mark.parametrize("signed", [True, False])
def test_the_rule_is_the_nearest_magnitude(signed):
    """Up to float32 rounding at bin edges: the chosen magnitude is as close as the best one."""
    codec = cd.make_codec(signed)
    a = _probe_points(codec)
    a = a[a <= 1]
    chosen = codec.magnitudes[cd.index_rule(a, codec)].astype(np.float64)
    best = np.min(np.abs(a[:, None].astype(np.float64) - codec.magnitudes[None, :]), axis=1)
    np.testing.assert_array_less(np.abs(chosen - a), best + 1e-6 * a + 1e-12)


@pytest.mark.parametrize("signed", [True, False])
def test_midpoints_are_where_the_rule_steps(signed):
    codec = cd.make_codec(signed)
    mids = codec.midpoints[:-1]
    k = np.arange(len(mids))
    np.testing.assert_array_equal(cd.index_rule(mids, codec), k + 1)
    np.testing.assert_array_equal(cd.index_rule(np.nextafter(mids, np.float32(0)), codec), k)


@pytest.mark.parametrize("signed", [True, False])
def test_decode_from_leading_zeros_is_the_table(signed):
    """The kernels decode k as (k - offset[d])·slope[d], d from k's leading zeros."""
    codec = cd.make_codec(signed)
    k = np.arange(len(codec.magnitudes))
    log2 = np.floor(np.log2(np.maximum(k if signed else k + 1, 1))).astype(np.int64)
    d = np.where(k == 0, -1, log2 if signed else log2 - 1) & 15
    values = (k.astype(np.float32) - codec.offset[d]) * codec.slope[d]
    np.testing.assert_array_equal(values, codec.magnitudes)
    assert values[0] == 0.0 and values[-1] == 1.0
    np.testing.assert_allclose(codec.magnitudes, cd.dynamic_map(signed)[-len(k) :], rtol=1e-6)
