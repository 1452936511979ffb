"""The fused CPU kernels per shard, and FlatParams of sharded leaves, on 8 simulated CPU devices.

Run by ``tests/test_sharding.py`` in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

from __future__ import annotations

import re
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import functional_adam as fa
from functional_adam.kernels import adam8_gpu, fused_adam8
from tests import mesh_layouts as ml
from tests.trees import assert_within_ulps, spy_leaf_counts

TARGET = 'custom_call_target="functional_adam_adam_f32"'
LR = 1e-2


@pytest.fixture(autouse=True, scope="module")
def _eight_devices():
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"


def _xla_step(tx):
    return jax.jit(ml.step_fn(tx, "xla"))


def _kernel_hlo(step, *args) -> str:
    """The compiled HLO; asserts it runs the kernel, in place, and moves no array."""
    hlo = step.lower(*args).compile().as_text()
    calls = [line for line in hlo.splitlines() if TARGET in line]
    assert calls and all("output_to_operand_aliasing" in line for line in calls)
    assert "CustomSPMDPartitioning" not in hlo  # every call was partitioned
    assert not [line for line in hlo.splitlines() if re.search(r"= f32\[\d.*\bcopy\(", line)]
    assert ml.gathers_of_arrays(hlo) == []
    return hlo


def _assert_close_to_xla(new, reference):
    """State bitwise; parameters within 4 ulps of max(|θ|, lr), the size of a step.

    As on one device: XLA rewrites the XLA path's divisions differently from program to
    program, and where θ is near 0 the step's rounding is many ulps of θ (on this tree the
    one-device kernel is 4 such ulps from the XLA path with NAdam).
    """
    chex.assert_trees_all_equal(new[1], reference[1])
    assert_within_ulps(new[0], reference[0], 4, scale_floor=LR)


def _one_device_step(tx, params, state, grads, target='custom_call_target="functional_adam_adam'):
    """``update_and_apply`` on copies of the arrays on one device (the kernel, unpartitioned;
    ``target``: in its HLO)."""
    one = jax.devices()[0]
    args = jax.tree.map(lambda x: jax.device_put(np.asarray(x), one), (params, state, grads))
    step = jax.jit(ml.step_fn(tx, "update_and_apply"))
    assert target in step.lower(*args).compile().as_text()
    return jax.block_until_ready(step(*args))


TXS = {
    "adamw_mask": lambda: fa.adamw(LR, weight_decay=0.1, mask=lambda p: jax.tree.map(jnp.ndim, p)),
    "nadam": lambda: fa.nadam(LR),
}


CASES = [  # (mesh, layout, optimizer)
    ((8, 1), "fsdp", "adamw_mask"),
    ((8, 1), "replicated", "adamw_mask"),
    ((2, 4), "fsdp", "adamw_mask"),
    ((2, 4), "tp", "adamw_mask"),
    ((2, 4), "fsdp_tp", "adamw_mask"),
    ((2, 4), "fsdp_tp", "nadam"),
]


@pytest.mark.parametrize(("mesh_shape", "layout", "name"), CASES, ids=lambda x: str(x))
def test_kernel_runs_on_each_devices_shards(mesh_shape, layout, name):
    """The donated step keeps the shardings, moves nothing, and equals the XLA path."""
    mesh = ml.make_mesh(mesh_shape)
    tx = TXS[name]()
    params = ml.placed(ml.random_tree(0), mesh, layout)  # "odd" (7, 5): replicated
    grads = ml.placed(ml.random_tree(1), mesh, layout)
    state = fa.init_sharded(tx, params)
    shardings = (ml.shardings_of(params), ml.shardings_of(state))
    step = jax.jit(ml.step_fn(tx, "update_and_apply"), donate_argnums=(0, 1))
    _kernel_hlo(step, params, state, grads)
    reference = jax.block_until_ready(_xla_step(tx)(params, state, grads))
    one_device = _one_device_step(tx, params, state, grads)
    new = jax.block_until_ready(step(params, state, grads))
    ml.assert_same_shardings(new, shardings)
    _assert_close_to_xla(new, reference)
    assert_within_ulps(new, one_device, 1)  # the same arithmetic on every element
    again = jax.block_until_ready(step(*new, grads))  # the same executable, in place again
    ml.assert_same_shardings(again, shardings)
    assert step._cache_size() == 1


def test_gradients_sharded_otherwise_are_resharded_to_the_params():
    """Parameters and state keep their sharding (the XLA path moves them to the gradients')."""
    mesh = ml.make_mesh((2, 4))
    tx = fa.adam(LR)
    params = ml.placed(ml.random_tree(0), mesh, "fsdp")
    grads = ml.placed(ml.random_tree(1), mesh, "tp")
    assert params["embed"].sharding.spec != grads["embed"].sharding.spec
    state = fa.init_sharded(tx, params)
    shardings = (ml.shardings_of(params), ml.shardings_of(state))
    reference = jax.block_until_ready(_xla_step(tx)(params, state, grads))
    step = jax.jit(ml.step_fn(tx, "update_and_apply"), donate_argnums=(0, 1))
    assert TARGET in step.lower(params, state, grads).compile().as_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Some donated buffers were not usable"
        new = jax.block_until_ready(step(params, state, grads))
    ml.assert_same_shardings(new, shardings)
    _assert_close_to_xla(new, reference)


def test_zero1_steps_the_state_shards_and_gathers_only_the_new_params():
    """ZeRO-1: the kernel runs on the state's shards (the parameter sliced where it lies), and
    the step's collectives are the XLA path's: one all-gather of each new parameter."""
    mesh = ml.make_mesh((8, 1))
    tx = fa.adamw(LR, weight_decay=0.1)
    params = ml.placed(ml.random_tree(0), mesh, "replicated")
    grads = ml.placed(ml.random_tree(1), mesh, "replicated")
    state = fa.init_sharded(tx, params, zero1_axis="data")
    out_shardings = (ml.shardings_of(params), fa.state_shardings(tx, params, zero1_axis="data"))
    hlo = {
        via: jax.jit(ml.step_fn(tx, via), donate_argnums=(0, 1), out_shardings=out_shardings)
        .lower(params, state, grads)
        .compile()
        .as_text()
        for via in ("update", "update_and_apply")
    }
    call = next(line for line in hlo["update_and_apply"].splitlines() if TARGET in line)
    assert "f32[8,48]" in call and "f32[64,48]" not in call  # embed: the state's shards
    assert sorted(ml.collectives(hlo["update_and_apply"])) == sorted(ml.collectives(hlo["update"]))


def test_leaf_split_unevenly():
    """12 elements over 8 devices: XLA pads the shards, and the kernel steps them too."""
    mesh = ml.make_mesh((8, 1))
    tx = fa.adam(LR)
    replicated = NamedSharding(mesh, P())
    params = jax.device_put(np.linspace(-1, 1, 12, dtype=np.float32), replicated)
    grads = jax.device_put(np.linspace(2, -1, 12, dtype=np.float32), replicated)
    state = tx.init(params)

    def uneven(via):
        def step(params, state, grads):
            split = NamedSharding(mesh, P("data"))
            params = jax.lax.with_sharding_constraint(params, split)
            grads = jax.lax.with_sharding_constraint(grads, split)
            return ml.step_fn(tx, via)(params, state, grads)

        return jax.jit(step)

    hlo = uneven("update_and_apply").lower(params, state, grads).compile().as_text()
    assert re.search(r"f32\[2\]\{0\}, f32\[2\]\{0\}, f32\[2\]\{0\}\) custom-call", hlo)
    new = jax.block_until_ready(uneven("update_and_apply")(params, state, grads))
    _assert_close_to_xla(new, jax.block_until_ready(uneven("update")(params, state, grads)))


def test_explicit_mesh_axes():
    """Explicit axes: a shard_map over the parameters' specs, the result types sharded too."""
    mesh = ml.make_mesh((2, 4), AxisType.Explicit)
    tx = fa.adamw(LR, weight_decay=0.1)
    params = ml.placed(ml.random_tree(0), mesh, "fsdp_tp", full_length=True)
    grads = ml.placed(ml.random_tree(1), mesh, "fsdp_tp", full_length=True)
    with jax.set_mesh(mesh):
        state = fa.init_sharded(tx, params)
        shardings = (ml.shardings_of(params), ml.shardings_of(state))
        reference = jax.block_until_ready(_xla_step(tx)(params, state, grads))
        step = jax.jit(ml.step_fn(tx, "update_and_apply"), donate_argnums=(0, 1))
        _kernel_hlo(step, params, state, grads)
        new = jax.block_until_ready(step(params, state, grads))
    ml.assert_same_shardings(new, shardings)
    _assert_close_to_xla(new, reference)
    # Outside the mesh context, with gradients sharded otherwise: resharded to the params'.
    grads = ml.placed(ml.random_tree(1), mesh, "tp", full_length=True)
    new = jax.block_until_ready(step(*new, grads))
    ml.assert_same_shardings(new, shardings)


def test_vmap_over_the_learning_rate_and_eager_calls():
    mesh = ml.make_mesh((2, 4))
    params = ml.placed(ml.random_tree(0), mesh, "fsdp_tp")
    grads = ml.placed(ml.random_tree(1), mesh, "fsdp_tp")

    def step(lr, via):
        tx = fa.adam(lr)
        return ml.step_fn(tx, via)(params, tx.init(params), grads)[0]

    rates = jnp.array([1e-1, 1e-2])
    kernel = jax.jit(jax.vmap(lambda lr: step(lr, "update_and_apply")))
    assert TARGET in kernel.lower(rates).compile().as_text()
    reference = jax.jit(jax.vmap(lambda lr: step(lr, "update")))(rates)
    new = jax.block_until_ready(kernel(rates))
    assert_within_ulps(new, reference, 4, scale_floor=float(rates.max()))
    eager = fa.update_and_apply(fa.adam(LR), grads, fa.adam(LR).init(params), params)[0]
    ml.assert_same_shardings(eager, params)
    assert_within_ulps(eager, step(LR, "update"), 4, scale_floor=LR)


def test_flat_params_refuse_sharded_leaves():
    mesh = ml.make_mesh((2, 4))
    params = ml.placed(ml.random_tree(0), mesh, "fsdp_tp")
    with pytest.raises(
        ValueError, match=r"params\['dense'\]\['bias'\] is sharded \(P\('data',\)"
    ) as error:
        fa.FlatParams.of(params)
    message = str(error.value)
    assert "fa.init_sharded" in message and "replicated" in message
    explicit = ml.make_mesh((2, 4), AxisType.Explicit)
    embed = ml.placed(ml.random_tree(0), explicit, "tp", full_length=True)["embed"]
    with jax.set_mesh(explicit), pytest.raises(ValueError, match=r"params\['embed'\] is sharded"):
        jax.jit(fa.FlatParams.of)({"embed": embed})  # traced: Explicit axes show in the type


def test_flat_params_of_replicated_leaves_on_a_mesh():
    mesh = ml.make_mesh((2, 4))
    params = ml.placed(ml.random_tree(0), mesh, "replicated")
    grads = ml.placed(ml.random_tree(1), mesh, "replicated")
    flat, flat_grads = fa.FlatParams.of(params), fa.FlatParams.of(grads)
    assert flat.buffers["float32"].sharding.is_fully_replicated
    chex.assert_trees_all_equal(flat.tree(), params)
    tx = fa.adam(LR)
    state = fa.init_sharded(tx, flat)
    step = jax.jit(ml.step_fn(tx, "update_and_apply"), donate_argnums=(0, 1))
    _kernel_hlo(step, flat, state, flat_grads)
    reference = jax.block_until_ready(_xla_step(tx)(flat, state, flat_grads))
    new = jax.block_until_ready(step(flat, state, flat_grads))
    assert new[0].buffers["float32"].sharding.is_fully_replicated
    _assert_close_to_xla(new, reference)


TARGET_8BIT = 'custom_call_target="functional_adam_adam8_f32"'


@pytest.mark.parametrize(
    ("mesh_shape", "layout", "zero1"),
    [((8, 1), "fsdp", None), ((2, 4), "tp", None), ((8, 1), "replicated", "data")],
    ids=lambda x: str(x),
)
def test_8bit_kernel_per_shard(mesh_shape, layout, zero1):
    """8-bit leaves of split parameters (their blocks laid out per shard) step on their shards
    and move nothing; ZeRO-1 gathers the new parameters, as the XLA path does. Bitwise the
    one-device kernel's step on the same layout; shardings kept."""
    mesh = ml.make_mesh(mesh_shape)
    tx = fa.adamw_8bit(LR, weight_decay=0.1, min_8bit_size=64, block_size=64)
    params = ml.placed(ml.random_tree(0), mesh, layout)
    grads = ml.placed(ml.random_tree(1), mesh, layout)
    state = fa.init_sharded(tx, params, zero1_axis=zero1)
    shardings = (ml.shardings_of(params), fa.state_shardings(tx, params, zero1_axis=zero1))
    hlo = {
        via: jax.jit(ml.step_fn(tx, via), donate_argnums=(0, 1), out_shardings=shardings)
        .lower(params, state, grads)
        .compile()
        .as_text()
        for via in ("xla", "update_and_apply")
    }
    assert TARGET_8BIT in hlo["update_and_apply"]
    gathered = {n for _, _, n in ml.gathers_of_arrays(hlo["update_and_apply"])}
    if not zero1:  # every 8-bit leaf's blocks live with its shards
        assert gathered == set()
    if zero1:  # the new parameters' all-gathers, as on the XLA path
        assert sorted(ml.collectives(hlo["update_and_apply"])) == sorted(ml.collectives(hlo["xla"]))
    one_device = _one_device_step(tx, params, state, grads)
    step = jax.jit(
        ml.step_fn(tx, "update_and_apply"), donate_argnums=(0, 1), out_shardings=shardings
    )
    new = jax.block_until_ready(step(params, state, grads))
    ml.assert_same_shardings(new, shardings)
    chex.assert_trees_all_equal(jax.device_get(new), jax.device_get(one_device))


def test_8bit_kernel_on_explicit_axes():
    """Explicit axes: column-sharded (tensor-parallel) leaves step per shard, bitwise the
    one-device kernel's step on the same layout."""
    mesh = ml.make_mesh((2, 4), AxisType.Explicit)
    tx = fa.adamw_8bit(LR, weight_decay=0.1, min_8bit_size=64, block_size=64)
    params = ml.placed(ml.random_tree(0), mesh, "tp", full_length=True)
    grads = ml.placed(ml.random_tree(1), mesh, "tp", full_length=True)
    with jax.set_mesh(mesh):
        state = fa.init_sharded(tx, params)
    shardings = (ml.shardings_of(params), ml.shardings_of(state))
    one_device = _one_device_step(tx, params, state, grads)
    with jax.set_mesh(mesh):
        step = jax.jit(ml.step_fn(tx, "update_and_apply"), donate_argnums=(0, 1))
        hlo = step.lower(params, state, grads).compile().as_text()
        assert TARGET_8BIT in hlo and ml.gathers_of_arrays(hlo) == []
        new = jax.block_until_ready(step(params, state, grads))
    ml.assert_same_shardings(new, shardings)
    chex.assert_trees_all_equal(jax.device_get(new), jax.device_get(one_device))


@pytest.mark.parametrize(("mesh_shape", "layout"), [((8, 1), "fsdp"), ((2, 4), "tp")], ids=str)
def test_pallas_8bit_kernel_per_shard(mesh_shape, layout, monkeypatch):
    """On several GPUs each device launches the Pallas 8-bit kernel on its shards (here
    interpreted on the CPU devices): nothing moves, the shardings are kept, and the step is
    bitwise the same kernel's on one device, and the XLA path's within a code and 4 ulps."""
    monkeypatch.setattr(fused_adam8, "_where", lambda: "gpu")
    monkeypatch.setattr(adam8_gpu, "INTERPRET", True)
    calls = spy_leaf_counts(monkeypatch, adam8_gpu, "adam8_step")
    mesh = ml.make_mesh(mesh_shape)
    tx = fa.adamw_8bit(LR, weight_decay=0.1, min_8bit_size=64, block_size=64)
    params = ml.placed(ml.random_tree(0), mesh, layout)
    grads = ml.placed(ml.random_tree(1), mesh, layout)
    state = fa.init_sharded(tx, params)
    shardings = (ml.shardings_of(params), fa.state_shardings(tx, params))
    step = jax.jit(
        ml.step_fn(tx, "update_and_apply"), donate_argnums=(0, 1), out_shardings=shardings
    )
    hlo = step.lower(params, state, grads).compile().as_text()
    assert calls and ml.gathers_of_arrays(hlo) == [] and "CustomSPMDPartitioning" not in hlo
    reference = jax.block_until_ready(_xla_step(tx)(params, state, grads))
    one_device = _one_device_step(tx, params, state, grads, target="")
    new = jax.block_until_ready(step(params, state, grads))
    ml.assert_same_shardings(new, shardings)
    chex.assert_trees_all_equal(jax.device_get(new), jax.device_get(one_device))
    for a, b in zip(jax.tree.leaves(new[1]), jax.tree.leaves(reference[1]), strict=True):
        gap = np.abs(np.asarray(a).astype(np.int64) - np.asarray(b))
        assert gap.max() <= 1 if a.dtype.kind in "iu" else np.allclose(a, b, rtol=3e-7)
    assert_within_ulps(new[0], reference[0], 4, scale_floor=LR)
