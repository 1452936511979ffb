"""Speed of one Adam step: functional_adam vs Optax vs PyTorch, against the memory-bandwidth limit.

An fp32 Adam step reads θ, g, m, v and writes θ, m, v: 28 bytes per parameter.
The limit is that traffic at a streaming bandwidth measured in the same run: on
the CPU PyTorch's multithreaded in-place ``a += b`` (12 bytes per element), on a
GPU a device-to-device copy (8 bytes per element); a donated jitted ``a + b``
(JAX's own streaming speed) is printed beside it. Methods: functional_adam's
``update`` + ``apply_updates``, ``update_and_apply`` (the fused CPU kernel where
it applies), ``update_and_apply`` on ``FlatParams``, ``optax.adam``, PyTorch's
fused and foreach Adam, and the cost of calling a jitted step with that many
arrays at all. Prints the loops each compiled step has, ms per step (median,
after warm-up, round-robin), GB/s at 28 B/param and the fraction of the limit;
then compile time (trace + lower + compile) of the jitted step.

    python benchmarks/update_step.py                 # 1e5, 1e6, 1e7 params
    python benchmarks/update_step.py --large         # and 1e8
    python benchmarks/update_step.py --sizes 1e7 --leaves 1 1000 --rounds 7
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import functional_adam as fa

BYTES_PER_PARAM = 28
# Steps timed between two synchronizations: on a GPU the host's wait for the device
# would otherwise be part of every step (the copy limit is timed over 20 copies).
STEPS_PER_SYNC = 1 if jax.default_backend() == "cpu" else 10
# Untimed steps before each method's block of timed steps: on the 2-core VM, a method's
# first steps after another ran (or after a pause) are up to 1.4x slower, and
# recover over about five steps.
WARMUP = 5
GROUPED_ENV = "FUNCTIONAL_ADAM_GPU_GROUPED"


def _leaf_sizes(n: int, leaves: int) -> list[int]:
    base = n // leaves
    return [base + (1 if i < n % leaves else 0) for i in range(leaves)]


def _tree(sizes: list[int], seed: int) -> list[jax.Array]:
    key = jax.random.PRNGKey(seed)
    return [
        jax.random.normal(jax.random.fold_in(key, i), (s,), jnp.float32)
        for i, s in enumerate(sizes)
    ]


# name: (optimizer, how the step is taken, parameters as FlatParams?)
METHODS: dict[str, tuple[Callable[[], Any], str, bool]] = {
    "functional_adam, update + apply_updates": (lambda: fa.adam(1e-3), "update", False),
    "functional_adam, update_and_apply": (lambda: fa.adam(1e-3), "fused", False),
    "functional_adam, FlatParams": (lambda: fa.adam(1e-3), "fused", True),
    "optax.adam": (lambda: optax.adam(1e-3), "update", False),
    # Not an optimizer: a jitted, donated call that returns its inputs, so the cost of
    # calling a compiled step with this many arrays (the floor under every per-leaf row).
    "floor: jit call returning its inputs": (lambda: fa.adam(1e-3), "identity", False),
}


# On a GPU with --gpu-grouped: the grouped Pallas kernel (opt-in) next to XLA's per-leaf step.
GPU_GROUPED_METHODS: dict[str, tuple[Callable[[], Any], str, bool]] = {
    "functional_adam, update_and_apply, grouped kernel": (lambda: fa.adam(1e-3), "grouped", False),
    "functional_adam, bf16 moments": (
        lambda: fa.adam(1e-3, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
        "fused",
        False,
    ),
    "functional_adam, bf16 moments, grouped kernel": (
        lambda: fa.adam(1e-3, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
        "grouped",
        False,
    ),
}


def _step(tx, how: str) -> Callable:
    """The step ``(params, state, grads) -> (params, state)``; donated arguments come in
    the order of the outputs."""
    if how == "fused":
        return lambda params, state, grads: fa.update_and_apply(tx, grads, state, params)
    if how == "grouped":  # FUNCTIONAL_ADAM_GPU_GROUPED=1 while the step is traced

        def grouped(params, state, grads):
            before = os.environ.get(GROUPED_ENV)
            os.environ[GROUPED_ENV] = "1"
            try:
                return fa.update_and_apply(tx, grads, state, params)
            finally:
                if before is None:
                    del os.environ[GROUPED_ENV]
                else:
                    os.environ[GROUPED_ENV] = before

        return grouped
    if how == "identity":
        return lambda params, state, grads: (params, state)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return fa.apply_updates(params, updates), state

    return step


def _inputs(sizes: list[int], flat: bool):
    params, grads = _tree(sizes, 0), _tree(sizes, 1)
    if flat:
        return fa.FlatParams.of(params), fa.FlatParams.of(grads)
    return params, grads


def jax_runner(method: str, sizes: list[int]) -> Callable[[], None]:
    """A closure that runs one jitted, donated step (params and state in place)."""
    make, how, flat = METHODS[method]
    tx = make()
    params, grads = _inputs(sizes, flat)
    jitted = jax.jit(_step(tx, how), donate_argnums=(0, 1))
    box = [params, tx.init(params)]

    def run():
        for _ in range(STEPS_PER_SYNC):
            box[0], box[1] = jitted(box[0], box[1], grads)
        jax.block_until_ready(box[0])

    run()
    return run


def _lowered(method: str, sizes: list[int]):
    make, how, flat = METHODS[method]
    tx = make()
    params, _ = _inputs(sizes, flat)
    return jax.jit(_step(tx, how), donate_argnums=(0, 1)).lower(params, tx.init(params), params)


def _torch_device() -> str | None:
    """Where PyTorch runs next to JAX: the same kind of device, or ``None`` (no torch, or no GPU)."""
    try:
        import torch
    except ImportError:
        return None
    if jax.default_backend() == "cpu":
        return "cpu"
    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else None


def torch_runner(sizes: list[int], device: str, **kwargs) -> Callable[[], None]:
    import torch

    params = [torch.randn(s, device=device, requires_grad=True) for s in sizes]
    for p in params:
        p.grad = torch.randn(p.shape[0], device=device)
    opt = torch.optim.Adam(params, lr=1e-3, **kwargs)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        for _ in range(STEPS_PER_SYNC):
            opt.step()
        sync()

    run()
    return run


def streaming_limits_gbps(n: int, repeats: int = 10) -> dict[str, float]:
    """Fastest streaming bandwidth over a few runs, per kernel (bytes read + written).

    On the CPU, ``torch a+=b`` is PyTorch's multithreaded in-place add (12 B/element).
    On a GPU, ``torch copy`` is a device-to-device copy (8 B/element), timed over
    20 copies between synchronizations. ``jax a+b`` is a donated jitted add, the
    streaming speed of the compiler that runs our step.
    """
    limits = {}
    device = _torch_device()
    if device == "cpu":
        import torch

        a, b = torch.randn(n), torch.randn(n)
        best = 0.0
        for _ in range(repeats):
            t = time.perf_counter()
            a += b
            best = max(best, 12 * n / (time.perf_counter() - t) / 1e9)
        limits["torch a+=b"] = best
    elif device == "cuda":
        import torch

        a, b = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
        b.copy_(a)
        torch.cuda.synchronize()
        best = 0.0
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(20):
                b.copy_(a)
            torch.cuda.synchronize()
            best = max(best, 20 * 8 * n / (time.perf_counter() - t) / 1e9)
        limits["torch copy"] = best
        del a, b
    add = jax.jit(lambda a, b: a + b, donate_argnums=0)
    a, b = jnp.ones(n), jnp.ones(n)
    a = add(a, b).block_until_ready()
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a = add(a, b).block_until_ready()
        best = max(best, 12 * n / (time.perf_counter() - t) / 1e9)
    limits["jax a+b (donated)"] = best
    return limits


def time_methods(runners: dict[str, Callable[[], None]], rounds: int, reps: int) -> dict:
    """Median ms per call of each runner, measured round-robin so noise hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            for _ in range(WARMUP):  # the first steps after a switch run slower (all methods)
                run()
            for _ in range(reps):
                t = time.perf_counter()
                run()
                samples[name].append((time.perf_counter() - t) * 1e3 / STEPS_PER_SYNC)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def loops(method: str, leaves: int, size: int = 1_000_000) -> tuple[int, int]:
    """Fusions (loops, or GPU kernels) over parameter-sized arrays, and custom calls, in the
    compiled step (scalar work such as the bias corrections is not counted)."""
    text = _lowered(method, _leaf_sizes(size, leaves)).compile().as_text()
    entry = text[text.index("ENTRY") :].splitlines()

    def big(line: str) -> bool:
        shapes = re.findall(r"\[([\d,]+)\]", line.split("fusion(")[0])
        return any(math.prod(int(d) for d in s.split(",")) >= 1000 for s in shapes)

    fusions = sum(1 for line in entry if " fusion(" in line and big(line))
    return fusions, sum(1 for line in entry if "custom-call(" in line)


