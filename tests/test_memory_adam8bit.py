"""adam_8bit / adamw_8bit: state layout and size, agreement with float32 Adam, pytree behaviour."""

import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import functional_adam as fa
from functional_adam.kernels.dispatch import reference_path
from functional_adam.optimizers.adam import adam_leaf, bias_corrections
from functional_adam.storage import blockwise
from functional_adam.storage import quantized as qz


def _state_bytes(state) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def _regression(seed=0, n=512, d=64, k=128):
    """Least squares ``|X W - Y|²`` with a 64×128 = 8192-parameter W (quantized by default)."""
    kx, kw, kn, k0 = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, (n, d))
    y = x @ jax.random.normal(kw, (d, k)) + 0.1 * jax.random.normal(kn, (n, k))
    w0 = 0.1 * jax.random.normal(k0, (d, k))
    return w0, lambda w: jnp.mean((x @ w - y) ** 2)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _train(tx_args, w0, _unused, steps, loss):
    name, lr, kwargs = tx_args
    tx = getattr(fa, name)(lr, **dict(kwargs))

    def body(carry, _):
        w, s = carry
        u, s = tx.update(jax.grad(loss)(w), s, w)
        return (fa.apply_updates(w, u), s), None

    (w, _), _ = jax.lax.scan(body, (w0, tx.init(w0)), None, length=steps)
    return w


def test_state_layout_and_dtypes():
    params = {"w": jnp.zeros((100, 50)), "b": jnp.zeros(50), "h": jnp.zeros(5000, jnp.bfloat16)}
    state = fa.scale_by_adam_8bit(block_size=256).init(params)
    assert isinstance(state, fa.ScaleByAdam8bitState)
    for moment, dtype in ((state.mu, jnp.int8), (state.nu, jnp.uint8)):
        for name in ("w", "h"):
            q = moment[name]
            assert isinstance(q, qz.BlockQuantized)
            assert q.codes.dtype == dtype and q.codes.shape == (math.ceil(5000 / 256), 256)
            assert q.scale.dtype == jnp.float32 and q.scale.shape == (math.ceil(5000 / 256),)
        assert moment["b"].dtype == jnp.float32 and moment["b"].shape == (50,)  # below 4096
    assert state.count.dtype == jnp.int32


def test_small_and_complex_leaves_follow_mu_dtype_and_nu_dtype():
    params = {"small": jnp.zeros(10, jnp.bfloat16), "c": jnp.zeros(8192, jnp.complex64)}
    state = fa.scale_by_adam_8bit().init(params)
    assert state.mu["small"].dtype == jnp.float32 and state.nu["small"].dtype == jnp.float32
    assert state.mu["c"].dtype == jnp.complex64 and state.nu["c"].dtype == jnp.float32
    state = fa.scale_by_adam_8bit(mu_dtype=jnp.bfloat16, nu_dtype=jnp.float16).init(params)
    assert state.mu["small"].dtype == jnp.bfloat16 and state.nu["small"].dtype == jnp.float16


@pytest.mark.parametrize("block_size", [256, 2048])
def test_state_bytes_per_parameter(block_size):
    n = 2**20
    p = jax.ShapeDtypeStruct((n,), jnp.float32)
    per_param = {
        "float32": _state_bytes(jax.eval_shape(fa.adam(1e-3).init, p)) / n,
        "bfloat16": _state_bytes(
            jax.eval_shape(fa.adam(1e-3, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16).init, p)
        )
        / n,
        "8bit": _state_bytes(jax.eval_shape(fa.adam_8bit(1e-3, block_size=block_size).init, p)) / n,
    }
    assert per_param["float32"] == pytest.approx(8.0, abs=1e-4)
    assert per_param["bfloat16"] == pytest.approx(4.0, abs=1e-4)
    # two 1-byte codes plus two float32 scales per block
    assert per_param["8bit"] == pytest.approx(2 + 8 / block_size, abs=1e-4)
    assert per_param["8bit"] <= 2.1


