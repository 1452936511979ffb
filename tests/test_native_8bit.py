"""The fused CPU 8-bit Adam kernel behind update_and_apply equals the XLA path, and steps aside."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import functional_adam as fa
from functional_adam.kernels import adam8_cpu, build
from functional_adam.kernels.dispatch import reference_path
from functional_adam.storage import quantized as qz
from functional_adam.storage.codec import index_rule, make_codec
from tests import test_float_codes
from tests.trees import assert_within_ulps, kernel_and_xla_steps, plain_update_step

TARGET = "functional_adam_adam8_f32"


@pytest.fixture(autouse=True)
def dispatch_to_the_kernel(monkeypatch):
    """update_and_apply takes the kernel also on a CPU without AVX-512 (its scalar code), so
    these tests check the kernel on every machine."""
    monkeypatch.setattr(build, "has_8bit_simd", build.available)


ULPS = 8  # of max(|θ before|, |θ after|): the XLA path divides by the bias corrections


def _tree(seed=0):
    """8-bit leaves (one with a padded last block), float32-moment leaves, a masked None."""
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(64, 100)), jnp.float32),  # 25 blocks, the last padded
        "emb": jnp.asarray(rng.normal(size=8192), jnp.float32),
        "b": jnp.asarray(rng.normal(size=100), jnp.float32),  # below min_8bit_size
        "none": None,
    }


def _grads(params, seed, bad=None):
    """Gradients over eight decades of magnitude; ``bad`` (inf, NaN, 1e20) in a few elements."""
    rng = np.random.default_rng(seed)

    def one(p):
        g = rng.normal(size=p.shape) * np.exp(rng.uniform(-12, 2, p.shape))
        if bad is not None and p.size > 1000:
            g.reshape(-1)[[3, 700, 701]] = bad
        return jnp.asarray(g, jnp.float32)

    return jax.tree.map(one, params)


CONFIGS = {
    "adam_8bit": lambda: fa.adam_8bit(1e-2),
    "adamw_8bit_mask_schedule": lambda: fa.adamw_8bit(
        optax.cosine_decay_schedule(1e-2, 50),
        weight_decay=lambda count: 0.01 * (count + 1),
        mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
    ),
    "nadam_8bit_block_64": lambda: fa.adam_8bit(3e-3, b1=0.8, nesterov=True, block_size=64),
    "adamw_8bit_block_2048_eps_root": lambda: fa.adamw_8bit(
        1e-2, eps_root=1e-10, weight_decay=0.1, block_size=2048
    ),
    "adam_8bit_block_8_scalar_path": lambda: fa.adam_8bit(1e-2, block_size=8, min_8bit_size=64),
    "nadamw_8bit_float_codes_block_64": lambda: fa.adamw_8bit(
        3e-3, nesterov=True, weight_decay=0.1, block_size=64, code="float"
    ),
    "chain_clip_inject": lambda: optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.inject_hyperparams(fa.adamw_8bit, static_args=("block_size", "min_8bit_size"))(
            learning_rate=0.01
        ),
    ),
}


# Before the 8-bit step, XLA may fold the clipping factor into the moment update of its own
# path (a different rounding of m and v in the last bit): there the scales may differ too.
ROUNDS_DIFFERENTLY = {"chain_clip_inject"}


def _assert_states_match(s_k, s_x, exact_scales: bool) -> int:
    """Codes within one (XLA:CPU may divide 1/scale inexactly, so a value on a bin edge can
    round the other way), scales and counts equal (or within 2 ulps); returns how many codes
    differ."""
    differ = 0
    for a, b in zip(jax.tree.leaves(s_k), jax.tree.leaves(s_x), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype.kind in "iu" and a.ndim == 2:
            gap = np.abs(a.astype(np.int64) - b)
            assert np.all((gap <= 1) | (gap == 255)), gap.max()  # 255: codes -128 (+1) and 127
            differ += int(np.sum(gap != 0))
        elif exact_scales or a.dtype.kind != "f":
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=2.5e-7)
    return differ


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_kernel_equals_xla_path_step_by_step(config):
    """Codes and scales bitwise; θ within a few ulps; also with inf, NaN and 1e20 gradients.
    Both kernel steps: ``update_and_apply``, and the plain ``update`` (which writes the
    update over the gradient) + ``apply_updates``."""
    tx = CONFIGS[config]()
    params = _tree()
    state = tx.init(params)
    kernel, xla = kernel_and_xla_steps(tx)
    update = plain_update_step(tx)
    for step in (kernel, update):
        assert step.lower(params, state, params).as_text().count(TARGET) >= 1
    differ = 0
    for t, bad in enumerate([None, None, np.inf, None, np.nan, 1e20, None]):
        grads = _grads(params, t, bad)
        p_x, s_x = xla(grads, state, params)
        for p_k, s_k in (kernel(grads, state, params), update(grads, state, params)):
            differ += _assert_states_match(s_k, s_x, config not in ROUNDS_DIFFERENTLY)
            finite, expected, before = (
                [jnp.where(jnp.isfinite(p), p, 0.0) for p in jax.tree.leaves(tree)]
                for tree in (p_k, p_x, params)
            )
            for k, x, b in zip(finite, expected, before, strict=True):
                assert_within_ulps(k, x, ULPS, scale_floor=np.abs(np.asarray(b)))
            # The non-finite gradients' parameters are non-finite in both (as in float32 Adam).
            chex.assert_trees_all_equal(
                jax.tree.map(jnp.isfinite, p_k), jax.tree.map(jnp.isfinite, p_x)
            )
        params, state = p_x, s_x
    assert differ <= 0.001 * 7 * 2 * 2 * 14592  # codes over 7 steps, 2 paths: rare ties


def test_plain_update_writes_over_the_gradient_and_keeps_a_gradient_still_needed():
    """``tx.update``'s kernel writes the update into the gradient's buffer: with the gradient
    donated, no new parameter-sized buffer and no copy; where the gradient is used after the
    update, XLA copies it first and it is returned unchanged. The update itself equals the
    XLA path's within a few ulps of lr·max(1, wd·|θ|)."""
    tx = fa.adamw_8bit(1e-2, weight_decay=0.1)
    params = _tree()
    params.pop("none")
    state, grads = tx.init(params), _grads(params, 1)

    def update(g, s, p):
        return tx.update(g, s, p)

    donated = jax.jit(update, donate_argnums=0).lower(grads, state, params).compile().as_text()
    entry = donated[donated.index("ENTRY") :]
    (call,) = [line for line in entry.splitlines() if f'custom_call_target="{TARGET}"' in line]
    assert "{0}: (3, {})" in call  # the first leaf's update over its gradient, operand 3
    assert not [
        line
        for line in entry.splitlines()
        if ("copy(" in line or " fusion(" in line) and ("64,100" in line or "8192" in line)
    ]
    u_k, _ = jax.jit(update)(grads, state, params)
    with reference_path():
        u_x, _ = jax.jit(lambda g, s, p: update(g, s, p))(grads, state, params)
    floor = jax.tree.map(lambda p: 1e-2 * np.maximum(1.0, 0.1 * np.abs(np.asarray(p))), params)
    for k, x, f in zip(*(jax.tree.leaves(t) for t in (u_k, u_x, floor)), strict=True):
        assert_within_ulps(k, x, 4, scale_floor=f)
    kept = jax.jit(lambda g, s, p: (update(g, s, p), g))(grads, state, params)[1]
    chex.assert_trees_all_equal(kept, grads)


