"""Parameter trees and gradient streams shared by the tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import functional_adam as fa
from functional_adam.kernels.dispatch import reference_path


def mixed_tree(dtype) -> dict:
    """Nested dicts, lists and tuples of scalars, vectors, matrices, a zero-size array and None."""
    rng = np.random.default_rng(0)

    def arr(*shape):
        x = rng.normal(size=shape)
        if jnp.issubdtype(dtype, jnp.complexfloating):
            x = x + 1j * rng.normal(size=shape)
        return jnp.asarray(x, dtype)

    return {
        "dense": {"w": arr(4, 3), "b": arr(3)},
        "layers": [arr(5), (arr(), arr(2, 2, 2)), None],
        "empty": arr(0, 3),
        "frozen": None,
    }


def gradient_stream(params, steps: int, seed: int = 1, scale: float = 1.0):
    """A list of ``steps`` random gradient trees shaped like ``params`` (None kept)."""
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    stream = []
    for _ in range(steps):
        grads = []
        for p in leaves:
            g = rng.normal(size=p.shape) * scale
            if jnp.issubdtype(p.dtype, jnp.complexfloating):
                g = g + 1j * rng.normal(size=p.shape) * scale
            grads.append(jnp.asarray(g, p.dtype))
        stream.append(treedef.unflatten(grads))
    return stream


def _components(x):
    x = np.asarray(x.astype(jnp.float32) if x.dtype.itemsize < 4 else x)
    return (x.real, x.imag) if x.dtype.kind == "c" else (x,)


def assert_within_ulps(actual, expected, ulps, scale_floor=0.0):
    """Each element within ``ulps`` units in the last place of max(itself, ``scale_floor``),
    per real component; dtypes and shapes equal."""
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        if a.size == 0:
            continue
        for x, y in zip(_components(a), _components(e), strict=True):
            scale = np.maximum(np.maximum(np.abs(x), np.abs(y)), scale_floor)
            tol = ulps * np.spacing(scale.astype(x.dtype)).astype(np.float64)
            assert np.all(np.abs(x.astype(np.float64) - y) <= tol), (x, y)


def run_scan(tx, grads, p0) -> np.ndarray:
    """Feeds ``grads`` (stacked on axis 0) into ``tx`` in a jitted ``lax.scan`` of
    ``update`` + ``apply_updates``; returns the final parameters."""

    @jax.jit
    def run(params, grads):
        def step(carry, g):
            params, state = carry
            updates, state = tx.update(g, state, params)
            return (fa.apply_updates(params, updates), state), None

        return jax.lax.scan(step, (params, tx.init(params)), grads)[0][0]

    return np.asarray(run(jnp.asarray(p0), jnp.asarray(grads)))


def relative_error(ours, theirs) -> float:
    """The largest elementwise ``|ours - theirs| / |theirs|``."""
    return float(np.max(np.abs(ours - theirs) / np.abs(theirs)))


PARITY_STEPS = 500
PARITY_SIZE = 48


def parity_gradients(steps: int = PARITY_STEPS, size: int = PARITY_SIZE, seed: int = 0):
    """Random float32 gradients ``(steps, size)`` for the framework parity tests: columns
    scaled 1e-7 ... 1, shrinking tenfold over the run."""
    rng = np.random.default_rng(seed)
    scales = np.logspace(-7, 0, size)[None, :] * np.geomspace(1.0, 0.1, steps)[:, None]
    return (rng.standard_normal((steps, size)) * scales).astype(np.float32)


def parity_initial_params(size: int = PARITY_SIZE, seed: int = 1):
    """Parameters of magnitude 1 to 2, so that they stay far from 0 over the run."""
    rng = np.random.default_rng(seed)
    return (rng.uniform(1.0, 2.0, size) * rng.choice([-1.0, 1.0], size)).astype(np.float32)


def displacement_error(ours, theirs, start) -> float:
    """The largest ``|ours - theirs|`` as a fraction of the largest displacement ``|theirs - start|``."""
    ours, theirs, start = (np.asarray(x, np.float64) for x in (ours, theirs, start))
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs - start)))


TRITON = "__gpu$xla.gpu.triton"


def cuda_module(step, *args) -> str:
    """The MLIR module of ``jax.jit(step)(*args)`` exported for CUDA (Pallas calls lowered to
    Triton), without a GPU."""
    from jax import export

    exported = export.export(
        jax.jit(step),
        platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)],
    )(*args)
    return exported.mlir_module()


def triton_launches(module: str) -> int:
    """How many Triton kernels a :func:`cuda_module` launches."""
    return module.count(f"custom_call @{TRITON}")


def spy_leaf_counts(monkeypatch, module, name: str) -> list[int]:
    """Replaces the kernel ``module.name(scalars, leaves, ...)`` by a wrapper that records how
    many leaves each call gets; returns that list."""
    calls, step = [], getattr(module, name)

    def spy(scalars, leaves, *args, **kwargs):
        calls.append(len(leaves))
        return step(scalars, leaves, *args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def plain_update_step(tx):
    """Jitted ``(grads, state, params) -> (params, state)`` through ``update`` + ``apply_updates``
    (a fusable transformation's ``fused_updates`` kernel, where it has one)."""

    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return fa.apply_updates(params, updates), state

    return jax.jit(step)


def kernel_and_xla_steps(tx):
    """Jitted ``(grads, state, params) -> (params, state)`` through ``update_and_apply`` and
    through ``update`` + ``apply_updates`` inside ``reference_path()`` (the XLA path), to
    compare. The second traces, and runs, inside ``reference_path()``."""
    kernel = jax.jit(lambda g, s, p: fa.update_and_apply(tx, g, s, p))
    jitted = plain_update_step(tx)

    def xla(*args):
        with reference_path():
            return jitted(*args)

    return kernel, xla
