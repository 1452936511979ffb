"""Flat layouts in checkpoints: a state or FlatParams restored into another layout is refused,
naming the first leaf that differs; flax.serialization round-trips both."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import chex
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import functional_adam as fa

SAVED = {"a": jnp.arange(2.0), "b": jnp.arange(3.0) + 10}  # 5 elements: a then b
SWAPPED = {"a": jnp.ones(3), "b": jnp.ones(2)}  # the same 5 elements, cut elsewhere


def _stepped_flat_state(params, steps=2):
    tx = fa.adam(1e-2, flat=True)
    state = tx.init(params)
    for _ in range(steps):
        _, state = tx.update(params, state, params)
    return tx, state


def _orbax_round_trip(tmp_path, tree, target):
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", tree)
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(tmp_path / "ckpt", target)


def test_orbax_restore_into_another_layout_is_refused(tmp_path):
    tx, state = _stepped_flat_state(SAVED)
    restored = _orbax_round_trip(tmp_path, state, jax.eval_shape(lambda: tx.init(SWAPPED)))
    with pytest.raises(ValueError, match=r"leaf \['a'\] \(float32\[3\]\) .*saved"):
        fa.check_layout(restored)
    with pytest.raises(ValueError, match=r"leaf \['a'\] \(float32\[3\]\) .*saved"):
        tx.update(SWAPPED, restored, SWAPPED)  # checked on update where the state is concrete


def test_orbax_round_trip_into_the_same_layout_checks_out(tmp_path):
    tx, state = _stepped_flat_state(SAVED)
    restored = _orbax_round_trip(tmp_path, state, jax.eval_shape(lambda: tx.init(SAVED)))
    fa.check_layout(restored)
    chex.assert_trees_all_equal(restored, state)
    chex.assert_trees_all_equal(tx.update(SAVED, restored, SAVED), tx.update(SAVED, state, SAVED))


def test_renamed_leaf_of_the_same_shape_is_refused(tmp_path):
    tx, state = _stepped_flat_state({"a": jnp.ones(2), "b": jnp.ones(3)})
    renamed = {"a": jnp.ones(2), "c": jnp.ones(3)}
    restored = _orbax_round_trip(tmp_path, state, jax.eval_shape(lambda: tx.init(renamed)))
    with pytest.raises(ValueError, match=r"leaf \['c'\] \(float32\[3\]\)"):
        fa.check_layout(restored)


def test_flat_params_saved_with_their_fingerprint_are_checked(tmp_path):
    flat = fa.FlatParams.of(SAVED)
    saved = {"params": flat, "layout": flat.fingerprint()}
    target = {"params": fa.FlatParams.of(SWAPPED), "layout": flat.fingerprint()}
    restored = _orbax_round_trip(tmp_path, saved, target)
    with pytest.raises(ValueError, match=r"leaf \['a'\] \(float32\[3\]\) .*saved"):
        fa.check_layout(restored["params"], restored["layout"])
    fa.check_layout(flat, restored["layout"])  # the layout it was saved for


def test_flat_state_fingerprint_survives_jit_and_tree_maps():
    tx, state = _stepped_flat_state(SAVED)
    _, jitted = jax.jit(tx.update)(SAVED, state, SAVED)
    fa.check_layout(jitted)
    assert jax.tree.map(lambda x: x, state)[0].fingerprint.dtype == jnp.uint32


@pytest.mark.parametrize("kind", ["flat_state", "flat_params"])
def test_flax_serialization_round_trips_and_checks_the_layout(kind):
    if kind == "flat_state":
        tx, tree = _stepped_flat_state(SAVED)
        target, other = tx.init(SAVED), tx.init(SWAPPED)
    else:
        tree = fa.FlatParams.of(SAVED, groups=lambda path, leaf: "g" if leaf.size > 2 else "")
        target, other = jax.tree.map(jnp.zeros_like, tree), fa.FlatParams.of(SWAPPED)
    data = flax.serialization.to_bytes(tree)
    chex.assert_trees_all_equal(flax.serialization.from_bytes(target, data), tree)
    with pytest.raises(ValueError, match=r"leaf \['a'\] \(.*\[3\]\) .*saved"):
        flax.serialization.from_bytes(other, data)


@pytest.mark.parametrize("flax_first", [True, False], ids=["flax_first", "flax_after"])
def test_flax_registration_does_not_depend_on_import_order(flax_first):
    imports = ["import flax.serialization", "import functional_adam as fa"]
    code = "\n".join(imports if flax_first else imports[::-1]) + textwrap.dedent("""
        import sys, jax.numpy as jnp
        flat = fa.FlatParams.of({"w": jnp.arange(3.0)})
        back = flax.serialization.from_bytes(flat, flax.serialization.to_bytes(flat))
        print(back.buffers["float32"].tolist())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[0.0, 1.0, 2.0]"


def test_importing_functional_adam_does_not_import_flax():
    code = "import sys, functional_adam; print('flax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_check_layout_refuses_what_it_cannot_check():
    flat = fa.FlatParams.of(SAVED)
    with pytest.raises(ValueError, match="a FlatParams carries no fingerprint"):
        fa.check_layout({"params": flat})
    with pytest.raises(ValueError, match=r"fingerprint has 3 leaves but the layout 2"):
        fa.check_layout(flat, np.zeros(3, np.uint32))
