"""State that follows FSDP / tensor-parallel parameters, on 8 simulated CPU devices.

Run by ``tests/test_sharding.py`` in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

from __future__ import annotations

import contextlib

import chex
import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import functional_adam as fa
from tests import mesh_layouts as ml


@pytest.fixture(autouse=True, scope="module")
def _eight_devices():
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"


def _moment_leaves(state):
    """The ``mu``/``nu``/``master`` subtrees of a state, found by name."""
    found = []

    def visit(node):
        for field in ("mu", "nu", "nu_max", "master"):
            sub = getattr(node, field, None)
            if sub is not None and not callable(sub):
                found.append(sub)
        if isinstance(node, tuple):
            for child in node:
                visit(child)
        for field in ("inner_state",):
            if hasattr(node, field):
                visit(getattr(node, field))

    visit(state)
    return found


def _check_step(tx, params, state, grads, via):
    """(b) outputs placed as inputs; (c) no gathers of arrays in the compiled step."""
    step = jax.jit(ml.step_fn(tx, via), donate_argnums=(0, 1))
    compiled = step.lower(params, state, grads).compile()
    assert ml.gathers_of_arrays(compiled.as_text()) == []
    in_shardings = (ml.shardings_of(params), ml.shardings_of(state))
    new_params, new_state = jax.block_until_ready(step(params, state, grads))
    ml.assert_same_shardings((new_params, new_state), in_shardings)
    new_params, new_state = step(new_params, new_state, grads)  # the same executable again
    ml.assert_same_shardings((new_params, new_state), in_shardings)
    assert step._cache_size() == 1


@pytest.mark.parametrize("layout", ["fsdp", "tp", "fsdp_tp"])
@pytest.mark.parametrize("mesh_shape", ml.MESH_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize(
    ("name", "via"), [("adam", "update_and_apply"), ("adam_bf16_moments", "update")]
)
def test_state_follows_params_on_meshes(name, via, mesh_shape, layout):
    mesh = ml.make_mesh(mesh_shape)
    tx = ml.TXS[name]()
    params = ml.placed(ml.random_tree(0), mesh, layout)
    grads = ml.placed(ml.random_tree(1), mesh, layout)
    state = fa.init_sharded(tx, params)
    # (a) born as state_shardings says, and each moment placed like its parameter
    ml.assert_same_shardings(state, fa.state_shardings(tx, params))
    for moments in _moment_leaves(state):
        ml.assert_same_shardings(moments, params)
    assert state[0].count.sharding.is_fully_replicated
    _check_step(tx, params, state, grads, via)


@pytest.mark.parametrize("name", sorted(ml.TXS))
def test_every_optimizer_on_fsdp_and_tensor_parallel(name):
    mesh = ml.make_mesh((2, 4))
    tx = ml.TXS[name]()
    dtype = ml.PARAM_DTYPE.get(name, np.float32)
    params = ml.placed(ml.random_tree(0, dtype), mesh, "fsdp_tp")
    grads = ml.placed(ml.random_tree(1, dtype), mesh, "fsdp_tp")
    state = fa.init_sharded(tx, params)
    ml.assert_same_shardings(state, fa.state_shardings(tx, params))
    moments = _moment_leaves(state)
    assert moments, "no moment subtree found"
    for tree in moments:  # mu, nu (nu_max), and the master copies of the bf16 parameters
        ml.assert_same_shardings(tree, params)
    _check_step(tx, params, state, grads, "update_and_apply")


def test_explicit_mesh_axes():
    """jax.make_mesh's default axis type (Explicit) under jax.set_mesh, as well as Auto."""
    mesh = ml.make_mesh((2, 4), AxisType.Explicit)
    tx = fa.adamw(1e-2, weight_decay=0.1)
    params = ml.placed(ml.random_tree(0), mesh, "fsdp_tp", full_length=True)
    grads = ml.placed(ml.random_tree(1), mesh, "fsdp_tp", full_length=True)
    with jax.set_mesh(mesh):
        state = fa.init_sharded(tx, params)
        for moments in _moment_leaves(state):
            ml.assert_same_shardings(moments, params)
        _check_step(tx, params, state, grads, "update")


def _output_bytes(tx, params, shardings) -> int:
    compiled = jax.jit(tx.init, out_shardings=shardings).lower(params).compile()
    assert ml.gathers_of_arrays(compiled.as_text()) == []
    return compiled.memory_analysis().output_size_in_bytes