def compile_seconds(method: str, leaves: int, size: int = 1000) -> float:
    """Trace, lower and compile the jitted step, from scratch (inputs made beforehand)."""
    make, how, flat = METHODS[method]
    tx = make()
    params, _ = _inputs([size] * leaves, flat)
    state = tx.init(params)
    t = time.perf_counter()
    jax.jit(_step(tx, how), donate_argnums=(0, 1)).lower(params, state, params).compile()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6, 1e7])
    parser.add_argument("--large", action="store_true", help="add 1e8 parameters")
    parser.add_argument("--leaves", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds (default 5)")
    parser.add_argument("--reps", type=int, default=8, help="timed steps per method per round")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    parser.add_argument("--compile-leaves", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument(
        "--gpu-grouped",
        action="store_true",
        help="on a GPU, add the grouped Pallas kernel (float32 and bf16 moments)",
    )
    args = parser.parse_args(argv)
    if args.gpu_grouped and jax.default_backend() == "gpu":
        METHODS.update(GPU_GROUPED_METHODS)
    sizes = [int(s) for s in args.sizes] + ([int(1e8)] if args.large else [])

    device = jax.devices()[0]
    print(
        f"# {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"optax {optax.__version__}, python {platform.python_version()}"
    )
    torch_device = None if args.no_torch else _torch_device()
    print("\n| method | loops (fusions) + custom calls, 1 leaf | 100 leaves |")
    print("|---|---:|---:|")
    for name in METHODS:
        (f1, c1), (f100, c100) = loops(name, 1), loops(name, 100)
        print(f"| {name} | {f1} + {c1} | {f100} + {c100} |")

    print("\n| params | leaves | method | ms/step (median) | GB/s @28B | of limit | of XLA's |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for n in sizes:
        limits = streaming_limits_gbps(n)
        xla_limit = limits["jax a+b (donated)"]
        limit = limits.get("torch copy", max(limits.values()))  # on a GPU, the copy bandwidth
        for how, gbps in limits.items():
            limit_ms = BYTES_PER_PARAM * n / gbps / 1e9 * 1e3
            print(
                f"| {n:.0e} | - | streaming at {how} ({gbps:.1f} GB/s) | {limit_ms:.2f} "
                f"| {gbps:.1f} | {gbps / limit:.0%} | {gbps / xla_limit:.0%} |"
            )
        for leaves in args.leaves:
            leaf_sizes = _leaf_sizes(n, leaves)
            runners = {name: jax_runner(name, leaf_sizes) for name in METHODS}
            medians = time_methods(runners, args.rounds, args.reps)
            del runners
            if torch_device is not None:
                # Timed in a phase of their own: right after a JAX step, XLA's worker
                # threads still spin and would take the cores from PyTorch's.
                time.sleep(0.5)
                torch_runners = {
                    "torch Adam fused": torch_runner(leaf_sizes, torch_device, fused=True),
                    "torch Adam foreach": torch_runner(leaf_sizes, torch_device, foreach=True),
                }
                medians |= time_methods(torch_runners, args.rounds, args.reps)
            for name, ms in medians.items():
                gbps = BYTES_PER_PARAM * n / (ms / 1e3) / 1e9
                print(
                    f"| {n:.0e} | {leaves} | {name} | {ms:.2f} | {gbps:.1f} | {gbps / limit:.0%} "
                    f"| {gbps / xla_limit:.0%} |"
                )

    names = list(METHODS)
    print("\n| leaves (1,000 params each) | " + " | ".join(f"{n} s" for n in names) + " |")
    print("|---:|" + "---:|" * len(names))
    for leaves in args.compile_leaves:
        seconds = [compile_seconds(name, leaves) for name in names]
        print(f"| {leaves} | " + " | ".join(f"{s:.3f}" for s in seconds) + " |")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
