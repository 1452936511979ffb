"""The block-wise 8-bit codec (functional_adam.storage.quantized): the map, round trips, error bounds."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from functional_adam.storage import quantized as qz


def _brackets(values: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The map entries just below and just above each ``a`` (clipped to the map's range)."""
    hi = np.clip(np.searchsorted(values, a, side="left"), 1, len(values) - 1)
    return values[hi - 1], values[hi]


def _data(signed: bool, n: int = 8192, seed: int = 0) -> np.ndarray:
    """Values over ten decades of magnitude, so every decade of the map is exercised."""
    rng = np.random.default_rng(seed)
    x = np.exp(rng.uniform(np.log(1e-9), 0.0, n)) * rng.choice([-1.0, 1.0], n)
    x[::97] = 0.0
    return (x if signed else np.abs(x)).astype(np.float32)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_the_bitsandbytes_construction(signed):
    q = qz.dynamic_map(signed).astype(np.float64)
    assert q.shape == (256,) and np.all(np.diff(q) > 0)
    assert q[-1] == 1.0 and 0.0 in q
    positive = q[q > 0][:-1]  # the bin centres, without the final 1
    per_sign = 2 ** np.arange(7) if signed else 2 ** np.arange(1, 8)
    for i, count in enumerate(per_sign):
        in_decade = positive[(positive >= 10.0 ** (i - 6) * 0.1) & (positive < 10.0 ** (i - 6))]
        assert len(in_decade) == count  # 2^i (signed) or 2^(i+1) values in decade i
        # the centres of `count` equal bins of [0.1, 1]·10^(i-6)
        width = 0.9 * 10.0 ** (i - 6) / count
        np.testing.assert_allclose(np.diff(in_decade), width, rtol=1e-5)
        np.testing.assert_allclose(in_decade[0], 10.0 ** (i - 6) * 0.1 + width / 2, rtol=1e-6)
    if signed:
        np.testing.assert_array_equal(q[q < 0], -positive[::-1].astype(np.float32))


def test_the_map_is_not_linear():
    q = qz.dynamic_map(signed=False).astype(np.float64)
    gaps = np.diff(q)
    assert gaps.max() / gaps.min() > 1e4  # a linear map has equal gaps
    assert (q < 1 / 255).sum() > 30  # a linear map would have one value (0) below 1/255


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_picks_the_nearest_map_value(signed):
    x = _data(signed)
    q = qz.quantize(jnp.asarray(x), 256, signed=signed)
    s = np.repeat(np.asarray(q.scale, np.float64), 256)[: x.size]
    chosen = np.asarray(qz.dequantize(q, x.shape, signed=signed), np.float64) / s
    a = x / s
    table = qz.dynamic_map(signed).astype(np.float64)
    best = np.min(np.abs(a[:, None] - table[None, :]), axis=1)
    np.testing.assert_array_less(np.abs(chosen - a), best + 1e-6 * np.abs(a) + 1e-12)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("block_size", [64, 2048])
def test_round_trip_error_is_at_most_half_the_local_spacing(signed, block_size):
    x = _data(signed, n=3 * block_size + 17)  # not a multiple of the block size: padded
    q = qz.quantize(jnp.asarray(x), block_size, signed=signed)
    xh = np.asarray(qz.dequantize(q, x.shape, signed=signed), np.float64)
    s = np.repeat(np.asarray(q.scale, np.float64), block_size)[: x.size]
    values = qz.dynamic_map(signed).astype(np.float64)
    below, above = _brackets(values, x / s)
    bound = s * (above - below) / 2 + 4 * np.finfo(np.float32).eps * s
    np.testing.assert_array_less(np.abs(xh - x), bound)
    # Near the block maximum (|x| >= s/10) the spacing is 0.9/64 (signed) or 0.9/128.
    big = np.abs(x) >= 0.1 * s
    step = 0.9 / (64 if signed else 128)
    assert big.sum() > 10
    assert np.all(np.abs(xh - x)[big] <= s[big] * (step / 2 + 1e-6))


def test_scale_is_the_block_absmax_and_it_round_trips_exactly():
    x = jnp.array([0.5, -3.0, 0.25, 1.0, 2.0, -0.5, 7.0, 0.0])
    q = qz.quantize(x, 4, signed=True)
    np.testing.assert_array_equal(q.scale, [3.0, 7.0])
    xh = qz.dequantize(q, (8,), signed=True)
    assert xh[6] == 7.0  # +absmax is in the map (+1)
    # -absmax is not (the map holds +1 but not -1): the largest centre, 1 - 0.45/64.
    np.testing.assert_allclose(xh[1], -3.0 * (1 - 0.45 / 64), rtol=1e-6)


@pytest.mark.parametrize("signed", [True, False])
def test_zeros_encode_to_zero_codes_and_decode_to_zero(signed):
    q = qz.quantize(jnp.zeros((3, 100)), 64, signed=signed)
    z = qz.zeros((3, 100), 64, signed=signed)
    for a, b in zip(q, z, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(qz.dequantize(q, (3, 100), signed=signed), 0.0)


def test_code_dtypes_shapes_and_padding():
    x = jnp.arange(1.0, 11.0).reshape(2, 5)
    q = qz.quantize(x, 4, signed=True)
    assert q.codes.dtype == jnp.int8 and q.codes.shape == (3, 4)
    assert q.scale.dtype == jnp.float32 and q.scale.shape == (3,)
    np.testing.assert_array_equal(q.codes[-1, 2:], 0)  # the padding encodes zeros
    assert qz.dequantize(q, (2, 5), signed=True).shape == (2, 5)
    assert qz.quantize(jnp.abs(x), 8, signed=False).codes.dtype == jnp.uint8


def test_signed_codes_are_sign_symmetric():
    x = jnp.asarray(_data(True, n=512))
    qp, qn = qz.quantize(x, 512, signed=True), qz.quantize(-x, 512, signed=True)
    not_top = (qp.codes != -128) & (qn.codes != -128)
    np.testing.assert_array_equal(np.asarray(qp.codes)[not_top], -np.asarray(qn.codes)[not_top])


def test_zero_size_arrays():
    q = qz.quantize(jnp.zeros((0, 3)), 256, signed=True)
    assert q.codes.shape == (0, 256) and q.scale.shape == (0,)
    assert qz.dequantize(q, (0, 3), signed=True).shape == (0, 3)


def test_quantize_runs_under_jit_and_vmap():
    x = jnp.asarray(_data(True, n=4 * 256)).reshape(4, 256)
    eager = qz.quantize(x, 128, signed=True)
    jitted = jax.jit(qz.quantize, static_argnames=("block_size", "signed"))(
        x, block_size=128, signed=True
    )
    mapped = jax.vmap(lambda r: qz.quantize(r, 128, signed=True))(x)
    np.testing.assert_array_equal(eager.codes, jitted.codes)
    np.testing.assert_array_equal(eager.codes.reshape(4, 2, 128), mapped.codes)


@pytest.mark.parametrize("bad", [0, -256, 100, 3, 2.0, True, "256", None])
def test_block_size_must_be_a_positive_power_of_two(bad):
    with pytest.raises(ValueError, match="block_size must be a positive power of two"):
        qz.quantize(jnp.ones(8), bad, signed=True)


def test_num_blocks():
    assert [qz.num_blocks(n, 256) for n in (0, 1, 256, 257)] == [0, 1, 1, 2]
    assert qz.num_blocks(10**7, 2048) == math.ceil(10**7 / 2048)
