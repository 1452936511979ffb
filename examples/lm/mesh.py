"""The device mesh and the parameters' shardings: data parallel, FSDP, tensor parallel.

``--mesh data=2,fsdp=4`` names the size of each axis of a ``jax.sharding.Mesh`` with axes
``("data", "fsdp", "model")`` (an axis not named has size 1; no flag: every device on
``data``). The product must be the number of devices.

- ``data``: the batch is split over it; parameters are replicated over it (and, with
  ``--zero1``, the optimizer's moments are split over it: ``fa.state_shardings``).
- ``fsdp``: the batch is split over it too, and every parameter is split over it along its
  largest dimension that it divides (fully sharded data parallel: each device stores
  ``1/fsdp`` of the parameters and of the moments; the compiler gathers a layer's weights
  when it needs them).
- ``model``: tensor parallel in Megatron's pattern: ``qkv`` and ``fc`` split by output
  column, ``attn_out`` and ``mlp_out`` by input row.

The compiler's sharding propagation places everything in between; there is no
communication code of our own.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES: tuple[str, ...] = ("data", "fsdp", "model")
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")

COLUMN_PARALLEL = frozenset({"qkv", "fc"})
ROW_PARALLEL = frozenset({"attn_out", "mlp_out"})


class MeshError(ValueError):
    """A ``--mesh`` that cannot be built; the message names the flag."""


def parse_mesh(text: str | None, n_devices: int) -> dict[str, int]:
    """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4, "model": 1}``, checked against the devices.

    Example:
        >>> parse_mesh("fsdp=4,data=2", 8)
        {'data': 2, 'fsdp': 4, 'model': 1}
        >>> parse_mesh(None, 8)
        {'data': 8, 'fsdp': 1, 'model': 1}
    """
    if not text:
        return {"data": n_devices, "fsdp": 1, "model": 1}
    sizes = dict.fromkeys(AXES, 1)
    for part in text.split(","):
        name, eq, value = part.strip().partition("=")
        if not eq or name not in AXES or not value.isdigit() or int(value) < 1:
            raise MeshError(
                f"--mesh {text!r}: expected comma-separated AXIS=SIZE with AXIS in {list(AXES)} "
                f"and SIZE a positive integer, e.g. data=2,fsdp=4; got {part!r}"
            )
        sizes[name] = int(value)
    product = math.prod(sizes.values())
    if product != n_devices:
        raise MeshError(
            f"--mesh {text!r}: the axis sizes multiply to {product}, but there are {n_devices} "
            f"devices ({jax.default_backend()}); the product must equal the device count"
        )
    return sizes


def make_mesh(sizes: dict[str, int]) -> Mesh:
    """A mesh with axes :data:`AXES` of the given sizes over all devices."""
    shape = tuple(sizes[a] for a in AXES)
    return Mesh(np.asarray(jax.devices()).reshape(shape), AXES)


def describe(mesh: Mesh) -> str:
    """``"data=2,fsdp=4,model=1 (8 cpu devices)"``."""
    axes = ",".join(f"{a}={mesh.shape[a]}" for a in AXES)
    plural = "s" if mesh.size > 1 else ""
    return f"{axes} ({mesh.size} {jax.default_backend()} device{plural})"


def _names(path: tuple) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def leaf_spec(path: tuple, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The partition spec of the parameter at ``path`` (see the module docstring)."""
    spec: list[Any] = [None] * len(shape)
    names = _names(path)
    layer = names[-2] if len(names) >= 2 else ""
    model = mesh.shape["model"]
    if model > 1 and names[-1] in ("kernel", "bias"):
        dim = None
        if layer in COLUMN_PARALLEL:
            dim = len(shape) - 1
        elif layer in ROW_PARALLEL and names[-1] == "kernel":
            dim = 0
        if dim is not None and shape[dim] % model == 0:
            spec[dim] = "model"
    fsdp = mesh.shape["fsdp"]
    free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % fsdp == 0]
    if fsdp > 1 and free:
        spec[max(free, key=lambda i: shape[i])] = "fsdp"
    return P(*spec)


def param_shardings(abstract_params: Any, mesh: Mesh) -> Any:
    """A ``NamedSharding`` per parameter leaf (``abstract_params``: arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, leaf_spec(path, x.shape, mesh)), abstract_params
    )


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """Batches split over ``data`` and ``fsdp`` (after ``leading`` unsplit dimensions)."""
    return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of ``tree`` (sharded arrays or ShapeDtypeStructs with shardings).

    The largest shard is counted (device 0 holds one of those), so uneven splits count high.
    """
    total = 0
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total
