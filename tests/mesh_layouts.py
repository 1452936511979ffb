"""Meshes, parameter layouts and HLO helpers for the multi-device tests.

Imported by ``tests/mesh_cases_*.py``, which ``tests/test_sharding.py`` runs in a
subprocess with 8 simulated CPU devices; importing this module needs no devices.
"""

from __future__ import annotations

import contextlib
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import functional_adam as fa
from functional_adam.kernels.dispatch import reference_path

MESH_SHAPES = [(8, 1), (2, 4), (4, 2)]
AXES = ("data", "model")

SHAPES = {
    "embed": (64, 48),
    "dense": {"kernel": (48, 96), "bias": (96,)},
    "odd": (7, 5),  # no mesh axis divides it: stays unsharded
    "norm": (12,),
}


def make_mesh(shape, axis_types=AxisType.Auto) -> jax.sharding.Mesh:
    """An ``("data", "model")`` mesh of ``shape`` on the first ``prod(shape)`` devices."""
    return jax.make_mesh(shape, AXES, axis_types=(axis_types,) * 2)


def spec_for(shape: tuple[int, ...], mesh, layout: str, full_length: bool = False) -> P:
    """FSDP: ``data`` on the first dimension it divides; TP: ``model`` on the last one it divides.

    Axes of size 1 are left out and so are trailing ``None`` s, as ``jax.jit`` leaves them
    out of its outputs' specs on Auto axes; on Explicit axes its specs are ``full_length``.
    """
    spec: list = [None] * len(shape)
    if layout in ("fsdp", "fsdp_tp") and mesh.shape["data"] > 1:
        for dim, n in enumerate(shape):
            if n % mesh.shape["data"] == 0:
                spec[dim] = "data"
                break
    if layout in ("tp", "fsdp_tp") and mesh.shape["model"] > 1:
        for dim in reversed(range(len(shape))):
            if spec[dim] is None and shape[dim] % mesh.shape["model"] == 0:
                spec[dim] = "model"
                break
    while spec and spec[-1] is None and not full_length:
        spec.pop()
    return P(*spec)


def random_tree(seed: int, dtype=jnp.float32) -> dict:
    """Host arrays shaped as :data:`SHAPES` (numpy: placing them never aliases a buffer)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: np.asarray(rng.normal(size=s), jnp.dtype(dtype)),
        SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def placed(tree, mesh, layout: str, full_length: bool = False):
    """``tree`` put on ``mesh`` with :func:`spec_for` each leaf (``"replicated"``: ``P()``)."""

    def put(x):
        spec = spec_for(x.shape, mesh, layout, full_length)
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(put, tree)


def shardings_of(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def assert_same_shardings(actual, expected) -> None:
    """Each leaf of ``actual`` is placed as the matching leaf (a Sharding or an array) of ``expected``."""
    flat_actual = jax.tree_util.tree_flatten_with_path(actual)[0]
    flat_expected = jax.tree.leaves(
        expected, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)
    )
    assert len(flat_actual) == len(flat_expected)
    for (path, leaf), want in zip(flat_actual, flat_expected, strict=True):
        want = getattr(want, "sharding", want)
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (
            f"{jax.tree_util.keystr(path)}: {leaf.sharding} != {want}"
        )


_COLLECTIVE = re.compile(r"(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)")
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def collectives(hlo_text: str) -> list[tuple[str, str, int]]:
    """``(op, dtype, elements)`` for each collective in the compiled HLO (its result shapes)."""
    found = []
    for line in hlo_text.splitlines():
        if "=" not in line:
            continue
        _, rhs = line.split("=", 1)
        match = _COLLECTIVE.search(rhs.split("(", 1)[0])
        if not match:
            continue
        for dtype, dims in _SHAPE.findall(rhs.split(match.group(1), 1)[0]):
            elements = math.prod(int(d) for d in dims.split(",")) if dims else 1
            found.append((match.group(1), dtype, elements))
    return found


def gathers_of_arrays(hlo_text: str) -> list[tuple[str, str, int]]:
    """All-gathers, all-to-alls and collective-permutes of more than one element."""
    return [
        c
        for c in collectives(hlo_text)
        if c[0] in ("all-gather", "all-to-all", "collective-permute") and c[2] > 1
    ]


def step_fn(tx, via: str):
    """A step ``(params, state, grads) -> (params, state)``: ``update_and_apply``, update+apply
    (``"update"``), or update+apply on the XLA path (``"xla"``: traced inside
    ``reference_path()``, so no kernel)."""

    def step(params, state, grads):
        if via == "update_and_apply":
            return fa.update_and_apply(tx, grads, state, params)
        with reference_path() if via == "xla" else contextlib.nullcontext():
            updates, state = tx.update(grads, state, params)
        return fa.apply_updates(params, updates), state

    return step


TXS = {
    "adam": lambda: fa.adam(1e-2),
    "adam_bf16_moments": lambda: fa.adam(1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
    "adamw": lambda: fa.adamw(1e-2, weight_decay=0.1),
    "amsgrad": lambda: fa.amsgrad(1e-2),
    "nadamw": lambda: fa.nadamw(1e-2, weight_decay=0.1),
    "torch_adamw": lambda: fa.compat.torch_adamw(1e-2, weight_decay=0.1),
    "keras_adam": lambda: fa.compat.keras_adam(1e-2),
    "master_weights": lambda: fa.with_master_weights(fa.adam(1e-2)),
    "optax_chain_clip": lambda: optax.chain(optax.clip_by_global_norm(1.0), fa.adamw(1e-2)),
    "optax_multisteps": lambda: optax.MultiSteps(fa.adam(1e-2), 2).gradient_transformation(),
    "optax_inject_hyperparams": lambda: optax.inject_hyperparams(fa.adam)(learning_rate=1e-2),
}
"""Transformations whose state must follow the parameters exactly (moments in float32/bf16)."""

PARAM_DTYPE = {"master_weights": jnp.bfloat16}
