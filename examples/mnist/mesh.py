"""Data-parallel and FSDP training of the MNIST MLP on a device mesh (``--mesh data=8``).

``--mesh`` names the mesh axes and their sizes, ``AXIS=SIZE`` separated by commas:

- ``data=N``: data parallel. The parameters are replicated; each step's batch is split
  over the ``N`` devices and XLA sums the gradients across them. With ``--zero1`` the
  optimizer state is partitioned over ``data`` (ZeRO-1: each device keeps ``1/N``).
- ``fsdp=N``: fully sharded. Each parameter is split over the ``N`` devices on its first
  dimension that ``N`` divides (the others stay whole); the batch is split as well.
- ``data=2,fsdp=4``: both; the batch is split over all ``2 x 4`` devices.

The optimizer state is born sharded like the parameters with
:func:`functional_adam.init_sharded`. On a CPU, simulate the devices::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/mnist_mlp.py --mesh data=8
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import functional_adam as fa

AXES = ("data", "fsdp")


class MeshError(ValueError):
    """A ``--mesh`` value that cannot be used; the message says why."""


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}``, in the order of :data:`AXES`.

    Example:
        >>> parse_mesh("fsdp=4,data=2")
        {'data': 2, 'fsdp': 4}
    """
    sizes: dict[str, int] = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        name = name.strip()
        if name not in AXES or not size.strip().isdigit() or int(size) < 1:
            raise MeshError(
                f"--mesh {text!r}: each part must be AXIS=SIZE with AXIS one of {list(AXES)} "
                f"and SIZE a positive integer (e.g. data=8 or data=2,fsdp=4), got {part!r}"
            )
        if name in sizes:
            raise MeshError(f"--mesh {text!r}: axis {name!r} is given twice")
        sizes[name] = int(size)
    return {axis: sizes[axis] for axis in AXES if axis in sizes}


def make_mesh(text: str) -> Mesh:
    """The mesh ``text`` asks for, on the first devices; an error says how to get more."""
    sizes = parse_mesh(text)
    needed = math.prod(sizes.values())
    if needed > jax.device_count():
        raise MeshError(
            f"--mesh {text} needs {needed} devices, JAX sees {jax.device_count()}; on a CPU "
            f"set XLA_FLAGS=--xla_force_host_platform_device_count={needed} before starting"
        )
    devices = np.array(jax.devices()[:needed]).reshape(tuple(sizes.values()))
    return Mesh(devices, tuple(sizes))


def batch_shards(mesh: Mesh) -> int:
    """Over how many devices each batch is split (all the mesh's axes)."""
    return math.prod(mesh.shape.values())


def param_spec(shape: tuple[int, ...], mesh: Mesh) -> P:
    """``fsdp`` on the first dimension its size divides; replicated otherwise (and for ``data``)."""
    size = mesh.shape.get("fsdp", 1)
    for dim, n in enumerate(shape):
        if size > 1 and n % size == 0:
            return P(*([None] * dim), "fsdp")
    return P()


def place_params(params: Any, mesh: Mesh) -> Any:
    """The parameters placed by :func:`param_spec`."""
    return jax.tree.map(
        lambda x: jax.device_put(x, NamedSharding(mesh, param_spec(x.shape, mesh))), params
    )


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` copied to every device of ``mesh`` (the data set, the RNG key)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def init_state(tx: fa.GradientTransformation, params: Any, zero1: bool) -> Any:
    """The optimizer state, born sharded (over ``data`` as well with ``zero1``)."""
    return fa.init_sharded(tx, params, zero1_axis="data" if zero1 else None)


def step_shardings(tx: fa.GradientTransformation, params: Any, mesh: Mesh, zero1: bool):
    """``(index sharding, out_shardings)`` of the step ``-> (params, opt_state, loss)``."""
    batch = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    state = fa.state_shardings(tx, params, zero1_axis="data" if zero1 else None)
    out = (jax.tree.map(lambda x: x.sharding, params), state, NamedSharding(mesh, P()))
    return batch, out


def synchronous(compiled: Callable, indices: jax.ShapeDtypeStruct) -> Callable:
    """``compiled`` that places its last argument (host indices) and waits for its result.

    On several simulated CPU devices, steps with collectives queued asynchronously can
    deadlock in XLA's rendezvous (JAX 0.10 on 2 cores: one device never joins and the run
    aborts after 40 s); one step at a time does not. Costs little next to a step's
    collectives on a CPU; on accelerators, drop it.
    """

    def call(*args):
        placed = jax.device_put(args[-1], indices.sharding)
        return jax.block_until_ready(compiled(*args[:-1], placed))

    return call


def check(text: str | None, zero1: bool, batch_size: int) -> str | None:
    """The reason a ``--mesh``/``--zero1``/``--batch-size`` combination cannot run, or ``None``."""
    if text is None:
        return "--zero1 needs --mesh with a data axis" if zero1 else None
    try:
        sizes = parse_mesh(text)
    except MeshError as e:
        return str(e)
    if zero1 and "data" not in sizes:
        return f"--zero1 needs a data axis in --mesh, got {text!r}"
    shards = math.prod(sizes.values())
    if batch_size % shards:
        return f"batch_size {batch_size} must be divisible by the {shards} devices of --mesh {text}"
    return None
