"""The fused CPU kernel behind update_and_apply equals the XLA path, and steps aside cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import functional_adam as fa
from functional_adam.kernels import adam_cpu
from functional_adam.kernels import build as native
from tests.trees import assert_within_ulps, gradient_stream, mixed_tree

TARGET = "functional_adam_adam_f32"


def _many_leaves(n=40):
    """More leaves than one kernel call takes, of several shapes."""
    return {f"layer{i:02d}": jnp.full((i % 7 + 1, 3), 0.5 + i, jnp.float32) for i in range(n)}


def _xla_step(tx):
    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return fa.apply_updates(params, updates), state

    return jax.jit(step)


def _kernel_step(tx):
    return jax.jit(lambda grads, state, params: fa.update_and_apply(tx, grads, state, params))


CONFIGS = {
    "adam": lambda: fa.adam(1e-2),
    "adam_schedule_eps_root": lambda: fa.adam(optax.cosine_decay_schedule(1e-2, 50), eps_root=1e-6),
    "adamw_mask_tree": lambda: fa.adamw(
        1e-2, weight_decay=0.1, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
    ),
    "adamw_wd_schedule": lambda: fa.adamw(1e-2, weight_decay=lambda count: 0.01 * (count + 1)),
    "nadam": lambda: fa.nadam(3e-3, b1=0.8, b2=0.99),
    "nadamw_prefix_mask": lambda: fa.nadamw(
        1e-2, weight_decay=0.1, mask={"dense": True, "rest": False}
    ),
}


def _tree(config):
    tree = mixed_tree(jnp.float32)
    if config == "nadamw_prefix_mask":  # the mask is a prefix of this tree
        return {"dense": tree["dense"], "rest": {k: v for k, v in tree.items() if k != "dense"}}
    return tree | {"many": _many_leaves()}


def test_kernel_is_built_and_used_in_one_pass():
    assert native.available()
    tx = fa.adam(1e-3)
    params = {"w": jnp.zeros((256, 256)), "b": jnp.zeros(256)}
    hlo = _kernel_step(tx).lower(params, tx.init(params), params).compile().as_text()
    assert hlo.count(f'custom_call_target="{TARGET}"') == 1
    entry = hlo[hlo.index("ENTRY") :]
    # No loop over the arrays besides the kernel (only scalar work: count, bias corrections).
    assert not [line for line in entry.splitlines() if " fusion(" in line and "f32[256" in line]


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_kernel_equals_xla_path_step_by_step(config):
    """Moments and counts bitwise; parameters within 2 ulps of the XLA path's.

    XLA rewrites the XLA path's divisions by the bias corrections (into a reciprocal
    multiply or a merged divide, depending on the program), so a parameter can differ
    in its last bit; each step starts again from the XLA path's values.
    """
    tx = CONFIGS[config]()
    params = _tree(config)
    state = tx.init(params)
    kernel, xla = _kernel_step(tx), _xla_step(tx)
    assert TARGET in kernel.lower(params, state, params).as_text()
    for grads in gradient_stream(params, 8):
        (p_k, s_k), (p_x, s_x) = kernel(grads, state, params), xla(grads, state, params)
        chex.assert_trees_all_equal(s_k, s_x)
        assert_within_ulps(p_k, p_x, 2)
        params, state = p_x, s_x


def test_trajectories_stay_together_over_many_steps():
    tx = fa.adamw(1e-2, weight_decay=0.1)
    params = {"w": jnp.linspace(-3.0, 3.0, 1000).reshape(10, 100), "b": jnp.ones(7)}
    kernel, xla = _kernel_step(tx), _xla_step(tx)
    (p_k, s_k), (p_x, s_x) = (params, tx.init(params)), (params, tx.init(params))
    for _ in range(300):
        p_k, s_k = kernel(jax.tree.map(lambda p: 2 * p, p_k), s_k, p_k)
        p_x, s_x = xla(jax.tree.map(lambda p: 2 * p, p_x), s_x, p_x)
    chex.assert_trees_all_close(p_k, p_x, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(p_k["w"]))) < 2.0  # it did descend


def test_float64():
    with jax.enable_x64(True):
        tx = fa.adamw(1e-2, weight_decay=0.1)
        params = mixed_tree(jnp.float64)
        state = tx.init(params)
        kernel, xla = _kernel_step(tx), _xla_step(tx)
        assert "functional_adam_adam_f64" in kernel.lower(params, state, params).as_text()
        for grads in gradient_stream(params, 5):
            (p_k, s_k), (p_x, s_x) = kernel(grads, state, params), xla(grads, state, params)
            chex.assert_trees_all_equal(s_k, s_x)
            assert_within_ulps(p_k, p_x, 2)
            params, state = p_x, s_x


@pytest.mark.parametrize(
    "make, params",
    [
        (lambda: fa.adam(1e-2), {"w": jnp.ones(3, jnp.bfloat16)}),
        (lambda: fa.adam(1e-2, mu_dtype=jnp.bfloat16), {"w": jnp.ones(3)}),
        (lambda: fa.amsgrad(1e-2), {"w": jnp.ones(3)}),
        (lambda: fa.adam(1e-2, flat=True), {"w": jnp.ones(3)}),
    ],
    ids=["bf16_params", "bf16_mu", "amsgrad", "flat"],
)
def test_what_the_kernel_does_not_take_goes_the_xla_way(make, params):
    tx = make()
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    assert TARGET not in _kernel_step(tx).lower(grads, state, params).as_text()
    chex.assert_trees_all_equal(
        _kernel_step(tx)(grads, state, params), _xla_step(tx)(grads, state, params)
    )


def test_mixed_dtypes_go_the_xla_way():
    with jax.enable_x64(True):
        tx = fa.adam(1e-2)
        params = {"a": jnp.ones(3, jnp.float32), "b": jnp.ones(3, jnp.float64)}
        state = tx.init(params)
        hlo = _kernel_step(tx).lower(params, state, params).as_text()
        assert "functional_adam_adam" not in hlo


def test_hypergradient_and_vmap_through_the_kernel():
    def final_loss(lr, fused):
        tx = fa.adamw(lr, weight_decay=0.1)
        params = jnp.array([1.0, -2.0, 0.5])
        state = tx.init(params)
        for _ in range(3):
            grads = 2 * params
            if fused:
                params, state = fa.update_and_apply(tx, grads, state, params)
            else:
                updates, state = tx.update(grads, state, params)
                params = fa.apply_updates(params, updates)
        return jnp.sum(params**2)

    kernel_grad = jax.jit(jax.grad(final_loss), static_argnums=1)(0.1, True)
    np.testing.assert_allclose(kernel_grad, jax.grad(final_loss)(0.1, False), rtol=1e-6)
    lrs = jnp.array([0.01, 0.1, 0.3])
    np.testing.assert_allclose(
        jax.vmap(lambda lr: final_loss(lr, True))(lrs),
        jax.vmap(lambda lr: final_loss(lr, False))(lrs),
        rtol=1e-6,
    )


def test_no_recompilation_and_scan():
    tx = fa.adam(1e-2)
    params = {"w": jnp.ones((4, 4)), "b": jnp.zeros(4)}
    step = jax.jit(lambda p, s, g: fa.update_and_apply(tx, g, s, p), donate_argnums=(0, 1))
    state = tx.init(params)
    for grads in gradient_stream(params, 3):
        params, state = step(params, state, grads)
    assert step._cache_size() == 1

    def body(carry, grads):
        return fa.update_and_apply(tx, grads, carry[1], carry[0]), None

    stream = gradient_stream(params, 4)
    start = (params, tx.init(params))
    scanned, _ = jax.lax.scan(body, start, jax.tree.map(lambda *x: jnp.stack(x), *stream))
    looped = start
    for grads in stream:
        looped = _kernel_step(tx)(grads, looped[1], looped[0])
    chex.assert_trees_all_equal(scanned, looped)


def test_bad_trees_get_the_xla_paths_errors():
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    tx = fa.adamw(1e-2, mask={"w": True, "x": False})
    with pytest.raises(ValueError, match="add_decayed_weights: the mask must have the structure"):
        fa.update_and_apply(tx, params, tx.init(params), params)
    tx = fa.adam(1e-2)
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"\['b'\]"):
        fa.update_and_apply(tx, {"w": jnp.ones(3)}, state, params)
    with pytest.raises(TypeError, match="int32"):
        fa.update_and_apply(tx, {"w": jnp.ones(3), "b": jnp.ones(2, jnp.int32)}, state, params)


def test_reference_step_is_the_kernels_arithmetic():
    """The derivative rule's values equal the kernel's within rounding."""
    rng = np.random.default_rng(0)
    leaves = [tuple(jnp.asarray(rng.normal(size=7), jnp.float32) ** k for k in (1, 1, 1, 2))]
    scalars = jnp.asarray([0.9, 0.1, 0.999, 0.001, 1e-8, 0.0, 10.0, 1000.0, 5.26, -0.1, 0.1])
    for nesterov in (False, True):
        kernel = adam_cpu.adam_step(scalars, leaves, (True,), nesterov)
        reference = adam_cpu.reference_step(scalars, leaves, (True,), nesterov)
        assert_within_ulps(kernel, reference, 2)


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=os.environ | env,
        check=True,
    )


STEP = """
    import jax, jax.numpy as jnp
    import functional_adam as fa
    tx = fa.adam(0.1)
    p = jnp.ones(3)
    step = jax.jit(lambda p, s, g: fa.update_and_apply(tx, g, s, p))
    print("kernel:", "functional_adam_adam" in step.lower(p, tx.init(p), p).as_text())
    print("params:", step(p, tx.init(p), p)[0].tolist())
