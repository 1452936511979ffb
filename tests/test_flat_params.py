"""FlatParams: parameters in one buffer per dtype (and group), any optimizer on top."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import functional_adam as fa
from tests.trees import assert_within_ulps, gradient_stream, mixed_tree


def _loss(tree):
    return sum(jnp.sum(jnp.abs(x) ** 2) for x in jax.tree.leaves(tree))


def test_round_trip_keeps_tree_dtypes_and_none():
    with jax.enable_x64(True):
        params = mixed_tree(jnp.float32) | {"f64": jnp.arange(3.0, dtype=jnp.float64)}
        flat = fa.FlatParams.of(params)
        assert sorted(flat.buffers) == ["float32", "float64"]
        chex.assert_trees_all_equal(flat.tree(), params)
        assert jax.tree.structure(flat.tree()) == jax.tree.structure(params)


def test_adamw_on_flat_params_equals_per_leaf_adamw():
    """Same math as the per-leaf step on the original tree (each step from the same values);
    the state is flat too."""
    params = mixed_tree(jnp.float32) | {"many": [jnp.full((3, i + 1), 0.1 * i) for i in range(50)]}

    def groups(path, leaf):
        return "decay" if leaf.ndim > 1 else ""

    def flat_state(state):  # the per-leaf state, in the flat layout
        adam, *rest = state
        mu, nu = fa.FlatParams.of(adam.mu, groups), fa.FlatParams.of(adam.nu, groups)
        return (adam._replace(mu=mu, nu=nu), *rest)

    tx_flat = fa.adamw(1e-2, weight_decay=0.1, mask=lambda f: f.group_mask("decay"))
    tx_tree = fa.adamw(1e-2, weight_decay=0.1, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
    state = tx_tree.init(params)
    flat = fa.FlatParams.of(params, groups=groups)
    assert len(jax.tree.leaves(tx_flat.init(flat)[0].mu)) == 2  # one moment buffer per group
    chex.assert_trees_all_equal(tx_flat.init(flat), flat_state(state))

    step_flat = jax.jit(lambda p, s, g: fa.update_and_apply(tx_flat, g, s, p))
    step_tree = jax.jit(lambda p, s, g: fa.update_and_apply(tx_tree, g, s, p))
    hlo = step_flat.lower(flat, flat_state(state), flat).compile().as_text()
    assert hlo.count('custom_call_target="functional_adam_adam_f32"') == 1  # 61 leaves, one call

    # Jitted: 61 slices (or concatenations) compiled op by op take seconds on the CPU.
    flat_grad = jax.jit(jax.grad(lambda f, g: _dot(f.tree(), g)))
    flatten, tree = (
        jax.jit(lambda p: fa.FlatParams.of(p, groups=groups)),
        jax.jit(fa.FlatParams.tree),
    )
    flat_state = jax.jit(flat_state)
    for grads in gradient_stream(params, 5):
        flat = flatten(params)
        flat_grads = flat_grad(flat, grads)
        assert isinstance(flat_grads, fa.FlatParams)
        new_flat, new_flat_state = step_flat(flat, flat_state(state), flat_grads)
        params, state = step_tree(params, state, grads)
        assert_within_ulps(tree(new_flat), params, 2, scale_floor=1e-2)
        assert_within_ulps(new_flat_state, flat_state(state), 1)


def _dot(tree, grads):
    """A loss whose gradient with respect to ``tree`` is ``grads``."""
    return sum(
        jnp.sum(x * g) for x, g in zip(jax.tree.leaves(tree), jax.tree.leaves(grads), strict=True)
    )


def test_checkpoints_like_any_pytree(tmp_path):
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    flat = fa.FlatParams.of(params)
    tx = fa.adam(1e-2)
    state = tx.init(flat)
    flat, state = fa.update_and_apply(tx, flat, state, flat)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", (flat, state))
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(tmp_path / "ckpt", (flat, state))
    chex.assert_trees_all_equal(restored, (flat, state))
    np.testing.assert_array_equal(restored[0].tree()["w"], flat.tree()["w"])


def test_no_recompilation_from_step_to_step():
    """The layout is static metadata: each step's outputs reuse the compiled step."""
    tx = fa.adam(1e-2)
    flat = fa.FlatParams.of({f"layer{i}": jnp.ones((i + 1, 2)) for i in range(20)})
    state = tx.init(flat)
    step = jax.jit(lambda p, s, g: fa.update_and_apply(tx, g, s, p), donate_argnums=(0, 1))
    for _ in range(3):
        grads = jax.tree.map(jnp.ones_like, flat)
        flat, state = step(flat, state, grads)
    assert step._cache_size() == 1


def test_state_of_another_layout_is_refused():
    tx = fa.adam(1e-2)
    state = tx.init(fa.FlatParams.of({"w": jnp.ones(3)}))
    other = fa.FlatParams.of({"w": jnp.ones(2), "b": jnp.ones(1)})
    with pytest.raises(ValueError, match=r"leaf \['b'\] is float32\[1\] where init saw \['w'\]"):
        fa.update_and_apply(tx, other, state, other)


def test_bad_input_is_named():
    with pytest.raises(TypeError, match=r"params\['x'\] is str"):
        fa.FlatParams.of({"x": "not an array"})
    with pytest.raises(TypeError, match=r"groups returned 3 for params\['w'\]"):
        fa.FlatParams.of({"w": jnp.ones(2)}, groups=lambda path, leaf: 3)
    flat = fa.FlatParams.of({"w": jnp.ones(2)}, groups=lambda path, leaf: "decay")
    with pytest.raises(ValueError, match=r"no group \['bias'\]; the groups are \['decay'\]"):
        flat.group_mask("bias")
