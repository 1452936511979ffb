"""8-bit blocks with a non-finite or overflowing value: the other elements of the block are kept.

Policy (functional_adam.storage.quantized): the scale is the absmax over the valid elements;
an invalid one saturates (±inf and overflowing values to their sign's largest code, NaN to 0
in a signed moment and to the block maximum in a squared one).
"""

import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import functional_adam as fa
from functional_adam.kernels.dispatch import reference_path
from functional_adam.storage import quantized as qz

BLOCK = 256


def _block(seed=0, n=BLOCK):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * np.exp(rng.uniform(-5, 0, n))).astype(np.float32)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("signed", [True, False])
def test_a_non_finite_value_leaves_the_scale_and_codes_of_the_others(bad, signed):
    x = _block()
    x = x if signed else np.abs(x)
    x[7] = 0.0  # not the maximum, so the block without element 7 has the same scale
    clean = qz.encode_blocks(jnp.asarray(x)[None], signed=signed)
    x[7] = bad
    q = qz.encode_blocks(jnp.asarray(x)[None], signed=signed)
    finite_max = np.max(np.abs(x[np.isfinite(x)]))
    np.testing.assert_array_equal(q.scale, [finite_max])
    others = np.arange(BLOCK) != 7
    np.testing.assert_array_equal(
        np.asarray(q.codes)[0, others], np.asarray(clean.codes)[0, others]
    )
    decoded = np.asarray(qz.decode_blocks(q, signed=signed))[0]
    assert np.all(np.isfinite(decoded))
    # The element itself saturates: +inf (and, unsigned, NaN) to the block maximum, -inf to
    # the most negative value of the map (its first, sorted), NaN to 0 in the signed map.
    if not signed or bad == np.inf:
        want = finite_max
    elif bad == -np.inf:
        want = float(qz.dynamic_map(signed=True)[0]) * finite_max
    else:
        want = 0.0
    np.testing.assert_allclose(decoded[7], want, rtol=1e-6)


@pytest.mark.parametrize("signed", [True, False])
def test_a_block_without_finite_values_decodes_to_zeros(signed):
    x = jnp.array([[jnp.inf, jnp.nan, jnp.inf, jnp.nan]])
    q = qz.encode_blocks(x, signed=signed)
    np.testing.assert_array_equal(q.scale, [0.0])
    np.testing.assert_array_equal(qz.decode_blocks(q, signed=signed), np.zeros((1, 4)))


def test_valid_mask_excludes_finite_values_from_the_scale():
    x = jnp.array([[1e19, 0.5, -0.25, 0.0]])
    q = qz.encode_blocks(x, signed=True, valid=jnp.array([[False, True, True, True]]))
    np.testing.assert_array_equal(q.scale, [0.5])
    np.testing.assert_allclose(qz.decode_blocks(q, signed=True)[0, 0], 0.5)  # saturated


def _trajectory(name, bad, steps=50, n=4096, at=3, reference=False, **kwargs):
    """``steps`` Adam steps on f(p) = |p|²; the first gradient has ``bad`` at index ``at``.
    ``reference``: the XLA path (else a plain update takes the kernel where one applies)."""
    tx = getattr(fa, name)(1e-3, **kwargs)
    p0 = jnp.linspace(-1.0, 1.0, n)

    @jax.jit
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return fa.apply_updates(p, u), s

    p, s = p0, tx.init(p0)
    with reference_path() if reference else contextlib.nullcontext():
        for t in range(steps):
            g = 2 * p
            p, s = step(p, s, g.at[at].set(bad) if t == 0 else g)
    return np.asarray(p0), np.asarray(p), s


CASES = [(bad, reference, "dynamic") for bad in (np.inf, -np.inf, np.nan, 1e20, -1e20)
         for reference in (False, True)]  # fmt: skip
CASES += [(bad, False, "float") for bad in (-np.inf, np.nan, 1e20)]


@pytest.mark.parametrize(("bad", "reference", "code"), CASES)
def test_one_bad_gradient_does_not_spoil_its_block(bad, reference, code):
    """reference: the XLA path (else the kernel, where one applies); code: the 8-bit codes.

    Before: inf turned the whole block to NaN; 1e20 froze it (each moved ~lr in 50 steps).
    """
    p0, p8, state = _trajectory("adam_8bit", bad, reference=reference, code=code)
    _, p32, _ = _trajectory("adam", bad)
    others = np.arange(BLOCK) != 3  # the rest of the first block
    assert np.all(np.isfinite(p8[:BLOCK][others]))
    # The neighbours travel as far as float32 Adam's (about 50·lr), within 8-bit accuracy.
    travelled = np.abs(p32[:BLOCK][others] - p0[:BLOCK][others])
    assert np.median(travelled) > 0.04
    np.testing.assert_allclose(p8[:BLOCK][others], p32[:BLOCK][others], atol=0.1 * 0.05)
    # Every scale stays finite.
    for q in (state[0].mu, state[0].nu):
        assert np.all(np.isfinite(np.asarray(q.scale)))


def test_an_overflowing_gradient_saturates_its_own_moments():
    """|g| = 1e20: g² overflows, so the element is invalid; its m and sqrt(v) take the block
    maxima of the other elements, and its step stays bounded (about lr)."""
    g = jnp.asarray(_block(1, 4096)).at[3].set(1e20)
    tx = fa.scale_by_adam_8bit()
    u, state = tx.update(g, tx.init(g))
    m = np.asarray(qz.decode_blocks(state.mu, signed=True))[0]
    v = np.asarray(qz.decode_second_moment(state.nu))[0]
    g0 = np.asarray(g)[:BLOCK]
    others = np.arange(BLOCK) != 3
    np.testing.assert_allclose(m[3], 0.1 * np.max(np.abs(g0[others])), rtol=1e-6)
    np.testing.assert_allclose(v[3], 0.001 * np.max(g0[others] ** 2), rtol=1e-5)
    u2, _ = tx.update(jnp.zeros_like(g), state)
    assert abs(float(u2[3])) < 1.0
    # The step in which the gradient arrived is float32 Adam's: m / sqrt(inf) = 0.
    u32, _ = fa.scale_by_adam().update(g, fa.scale_by_adam().init(g))
    chex.assert_trees_all_equal(u[3], u32[3])
