"""Data-parallel AdamW with ZeRO-1 on a small MLP: one process of a multi-process run.

``tests/test_sharding_multiprocess.py`` starts two of these on localhost (4 simulated
CPU devices each, ``XLA_FLAGS`` set by the caller) and compares the result with
:func:`train` run in its own single-device process::

    python -m tests.multiprocess_train 127.0.0.1:PORT PROCESS_ID NUM_PROCESSES OUT.npz
"""

from __future__ import annotations

import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import functional_adam as fa

STEPS = 20
BATCH = 32
WIDTHS = (16, 64, 8)


def init_params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(WIDTHS)):
        params[f"dense{i}"] = {
            "kernel": np.asarray(rng.normal(size=(a, b)) / np.sqrt(a), np.float32),
            "bias": np.zeros(b, np.float32),
        }
    return params


def batches(seed: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """The global batches: a fixed random regression task."""
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(WIDTHS[0], WIDTHS[-1])).astype(np.float32)
    out = []
    for _ in range(STEPS):
        x = rng.normal(size=(BATCH, WIDTHS[0])).astype(np.float32)
        out.append((x, np.tanh(x @ teacher)))
    return out


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    h = x
    for i in range(len(WIDTHS) - 1):
        layer = params[f"dense{i}"]
        h = h @ layer["kernel"] + layer["bias"]
        if i < len(WIDTHS) - 2:
            h = jax.nn.relu(h)
    return jnp.mean((h - y) ** 2)


def train(mesh: jax.sharding.Mesh) -> tuple[dict, np.ndarray]:
    """Trains on ``mesh`` (axis ``"data"``); returns the final parameters and losses on the host."""
    tx = fa.adamw(1e-2, weight_decay=0.1)
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    params = jax.device_put(init_params(), replicated)
    state = fa.init_sharded(tx, params, zero1_axis="data")
    out_shardings = (
        jax.tree.map(lambda x: x.sharding, params),
        fa.state_shardings(tx, params, zero1_axis="data"),
        replicated,
    )

    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        params, state = fa.update_and_apply(tx, grads, state, params)
        return params, state, loss

    step = jax.jit(step, donate_argnums=(0, 1), out_shardings=out_shardings)
    rows = slice(
        jax.process_index() * BATCH // jax.process_count(),
        (jax.process_index() + 1) * BATCH // jax.process_count(),
    )
    losses = []
    for x, y in batches():
        x = jax.make_array_from_process_local_data(batch_sharding, x[rows])
        y = jax.make_array_from_process_local_data(batch_sharding, y[rows])
        params, state, loss = jax.block_until_ready(step(params, state, x, y))
        losses.append(loss)
    host = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), params)
    return host, np.array([np.asarray(loss.addressable_data(0)) for loss in losses])


def main(argv: list[str]) -> int:
    coordinator, process_id, num_processes, out = argv
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=int(num_processes),
        process_id=int(process_id),
        initialization_timeout=60,
    )
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    params, losses = train(mesh)
    if jax.process_index() == 0:
        flat = {
            jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
        }
        np.savez(out, losses=losses, **flat)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
