"""The MNIST MLP example end to end: accuracy, outputs, resume, Optax equivalence, CLI."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from mnist.checkpoint import CheckpointError
from mnist.train import Config, ConfigError, make_optimizer, optimizer_table, train

import functional_adam as fa

REPO_ROOT = Path(__file__).resolve().parents[1]


def leaves_equal(a, b) -> None:
    """Asserts two pytrees have the same structure and bit-identical leaves."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_one_epoch_on_mnist_reaches_90_percent_and_writes_outputs(mnist, tmp_path):
    config = Config(epochs=1, output_dir=str(tmp_path), progress=False)
    result = train(config, mnist, log=None)
    (row,) = result.history
    assert row["test_accuracy"] > 0.90
    assert row["step"] == 60000 // 64
    assert len(result.step_losses) == 60000 // 64
    assert result.step_losses[-100:].mean() < result.step_losses[:100].mean() / 3

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["optimizer"] == "adam"
    assert metrics["config"]["batch_size"] == 64
    assert metrics["epochs"][0]["test_accuracy"] == row["test_accuracy"]
    assert metrics["epochs"][0]["train_loss"] == pytest.approx(float(result.step_losses.mean()))
    assert metrics["compile_seconds"] > 0 and metrics["epochs"][0]["epoch_seconds"] > 0
    assert (tmp_path / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


SMALL = {"hidden": (32,), "train_subset": 1024, "test_subset": 256, "progress": False}


def test_resume_is_bit_identical_to_training_straight(mnist, tmp_path):
    straight = train(Config(epochs=2, checkpoint_dir=str(tmp_path / "a"), **SMALL), mnist, log=None)

    first = Config(epochs=1, checkpoint_dir=str(tmp_path / "b"), **SMALL)
    train(first, mnist, log=None)
    resumed = train(
        Config(epochs=2, checkpoint_dir=str(tmp_path / "b"), resume=True, **SMALL), mnist, log=None
    )

    leaves_equal(straight.params, resumed.params)
    leaves_equal(straight.opt_state, resumed.opt_state)
    assert int(resumed.opt_state[0].count) == 2 * (1024 // 64)
    # the resumed call ran only epoch 2, on the same shuffle as the straight run's epoch 2
    np.testing.assert_array_equal(resumed.step_losses, straight.step_losses[1024 // 64 :])
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert resumed.history[1]["train_loss"] == straight.history[1]["train_loss"]
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.name.isdigit()) == ["1", "2"]


def test_checkpoints_are_not_overwritten_or_mixed(mnist, tmp_path):
    directory = str(tmp_path / "c")
    train(Config(epochs=1, checkpoint_dir=directory, **SMALL), mnist, log=None)
    with pytest.raises(CheckpointError, match=r"already holds checkpoints.*--resume"):
        train(Config(epochs=2, checkpoint_dir=directory, **SMALL), mnist, log=None)
    other = Config(epochs=2, checkpoint_dir=directory, resume=True, learning_rate=1e-2, **SMALL)
    with pytest.raises(CheckpointError, match=r"learning_rate: checkpoint 0.001, now 0.01"):
        train(other, mnist, log=None)


def test_same_as_optax_adam_for_300_steps(mnist):
    """functional_adam's Adam on the XLA path and optax.adam, same init and batches, same
    jitted step: bitwise the same trajectory."""
    config = Config(epochs=1, train_subset=300 * 64, test_subset=1000, progress=False)
    xla_adam = fa.chain(fa.scale_by_adam(), fa.scale_by_learning_rate(1e-3))  # no CPU kernel
    ours = train(config, mnist, tx=xla_adam, log=None)
    theirs = train(config, mnist, tx=optax.adam(1e-3), log=None)
    assert len(ours.step_losses) == 300
    # Observed: bitwise equal under jit in float32 (the library's documented promise).
    np.testing.assert_array_equal(ours.step_losses, theirs.step_losses)
    leaves_equal(ours.params, theirs.params)
    leaves_equal(ours.opt_state[0].mu, theirs.opt_state[0].mu)
    leaves_equal(ours.opt_state[0].nu, theirs.opt_state[0].nu)
    assert int(ours.opt_state[0].count) == int(theirs.opt_state[0].count) == 300


def test_fused_kernel_trains_as_optax_does(mnist):
    """fa.adam in the example's step runs the CPU kernel, which equals the XLA path to an ulp
    per step; over 300 steps of training those last bits grow as any reordering of float
    math does, so the trajectories agree closely early and statistically later."""
    config = Config(epochs=1, train_subset=300 * 64, test_subset=1000, progress=False)
    ours = train(config, mnist, tx=fa.adam(1e-3), log=None)
    theirs = train(config, mnist, tx=optax.adam(1e-3), log=None)
    np.testing.assert_allclose(ours.step_losses[:5], theirs.step_losses[:5], rtol=1e-5)
    late_ours, late_theirs = np.mean(ours.step_losses[-100:]), np.mean(theirs.step_losses[-100:])
    assert abs(late_ours - late_theirs) < 0.02 * late_theirs, (late_ours, late_theirs)
    assert late_ours < 0.5 * np.mean(ours.step_losses[:10])  # and it did learn


def test_scan_loop_matches_step_loop(mnist):
    config = Config(epochs=1, **SMALL)
    step = train(config, mnist, log=None)
    scan = train(Config(epochs=1, loop="scan", **SMALL), mnist, log=None)
    np.testing.assert_allclose(scan.step_losses, step.step_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(scan.params), jax.tree.leaves(step.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bfloat16_params_stay_bfloat16_and_learn(mnist):
    result = train(Config(epochs=2, param_dtype="bfloat16", **SMALL), mnist, log=None)
    assert {leaf.dtype for leaf in jax.tree.leaves(result.params)} == {jnp.dtype(jnp.bfloat16)}
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.history[-1]["test_accuracy"] > 0.5


def test_optimizer_table_builds_every_entry():
    table = optimizer_table()
    assert {"adam", "adamw", "amsgrad", "nadam", "nadamw"} <= set(table)
    params = {"w": jnp.ones(3)}
    for name in table:
        tx = make_optimizer(Config(optimizer=name, learning_rate=1e-3))
        state = tx.init(params)
        for _ in range(2):  # ADOPT's first step only records the second moment
            updates, state = tx.update({"w": jnp.ones(3)}, state, params)
        assert jnp.all(updates["w"] < 0), name


def test_schedule_free_is_evaluated_at_its_average(mnist):
    """The reported accuracy is that of ``schedule_free_eval_params``, not of the iterate ``y``."""
    from mnist.train import evaluation_params

    config = Config(epochs=2, optimizer="schedule_free_adamw", learning_rate=2.5e-3, **SMALL)
    result = train(config, mnist, log=None)
    x = evaluation_params(result.opt_state, result.params)
    same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), x, result.params)
    assert not all(jax.tree.leaves(same))  # x differs from the trained y
    leaves_equal(x, fa.schedule_free_eval_params(result.opt_state, result.params))
    assert evaluation_params(fa.adam(1e-3).init(result.params), result.params) is result.params
    assert result.history[-1]["test_accuracy"] > 0.5


@pytest.mark.parametrize(
    ("field", "value"),
    [("epochs", 0), ("batch_size", -1), ("learning_rate", 0.0), ("optimizer", "sgd")],
)
def test_bad_config_names_the_field(mnist, field, value):
    with pytest.raises(ConfigError, match=field):
        train(Config(**{**SMALL, field: value}), mnist, log=None)


def test_batch_larger_than_data_names_it(mnist):
    with pytest.raises(ConfigError, match="batch_size 2048 exceeds the 1024"):
        train(Config(batch_size=2048, **SMALL), mnist, log=None)


def run_cli(*args):
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "mnist_mlp.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )


def test_cli_help():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    for flag in [
        "--epochs",
        "--batch-size",
        "--learning-rate",
        "--optimizer",
        "--seed",
        "--data-dir",
        "--checkpoint-dir",
        "--resume",
        "--output-dir",
        "--param-dtype",
    ]:
        assert flag in proc.stdout
    assert "adamw" in proc.stdout and "bfloat16" in proc.stdout


def test_cli_rejects_bad_values_by_name():
    proc = run_cli("--epochs", "0")
    assert proc.returncode == 2
    assert "--epochs" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("--optimizer", "sgd")
    assert proc.returncode == 2 and "--optimizer" in proc.stderr


def test_cli_trains_writes_outputs_and_resumes(mnist_dir, tmp_path, capsys):
    import mnist_mlp

    out = tmp_path / "run"
    argv = ["--data-dir", str(mnist_dir), "--output-dir", str(out), "--no-progress"]
    argv += ["--hidden", "16", "--train-subset", "512", "--test-subset", "256"]
    assert mnist_mlp.main([*argv, "--epochs", "1"]) == 0
    assert json.loads((out / "metrics.json").read_text())["epochs"][0]["epoch"] == 1
    assert (out / "training.png").is_file() and (out / "checkpoints" / "1").is_dir()
    assert "epoch  1/1" in capsys.readouterr().out

    assert mnist_mlp.main([*argv, "--epochs", "2"]) == 2  # would overwrite: refused
    assert "--resume" in capsys.readouterr().err

    assert mnist_mlp.main([*argv, "--epochs", "2", "--resume"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["epochs"]] == [1, 2]
    assert metrics["config"]["resume"] is True


def test_cli_output_dir_that_cannot_be_created_is_named(mnist_dir, tmp_path, capsys):
    import mnist_mlp

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    argv = ["--data-dir", str(mnist_dir), "--output-dir", str(blocker / "run"), "--no-progress"]
    assert mnist_mlp.main(argv) == 2
    err = capsys.readouterr().err
    assert "--output-dir" in err and str(blocker / "run") in err and "Traceback" not in err
