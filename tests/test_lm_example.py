"""The language-model example (examples/lm) on 8 simulated CPU devices, each in a subprocess.

XLA_FLAGS must be set before jax is imported, so every test that needs the 8 devices runs
Python in a subprocess; the rest of the suite keeps one device.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from examples.lm import data as D

REPO_ROOT = Path(__file__).resolve().parents[1]
EIGHT = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
SMALL = ["--layers", "1", "--d-model", "64", "--heads", "2", "--context", "64"]


def run_python(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=EIGHT,
        timeout=timeout,
    )
    return proc


def test_trains_on_8_devices_fsdp_zero1_and_loss_falls(tmp_path):
    out = tmp_path / "run"
    argv = ["-m", "examples.lm.train", *SMALL, "--mesh", "data=2,fsdp=4", "--zero1"]
    argv += ["--steps", "40", "--batch-size", "16", "--warmup-steps", "5", "--eval-every", "20"]
    argv += ["--eval-batches", "2", "--sample-tokens", "16", "--prompt", "import "]
    argv += ["--output-dir", str(out), "--no-progress"]
    proc = run_python(*argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stdout = proc.stdout
    assert "train tokens" in stdout and "validation tokens" in stdout  # what it read
    assert "data=2,fsdp=4,model=1 (8 cpu devices), ZeRO-1" in stdout
    assert "sample (temperature 0.8):\nimport " in stdout

    metrics = json.loads((out / "metrics.json").read_text())
    losses = np.asarray(metrics["train_loss"])
    assert len(losses) == 40 and np.isfinite(losses).all()
    assert losses[:3].mean() > math.log(256) - 0.5  # starts near uniform over bytes
    assert losses[-5:].mean() < losses[:5].mean() - 1.0, losses
    evals = metrics["evals"]
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[1]["val_loss"] < evals[0]["val_loss"]
    assert evals[1]["val_perplexity"] == math.exp(evals[1]["val_loss"])

    # FSDP over 4 and ZeRO-1 over 2: each device stores 1/4 of the float32 parameters and
    # 1/8 of the two float32 moments (+ scalar counters, replicated).
    n = metrics["parameters"]
    memory = metrics["memory"]
    assert memory["params_bytes_per_device"] == 4 * n / 4
    assert 2 * 4 * n / 8 <= memory["opt_state_bytes_per_device"] <= 2 * 4 * n / 8 + 64
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoints" / "40").is_dir()


RESUME_SCRIPT = textwrap.dedent("""
    import dataclasses, json, sys
    import jax, numpy as np
    from examples.lm.config import resolve
    from examples.lm.loop import train

    directory, data, cache = sys.argv[1], sys.argv[2], sys.argv[3]
    # The two runs on data=2,fsdp=4 compile the same programs: the second reads them back.
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    base = dict(layers=1, d_model=64, heads=2, context=32, steps=10, batch_size=8,
                warmup_steps=2, eval_every=5, eval_batches=2, checkpoint_every=5,
                sample_tokens=0, progress=False, data=data)
    # 5 steps on data=8, checkpoint at step 5.
    a = train(resolve("tiny", mesh="data=8", until=5, checkpoint_dir=directory, **base), log=None)
    on_b = resolve("tiny", mesh="data=2,fsdp=4", **base)
    # Reference: the step-5 state moved in memory onto data=2,fsdp=4 (no Orbax), steps 6-10.
    ref = train(dataclasses.replace(on_b, checkpoint_dir=None), log=None, initial=a.state)
    # Resumed: a new run on data=2,fsdp=4 restores step 5 from disk, steps 6-10.
    res = train(dataclasses.replace(on_b, checkpoint_dir=directory, resume=True), log=None)

    def same(x, y):
        lx, ly = jax.tree.leaves(x), jax.tree.leaves(y)
        return jax.tree.structure(x) == jax.tree.structure(y) and all(
            u.dtype == v.dtype and np.array_equal(np.asarray(u), np.asarray(v))
            for u, v in zip(lx, ly, strict=True))

    print(json.dumps({
        "a_step": a.state.step, "ref_step": ref.state.step, "res_step": res.state.step,
        "a_losses": a.state.losses, "ref_losses": ref.state.losses,
        "res_losses": res.state.losses,
        "ref_evals": [{k: e[k] for k in ("step", "val_loss")} for e in ref.state.evals],
        "res_evals": [{k: e[k] for k in ("step", "val_loss")} for e in res.state.evals],
        "params_equal": same(ref.state.params, res.state.params),
        "opt_state_equal": same(ref.state.opt_state, res.state.opt_state),
        "moved": not same(a.state.params, res.state.params),
        "a_specs": sorted({str(x.sharding.spec) for x in jax.tree.leaves(a.state.params)}),
        "res_specs": sorted({str(x.sharding.spec) for x in jax.tree.leaves(res.state.params)}),
        "count": int(res.state.opt_state[1][0].count),
    }))