def _kernel_inputs(block, size, seed=0, bad=True, code="dynamic"):
    rng = np.random.default_rng(seed)
    p = jnp.asarray(rng.normal(size=size), jnp.float32)
    g = rng.normal(size=size) * np.exp(rng.uniform(-20, 3, size))
    if bad and size > 8:
        g[[1, 5, 7]] = [np.inf, np.nan, -1e20]
    m = jnp.asarray(rng.normal(size=size) * 0.1, jnp.float32)
    m = qz.quantize(m, block, signed=True, code=code)
    v = jnp.pad(jnp.asarray(rng.exponential(size=size) * 1e-3, jnp.float32), (0, -size % block))
    v = qz.encode_second_moment(v.reshape(-1, block), code=code)
    return p, jnp.asarray(g, jnp.float32), m, v


SCALARS = jnp.array([0.9, 0.1, 0.999, 0.001, 1e-8, 0.0, 10.0, 1000.0, 1 / 0.19, -0.01, 0.1])


@pytest.mark.parametrize(
    "block, size, nesterov, code",
    [
        (16, 16 * 7 + 5, False, "float"),
        (64, 64 * 40, True, "dynamic"),
        (256, 1000, False, "dynamic"),
        (4096, 5000, True, "float"),
    ],
)
def test_simd_and_scalar_code_are_bitwise_equal_and_match_the_reference(
    block, size, nesterov, code
):
    """The AVX-512 code (where built) and the scalar code agree bitwise; the jax.numpy
    reference (as XLA compiles it) within a code and a few ulps."""
    leaves = [
        _kernel_inputs(block, size, code=code),
        _kernel_inputs(block, 3 * block, seed=1, bad=False, code=code),
    ]
    decay = (True, False)
    simd = adam8_cpu.adam8_step(SCALARS, leaves, decay, nesterov, True, False, code)
    scalar = adam8_cpu.adam8_step(SCALARS, leaves, decay, nesterov, False, False, code)
    reference = jax.jit(adam8_cpu.reference_step, static_argnums=(2, 3, 4, 5))(
        SCALARS, leaves, decay, nesterov, False, code
    )
    chex.assert_trees_all_equal(simd, scalar)
    states = lambda out: [o[1:] for o in out]  # noqa: E731
    assert _assert_states_match(states(simd), states(reference), True) <= 2
    for (p_k, *_), (p_r, *_), (p, *_) in zip(simd, reference, leaves, strict=True):
        finite = jnp.isfinite(p_k)
        np.testing.assert_array_equal(finite, jnp.isfinite(p_r))
        assert_within_ulps(
            p_k[finite], p_r[finite], ULPS, scale_floor=np.abs(np.asarray(p[finite]))
        )


