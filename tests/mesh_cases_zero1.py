"""ZeRO-1, checkpoints across meshes, Flax NNX, errors and 8-bit, on 8 simulated CPU devices.

Run by ``tests/test_sharding.py`` in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import functional_adam as fa
from tests import mesh_layouts as ml

STEPS = 10


@pytest.fixture(autouse=True, scope="module")
def _eight_devices():
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"


def _run(tx, params, state, grads_list, out_shardings=None):
    step = jax.jit(
        ml.step_fn(tx, "update_and_apply"), donate_argnums=(0, 1), out_shardings=out_shardings
    )
    for grads in grads_list:
        # One step at a time: queued steps with collectives can deadlock XLA:CPU's rendezvous
        # on a 2-core machine (examples/mnist/mesh.py, synchronous).
        params, state = jax.block_until_ready(step(params, state, grads))
    return params, state


ZERO1_TXS = {
    "adamw": lambda: fa.adamw(1e-2, weight_decay=0.1),
    "adam_bf16_moments": lambda: fa.adam(1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
    "torch_adam": lambda: fa.compat.torch_adam(1e-2, amsgrad=True),
}


@pytest.mark.parametrize("mesh_shape", [(8, 1), (2, 4)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", sorted(ZERO1_TXS))
def test_zero1_is_bitwise_the_unsharded_run(name, mesh_shape):
    mesh = ml.make_mesh(mesh_shape)
    tx = ZERO1_TXS[name]()
    layout = "replicated" if mesh_shape == (8, 1) else "tp"  # data parallel (+ tensor parallel)
    host = ml.random_tree(0)
    grads = [ml.random_tree(1 + t) for t in range(STEPS)]
    reference = _run(tx, jax.device_put(host, jax.devices()[0]), tx.init(host), grads)

    params = ml.placed(host, mesh, layout)
    state = fa.init_sharded(tx, params, zero1_axis="data")
    shardings = fa.state_shardings(tx, params, zero1_axis="data")
    ml.assert_same_shardings(state, shardings)
    for row in fa.describe_state_shardings(tx, params, zero1_axis="data"):
        if row.path.endswith((".mu['embed']", ".nu['embed']")):
            assert "'data' on dim 0 (ZeRO-1)" in row.reason, row
        if row.path.endswith(".mu['odd']"):
            assert "not partitioned over 'data'" in row.reason, row
    sharded = _run(
        tx,
        params,
        state,
        [ml.placed(g, mesh, layout) for g in grads],
        out_shardings=(ml.shardings_of(params), shardings),
    )
    ml.assert_same_shardings(sharded, (ml.shardings_of(params), shardings))
    chex.assert_trees_all_equal(jax.device_get(sharded), jax.device_get(reference))


def test_zero1_keeps_one_nth_of_the_state_per_device():
    """Per-device state bytes from the compiled init: 1/8 of the replicated state."""
    mesh = ml.make_mesh((8, 1))
    tx = fa.adam(1e-2)
    divisible = {"w": np.ones((64, 48), np.float32), "b": np.ones(96, np.float32)}
    params = ml.placed(divisible, mesh, "replicated")

    def compiled_bytes(zero1_axis):
        shardings = fa.state_shardings(tx, params, zero1_axis=zero1_axis)
        init = jax.jit(tx.init, out_shardings=shardings).lower(params).compile()
        return init.memory_analysis().output_size_in_bytes

    moments = 2 * (64 * 48 + 96) * 4
    # the outputs also hold the count (4 bytes) and the same output table in both runs
    assert compiled_bytes(None) - compiled_bytes("data") == moments - moments // 8
    shard_bytes = sum(
        int(np.prod(s.sharding.shard_shape(s.shape))) * s.dtype.itemsize
        for s in jax.tree.leaves(fa.abstract_state(tx, params, zero1_axis="data"))
    )
    assert shard_bytes == moments // 8 + 4


def _assert_restored(restored, state, target):
    chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
    ml.assert_same_shardings(restored, target)


def test_orbax_restores_a_2x4_state_on_8x1_and_on_one_device(tmp_path):
    tx = fa.adamw(1e-2, weight_decay=0.1)
    host = ml.random_tree(0)
    params = ml.placed(host, ml.make_mesh((2, 4)), "fsdp_tp")
    state = fa.init_sharded(tx, params)
    params, state = _run(
        tx, params, state, [ml.placed(ml.random_tree(1), params_mesh(params), "fsdp_tp")]
    )
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", state)
    checkpointer.wait_until_finished()

    other = ml.placed(host, ml.make_mesh((8, 1)), "fsdp")
    target = fa.abstract_state(tx, other)
    restored = checkpointer.restore(tmp_path / "state", target)
    _assert_restored(restored, state, target)
    fa.check_state_shardings(tx, restored, other)

    one = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ml.AXES)
    single = ml.placed(host, one, "replicated")
    target = fa.abstract_state(tx, single)
    restored = checkpointer.restore(tmp_path / "state", target)
    _assert_restored(restored, state, target)
    assert all(leaf.sharding.device_set == {jax.devices()[0]} for leaf in jax.tree.leaves(restored))


def params_mesh(tree):
    return jax.tree.leaves(tree)[0].sharding.mesh


def test_errors_name_the_leaf_and_both_shardings():
    tx = fa.adam(1e-2)
    host = ml.random_tree(0)
    on_2x4 = ml.placed(host, ml.make_mesh((2, 4)), "fsdp_tp")
    on_8x1 = ml.placed(host, ml.make_mesh((8, 1)), "fsdp")
    state = fa.init_sharded(tx, on_2x4)
    with pytest.raises(
        ValueError,
        match=r"state\[0\]\.mu\['dense'\]\['bias'\] has sharding .*"
        r"where .* was expected \(a state laid out for another mesh",
    ):
        fa.check_state_shardings(tx, state, on_8x1)
    with pytest.raises(
        ValueError, match=r"params\['embed'\] has sharding .* but params\['dense'\]"
    ):
        fa.state_shardings(tx, {**on_8x1, "embed": on_2x4["embed"]})
    with pytest.raises(
        ValueError, match=r"zero1_axis='fsdp' is not an axis .* \('data', 'model'\)"
    ):
        fa.init_sharded(tx, on_8x1, zero1_axis="fsdp")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), on_8x1)
    shardings = {**ml.shardings_of(on_8x1), "odd": NamedSharding(params_mesh(on_8x1), P("data"))}
    with pytest.raises(ValueError, match=r"params\['odd'\] of shape \(7, 5\) cannot have sharding"):
        fa.state_shardings(tx, abstract, param_shardings=shardings)


def test_flax_nnx_optimizer_with_a_sharded_model():
    from flax import nnx

    mesh = ml.make_mesh((2, 4))
    init = nnx.initializers.lecun_normal()

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(
                16,
                32,
                kernel_init=nnx.with_partitioning(init, ("data", "model")),
                bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("model",)),
                rngs=rngs,
            )
            self.l2 = nnx.Linear(
                32, 8, kernel_init=nnx.with_partitioning(init, ("model", None)), rngs=rngs
            )

        def __call__(self, x):
            return self.l2(jax.nn.relu(self.l1(x)))

    def create(tx):
        model = MLP(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        state = nnx.state((model, optimizer))
        nnx.update(
            (model, optimizer),
            jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)),
        )
        return model, optimizer

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    import optax

    rng = np.random.default_rng(0)
    x, y = (
        jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
        jnp.asarray(rng.normal(size=(8, 8)), jnp.float32),
    )
    losses = {}
    for name, tx in [
        ("fa", fa.adamw(1e-2, weight_decay=0.1)),
        ("optax", optax.adamw(1e-2, weight_decay=0.1)),
    ]:
        with jax.set_mesh(mesh):
            model, optimizer = nnx.jit(create, static_argnums=0)(tx)
            losses[name] = [float(train_step(model, optimizer, x, y)) for _ in range(5)]
        params = nnx.state(model, nnx.Param)
        if name == "fa":
            expected = fa.state_shardings(tx, params)
            ml.assert_same_shardings(nnx.as_pure(optimizer.opt_state), nnx.as_pure(expected))
            kernel = optimizer.opt_state[0].mu["l1"]["kernel"]
            assert kernel.get_value().sharding.spec == P("data", "model")
    assert losses["fa"] == losses["optax"]
    assert losses["fa"][-1] < losses["fa"][0]


def _one_device_twin(tx, host, counts, grads):
    """The same optimizer on one device with the same shard-major layout (shard counts as hints)."""
    with fa.layout_hints(counts):
        state = tx.init(host)
    one = jax.devices()[0]
    return _run(tx, jax.device_put(host, one), state, jax.device_put(grads, one))


def test_adam_8bit_zero1_and_orbax_on_tensor_parallel(tmp_path):
    """ZeRO-1 blocks each moment per shard of its ZeRO-1 sharding; the run is bitwise the
    one-device twin's, and Orbax restores the shard-major state onto the same layout."""
    mesh = ml.make_mesh((2, 4))
    tx = fa.adam_8bit(1e-2, min_8bit_size=1024)
    rng = np.random.default_rng(0)
    # e: 'data' divides neither 17 nor 68 / 4; its 17 x 17 per shard are 2 padded blocks.
    shapes = {"w": (64, 256), "b": (1024,), "e": (17, 68)}
    specs = {"w": P(None, "model"), "b": P(), "e": P(None, "model")}
    host, *grads = (
        {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(4)
    )

    def place(tree):
        return {k: jax.device_put(x, NamedSharding(mesh, specs[k])) for k, x in tree.items()}

    params = place(host)
    shardings = fa.state_shardings(tx, params, zero1_axis="data")
    rows = {r.path: r for r in fa.describe_state_shardings(tx, params, zero1_axis="data")}
    assert rows["[0].mu['w'].codes"].shape == (2, 4, 8, 256)  # 32 x 64 per shard: 8 blocks
    assert shardings[0].mu["w"].codes.spec == P("data", "model")
    assert rows["[0].mu['w'].codes"].reason.endswith("(plus 'data' on dim 0 (ZeRO-1))")
    assert rows["[0].mu['b'].codes"].shape == (2, 2, 256)  # replicated: split by ZeRO-1 alone
    assert shardings[0].nu["b"].scale.spec == P("data")
    assert rows["[0].mu['e'].codes"].shape == (1, 4, 2, 256)
    assert shardings[0].mu["e"].codes.spec == P(None, "model")
    assert "not partitioned over 'data'" in rows["[0].nu['e'].scale"].reason

    state = fa.init_sharded(tx, params, zero1_axis="data")
    ml.assert_same_shardings(state, shardings)
    out = (ml.shardings_of(params), shardings)
    sharded = _run(tx, params, state, [place(g) for g in grads], out_shardings=out)
    ml.assert_same_shardings(sharded, out)
    counts = {"w": (2, 4), "b": (2,), "e": (1, 4)}
    chex.assert_trees_all_equal(
        jax.device_get(sharded), jax.device_get(_one_device_twin(tx, host, counts, grads))
    )

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", sharded[1])
    checkpointer.wait_until_finished()
    target = fa.abstract_state(tx, params, zero1_axis="data")
    restored = checkpointer.restore(tmp_path / "state", target)
    _assert_restored(restored, sharded[1], target)
    fa.check_state_shardings(tx, restored, params, zero1_axis="data")


def test_adam_8bit_state_for_other_shards_is_refused():
    """A shard-major state stepped or checked with parameters split otherwise: the leaf is named."""
    tx = fa.adam_8bit(1e-2, min_8bit_size=1024)
    host = {"w": np.ones((64, 256), np.float32)}
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = ml.make_mesh((8, 1), axis_type)
        by_columns = {"w": jax.device_put(host["w"], NamedSharding(mesh, P(None, "data")))}
        by_rows = {"w": jax.device_put(host["w"], NamedSharding(mesh, P("data", None)))}
        state = fa.init_sharded(tx, by_columns)
        assert state[0].mu["w"].codes.shape == (1, 8, 8, 256)
        with pytest.raises(
            ValueError,
            match=r"state\[0\]\.mu\['w'\]\.codes has shape \(1, 8, 8, 256\) and sharding "
            r"NamedSharding\(.*spec=P\(None, 'data'.* where shape \(8, 1, 8, 256\) and sharding "
            r"NamedSharding\(.*spec=P\('data',.* were expected \(8-bit blocks laid out per shard",
        ):
            fa.check_state_shardings(tx, state, by_rows)
        message = (
            r"updates\['w'\]: 8-bit blocks laid out for \(1, 8\) shards \(codes \(1, 8, 8, 256\)\) "
            r"but the gradient is split into \(8, 1\) shards"
        )
        with pytest.raises(ValueError, match=message):  # eager: the arrays' shardings
            tx.update(by_rows, state, by_rows)
        if axis_type == AxisType.Explicit:
            with jax.set_mesh(mesh), pytest.raises(ValueError, match=message):  # under jit
                jax.jit(tx.update)(by_rows, state, by_rows)
            flat = jax.device_put(tx.init(host), NamedSharding(mesh, P()))  # built on one device
            with (
                jax.set_mesh(mesh),
                pytest.raises(ValueError, match=r"updates\['w'\]: 8-bit blocks laid out flat"),
            ):
                jax.jit(tx.update)(by_columns, flat, by_columns)
    with pytest.raises(
        ValueError, match=r"updates\['w'\]: .* do not divide a leaf of shape \(64, 100\)"
    ):
        tx.update({"w": jnp.ones((64, 100))}, state)
