"""Memory-lean Adam: state bytes per parameter, 8-bit step time, and 8-bit trajectory quality.

Prints three Markdown tables (the numbers recorded in BENCHMARKS.md, section
"Memory: moment dtypes and 8-bit Adam"):

1. optimizer-state bytes per parameter of ``adam`` with float32 and bfloat16
   moments and of ``adam_8bit`` (from ``jax.eval_shape``, nothing allocated);
2. the time of one jitted, donated ``update`` + ``apply_updates`` step on one
   leaf of ``--size`` float32 parameters, rounds interleaved so all variants see
   the same machine load (median over ``--repeats``), with two reference rows:
   the streaming time of ``a += b`` on the same number of float32 elements and
   the cost of a fresh (not donated) float32 output of that size;
3. the relative distance ``|W - W_fp32| / |W_fp32 - W_0|`` after ``--steps``
   Adam steps on a least-squares problem (W: 64×128), and the final losses.

Usage:
    python benchmarks/memory.py                 # 1e7 parameters, 1,000 steps
    python benchmarks/memory.py --size 1000000 --repeats 5 --steps 200   # quick
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import functional_adam as fa


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return (
        f"{os.cpu_count()} cores, {cpu}; Python {platform.python_version()}, jax {jax.__version__}, "
        f"jaxlib {jax.lib.__version__ if hasattr(jax.lib, '__version__') else '?'}, "
        f"optax {optax.__version__}, numpy {np.__version__}, device {jax.devices()[0].platform}"
    )


def state_bytes(tx: fa.GradientTransformation, n: int) -> float:
    abstract = jax.eval_shape(tx.init, jax.ShapeDtypeStruct((n,), jnp.float32))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract)) / n


def optimizers(lr: float = 1e-3) -> dict[str, fa.GradientTransformation]:
    return {
        "adam, float32 moments": fa.adam(lr),
        "adam, bfloat16 moments": fa.adam(lr, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
        "adam_8bit, block_size=256": fa.adam_8bit(lr, block_size=256),
        "adam_8bit, block_size=2048": fa.adam_8bit(lr, block_size=2048),
    }


def table_bytes(n: int) -> None:
    print(f"\n### Optimizer state, bytes per parameter ({n:,} float32 parameters, one leaf)\n")
    print("| optimizer | bytes / param | target |")
    print("| --- | ---: | ---: |")
    targets = {"float32": "8", "bfloat16": "4", "8bit": "<= 2.1"}
    for name, tx in optimizers().items():
        target = next(v for k, v in targets.items() if k in name)
        print(f"| {name} | {state_bytes(tx, n):.4f} | {target} |")


def _step_fn(tx):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return fa.apply_updates(params, updates), state

    return step


def table_time(n: int, repeats: int) -> None:
    grads = jax.random.normal(jax.random.key(0), (n,))
    runs = {"optax.adam": optax.adam(1e-3)} | optimizers()
    runs = {k: v for k, v in runs.items() if "bfloat16" not in k}
    live = {}
    for name, tx in runs.items():
        params = jnp.ones(n)
        step = _step_fn(tx)
        params, state = step(params, tx.init(params), grads)  # compile
        live[name] = [step, params, state]
    add = jax.jit(lambda a, b: a + b, donate_argnums=0)
    fresh = jax.jit(lambda a: a * 2.0)
    a, b = jnp.ones(n), jnp.ones(n)
    a = add(a, b)
    fresh(b).block_until_ready()
    times: dict[str, list[float]] = {k: [] for k in [*live, "a += b", "fresh"]}
    for _ in range(repeats):
        for name, run in live.items():
            start = time.perf_counter()
            run[1], run[2] = run[0](run[1], run[2], grads)
            jax.block_until_ready((run[1], run[2]))
            times[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        a = add(a, b).block_until_ready()
        times["a += b"].append(time.perf_counter() - start)
        start = time.perf_counter()
        fresh(b).block_until_ready()
        times["fresh"].append(time.perf_counter() - start)
    med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    base = med["adam, float32 moments"]
    print(f"\n### Step time, {n:,} float32 parameters in one leaf (median of {repeats})\n")
    print("| step (jitted; params and state donated) | ms | vs float32 adam |")
    print("| --- | ---: | ---: |")
    for name in live:
        print(f"| {name} | {med[name]:.1f} | {med[name] / base:.2f}x |")
    stream = med["a += b"] * 28 / 12
    print(f"| streaming limit, 28 B/param at `a += b` bandwidth | {stream:.1f} | "
          f"{stream / base:.2f}x |")  # fmt: skip
    print(f"| streaming limit, 16 B/param (8-bit) | {med['a += b'] * 16 / 12:.1f} | "
          f"{med['a += b'] * 16 / 12 / base:.2f}x |")  # fmt: skip
    print(f"| reference: `a += b`, donated (12 B/elem) | {med['a += b']:.1f} | |")
    print(f"| reference: `2 * a` into a fresh buffer (8 B/elem + page faults) | "
          f"{med['fresh']:.1f} | |")  # fmt: skip


def table_codec(repeats: int, n: int = 2**20) -> None:
    """Where the 8-bit step's time goes on a CPU: the codec's arithmetic, per element."""
    from functional_adam.storage import quantized as qz

    x = jax.random.normal(jax.random.key(1), (n // 256, 256))
    m_q, v_q = qz.encode_blocks(x, signed=True), qz.encode_blocks(x * x, signed=False)
    cases = {
        "reference: `2 * x + 1` (float32 in, float32 out)": (jax.jit(lambda x: 2 * x + 1), x),
        "encode, signed map (m)": (jax.jit(lambda x: qz.encode_blocks(x, signed=True)), x),
        "encode, unsigned map (v)": (jax.jit(lambda x: qz.encode_blocks(x, signed=False)), x * x),
        "decode, signed map (m)": (jax.jit(lambda q: qz.decode_blocks(q, signed=True)), m_q),
        "decode, unsigned map (v)": (jax.jit(lambda q: qz.decode_blocks(q, signed=False)), v_q),
    }
    print(f"\n### Codec cost, {n:,} elements (fits in cache; median of {repeats})\n")
    print("| operation | ms | ns / element |")
    print("| --- | ---: | ---: |")
    for name, (fn, arg) in cases.items():
        jax.block_until_ready(fn(arg))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(arg))
            times.append(time.perf_counter() - start)
        ms = 1e3 * float(np.median(times))
        print(f"| {name} | {ms:.2f} | {1e6 * ms / n:.2f} |")


def regression(seed: int = 0, n: int = 512, d: int = 64, k: int = 128):
    kx, kw, kn, k0 = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, (n, d))
    y = x @ jax.random.normal(kw, (d, k)) + 0.1 * jax.random.normal(kn, (n, k))
    w0 = 0.1 * jax.random.normal(k0, (d, k))
    return w0, lambda w: jnp.mean((x @ w - y) ** 2)


def train(tx, w0, loss, steps: int):
    def body(carry, _):
        w, s = carry
        u, s = tx.update(jax.grad(loss)(w), s, w)
        return (fa.apply_updates(w, u), s), None

    run = jax.jit(lambda w0: jax.lax.scan(body, (w0, tx.init(w0)), None, length=steps)[0][0])
    return run(w0)


def table_quality(steps: int) -> None:
    print(f"\n### Trajectory after {steps:,} steps: least squares, W 64×128 (8,192 params)\n")
    print("Relative distance `|W - W_fp32| / |W_fp32 - W_0|` from float32 Adam; final loss.\n")
    print("| optimizer | lr | relative distance | loss | fp32 loss |")
    print("| --- | ---: | ---: | ---: | ---: |")
    w0, loss = regression()
    for lr in (1e-2, 1e-3):
        w32 = train(fa.adam(lr), w0, loss, steps)
        travelled = float(jnp.linalg.norm(w32 - w0))
        variants = {
            "adam, bfloat16 moments": fa.adam(lr, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
            "adam_8bit, block_size=256": fa.adam_8bit(lr, block_size=256),
            "adam_8bit, block_size=2048": fa.adam_8bit(lr, block_size=2048),
            'adam_8bit, code="float"': fa.adam_8bit(lr, code="float"),
        }
        for name, tx in variants.items():
            w = train(tx, w0, loss, steps)
            dist = float(jnp.linalg.norm(w - w32)) / travelled
            print(f"| {name} | {lr:g} | {dist:.4f} | {float(loss(w)):.4f} | "
                  f"{float(loss(w32)):.4f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=10_000_000, help="parameters (one leaf)")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds")
    parser.add_argument("--steps", type=int, default=1000, help="steps of the quality run")
    args = parser.parse_args()
    print(f"Machine: {machine()}")
    table_bytes(args.size)
    table_time(args.size, args.repeats)
    table_codec(args.repeats)
    table_quality(args.steps)


if __name__ == "__main__":
    main()