def test_one_step_is_dequantize_adam_leaf_quantize():
    """The fused chunked loop (with a tail block) computes what the codec and adam_leaf say."""
    size, bs = 3 * 2**16 + 1000, 256  # three whole loop chunks, then a tail with padding
    tx = fa.scale_by_adam_8bit(block_size=bs)
    state = tx.init(jnp.zeros(size))
    m_q, v_q = state.mu, state.nu

    @jax.jit
    def reference(g, m_q, v_q, bc):
        m = qz.dequantize(m_q, (size,), signed=True)
        v = qz.dequantize(v_q, (size,), signed=False) ** 2  # nu holds the codes of sqrt(v)
        u, m, v, _ = adam_leaf(g, m, v, None, bc, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0)
        return u, qz.quantize(m, bs, signed=True), qz.quantize(jnp.sqrt(v), bs, signed=False)

    update = jax.jit(tx.update)
    for t in range(1, 4):
        g = jax.random.normal(jax.random.key(t), (size,)) * jnp.linspace(0.01, 3.0, size)
        u_ref, m_ref, v_ref = reference(g, m_q, v_q, bias_corrections(0.9, 0.999, jnp.array(t)))
        u, state = update(g, state)
        # Rounding can differ by an ulp between the two programs: allow rare code ties.
        close = np.isclose(np.asarray(u), np.asarray(u_ref), rtol=1e-5, atol=1e-7)
        assert close.mean() > 0.999
        np.testing.assert_allclose(u, u_ref, rtol=1e-5, atol=0.02)
        assert np.mean(np.asarray(state.mu.codes) == np.asarray(m_ref.codes)) > 0.999
        assert np.mean(np.asarray(state.nu.codes) == np.asarray(v_ref.codes)) > 0.999
        np.testing.assert_allclose(state.mu.scale, m_ref.scale, rtol=1e-5)
        np.testing.assert_allclose(state.nu.scale, v_ref.scale, rtol=1e-5)
        m_q, v_q = state.mu, state.nu


@pytest.mark.parametrize("ratio", [1e-3, 1e-4, 1e-6])
def test_small_gradients_next_to_large_ones_keep_adam_steps_bounded(ratio):
    """The zero-point problem: in a block with one large gradient, v of the small ones must
    not round to 0 (storing v itself, as bitsandbytes does, gave steps of 8.8 for 1e-4)."""
    g = jnp.full(4096, ratio).at[::256].set(1.0)  # one gradient of 1 per 256-block
    tx8, tx = fa.scale_by_adam_8bit(), fa.scale_by_adam()
    s8, s = tx8.init(g), tx.init(g)
    update8 = jax.jit(tx8.update)
    for _ in range(100):
        u8, s8 = update8(g, s8)
        u, s = tx.update(g, s)
    assert float(jnp.max(jnp.abs(u))) == pytest.approx(1.0, abs=1e-3)  # Adam: |u| <= ~1
    assert float(jnp.max(jnp.abs(u8))) < 1.1
    # the small coordinates still move: the coarse low decades of the map cost some accuracy
    assert float(jnp.min(u8)) > 0.5
    np.testing.assert_allclose(u8[::256], u[::256], rtol=1e-3)


def test_second_moment_codes_hold_its_square_root():
    v = jnp.array([[4.0, 1.0, 0.0, 1e-20]])
    q = qz.encode_second_moment(v)
    np.testing.assert_array_equal(q.scale, [2.0])  # the absmax of sqrt(v)
    assert int(q.codes[0, 2]) == 0 and int(q.codes[0, 3]) == 1  # positive: never code 0
    np.testing.assert_allclose(qz.decode_second_moment(q)[0, :3], [4.0, 1.0, 0.0], rtol=0.02)


def test_first_step_moves_each_coordinate_by_lr():
    x = jnp.linspace(1.0, 3.0, 8192) * jnp.tile(jnp.array([1.0, -1.0]), 4096)
    tx = fa.adam_8bit(1e-3)
    u, _ = tx.update(2 * x, tx.init(x), x)
    np.testing.assert_allclose(u, -1e-3 * jnp.sign(x), atol=1e-8)
    # From zero moments (decoded exactly) the first step is float32 Adam's, bit for bit.
    u32, _ = fa.adam(1e-3).update(2 * x, fa.adam(1e-3).init(x), x)
    chex.assert_trees_all_equal(u, u32)


@pytest.mark.parametrize("block_size, code", [(256, "dynamic"), (2048, "dynamic"), (256, "float")])
def test_trajectory_stays_close_to_float32_adam(block_size, code):
    """Measure: |W_8bit - W_fp32| / |W_fp32 - W_0| after 300 Adam steps on least squares."""
    w0, loss = _regression()
    w32 = _train(("adam", 1e-2, ()), w0, None, 300, loss)
    options = (("block_size", block_size), ("code", code))
    w8 = _train(("adam_8bit", 1e-2, options), w0, None, 300, loss)
    travelled = float(jnp.linalg.norm(w32 - w0))
    assert travelled > 10.0
    distance = float(jnp.linalg.norm(w8 - w32)) / travelled
    assert distance < 0.05  # measured about 0.02 (bitsandbytes-style 8-bit state)
    assert float(loss(w8)) < 1.2 * float(loss(w32)) < 0.02 * float(loss(w0))