def test_init_is_born_sharded_not_gathered():
    """The compiled init allocates only each device's shards (optax#548's out-of-memory)."""
    mesh = ml.make_mesh((8, 1))
    tx = fa.adam(1e-2)
    params = ml.placed(ml.random_tree(0), mesh, "fsdp")
    shardings = fa.state_shardings(tx, params)
    abstract = jax.tree.leaves(jax.eval_shape(tx.init, params))
    full = sum(x.size * x.dtype.itemsize for x in abstract)
    per_device = sum(
        int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
        for x, s in zip(abstract, jax.tree.leaves(shardings), strict=True)
    )
    assert per_device < full / 4  # most of the state is sharded 8 ways ("odd" is not)
    replicated = jax.tree.map(lambda s: NamedSharding(mesh, P()), shardings)
    # The output sizes also hold the output tuple's table (the same in both): compare them.
    saved = _output_bytes(tx, params, replicated) - _output_bytes(tx, params, shardings)
    assert saved == full - per_device


def test_flat_params_with_sharded_buffers():
    mesh = ml.make_mesh((8, 1))
    rng = np.random.default_rng(0)

    def flat(seed):  # 64 * 48 + 64 = 3136 elements: the buffer splits 8 ways
        tree = {"w": rng.normal(size=(64, 48)), "b": rng.normal(size=64)}
        tree = jax.tree.map(lambda x: np.asarray(x, np.float32), tree)
        return jax.device_put(fa.FlatParams.of(tree), NamedSharding(mesh, P("data")))

    params, grads = flat(0), flat(1)
    tx = fa.adam(1e-2)
    state = fa.init_sharded(tx, params)
    assert state[0].mu.buffers["float32"].sharding.spec == P("data")
    _check_step(tx, params, state, grads, "update_and_apply")


def test_flatten_refuses_sharded_params_and_replicates_buffers():
    mesh = ml.make_mesh((8, 1))
    tx = fa.adam(1e-2, flat=True)
    with pytest.raises(ValueError, match=r"flatten: params\['dense'\]\['bias'\] is sharded"):
        fa.state_shardings(tx, ml.placed(ml.random_tree(0), mesh, "fsdp"))
    params = ml.placed(ml.random_tree(0), mesh, "replicated")
    state = fa.init_sharded(tx, params)
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state))
    # ZeRO-1 partitions a buffer over "data" when its length divides: 64 + 32 = 96 here
    divisible = ml.placed(
        {"a": np.ones(64, np.float32), "b": np.ones((8, 4), np.float32)}, mesh, "replicated"
    )
    assert fa.state_shardings(tx, divisible, zero1_axis="data")[0].inner_state.mu[
        "float32"
    ].spec == P("data")
    assert (
        fa.state_shardings(tx, params, zero1_axis="data")[0].inner_state.mu["float32"].spec == P()
    )


def test_params_tuple_as_long_as_the_chain():
    """A 2-tuple of parameters and a 2-stage chain: the state tuple is not taken for params."""
    mesh = ml.make_mesh((2, 4))
    a = jax.device_put(np.ones((8, 4), np.float32), NamedSharding(mesh, P("data")))
    b = jax.device_put(np.ones((8, 4), np.float32), NamedSharding(mesh, P(None, "model")))
    tx = fa.chain(fa.scale_by_adam(), fa.scale(-1e-2))
    shardings = fa.state_shardings(tx, (a, b))
    assert shardings[0].mu[0] == a.sharding and shardings[0].mu[1] == b.sharding
    assert shardings[0].count.spec == P()


# 8-bit moments in the shard-major layout: codes (S_0, ..., S_{r-1}, n_local_blocks, 256).
# "w" (64, 256), "v" (24, 384) and "b" (1024,) are quantized (min_8bit_size=1024), "s" is not.
# Per-shard sizes: on 2x4 with P("data", "model"), v's 12 x 96 = 1152 elements are 4.5 blocks
# (padded per shard); b over 8 shards holds 128 elements, half a block.
EIGHT_BIT_SHAPES = {"w": (64, 256), "v": (24, 384), "b": (1024,), "s": (12,)}
EIGHT_BIT_SPECS = {
    "fsdp": {"w": P("data"), "v": P("data"), "b": P("data")},
    "column": {"w": P(None, "data"), "v": P(None, "data"), "b": P("data")},
    "fsdp_tp": {"w": P("data", "model"), "v": P("data", "model"), "b": P(("data", "model"))},
}


