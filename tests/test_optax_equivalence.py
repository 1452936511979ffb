"""functional_adam's aliases against Optax's, over 100 steps of random gradients.

Tolerances per dtype, and why:
- float32, float64: bitwise under ``jax.jit`` (the operations are Optax's, in
  Optax's order). Without jit, Optax evaluates its bias correction inside a
  jitted helper and XLA's fused ``b**t`` can differ by an ulp from ours, so
  updates (and AMSGrad's ``nu_max``, which holds a bias-corrected value) are
  compared to ``rtol=1e-6``.
- complex64: Optax keeps a complex second moment and divides complex by
  complex; we keep it real (its imaginary part is always 0) and divide complex
  by real: a few ulps, ``rtol=1e-5``.
- bfloat16, float16: Optax does the arithmetic in 16 bits, we do it in float32
  and round once when storing, so the two differ by Optax's accumulated
  rounding (measured worst case over 100 steps: ~7% of an update in bfloat16,
  ~5% in float16; up to 19% of a second moment in bfloat16 with b2 = 0.99,
  which Optax rounds to the bfloat16 0.98828125). ``test_low_precision_is_closer_to_float64`` shows that the
  difference is ours being the more accurate.
- ``mu_dtype=bfloat16``: we widen the stored moment before multiplying by b1,
  Optax multiplies in bfloat16: bfloat16-level tolerance.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import functional_adam as fa
from tests.trees import gradient_stream, mixed_tree

STEPS = 100
EAGER_STEPS = 20  # without jit (op by op): compared within tolerances, not bitwise


def _decay_matrices(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)


# name -> (factory taking the module (optax or fa), bitwise in float32/float64 under jit)
OPTIMIZERS = {
    "adam": (lambda m: m.adam(1e-2), True),
    "adam_hyper": (lambda m: m.adam(3e-3, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-8), True),
    "adam_mu_bf16": (lambda m: m.adam(1e-2, mu_dtype=jnp.bfloat16), False),
    "adam_schedule": (lambda m: m.adam(optax.cosine_decay_schedule(1e-2, STEPS)), True),
    "adam_nesterov": (lambda m: m.adam(1e-2, nesterov=True), True),
    "adamw": (lambda m: m.adamw(1e-2), True),
    "adamw_mask": (lambda m: m.adamw(1e-2, weight_decay=0.1, mask=_decay_matrices), True),
    "adamw_wd_schedule": (
        lambda m: m.adamw(1e-2, weight_decay=optax.linear_schedule(0.1, 0.0, STEPS)),
        True,
    ),
    "amsgrad": (lambda m: m.amsgrad(1e-2), True),
    "amsgrad_eps_root": (lambda m: m.amsgrad(1e-2, eps=1e-7, eps_root=1e-10), True),
    "nadam": (lambda m: m.nadam(1e-2), True),
    "nadamw": (lambda m: m.nadamw(1e-2, weight_decay=1e-2), True),
}

# dtype -> (update rtol, state rtol, atol) when not bitwise
TOLERANCES = {
    "float32": (1e-6, 1e-6, 1e-9),
    "float64": (1e-12, 1e-12, 1e-15),
    "complex64": (1e-5, 1e-6, 1e-8),
    "bfloat16": (0.1, 0.25, 2e-2),
    "float16": (0.06, 0.03, 2e-3),
}
MU_BF16_TOLERANCE = (0.05, 0.05, 1e-2)


def _comparable(optax_leaves, our_leaves):
    """Optax's complex second moments as real arrays (their imaginary part must be 0)."""
    out = []
    for theirs, ours in zip(optax_leaves, our_leaves, strict=True):
        if jnp.iscomplexobj(theirs) and not jnp.iscomplexobj(ours):
            np.testing.assert_array_equal(np.asarray(theirs.imag), 0)
            theirs = theirs.real
        out.append(theirs)
    return out


def _run(make, dtype, update_wrapper, steps):
    params = mixed_tree(dtype)
    grads = gradient_stream(params, steps)
    ours, theirs = make(fa), make(optax)
    our_update, their_update = update_wrapper(ours.update), update_wrapper(theirs.update)
    our_state, their_state = ours.init(params), theirs.init(params)
    pairs = []
    for g in grads:
        our_u, our_state = our_update(g, our_state, params)
        their_u, their_state = their_update(g, their_state, params)
        pairs.append((g, our_u, their_u))
    return pairs, our_state, their_state


