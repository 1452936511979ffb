"""Two processes on localhost (jax.distributed, gloo CPU collectives) train as one process does."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from tests import multiprocess_train

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path) -> list[str]:
    """Runs the two processes; returns their outputs. Kills both if either fails or hangs."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.multiprocess_train", coordinator, str(i), "2", str(out)],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
            assert proc.returncode == 0, f"process exited with {proc.returncode}:\n{outputs[-1]}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return outputs


def test_two_processes_train_as_one(tmp_path):
    out = tmp_path / "params.npz"
    _launch(out)
    saved = np.load(out)

    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    params, losses = multiprocess_train.train(mesh)
    flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert sorted(saved.files) == sorted([*flat, "losses"])
    assert losses[-1] < losses[0] / 2  # it trained
    # The batch mean is summed per device, then across devices: float32 rounding apart.
    np.testing.assert_allclose(saved["losses"], losses, rtol=2e-6)
    for key, value in flat.items():
        np.testing.assert_allclose(saved[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
