"""The MNIST example on a mesh of 8 simulated CPU devices trains as one device does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from jax.sharding import PartitionSpec as P
from mnist.mesh import MeshError, param_spec, parse_mesh
from mnist.train import Config, ConfigError, train

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN = {"epochs": 1, "hidden": (64,), "train_subset": 8192, "test_subset": 2000, "progress": False}

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, "examples")
    import jax
    from mnist.data import load_mnist
    from mnist.train import Config, train
    data = load_mnist(sys.argv[1], download_missing=False, progress=False)
    out = {}
    for mesh, zero1 in [("data=8", True), ("fsdp=8", False)]:
        result = train(Config(mesh=mesh, zero1=zero1, **json.loads(sys.argv[2])), data, log=None)
        mu = result.opt_state[0].mu["dense0"]["kernel"]
        out[mesh] = {
            "accuracy": result.history[-1]["test_accuracy"],
            "loss": result.history[-1]["train_loss"],
            "kernel": str(result.params["dense0"]["kernel"].sharding.spec),
            "mu": str(mu.sharding.spec),
            "devices": len(mu.sharding.device_set),
        }
    print(json.dumps(out))
""")


def test_data_parallel_and_fsdp_train_as_one_device(mnist, mnist_dir):
    single = train(Config(**RUN), mnist, log=None).history[-1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(mnist_dir), json.dumps(RUN)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    runs = json.loads(out.stdout.strip().splitlines()[-1])
    # data parallel: parameters replicated, moments partitioned over data (ZeRO-1)
    assert runs["data=8"]["kernel"] == "P()" and runs["data=8"]["mu"] == "P('data',)"
    # FSDP: the 784 x 64 kernel split over its rows, its moments alike
    assert runs["fsdp=8"]["kernel"] == runs["fsdp=8"]["mu"] == "P('fsdp',)"
    for run in runs.values():
        assert run["devices"] == 8
        # same batches, same initialisation: the sums over the batch are split across
        # devices, so the runs agree to float32 rounding, not bitwise
        assert run["accuracy"] == pytest.approx(single["test_accuracy"], abs=0.005)
        assert run["loss"] == pytest.approx(single["train_loss"], rel=0.01)
    assert single["test_accuracy"] > 0.8


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (Config(mesh="model=8"), r"AXIS one of \['data', 'fsdp'\]"),
        (Config(mesh="data=8,data=2"), "axis 'data' is given twice"),
        (Config(zero1=True), "--zero1 needs --mesh"),
        (Config(mesh="fsdp=8", zero1=True), "--zero1 needs a data axis"),
        (Config(mesh="data=3"), "batch_size 64 must be divisible by the 3 devices"),
    ],
)
def test_bad_mesh_is_named(config, message):
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_mesh_larger_than_the_devices_says_how_to_get_more(mnist):
    with pytest.raises(ConfigError, match="xla_force_host_platform_device_count=8"):
        train(Config(mesh="data=8", **RUN), mnist, log=None)


def test_mesh_parsing_and_fsdp_layout():
    assert parse_mesh("fsdp=4, data=2") == {"data": 2, "fsdp": 4}
    with pytest.raises(MeshError, match="SIZE a positive integer"):
        parse_mesh("data=0")

    class FakeMesh:
        shape = {"fsdp": 8}  # noqa: RUF012

    assert param_spec((784, 64), FakeMesh) == P("fsdp")
    assert param_spec((10, 64), FakeMesh) == P(None, "fsdp")
    assert param_spec((10,), FakeMesh) == P()