""")


def test_resume_on_another_mesh_is_bit_identical_to_continuing_there(tmp_path):
    """Checkpoint at step 5 written on data=8; a run on data=2,fsdp=4 restores it and trains
    to step 10. The reference starts from the same step-5 state, moved onto data=2,fsdp=4 in
    memory, and trains to step 10 on that mesh without an interruption."""
    data = str(D.stdlib_root() / "json")
    proc = run_python("-c", RESUME_SCRIPT, str(tmp_path / "ckpt"), data, str(tmp_path / "xla"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (r["a_step"], r["ref_step"], r["res_step"]) == (5, 10, 10)
    assert r["count"] == 10
    assert r["res_losses"] == r["ref_losses"]  # bitwise: floats from float32 values
    assert r["res_losses"][:5] == r["a_losses"]
    assert len(set(r["res_losses"][5:])) == 5
    assert r["res_evals"] == r["ref_evals"] and [e["step"] for e in r["res_evals"]] == [5, 10]
    assert r["params_equal"] and r["opt_state_equal"] and r["moved"]
    assert all("fsdp" not in s for s in r["a_specs"])
    assert any("fsdp" in s for s in r["res_specs"])  # restored with the new mesh's shardings


BAD_FLAGS_SCRIPT = textwrap.dedent("""
    import contextlib, io, json, sys
    from examples.lm.train import main

    cases = json.loads(sys.argv[1])
    results = {}
    for name, argv in cases.items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                rc = main(argv + ["--no-progress", "--checkpoint-dir", "", "--output-dir", ""])
            except SystemExit as e:
                rc = e.code
        results[name] = [rc, err.getvalue()]
    print(json.dumps(results))
""")


def test_bad_flags_stop_with_a_message_naming_the_flag(tmp_path):
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    missing = tmp_path / "no-such-file.txt"
    cases = {
        "mesh": ["--mesh", "data=2,fsdp=2"],
        "mesh_axis": ["--mesh", "data=4,pipe=2"],
        "seq_len": ["--seq-len", "256"],
        "missing": ["--data", str(missing)],
        "binary": ["--data", str(binary)],
        "batch": ["--batch-size", "12", "--mesh", "data=8"],
        "moments": ["--optimizer", "torch_adamw", "--moments", "8bit"],
        "heads": ["--d-model", "100", "--heads", "3"],
        "master": ["--master-weights"],
    }
    proc = run_python("-c", BAD_FLAGS_SCRIPT, json.dumps(cases), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {
        "mesh": ["--mesh 'data=2,fsdp=2'", "multiply to 4", "8 devices"],
        "mesh_axis": ["--mesh 'data=4,pipe=2'", "'pipe=2'"],
        "seq_len": ["--seq-len 256", "--context 128"],
        "missing": ["--data", str(missing), "no such file"],
        "binary": ["--data", str(binary), "no text"],
        "batch": ["--batch-size 12", "not divisible by 8"],
        "moments": ["--moments 8bit", "torch_adamw"],
        "heads": ["--d-model 100", "--heads 3"],
        "master": ["--master-weights", "--param-dtype bfloat16"],
    }
    for name, parts in expected.items():
        rc, err = r[name]
        assert rc == 2, (name, err)
        assert "Traceback" not in err, (name, err)
        for part in parts:
            assert part in err, (name, part, err)


def test_split_is_by_file_deterministic_and_batches_depend_on_seed_and_step_only(tmp_path):
    for i in range(40):
        (tmp_path / f"f{i:02d}.txt").write_text(f"file {i}\n" * 50)
    a = D.load_corpus(str(tmp_path), val_fraction=0.2)
    b = D.load_corpus(str(tmp_path), val_fraction=0.2)
    assert a.train_files + a.val_files == 40 and 0 < a.val_files < 40
    np.testing.assert_array_equal(a.train, b.train)
    val_names = {f"f{i:02d}.txt" for i in range(40) if D.is_validation(f"f{i:02d}.txt", 0.2)}
    assert len(val_names) == a.val_files
    for name in val_names:  # a validation file's text is not in the training bytes
        needle = np.frombuffer((tmp_path / name).read_bytes()[:16], np.uint8)
        windows = np.lib.stride_tricks.sliding_window_view(a.train, len(needle))
        assert not (windows == needle).all(axis=1).any(), name
    x = D.train_batch(a.train, 4, 16, seed=1, step=7)
    np.testing.assert_array_equal(x, D.train_batch(a.train, 4, 16, seed=1, step=7))
    assert not np.array_equal(x, D.train_batch(a.train, 4, 16, seed=1, step=8))
    single = tmp_path / "one.txt"
    single.write_text("abcdefghij" * 100)
    c = D.load_corpus(str(single), val_fraction=0.1)
    assert (len(c.train), len(c.val)) == (900, 100) and "split by position" in c.source


SHARDING_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import functional_adam as fa
    from functional_adam import init_sharded, state_shardings

    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("data", "fsdp"))

    def params(dtype):
        def place(shape, spec):
            x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape) / 1e4
            return jax.device_put(x.astype(dtype), NamedSharding(mesh, spec))
        return {"w": place((128, 64), P(None, "fsdp")), "b": place((32,), P("fsdp")),
                "big": place((8192,), P())}

    def norm(spec):  # trailing None entries do not change a sharding
        entries = list(spec)
        while entries and entries[-1] is None:
            entries.pop()
        return str(P(*entries))

    def specs(tree):
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(k): norm(getattr(v, "sharding", v).spec) for k, v in flat}

    clip_adamw = fa.chain(optax.clip_by_global_norm(1.0), fa.adamw(1e-3))
    out = {
        "adamw": specs(state_shardings(clip_adamw, params(jnp.float32))),
        "adamw_zero1": specs(state_shardings(clip_adamw, params(jnp.float32), zero1_axis="data")),
        "8bit": specs(state_shardings(fa.adam_8bit(1e-3), params(jnp.float32))),
        "8bit_zero1": specs(
            state_shardings(fa.adam_8bit(1e-3), params(jnp.float32), zero1_axis="data")),
        "master": specs(state_shardings(
            fa.with_master_weights(fa.adam(1e-3)), params(jnp.bfloat16), zero1_axis="data")),
    }
    born = init_sharded(fa.adam_8bit(1e-3), params(jnp.float32), zero1_axis="data")
    out["born"] = specs(born)
    out["born_zero"] = jax.tree.all(jax.tree.map(lambda x: not np.asarray(x).any(), born))
    print(json.dumps(out))
""")