"""


def test_without_a_compiler_the_step_takes_the_xla_path_with_one_warning(tmp_path):
    out = _run(STEP, CXX="/nonexistent/c++", FUNCTIONAL_ADAM_CACHE=str(tmp_path))
    assert "kernel: False" in out.stdout
    assert "params: [0.9" in out.stdout
    assert out.stderr.count("RuntimeWarning") == 1
    assert "/nonexistent/c++" in out.stderr and "FUNCTIONAL_ADAM_NATIVE=0" in out.stderr


def test_read_only_cache_builds_in_the_temporary_directory(tmp_path, monkeypatch):
    read_only = tmp_path / "cache"
    read_only.mkdir()
    read_only.chmod(0o500)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    try:
        if os.access(read_only, os.W_OK):  # root writes anywhere: make the cache a file
            read_only.chmod(0o700)
            read_only.rmdir()
            read_only.write_text("not a folder")
        monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
        library = native.build(read_only)
        assert library.is_relative_to(tmp_path / "tmp") and library.exists()
    finally:
        if read_only.is_dir():
            read_only.chmod(0o700)


def test_build_error_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(RuntimeError, match=r"/nonexistent/c\+\+.* could not run"):
        native.build(tmp_path)


def test_switched_off_by_environment():
    out = _run(STEP, FUNCTIONAL_ADAM_NATIVE="0")
    assert "kernel: False" in out.stdout and "params: [0.9" in out.stdout
    assert "RuntimeWarning" not in out.stderr


def test_several_cpu_devices_run_the_kernel_per_shard_and_keep_the_sharding():
    """The 8-device cases are in ``tests/mesh_cases_kernel.py``; here, 2 devices in a fresh process."""
    code = """
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        import jax, jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        import functional_adam as fa
        mesh = Mesh(jax.devices(), ("x",))
        sharded = NamedSharding(mesh, P("x"))
        tx = fa.adam(0.1)
        p = jax.device_put(jnp.ones(8), sharded)
        state = jax.jit(tx.init)(p)  # the moments take the parameters' sharding
        step = jax.jit(lambda p, s, g: fa.update_and_apply(tx, g, s, p))
        hlo = step.lower(p, state, p).compile().as_text()
        print("kernel:", "f32[4]{0}) custom-call" in hlo and "functional_adam_adam" in hlo)
        new_p, new_state = step(p, state, p)
        print("sharded:", new_p.sharding.is_equivalent_to(sharded, 1),
              new_state[0].mu.sharding.is_equivalent_to(sharded, 1))
        print("params:", [round(float(x), 3) for x in new_p[:2]])
    """
    out = _run(code)
    assert "kernel: True" in out.stdout
    assert "sharded: True True" in out.stdout
    assert "params: [0.9, 0.9]" in out.stdout