def _assert_close(actual, expected, rtol, atol):
    if rtol == 0.0:
        chex.assert_trees_all_equal(actual, expected)
    else:
        chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=atol)


class OptaxEquivalenceTest(chex.TestCase):
    def _check(self, optimizer, dtype):
        make, exact = OPTIMIZERS[optimizer]
        jitted = self.variant.type == chex.ChexVariantType.WITH_JIT
        steps = STEPS if jitted else EAGER_STEPS
        with jax.enable_x64(dtype == "float64"):
            pairs, our_state, their_state = _run(make, jnp.dtype(dtype), self.variant, steps)
            bitwise = exact and jitted and dtype in ("float32", "float64")
            u_rtol, s_rtol, atol = TOLERANCES[dtype]
            if optimizer == "adam_mu_bf16":
                u_rtol, s_rtol, atol = MU_BF16_TOLERANCE
            for g, our_u, their_u in pairs:
                # Updates keep the gradients' dtype (Optax's can widen to float32 when a
                # float32 scalar meets 16-bit updates), so Optax's are cast to compare.
                chex.assert_trees_all_equal_dtypes(our_u, g)
                their_u = jax.tree.map(lambda t, o: t.astype(o.dtype), their_u, our_u)
                for ours, theirs in zip(
                    jax.tree.leaves(our_u), jax.tree.leaves(their_u), strict=True
                ):
                    chex.assert_shape(ours, theirs.shape)
                _assert_close(our_u, their_u, 0.0 if bitwise else u_rtol, atol)
            ours_leaves = jax.tree.leaves(our_state)
            theirs_leaves = _comparable(jax.tree.leaves(their_state), ours_leaves)
            _assert_close(ours_leaves, theirs_leaves, 0.0 if bitwise else s_rtol, atol)
            self.assertEqual(int(our_state[0].count), steps)  # one count per step

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((name, "float32") for name in sorted(OPTIMIZERS))
    def test_matches_optax(self, optimizer, dtype):
        self._check(optimizer, dtype)

    @chex.variants(with_jit=True)
    @parameterized.parameters(
        # Optax casts a complex first moment to mu_dtype=bfloat16, dropping its imaginary
        # part; we keep it complex (tests/test_state.py), so that pair is not compared.
        (name, "complex64")
        for name in sorted(OPTIMIZERS)
        if name != "adam_mu_bf16"
    )
    def test_matches_optax_complex(self, optimizer, dtype):
        self._check(optimizer, dtype)

    @chex.variants(with_jit=True)
    @parameterized.product(optimizer=sorted(OPTIMIZERS), dtype=["float64", "bfloat16", "float16"])
    def test_matches_optax_other_dtypes(self, optimizer, dtype):
        self._check(optimizer, dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["adam", "amsgrad", "nadam"])
def test_low_precision_is_closer_to_float64(name, dtype):
    """In 16-bit floats our updates are nearer a float64 run than Optax's are."""
    params = mixed_tree(jnp.dtype(dtype))
    grads = gradient_stream(params, STEPS)
    with jax.enable_x64(True):
        to64 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float64), t)  # noqa: E731
        runs = {
            "ours": (getattr(fa, name)(1e-2), params, lambda g: g),
            "optax": (getattr(optax, name)(1e-2), params, lambda g: g),
            "float64": (getattr(optax, name)(1e-2), to64(params), to64),
        }
        updates = {}
        for key, (tx, p, cast) in runs.items():
            step = jax.jit(tx.update)
            state, trajectory = tx.init(p), []
            for g in grads:
                u, state = step(cast(g), state, p)
                trajectory.append(
                    jnp.concatenate([x.ravel().astype(jnp.float64) for x in jax.tree.leaves(u)])
                )
            updates[key] = jnp.stack(trajectory)
        err_ours = float(jnp.linalg.norm(updates["ours"] - updates["float64"]))
        err_optax = float(jnp.linalg.norm(updates["optax"] - updates["float64"]))
    assert err_ours < err_optax, (err_ours, err_optax)