def _tree_8bit(seed):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in EIGHT_BIT_SHAPES.items()}


def _place_8bit(tree, mesh, layout, explicit=False):
    def put(key, x):
        spec = list(EIGHT_BIT_SPECS[layout].get(key, P()))
        if explicit:  # jax.jit's specs on Explicit axes are full length
            spec += [None] * (x.ndim - len(spec))
        return jax.device_put(x, NamedSharding(mesh, P(*spec)))

    return {k: put(k, x) for k, x in tree.items()}


def _counts(x):
    return tuple(n // m for n, m in zip(x.shape, x.sharding.shard_shape(x.shape), strict=True))


def _run_steps(tx, params, state, grads_list):
    """Jitted, donated steps of the XLA path one at a time: ``(params, state, first step's
    state, step)`` (the kernels per shard: tests/mesh_cases_kernel.py)."""
    step = jax.jit(ml.step_fn(tx, "xla"), donate_argnums=(0, 1))
    first = None
    for grads in grads_list:
        params, state = jax.block_until_ready(step(params, state, grads))
        first = jax.device_get(state) if first is None else first
    return params, state, first, step


@pytest.mark.parametrize(
    ("mesh_shape", "layout", "axis_type"),
    [
        ((8, 1), "fsdp", AxisType.Auto),
        ((8, 1), "column", AxisType.Auto),
        ((2, 4), "column", AxisType.Explicit),
        ((2, 4), "fsdp_tp", AxisType.Auto),
        ((4, 2), "fsdp_tp", AxisType.Explicit),
    ],
    ids=str,
)
def test_adam_8bit_blocks_follow_the_shards(mesh_shape, layout, axis_type):
    mesh = ml.make_mesh(mesh_shape, axis_type)
    explicit = axis_type == AxisType.Explicit
    tx = fa.adam_8bit(1e-2, min_8bit_size=1024)
    host = _tree_8bit(0)
    grads = [_tree_8bit(1 + t) for t in range(3)]
    params = _place_8bit(host, mesh, layout, explicit)
    with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():
        state = fa.init_sharded(tx, params)
        ml.assert_same_shardings(state, fa.state_shardings(tx, params))
        for key in ("w", "v", "b"):  # leading axes: the shards, placed like the parameter
            codes = state[0].mu[key].codes
            assert codes.shape[:-2] == _counts(params[key]) and codes.shape[-1] == 256
            shard = codes.sharding.shard_shape(codes.shape)
            assert shard[:-2] == (1,) * params[key].ndim and shard[-2:] == codes.shape[-2:]
        assert state[0].mu["s"].shape == (12,)
        shardings = ml.shardings_of((params, state))
        placed = [_place_8bit(g, mesh, layout, explicit) for g in grads]
        *out, first, step = _run_steps(tx, params, state, placed)
        on_mesh = tuple(out)
        ml.assert_same_shardings(on_mesh, shardings)  # every step kept every sharding
        assert step._cache_size() == 1
        hlo = step.lower(*on_mesh, placed[0]).compile().as_text()
        assert ml.gathers_of_arrays(hlo) == []

    # The same layout on one device (the shard counts as hints): bitwise the same run.
    counts = {k: _counts(x) for k, x in on_mesh[0].items()}
    with fa.layout_hints(counts):
        state = tx.init(host)
    assert state[0].mu["w"].codes.shape == on_mesh[1][0].mu["w"].codes.shape
    one = jax.devices()[0]
    alone = _run_steps(tx, jax.device_put(host, one), state, jax.device_put(grads, one))[:2]
    chex.assert_trees_all_equal(jax.device_get(on_mesh), jax.device_get(alone))

    # Each shard's blocks hold that shard's elements: after one step m = (1 - b1) g, so the
    # scale of block k of shard s is max |0.1 g| over elements [256k, 256k + 256) of shard s.
    scale = first[0].mu["v"].scale
    (s0, s1), (r, c) = counts["v"], (24 // counts["v"][0], 384 // counts["v"][1])
    for i in range(s0):
        for j in range(s1):
            local = grads[0]["v"][i * r : (i + 1) * r, j * c : (j + 1) * c].reshape(-1)
            local = np.pad(local, (0, scale.shape[-1] * 256 - local.size)).reshape(-1, 256)
            np.testing.assert_allclose(scale[i, j], np.abs(local).max(1) * 0.1, rtol=1e-6)