def test_state_shardings_follow_the_parameters_and_zero1_adds_the_data_axis():
    proc = run_python("-c", SHARDING_SCRIPT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    adam = "[1][0]"  # fa.chain(clip, adamw): adamw's own chain, then ScaleByAdamState
    assert r["adamw"][f"{adam}.count"] == "P()"
    assert r["adamw"][f"{adam}.mu['w']"] == "P(None, 'fsdp')"
    assert r["adamw"][f"{adam}.nu['b']"] == "P('fsdp',)"
    assert r["adamw"][f"{adam}.mu['big']"] == "P()"
    # ZeRO-1: the data axis on the first dimension it (with what is there) divides.
    assert r["adamw_zero1"][f"{adam}.mu['w']"] == "P('data', 'fsdp')"
    assert r["adamw_zero1"][f"{adam}.nu['b']"] == "P(('fsdp', 'data'),)"
    assert r["adamw_zero1"][f"{adam}.mu['big']"] == "P('data',)"
    assert r["adamw_zero1"][f"{adam}.count"] == "P()"
    # 8-bit: 'w' (128·64 elements) is split over fsdp on its columns: each shard's 128 x 16
    # elements are 8 blocks of its own, codes (1, 4, 8, 256) sharded like the parameter
    # (with ZeRO-1, blocked per shard of P('data', 'fsdp'), as its float32 moments would be);
    # 'big' (32 blocks) is replicated like its parameter, per shard of P('data') with ZeRO-1;
    # 'b' (32 elements, under min_8bit_size) keeps float32 moments.
    assert r["8bit"]["[0].mu['w'].codes"] == "P(None, 'fsdp')"
    assert r["8bit"]["[0].mu['w'].scale"] == "P(None, 'fsdp')"
    assert r["8bit"]["[0].nu['big'].codes"] == "P()"
    assert r["8bit"]["[0].mu['b']"] == "P('fsdp',)"
    assert r["8bit_zero1"]["[0].mu['w'].codes"] == "P('data', 'fsdp')"
    assert r["8bit_zero1"]["[0].nu['big'].codes"] == "P('data',)"
    # The float32 master copy of bfloat16 parameters is sharded like a moment.
    assert r["master"][".master['w']"] == "P('data', 'fsdp')"
    assert r["master"][".inner_state[0].mu['w']"] == "P('data', 'fsdp')"
    # Born sharded, with tx.init's values (zero codes, scales and count).
    assert r["born"] == r["8bit_zero1"] and r["born_zero"]


def test_docstring_examples_of_the_example_run():
    import doctest

    from examples.lm import config, data, mesh

    for module in (config, data, mesh):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__