def _encode_inputs(seed=0) -> np.ndarray:
    """Float32 a in [0, 1]: every midpoint of both maps and thresholds and the four floats on
    each side, powers of two from 2^-40 with two floats on each side, zero and subnormals,
    and 2^18 random bit patterns (log-uniform) and 2^16 uniform values."""
    edges = [make_codec(s).midpoints[:-1] for s in (True, False)]
    edges += [make_codec(s).thresholds for s in (True, False)]
    edges = np.concatenate([*edges, np.ldexp(np.float32(1), np.arange(-40, 1))])
    bits = edges.astype(np.float32).view(np.int32)[:, None] + np.arange(-4, 5)
    rng = np.random.default_rng(seed)
    random_bits = rng.integers(0, np.float32(1).view(np.int32), 2**18, dtype=np.int32)
    a = np.concatenate([bits.ravel(), random_bits, [0, 1, 2, 3, 2**20]]).view(np.float32)
    a = np.concatenate([a, rng.uniform(0, 1, 2**16).astype(np.float32)])
    return a[(a >= 0) & (a <= 1)]


@pytest.mark.parametrize(
    "simd, code", [(True, "dynamic"), (False, "dynamic"), (True, "float"), (False, "float")]
)
def test_codes_follow_the_rule_at_every_midpoint(simd, code):
    """With b1 = b2 = 0 and one element 1.0 per block, m = g and v = g² with scales 1: the
    kernel's codes of m and sqrt(v) are those of the codec's rule (index_rule; float codes:
    the nearest, by tests/test_float_codes.py's reference), signs, ties and the smallest
    codes included."""
    a = _encode_inputs()
    if code == "float":
        a = np.concatenate([a, test_float_codes._inputs()])
    block = 4096
    per_block = block - 1  # and one 1.0: the block maximum, scale 1
    blocks = -(-a.size // per_block)
    values = np.zeros(blocks * per_block, np.float32)
    values[: a.size] = a
    g = np.concatenate([np.ones((blocks, 1), np.float32), values.reshape(blocks, -1)], axis=1)
    rng = np.random.default_rng(1)
    g *= np.where(rng.random(g.shape) < 0.5, -1, 1).astype(np.float32)
    g = g.reshape(-1)
    mu, nu = qz.zeros(g.shape, block, signed=True), qz.zeros(g.shape, block, signed=False)
    scalars = jnp.array([0.0, 1.0, 0.0, 1.0, 1e-8, 0.0, 1.0, 1.0, 1.0, -0.01, 0.0])
    leaf = (jnp.zeros_like(g), jnp.asarray(g), mu, nu)
    _, mu, nu = adam8_cpu.adam8_step(scalars, [leaf], (False,), False, simd, False, code)[0]
    np.testing.assert_array_equal(mu.scale, 1.0)
    np.testing.assert_array_equal(nu.scale, 1.0)
    v = g * g  # float32, as the kernel rounds it; XLA:CPU flushes subnormal results to 0
    root = np.sqrt(np.where(v < np.finfo(np.float32).tiny, np.float32(0), v))
    if code == "float":
        k = test_float_codes.reference_codes(np.abs(g).astype(np.float64), True)
        expected_m = np.where(g < 0, -k, k)
        expected_v = test_float_codes.reference_codes(root.astype(np.float64), False)
    else:
        k = index_rule(np.abs(g), make_codec(True))
        expected_m = np.where(g < 0, -np.minimum(k, 127), k)
        expected_v = index_rule(root, make_codec(False))
    expected_v = np.where((root > 0) & (expected_v == 0), 1, expected_v)
    np.testing.assert_array_equal(np.asarray(mu.codes).reshape(-1), expected_m.astype(np.int8))
    np.testing.assert_array_equal(np.asarray(nu.codes).reshape(-1), expected_v)


@pytest.mark.parametrize(
    "make, params",
    [
        (lambda: fa.adam_8bit(1e-2), {"w": jnp.ones(8192, jnp.bfloat16)}),
        (
            lambda: fa.adam_8bit(1e-2, mu_dtype=jnp.bfloat16),
            {"w": jnp.ones(8192), "b": jnp.ones(3)},
        ),
        (lambda: fa.scale_by_adam_8bit(), {"w": jnp.ones(8192)}),
        (lambda: fa.adam_8bit(jnp.array([1e-2])), {"w": jnp.ones(8192)}),
    ],
    ids=["bf16_params", "bf16_mu_of_small_leaves", "no_learning_rate", "vector_learning_rate"],
)
def test_what_the_kernel_does_not_take_goes_the_xla_way(make, params):
    tx = make()
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    kernel, xla = kernel_and_xla_steps(tx)
    assert TARGET not in kernel.lower(grads, state, params).as_text()
    chex.assert_trees_all_equal(kernel(grads, state, params), xla(grads, state, params))


def test_one_pass_in_place_no_copies():
    """One custom call for the 8-bit leaves, one for the float32-moment ones; with donation,
    no copy of a parameter-sized array and no loop over the arrays outside the kernels."""
    tx = fa.adamw_8bit(1e-3, weight_decay=0.1)
    params = {
        "w": jax.ShapeDtypeStruct((512, 512), jnp.float32),
        "b": jax.ShapeDtypeStruct((512,), jnp.float32),
    }
    step = jax.jit(lambda p, s, g: fa.update_and_apply(tx, g, s, p), donate_argnums=(0, 1))
    hlo = step.lower(params, jax.eval_shape(tx.init, params), params).compile().as_text()
    entry = hlo[hlo.index("ENTRY") :]
    assert entry.count(f'custom_call_target="{TARGET}"') == 1
    assert entry.count('custom_call_target="functional_adam_adam_f32"') == 1
    big = [
        line
        for line in entry.splitlines()
        if ("copy(" in line or " fusion(" in line) and "512,512" in line
    ]
    assert not big, big


def test_hypergradient_and_vmap_through_the_kernel():
    def final_loss(lr, fused):
        tx = fa.adamw_8bit(lr, weight_decay=0.1, min_8bit_size=64, block_size=64)
        params = jnp.linspace(-1.0, 1.0, 256)
        state = tx.init(params)
        for _ in range(2):
            grads = 2 * params
            if fused:
                params, state = fa.update_and_apply(tx, grads, state, params)
            else:
                updates, state = tx.update(grads, state, params)
                params = fa.apply_updates(params, updates)
        return jnp.sum(params**2)

    def grad_and_batch(fused):  # jitted (new functions: no trace is shared between the calls)
        lrs = jnp.array([0.01, 0.3])
        grad = jax.jit(jax.grad(final_loss), static_argnums=1)(0.1, fused)
        return grad, jax.jit(jax.vmap(lambda lr: final_loss(lr, fused)))(lrs)

    for fused in (True, False):  # update_and_apply's kernel, then the plain update's
        assert TARGET in jax.jit(final_loss, static_argnums=1).lower(0.1, fused).as_text()
    with reference_path():
        xla_grad, xla_batch = grad_and_batch(False)
    for fused in (True, False):
        grad, batch = grad_and_batch(fused)
        np.testing.assert_allclose(grad, xla_grad, rtol=1e-5)
        np.testing.assert_allclose(batch, xla_batch, rtol=1e-6)


def test_trajectories_stay_together_and_descend():
    tx = fa.adamw_8bit(1e-2, weight_decay=0.1, min_8bit_size=1000)
    params = {"w": jnp.linspace(-3.0, 3.0, 5000).reshape(50, 100), "b": jnp.ones(7)}
    kernel, xla = kernel_and_xla_steps(tx)
    (p_k, s_k), (p_x, s_x) = (params, tx.init(params)), (params, tx.init(params))
    for _ in range(200):
        p_k, s_k = kernel(jax.tree.map(lambda p: 2 * p, p_k), s_k, p_k)
        p_x, s_x = xla(jax.tree.map(lambda p: 2 * p, p_x), s_x, p_x)
    # A last-bit difference can put a moment on the other side of a bin edge, so a few
    # parameters drift apart by a fraction of a step (lr = 1e-2) over 200 steps.
    chex.assert_trees_all_close(p_k, p_x, rtol=0, atol=1e-3)
    assert float(jnp.mean(jnp.abs(p_k["w"] - p_x["w"]))) < 1e-6
    assert float(jnp.max(jnp.abs(p_k["w"]))) < 2.0  # it did descend


def test_without_the_avx512_code_the_xla_path_is_taken(monkeypatch):
    """The kernel's scalar code (for CPUs without AVX-512) is slower than XLA's loops."""
    tx = fa.adam_8bit(1e-2)
    params = {"w": jnp.ones(8192)}
    monkeypatch.setattr(build, "has_8bit_simd", lambda: False)
    lowered = jax.jit(lambda g, s, p: fa.update_and_apply(tx, g, s, p)).lower(
        params, tx.init(params), params
    )
    assert TARGET not in lowered.as_text()


def test_flax_train_state_apply_gradients_takes_the_kernel():
    """``TrainState.apply_gradients`` (``tx.update`` + ``optax.apply_updates``) runs the
    8-bit kernel and steps as the XLA path does."""
    from flax.training import train_state

    tx = fa.adamw_8bit(1e-2, weight_decay=0.1)
    params = {"w": _tree()["w"]}
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
    grads = _grads(params, 2)
    apply = jax.jit(lambda s, g: s.apply_gradients(grads=g))
    assert TARGET in apply.lower(state, grads).as_text()
    _, xla = kernel_and_xla_steps(tx)
    p_x, s_x = xla(grads, state.opt_state, params)
    new = apply(state, grads)
    assert _assert_states_match(new.opt_state, s_x, True) <= 1
    assert_within_ulps(new.params, p_x, ULPS, scale_floor=np.abs(np.asarray(params["w"])))
