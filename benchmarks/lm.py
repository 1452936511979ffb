"""The language-model example (examples/lm) on the CPU: functional_adam against optax.adamw.

Prints three Markdown tables (recorded in BENCHMARKS.md, section "Language model"):

1. **Speed**, one CPU device, for the ``tiny`` and ``medium`` shapes: for optax.adamw and
   functional_adam's adamw as ``update`` + ``apply_updates`` (XLA, per leaf), as
   ``fa.update_and_apply`` (the fused CPU kernel) and on ``fa.FlatParams``: the compile
   time of the whole training step, its median time and tokens/s, the median time of the
   optimizer step alone (same parameters, fixed gradients, donated) and its share of the
   training step. Variants run in interleaved rounds, so all see the same machine load.
2. **Memory per device**, 8 simulated CPU devices (a subprocess with
   ``XLA_FLAGS=--xla_force_host_platform_device_count=8``): bytes of parameters + optimizer
   state on one device for each layout, from the shardings (nothing allocated; GPT-2 small
   included), and for ``tiny`` the argument and temporary bytes that
   ``compiled.memory_analysis()`` reports for the compiled step.
3. **Quality**, one device: validation loss after a fixed token budget for the example's
   optimizer (``fa.chain(optax.clip_by_global_norm, fa.adamw)``) and the same chain in
   Optax (``optax.chain(clip, optax.adamw)``), same model, data, schedule and batches;
   and the example's optimizer with bfloat16 and with 8-bit moments.

Usage:
    python benchmarks/lm.py                       # all three (about 10 minutes on 2 cores)
    python benchmarks/lm.py --rounds 3 --budget-steps 100 --skip medium   # quick
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import functional_adam as fa  # noqa: E402
from benchmarks.memory import machine  # noqa: E402
from examples.lm import loop as L  # noqa: E402
from examples.lm import mesh as mesh_lib  # noqa: E402
from examples.lm import model as M  # noqa: E402
from examples.lm import optim  # noqa: E402
from examples.lm.config import resolve  # noqa: E402

SHAPES = {
    "tiny": dict(preset="tiny", batch_size=16, seq_len=128),
    "medium": dict(preset="medium", batch_size=8, seq_len=256),
}
LR = optim.schedule(2e-3, 1000, 100, 0.1)


def variants() -> dict[str, tuple]:
    """name -> (tx, flat, fused): the optimizers of the speed table."""
    o = optax.adamw(LR, weight_decay=0.1, mask=optim.decay_mask)
    f = fa.adamw(LR, weight_decay=0.1, mask=optim.decay_mask)
    return {
        "optax.adamw": (o, False, False),
        "fa.adamw, update + apply_updates": (f, False, False),
        "fa.adamw, update_and_apply (fused)": (f, False, True),
        "fa.adamw, FlatParams + update_and_apply": (f, True, True),
    }


def _apply(tx, fused):
    def opt(params, state, grads):
        if fused:
            return fa.update_and_apply(tx, grads, state, params)
        updates, state = tx.update(grads, state, params)
        return fa.apply_updates(params, updates), state

    return opt


def _compiled(name, tx, flat, fused, gdef, params, batch):
    """The training step and the optimizer step, compiled; the compile time of the first."""
    opt = _apply(tx, fused)
    if flat:
        params = fa.FlatParams.of(params, groups=optim.decay_group)

    def step(params, state, batch):
        loss, grads = jax.value_and_grad(functools.partial(M.loss, gdef))(params, batch)
        return (*opt(params, state, grads), loss)

    state = tx.init(params)
    t0 = time.perf_counter()
    train = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, batch).compile()
    seconds = time.perf_counter() - t0
    only = jax.jit(opt, donate_argnums=(0, 1)).lower(params, state, params).compile()
    grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)
    return {"train": train, "opt": only, "compile": seconds, "live": [params, state], "g": grads}


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def speed_table(shape: str, rounds: int) -> None:
    config = resolve(**SHAPES[shape])
    gdef = M.graphdef(config.model)
    params = jax.jit(M.init_fn(config.model, 0))()
    rng = np.random.default_rng(0)
    batch = jnp.asarray(rng.integers(0, 256, (config.batch_size, config.seq_len + 1), np.uint8))
    runs = {}
    for name, (tx, flat, fused) in variants().items():
        runs[name] = _compiled(name, tx, flat, fused, gdef, _copy(params), batch)
    times = {name: {"train": [], "opt": []} for name in runs}
    for i in range(rounds + 1):  # round 0 warms up: not timed
        for name, r in runs.items():
            for kind in ("train", "opt"):
                arg = batch if kind == "train" else r["g"]
                t0 = time.perf_counter()
                out = r[kind](*r["live"], arg)
                jax.block_until_ready(out)
                if i:
                    times[name][kind].append(time.perf_counter() - t0)
                r["live"] = list(out[:2])
    n = config.model.num_params()
    tokens = config.batch_size * config.seq_len
    leaves = len(jax.tree.leaves(params))
    print(
        f"\n### Speed, `{shape}` ({n:,} parameters, {leaves} leaves, batch "
        f"{config.batch_size} x {config.seq_len} tokens; median of {rounds} rounds)\n"
    )
    print("| optimizer | compile s | step ms | tokens/s | optimizer ms | optimizer share |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in runs.items():
        step, opt = (1e3 * float(np.median(times[name][k])) for k in ("train", "opt"))
        print(
            f"| {name} | {r['compile']:.2f} | {step:.1f} | {tokens / step * 1e3:,.0f} | "
            f"{opt:.2f} | {opt / step:.1%} |"
        )


LAYOUTS = {
    "replicated (`data=8`)": dict(mesh="data=8"),
    "ZeRO-1 (`data=8 --zero1`)": dict(mesh="data=8", zero1=True),
    "FSDP (`fsdp=8`)": dict(mesh="fsdp=8"),
    "FSDP + ZeRO-1 (`data=2,fsdp=4 --zero1`)": dict(mesh="data=2,fsdp=4", zero1=True),
    "FSDP, bf16 moments": dict(mesh="fsdp=8", moments="bfloat16"),
    "FSDP, 8-bit moments": dict(mesh="fsdp=8", moments="8bit"),
    "FSDP, bf16 params, fp32 moments": dict(mesh="fsdp=8", param_dtype="bfloat16"),
    "FSDP, bf16 params + master weights": dict(
        mesh="fsdp=8", param_dtype="bfloat16", master_weights=True
    ),
}


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f}"


def memory_table() -> None:
    """Runs under 8 simulated devices: bytes per device of params and optimizer state."""
    presets = ("tiny", "medium", "gpt2-small")
    print(
        f"\n### Memory per device, MiB of params + optimizer state ({jax.device_count()} "
        "simulated CPU devices, adamw; from the shardings)\n"
    )
    print("| layout | " + " | ".join(presets) + " | `tiny` step: arguments / temp (XLA) |")
    print("| --- |" + " ---: |" * (len(presets) + 1))
    for name, fields in LAYOUTS.items():
        cells = []
        for preset in presets:
            config = resolve(preset, batch_size=8, **fields)
            mesh = L.make_mesh(config)
            _, target, _, _ = L.layout(config, mesh, L.make_tx(config))
            p = mesh_lib.bytes_per_device(target["params"])
            s = mesh_lib.bytes_per_device(target["opt_state"])
            cells.append(f"{_mib(p)} + {_mib(s)}")
        cells.append(_compiled_memory(resolve("tiny", batch_size=8, **fields)))
        print(f"| {name} | " + " | ".join(cells) + " |")


def _compiled_memory(config) -> str:
    mesh = L.make_mesh(config)
    tx = L.make_tx(config)
    _, target, param_sh, state_sh = L.layout(config, mesh, tx)
    batch_sh = mesh_lib.batch_sharding(mesh)
    batch = jax.ShapeDtypeStruct((8, config.seq_len + 1), jnp.uint8, sharding=batch_sh)
    step = jax.jit(
        L.make_step(M.graphdef(config.model), tx),
        in_shardings=(param_sh, state_sh, batch_sh),
        out_shardings=(param_sh, state_sh, mesh_lib.replicated(mesh)),
        donate_argnums=(0, 1),
    )
    m = step.lower(target["params"], target["opt_state"], batch).compile().memory_analysis()
    return f"{_mib(m.argument_size_in_bytes)} / {_mib(m.temp_size_in_bytes)}"


def quality_table(steps: int) -> None:
    base = dict(steps=steps, warmup_steps=steps // 10, eval_every=steps, eval_batches=16)
    config = resolve("tiny", **base, sample_tokens=0, progress=False)
    schedule = optim.schedule(config.learning_rate, steps, config.warmup_steps, 0.1)
    theirs = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, weight_decay=0.1, mask=optim.decay_mask),
    )
    results = {
        "fa.chain(optax.clip_by_global_norm, fa.adamw)": L.train(config, log=None),
        "optax.chain(optax.clip_by_global_norm, optax.adamw)": L.train(config, log=None, tx=theirs),
    }
    for moments in ("bfloat16", "8bit"):
        name = f"fa.chain(..., fa.adamw), `--moments {moments}`"
        results[name] = L.train(dataclasses.replace(config, moments=moments), log=None)
    tokens = steps * config.batch_size * config.seq_len
    print(f"\n### Validation loss after {tokens:,} tokens (`tiny`, {steps} steps, 1 device)\n")
    print("| optimizer | val loss (nats/byte) | val perplexity | final train loss | tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        e = r.state.evals[-1]
        print(
            f"| {name} | {e['val_loss']:.4f} | {e['val_perplexity']:.3f} | "
            f"{r.state.losses[-1]:.4f} | {r.tokens_per_second:,.0f} |"
        )
    a, b = (r.state.losses for r in list(results.values())[:2])
    print(f"\nfa and optax per-step training losses bitwise equal over {steps} steps: {a == b}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7, help="timing rounds (7)")
    p.add_argument("--budget-steps", type=int, default=300, help="quality table steps (300)")
    p.add_argument("--skip", nargs="*", default=[], help="tiny, medium, memory, quality")
    p.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_only:
        memory_table()
        return 0
    print(machine())
    for shape in SHAPES:
        if shape not in args.skip:
            speed_table(shape, args.rounds)
    if "memory" not in args.skip:
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
        out = subprocess.run(
            [sys.executable, __file__, "--memory-only"], env=env, capture_output=True, text=True
        )
        print(out.stdout, end="")
        if out.returncode:
            print(out.stderr[-2000:])
    if "quality" not in args.skip:
        quality_table(args.budget_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