def test_adamw_8bit_decays_like_adamw():
    w0, loss = _regression(seed=1)
    w32 = _train(("adamw", 1e-2, (("weight_decay", 0.1),)), w0, None, 200, loss)
    w8 = _train(("adamw_8bit", 1e-2, (("weight_decay", 0.1),)), w0, None, 200, loss)
    w8_no_decay = _train(("adam_8bit", 1e-2, ()), w0, None, 200, loss)
    close = float(jnp.linalg.norm(w8 - w32))
    assert close < 0.05 * float(jnp.linalg.norm(w32 - w0))
    assert close < 0.5 * float(jnp.linalg.norm(w8_no_decay - w32))  # the decay is applied


def test_jit_eval_shape_and_tree_round_trip():
    params = {"w": jnp.ones((64, 128)), "b": jnp.ones(128), "masked": None}
    tx = fa.adam_8bit(1e-3)
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    shapes = jax.eval_shape(tx.init, abstract)
    state = tx.init(params)
    chex.assert_trees_all_equal_shapes_and_dtypes(shapes, state)
    grads = {"w": jnp.full((64, 128), 0.5), "b": jnp.ones(128), "masked": None}
    leaves, treedef = jax.tree.flatten(state)  # what a checkpointer stores: plain arrays
    restored = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
    u1, s1 = jax.jit(tx.update)(grads, state, params)
    u2, s2 = tx.update(grads, restored, params)
    chex.assert_trees_all_close(u1, u2, rtol=1e-6)
    chex.assert_trees_all_equal(s1[0].mu["w"].codes, s2[0].mu["w"].codes)
    assert u1["masked"] is None and s1[0].mu["masked"] is None


def test_zero_size_leaf_and_quantized_zero_size():
    params = {"empty": jnp.zeros((0, 7)), "w": jnp.ones(10)}
    tx = fa.scale_by_adam_8bit(min_8bit_size=0)  # even the empty leaf is "quantized"
    state = tx.init(params)
    assert state.mu["empty"].codes.shape == (0, 256)
    u, state = jax.jit(tx.update)({"empty": jnp.zeros((0, 7)), "w": jnp.ones(10)}, state)
    assert u["empty"].shape == (0, 7)
    np.testing.assert_allclose(u["w"], 1.0, rtol=1e-5)  # m̂/sqrt(v̂) with v̂ = 1 ± 2 ulps


def test_bfloat16_params_give_bfloat16_updates():
    p = jnp.ones(8192, jnp.bfloat16)
    tx = fa.adam_8bit(1e-3)
    u, _ = tx.update(jnp.ones(8192, jnp.bfloat16), tx.init(p), p)
    assert u.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(u, np.float32), -1e-3, rtol=1e-2)


def test_complex_params_keep_unquantized_moments_and_match_adam():
    p = (jnp.ones(8192) + 1j * jnp.arange(8192.0)).astype(jnp.complex64)
    g = p * (0.5 - 0.25j)
    u8, s8 = fa.adam_8bit(0.1).update(g, fa.adam_8bit(0.1).init(p), p)
    u32, _ = fa.adam(0.1).update(g, fa.adam(0.1).init(p), p)
    assert s8[0].mu.dtype == jnp.complex64
    np.testing.assert_allclose(u8, u32, rtol=1e-6)


def test_composes_with_optax():
    params = {"w": jnp.ones(8192)}
    tx = optax.chain(optax.clip_by_global_norm(1.0), fa.adam_8bit(1e-3))
    state = tx.init(params)
    u, state = jax.jit(tx.update)({"w": jnp.full(8192, 10.0)}, state, params)
    np.testing.assert_allclose(u["w"], -1e-3, rtol=1e-5)
    tx = optax.MultiSteps(fa.adam_8bit(1e-3), every_k_schedule=2)
    state = tx.init(params)
    u, state = tx.update({"w": jnp.ones(8192)}, state, params)
    np.testing.assert_array_equal(u["w"], 0.0)


