"""state_shardings, init_sharded, ZeRO-1: one-device checks here, the meshes in a subprocess.

The multi-device cases live in ``tests/mesh_cases_state.py``,
``tests/mesh_cases_zero1.py`` and ``tests/mesh_cases_kernel.py`` (the fused
kernel per shard, ``FlatParams`` of sharded leaves) and run under pytest in a fresh interpreter with 8
simulated CPU devices, so this process keeps its single device.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import functional_adam as fa

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "module",
    ["tests/mesh_cases_state.py", "tests/mesh_cases_zero1.py", "tests/mesh_cases_kernel.py"],
)
def test_on_eight_simulated_devices(module):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    out = subprocess.run(
        [sys.executable, "-m", "pytest", module, "-p", "no:cacheprovider", "-n", "0"],
        cwd=REPO_ROOT,
        env={**os.environ, "XLA_FLAGS": flags},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout


def _mesh():
    return jax.make_mesh((1,), ("data",))


def _abstract(shape, sharding=None):
    return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)


def test_single_device_params_give_single_device_state():
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    shardings = fa.state_shardings(fa.adamw(1e-3), params)
    device = SingleDeviceSharding(jax.devices()[0])
    assert all(s == device for s in jax.tree.leaves(shardings))
    state = fa.init_sharded(fa.adamw(1e-3), params)
    fa.check_state_shardings(fa.adamw(1e-3), state, params)


def test_report_names_each_rule():
    mesh = _mesh()
    replicated = NamedSharding(mesh, P())
    params = {"w": _abstract((64, 64), replicated), "b": _abstract((3,), replicated)}
    tx = fa.adam_8bit(1e-3, min_8bit_size=1024)
    rows = {r.path: r for r in fa.describe_state_shardings(tx, params, zero1_axis="data")}
    assert rows["[0].count"].reason == "replicated (not parameter-shaped)"
    assert rows["[0].mu['b']"].reason == "like params['b'], plus 'data' on dim 0 (ZeRO-1)"
    assert rows["[0].mu['w'].codes"].shape == (16, 256)
    assert (
        rows["[0].mu['w'].codes"].reason
        == "8-bit: block axis over ('data',), 'data' added (ZeRO-1)"
    )
    assert rows["[0].nu['w'].scale"].sharding.spec == P("data")


def test_abstract_params_need_a_sharding_or_param_shardings():
    tx = fa.adam(1e-3)
    with pytest.raises(ValueError, match=r"params\['w'\] has no sharding"):
        fa.state_shardings(tx, {"w": _abstract((2, 2))})
    sharding = NamedSharding(_mesh(), P("data"))
    shardings = fa.state_shardings(tx, {"w": _abstract((2, 2))}, param_shardings={"w": sharding})
    assert shardings[0].mu["w"] == sharding
    with pytest.raises(ValueError, match="param_shardings does not have the structure of params"):
        fa.state_shardings(tx, {"w": _abstract((2, 2))}, param_shardings={"v": sharding})
    with pytest.raises(TypeError, match=r"the sharding of params\['w'\] is 'data'"):
        fa.state_shardings(tx, {"w": _abstract((2, 2))}, param_shardings={"w": "data"})


def test_sharding_that_does_not_fit_its_leaf_is_named():
    too_long = NamedSharding(_mesh(), P("data", None, None))
    with pytest.raises(ValueError, match=r"params\['b'\] of shape \(3,\) cannot have sharding"):
        fa.state_shardings(fa.adam(1e-3), {"b": _abstract((3,))}, param_shardings={"b": too_long})


def test_zero1_axis_must_name_a_mesh_axis():
    params = {"w": _abstract((4,), NamedSharding(_mesh(), P()))}
    with pytest.raises(ValueError, match=r"zero1_axis='dp' is not an axis .* \('data',\)"):
        fa.state_shardings(fa.adam(1e-3), params, zero1_axis="dp")
    with pytest.raises(ValueError, match=r"zero1_axis='data' needs parameters placed with Named"):
        fa.state_shardings(fa.adam(1e-3), {"w": jnp.ones(4)}, zero1_axis="data")


def test_init_sharded_needs_arrays():
    params = {"w": _abstract((4,), NamedSharding(_mesh(), P()))}
    with pytest.raises(TypeError, match=r"params\['w'\] is ShapeDtypeStruct, not a jax.Array"):
        fa.init_sharded(fa.adam(1e-3), params)
    abstract = fa.abstract_state(fa.adam(1e-3), params)
    assert abstract[0].mu["w"].sharding == params["w"].sharding


def test_state_of_another_structure_is_named():
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"does not have the structure of tx\.init"):
        fa.check_state_shardings(fa.adam(1e-3), fa.adamw(1e-3).init(params), params)


def test_single_array_params_and_scalar_leaves():
    sharding = NamedSharding(_mesh(), P("data"))
    param = jax.device_put(jnp.ones(4), sharding)
    shardings = fa.state_shardings(fa.chain(fa.scale_by_adam(), fa.scale(-0.1)), param)
    assert shardings[0].mu == sharding and shardings[0].count.spec == P()


EIGHT_BIT = {
    "adam_8bit": lambda: fa.adam_8bit(1e-2, min_8bit_size=1024),
    "adamw_8bit": lambda: fa.adamw_8bit(1e-2, weight_decay=0.1, min_8bit_size=1024),
    "lion_8bit": lambda: fa.lion_8bit(1e-3, min_8bit_size=1024),
    "ademamix_8bit": lambda: fa.ademamix_8bit(1e-2, min_8bit_size=1024),
}


@pytest.mark.parametrize("name", sorted(EIGHT_BIT))
def test_shard_major_blocks_of_whole_rows_are_the_flat_blocks(name):
    """Rows split in 2, 256 columns: each shard's blocks are the flat layout's rows, in order,
    so the shard-major codes are the flat codes reshaped, bitwise, step after step."""
    tx = EIGHT_BIT[name]()
    rng = np.random.default_rng(0)
    params, *grads = ({"w": rng.normal(size=(8, 256)).astype(np.float32)} for _ in range(4))
    flat_state = tx.init(params)
    with fa.layout_hints({"w": (2, 1)}):
        state = tx.init(params)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    fused = jax.jit(lambda p, s, g: fa.update_and_apply(tx, g, s, p))
    chained = jax.jit(lambda p, s, g: fa.update_and_apply(fa.chain(tx), g, (s,), p))
    p_flat = p_major = params
    for g in grads:
        # update_and_apply (adam_8bit, adamw_8bit: the kernel where it runs, on the blocks
        # of each shard in turn): the moments of the XLA path, parameters within rounding
        new_params, new_state = chained(p_major, state, g)
        fused_params, fused_state = fused(p_major, state, g)
        chex.assert_trees_all_equal(fused_state, new_state[0])
        chex.assert_trees_all_close(fused_params, new_params, rtol=1e-6, atol=1e-7)
        # the kernel's derivative rule (its arithmetic in jax.numpy) takes the same layout
        primal, _ = jax.jvp(lambda p, s=state, g=g: fused(p, s, g)[0], (p_major,), (p_major,))
        chex.assert_trees_all_close(primal, fused_params, rtol=1e-6, atol=1e-7)
        u_flat, flat_state = step(p_flat, flat_state, g)
        u_major, state = step(p_major, state, g)
        # AdEMAMix's update of the same moments rounds differently in the two programs (ulps)
        tol = 1e-8 if name == "ademamix_8bit" else 0
        chex.assert_trees_all_close(u_major, u_flat, rtol=1000 * tol, atol=tol)
        p_flat, p_major = fa.apply_updates(p_flat, u_flat), fa.apply_updates(p_major, u_major)
    flat_leaves = jax.tree.leaves(flat_state)
    major_leaves = jax.tree.leaves(state)
    assert any(x.ndim == 4 for x in major_leaves)  # codes (2, 1, 4, 256)
    for flat, major in zip(flat_leaves, major_leaves, strict=True):
        chex.assert_trees_all_equal(major.reshape(flat.shape), flat)


def test_layout_hints_of_another_structure_are_ignored():
    tx = fa.adam_8bit(1e-2, min_8bit_size=16)
    with fa.layout_hints({"w": (1, 2), "b": None}):
        assert tx.init({"w": jnp.zeros((4, 8))})[0].mu["w"].codes.shape == (1, 256)
        assert tx.init({"w": jnp.zeros((4, 8)), "b": jnp.zeros(2)})[0].mu["w"].codes.ndim == 4
    assert tx.init({"w": jnp.zeros((4, 8))})[0].mu["w"].codes.shape == (1, 256)  # outside
    with pytest.raises(ValueError, match=r"updates\['w'\]: 8-bit blocks laid out for \(1, 2\)"):
        with fa.layout_hints({"w": (1, 2)}):
            state = tx.init({"w": jnp.zeros((4, 8))})
        tx.update({"w": jnp.zeros((4, 7))}, state)
