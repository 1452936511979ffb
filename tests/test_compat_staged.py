"""``staged_update``: decay in place, then step, two roundings of θ as PyTorch and Keras make them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import functional_adam as fa
from functional_adam.compat.staged import staged_update

C = np.float32(1 - 1e-5)  # PyTorch's AdamW defaults: 1 - lr·wd


def _theta_and_steps(n=20_000, seed=0):
    """θ of magnitudes 1e-3 ... 1e3, steps of 1e-6 to 10 times |θ| (many cross 0)."""
    rng = np.random.default_rng(seed)
    theta = rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-3, 3, n)
    step = rng.standard_normal(n) * np.abs(theta) * 10.0 ** rng.uniform(-6, 1, n)
    return theta.astype(np.float32), step.astype(np.float32)


def _apply_staged(theta, step):
    @jax.jit  # under jit XLA would contract θ·c + u into one FMA, rounding once
    def run(theta, step):
        updates = staged_update(step, theta, lambda p: p * jnp.asarray(C, p.dtype))
        return fa.apply_updates(theta, updates)

    return np.asarray(run(jnp.asarray(theta), jnp.asarray(step)))


def test_apply_updates_lands_on_the_twice_rounded_theta():
    theta, step = _theta_and_steps()
    expected = (theta * C).astype(np.float32) + step  # float32: θ·c rounded, then θ + u rounded
    ours = _apply_staged(theta, step)
    sterbenz = (expected / theta >= 0.5) & (expected / theta <= 2.0)
    assert 0.2 < sterbenz.mean() < 0.9  # both kinds of steps are there
    np.testing.assert_array_equal(ours[sterbenz], expected[sterbenz])
    # Elsewhere new θ - θ rounds: apply_updates lands within an ulp of the larger magnitude.
    scale = np.maximum(np.abs(theta), np.abs(expected))
    assert np.all(np.abs(ours - expected) <= np.spacing(scale))


def test_sixteen_bit_parameters_are_rounded_to_their_dtype_at_each_stage():
    theta, step = _theta_and_steps(seed=1)
    theta16 = jnp.asarray(theta, jnp.bfloat16)
    step = step * np.float32(1e-3)  # small steps: the Sterbenz case
    ours = _apply_staged(theta16, step)
    decayed = (np.asarray(theta16, np.float32) * C).astype(jnp.bfloat16).astype(np.float32)
    expected = (decayed + step).astype(jnp.bfloat16)
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_parameters_stay_non_finite(value):
    theta = np.array([value, 1.0], np.float32)
    ours = _apply_staged(theta, np.array([1e-3, 1e-3], np.float32))
    assert not np.isfinite(ours[0]) and np.isfinite(ours[1])