@pytest.mark.parametrize("bad", [0, 100, -8, 2.0, True])
def test_bad_block_size(bad):
    with pytest.raises(ValueError, match="block_size must be a positive power of two"):
        fa.adam_8bit(1e-3, block_size=bad)
    with pytest.raises(ValueError, match="block_size"):
        fa.adamw_8bit(1e-3, block_size=bad)


@pytest.mark.parametrize("name", ["mu_dtype", "nu_dtype"])
@pytest.mark.parametrize("bad", [jnp.int8, "uint8", "int32", "not_a_dtype"])
def test_bad_moment_dtype(name, bad):
    with pytest.raises(ValueError, match=name):
        fa.adam_8bit(1e-3, **{name: bad})


def test_bad_min_8bit_size_and_hyperparameters():
    with pytest.raises(ValueError, match="min_8bit_size"):
        fa.adam_8bit(1e-3, min_8bit_size=-1)
    with pytest.raises(ValueError, match="b2"):
        fa.adam_8bit(1e-3, b2=1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        fa.adam_8bit(-1.0)


def test_the_chunk_loop_copies_no_whole_buffer_per_iteration():
    """A structural guard (no timing): inside the compiled loop body there is no copy of an
    array as large as the leaf's codes; such copies once made the step quadratic in size."""
    n = blockwise._CHUNKED_MIN_SIZE + 8 * 2**16  # chunked on the CPU: 72 loop iterations
    tx = fa.adam_8bit(1e-3)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return fa.apply_updates(p, u), s

    p = jax.ShapeDtypeStruct((n,), jnp.float32)
    with reference_path():  # the XLA path (a plain update would take the kernel)
        lowered = jax.jit(step, donate_argnums=(0, 1)).lower(p, jax.eval_shape(tx.init, p), p)
    hlo = lowered.compile().as_text()
    bodies = re.findall(r"body=(%[\w.\-]+)", hlo)
    assert bodies, "expected a while loop over chunks"
    for body in bodies:
        computation = hlo[hlo.index(f"\n{body} ") :].split("\n}\n", 1)[0]
        for shape in re.findall(r"= \w+\[([\d,]*)\]\{[\d,]*\} copy\(", computation):
            size = math.prod(int(d) for d in shape.split(",") if d)
            assert size < n // 2, f"a copy of {size} elements in every loop iteration"


@pytest.mark.parametrize("code", ["dynamic", "float"])
def test_chunked_and_vectorized_steps_are_bitwise_equal(code):
    """The CPU's loop over chunks (large leaves) and the one-expression step (other leaves,
    other backends) compute the same codes, scales and updates."""
    size = 3 * 2**16 + 1000  # three loop chunks and a padded tail
    tx = fa.scale_by_adam_8bit(code=code)
    state = tx.init(jnp.zeros(size))
    stored = (state.mu, state.nu)
    optimizer_step = None

    def capture(step, g, stored, scalars, squared, chunked, code):
        nonlocal optimizer_step
        optimizer_step = (step, scalars, squared)
        return original(step, g, stored, scalars, squared, chunked, code)

    original = blockwise._quantized_step
    try:
        blockwise._quantized_step = capture
        tx.update(jnp.ones(size), state)
    finally:
        blockwise._quantized_step = original
    step, scalars, squared = optimizer_step
    for t in range(3):
        g = jax.random.normal(jax.random.key(t), (size,)) * jnp.linspace(1e-4, 3.0, size)
        u_c, chunked = original(step, g, stored, scalars, squared, True, code)
        u_v, vector = original(step, g, stored, scalars, squared, False, code)
        chex.assert_trees_all_equal((u_c, chunked), (u_v, vector))
        stored = chunked


def test_vectorized_step_has_no_loop_and_one_reduction_for_both_moments():
    """Below the CPU's chunking size (and on accelerators) a leaf's step is one expression:
    no while loop, and the block maxima of m and v come from one variadic reduction."""
    n = 2**20
    tx = fa.adam_8bit(1e-3)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return fa.apply_updates(p, u), s

    p = jax.ShapeDtypeStruct((n,), jnp.float32)
    with reference_path():  # the XLA path (a plain update would take the kernel)
        lowered = jax.jit(step).lower(p, jax.eval_shape(tx.init, p), p).as_text()
    assert "stablehlo.while" not in lowered
    block_reductions = [
        line for line in lowered.splitlines() if "stablehlo.reduce(" in line and "4096x256" in line
    ]
    assert len(block_reductions) == 1, block_reductions
    assert "-> (tensor<4096xf32>, tensor<4096xf32>)" in block_reductions[0]  # m's and v's maxima
