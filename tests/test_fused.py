"""The fast paths: flat buffers and update_and_apply equal the default path."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import pytest

import functional_adam as fa
from functional_adam.storage.flat import unflatten_tree
from tests.trees import assert_within_ulps, gradient_stream, mixed_tree

STEPS = 40


FACTORIES = {
    "adam": lambda flat: fa.adam(1e-2, flat=flat),
    "adamw_mask": lambda flat: fa.adamw(
        1e-2, weight_decay=0.1, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p), flat=flat
    ),
    "amsgrad": lambda flat: fa.amsgrad(1e-2, flat=flat),
    "nadam_mu_bf16": lambda flat: fa.nadam(1e-2, mu_dtype=jnp.bfloat16, flat=flat),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "complex64"])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_flat_equals_default(name, dtype):
    params = mixed_tree(jnp.dtype(dtype))
    default, flat = FACTORIES[name](False), FACTORIES[name](True)
    s_default, s_flat = default.init(params), flat.init(params)
    step_default, step_flat = jax.jit(default.update), jax.jit(flat.update)
    for g in gradient_stream(params, STEPS):
        u_default, s_default = step_default(g, s_default, params)
        u_flat, s_flat = step_flat(g, s_flat, params)
        # XLA:CPU evaluates the last division and square root of one long buffer (vector
        # loop) and of short leaves (scalar remainder loops) a few ulps apart: measured
        # worst case 4 ulps of the learning rate, the scale of an Adam step (|u| <~ lr).
        assert_within_ulps(u_flat, u_default, 4, scale_floor=1e-2)
        # The moments, which carry the run from step to step, stay bitwise equal (complex
        # second moments: within 1 ulp), cut back into the tree.
        inner = s_flat[0].inner_state
        assert_within_ulps(unflatten_tree(inner.mu, params), s_default[0].mu, 0)
        assert_within_ulps(
            unflatten_tree(inner.nu, params),
            s_default[0].nu,
            1 if dtype == "complex64" else 0,
        )
    assert step_flat._cache_size() == 1


def test_mixed_dtypes_get_one_buffer_each():
    params = {"a": jnp.ones(3, jnp.bfloat16), "b": jnp.ones((2, 2)), "c": jnp.ones(5, jnp.bfloat16)}
    state = fa.flatten(fa.scale_by_adam()).init(params)
    assert {k: v.shape for k, v in state.inner_state.mu.items()} == {
        "bfloat16": (8,),
        "float32": (4,),
    }


def test_abstract_init_and_optax_state_utilities():
    params = mixed_tree(jnp.float32)
    tx = fa.adam(1e-3, flat=True)
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    chex.assert_trees_all_equal_shapes_and_dtypes(
        jax.eval_shape(tx.init, abstract), tx.init(params)
    )
    assert int(optax.tree_utils.tree_get(tx.init(params), "count")) == 0


def test_checkpoint_round_trip_with_orbax(tmp_path):
    params = mixed_tree(jnp.float32)
    tx = fa.adam(1e-2, flat=True)
    state = tx.init(params)
    grads = gradient_stream(params, 6)
    for g in grads[:3]:
        _, state = tx.update(g, state, params)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "state", jax.eval_shape(lambda: state))
    chex.assert_trees_all_equal(restored, state)
    for g in grads[3:]:
        u_a, state = tx.update(g, state, params)
        u_b, restored = tx.update(g, restored, params)
        chex.assert_trees_all_equal(u_a, u_b)


def test_tree_that_changes_between_steps_is_refused():
    tx = fa.adam(1e-2, flat=True)
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"leaf \['w'\] is float32\[4\] where init saw"):
        tx.update({"w": jnp.ones(4), "b": jnp.ones(2)}, state, None)
    with pytest.raises(ValueError, match=r"leaf \['extra'\] is float32\[1\] where init saw"):
        tx.update({"w": jnp.ones(3), "b": jnp.ones(2), "extra": jnp.ones(1)}, state, None)
    with pytest.raises(ValueError, match=r"leaf \['b'\] is bfloat16\[2\]"):
        tx.update({"w": jnp.ones(3), "b": jnp.ones(2, jnp.bfloat16)}, state, None)


def test_flat_must_be_bool():
    with pytest.raises(TypeError, match="flat must be a bool"):
        fa.adam(1e-3, flat="yes")


def test_leaves_on_different_devices_are_refused():
    """Run in a fresh interpreter with two host devices."""
    code = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        import jax, jax.numpy as jnp
        import functional_adam as fa
        d0, d1 = jax.devices()[:2]
        params = {"a": jax.device_put(jnp.ones(2), d0), "b": jax.device_put(jnp.ones(2), d1)}
        try:
            fa.adam(1e-3, flat=True).init(params)
        except ValueError as err:
            print("refused:", err)
        fa.adam(1e-3).init(params)  # the default path keeps each leaf where it is
        try:
            fa.FlatParams.of(params)
        except ValueError as err:
            print("refused:", err)
        fa.FlatParams.of(params, groups=lambda path, leaf: path[0].key)  # one buffer each: fine
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "refused: flatten: ['b'] is placed on" in out.stdout
    assert "refused: FlatParams.of: ['b'] is placed on" in out.stdout


def _compiled_step(tx, params):
    state = tx.init(params)

    # JAX pairs donated inputs with outputs of the same shape in order, so the donated
    # arguments come in the order of the outputs: (params, state).
    def step(params, state, grads):
        return fa.update_and_apply(tx, grads, state, params)

    return jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()


def _array_fusions(hlo_text):
    """Loop fusions in the entry computation that produce arrays (not scalars)."""
    entry = hlo_text[hlo_text.index("ENTRY") :]
    return [
        line
        for line in entry.splitlines()
        if " fusion(" in line and re.search(r"= (f|bf|c)\d+\[\d", line)
    ]


def _xla_adam(flat=False):
    """``fa.adam(1e-3)`` without the CPU kernel attached: the XLA path."""
    return fa.chain(_direction(fa.scale_by_adam(), flat), fa.scale_by_learning_rate(1e-3))


def _direction(tx, flat):
    return fa.flatten(tx) if flat else tx


def test_update_and_apply_is_one_pass_per_moment_and_param():
    """One leaf, XLA path: XLA emits a loop for m, one for v and one that computes Adam's
    direction and writes θ in the same pass; there is no separate loop for apply_updates."""
    compiled = _compiled_step(_xla_adam(), {"w": jnp.zeros(1 << 16)})
    assert len(_array_fusions(compiled.as_text())) <= 3


def test_flat_has_fewer_loops_than_leaves():
    params = {f"layer{i}": jnp.zeros(256) for i in range(100)}
    default = len(_array_fusions(_compiled_step(_xla_adam(), params).as_text()))
    flat = len(_array_fusions(_compiled_step(_xla_adam(flat=True), params).as_text()))
    assert default >= 200  # a few loops per leaf
    assert flat < default / 2, (flat, default)


@pytest.mark.parametrize("path", ["xla", "flat", "kernel", "flat_params"])
def test_donation_leaves_no_second_copy_of_the_state(path):
    params = {"w": jnp.zeros((256, 256)), "b": jnp.zeros(256)}
    if path == "flat_params":
        params, path = fa.FlatParams.of(params), "kernel"
    tx = fa.adam(1e-3) if path == "kernel" else _xla_adam(flat=path == "flat")
    flat = path == "flat"
    compiled = _compiled_step(tx, params)
    assert ("functional_adam_adam_f32" in compiled.as_text()) == (path == "kernel")
    stats = compiled.memory_analysis()
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(tx.init(params)))
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    # Every output buffer of the state and params is the donated input buffer, reused.
    assert stats.alias_size_in_bytes == state_bytes + param_bytes
    # No temporary copy of the state. The flat path writes its update as one buffer of
    # the params' size before cutting it into leaves; the default path needs nothing.
    allowed = param_bytes + 1024 if flat else 1024
    assert stats.temp_size_in_bytes <= allowed, stats.temp_size_in_bytes
