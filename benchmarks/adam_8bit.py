"""Speed and compile time of 8-bit Adam against float32 Adam, measured side by side.

Prints a check of the fused 8-bit step against the XLA path (codes that differ, largest
parameter difference in ulps; on a GPU this is the Pallas kernel compiled by Triton),
then two Markdown tables:

1. ms per jitted, donated step on one leaf of ``--size`` float32 parameters
   (median over round-robin rounds, so load hits all methods alike), with the
   ratio to float32 ``fa.adam`` through ``update_and_apply`` in the same run,
   and the streaming limits: 28 B/param (float32 Adam) and 16 B/param (8-bit:
   θ and g read, θ written, 1+1 code bytes read and written) at the bandwidth of
   a donated jitted ``a + b`` (12 B/element);
2. trace + lower + compile seconds of the jitted step for the GPT-2 small tree
   (148 leaves, 124M parameters; no arrays are allocated).

The 8-bit rows: ``update_and_apply`` and ``update + apply_updates`` (both take the
fused kernel where one applies: C++ on one CPU device, Pallas on a GPU; ``update``
writes the update, which ``apply_updates`` adds), the XLA path (``update +
apply_updates`` inside ``reference_path()``), and, for compile time, the XLA path
with every leaf in one expression (the form accelerators get) or every leaf in
chunks (the CPU form for leaves over 4M).

    python benchmarks/adam_8bit.py                       # 1e7 parameters, GPT-2 compile
    python benchmarks/adam_8bit.py --size 1e8 --gpt2-steps   # on a GPU: also the GPT-2 step
    python benchmarks/adam_8bit.py --no-compile          # step times only

Rows for ``code="float"`` (float codes, :mod:`functional_adam.storage.float_codes`) time
the other 8-bit format the same ways.

``--gpt2-steps`` adds a third table: ms per step on the GPT-2 small tree.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import functional_adam as fa
from functional_adam.kernels.dispatch import reference_path
from functional_adam.storage import blockwise

WARMUP = 3
# Steps between synchronizations: on a GPU the host's wait would otherwise be in every step.
STEPS_PER_SYNC = 1 if jax.default_backend() == "cpu" else 10


def gpt2_small_shapes() -> dict[str, tuple[int, ...]]:
    """The parameter shapes of GPT-2 small (124M parameters, 148 leaves)."""
    shapes = {"wte": (50257, 768), "wpe": (1024, 768)}
    for i in range(12):
        block = {
            "ln_1.g": (768,), "ln_1.b": (768,), "ln_2.g": (768,), "ln_2.b": (768,),
            "attn.c_attn.w": (768, 2304), "attn.c_attn.b": (2304,),
            "attn.c_proj.w": (768, 768), "attn.c_proj.b": (768,),
            "mlp.c_fc.w": (768, 3072), "mlp.c_fc.b": (3072,),
            "mlp.c_proj.w": (3072, 768), "mlp.c_proj.b": (768,),
        }  # fmt: skip
        shapes |= {f"h{i}.{k}": v for k, v in block.items()}
    return shapes | {"ln_f.g": (768,), "ln_f.b": (768,)}


@contextlib.contextmanager
def chunked_above(size: float | None):
    """The XLA path with leaves over ``size`` elements in chunks (inf: none, 0: all, None: as
    dispatched; CPU only)."""
    if size is None:
        yield
        return
    saved = getattr(blockwise, "_CHUNKED_MIN_SIZE", None)  # None: a version before the switch
    if saved is not None:
        blockwise._CHUNKED_MIN_SIZE = size
    try:
        yield
    finally:
        if saved is not None:
            blockwise._CHUNKED_MIN_SIZE = saved


# name: (optimizer, how it steps, chunking threshold of the XLA path or None for the default);
# how: "apply" (update_and_apply), "update" (update + apply_updates), "xla" (the same inside
# reference_path(): no kernel)
METHODS: dict[str, tuple[Callable[[], fa.GradientTransformation], str, float | None]] = {
    "fa.adam, update + apply_updates": (lambda: fa.adam(1e-3), "update", None),
    "fa.adam, update_and_apply": (lambda: fa.adam(1e-3), "apply", None),
    "fa.adam_8bit, XLA path (update + apply_updates, reference_path)": (
        lambda: fa.adam_8bit(1e-3),
        "xla",
        None,
    ),
    "fa.adam_8bit, update + apply_updates": (lambda: fa.adam_8bit(1e-3), "update", None),
    "fa.adam_8bit, update_and_apply": (lambda: fa.adam_8bit(1e-3), "apply", None),
    "fa.adamw_8bit, update_and_apply": (
        lambda: fa.adamw_8bit(1e-3, weight_decay=0.1),
        "apply",
        None,
    ),
    'fa.adam_8bit(code="float"), XLA path': (
        lambda: fa.adam_8bit(1e-3, code="float"),
        "xla",
        None,
    ),
    'fa.adam_8bit(code="float"), update + apply_updates': (
        lambda: fa.adam_8bit(1e-3, code="float"),
        "update",
        None,
    ),
    'fa.adam_8bit(code="float"), update_and_apply': (
        lambda: fa.adam_8bit(1e-3, code="float"),
        "apply",
        None,
    ),
}
COMPILE_ONLY = {
    "fa.adam_8bit, XLA path, every leaf one expression": (
        lambda: fa.adam_8bit(1e-3),
        "xla",
        float("inf"),
    ),
    "fa.adam_8bit, XLA path, every leaf in chunks": (lambda: fa.adam_8bit(1e-3), "xla", 0),
    'fa.adam_8bit(code="float"), XLA path, every leaf one expression': (
        lambda: fa.adam_8bit(1e-3, code="float"),
        "xla",
        float("inf"),
    ),
}
REFERENCE = "fa.adam, update_and_apply"


def _step(tx, how: str) -> Callable:
    if how == "apply":
        return lambda params, state, grads: fa.update_and_apply(tx, grads, state, params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return fa.apply_updates(params, updates), state

    return step


@contextlib.contextmanager
def tracing(how: str, threshold: float | None):
    """Where a method's step is traced: the XLA path's chunking, and no kernel for "xla"."""
    with chunked_above(threshold), reference_path() if how == "xla" else contextlib.nullcontext():
        yield


def _arrays(shapes: list[tuple[int, ...]], seed: int) -> list[jax.Array]:
    key = jax.random.key(seed)
    return [0.02 * jax.random.normal(jax.random.fold_in(key, i), s) for i, s in enumerate(shapes)]


def runner(method: str, shapes: list[tuple[int, ...]]) -> Callable[[], None]:
    make, how, threshold = METHODS[method]
    tx = make()
    params, grads = _arrays(shapes, 0), _arrays(shapes, 1)
    jitted = jax.jit(_step(tx, how), donate_argnums=(0, 1))
    box = [params, tx.init(params)]

    def run():
        for _ in range(STEPS_PER_SYNC):
            box[0], box[1] = jitted(box[0], box[1], grads)
        jax.block_until_ready(box[0])

    with tracing(how, threshold):
        run()
    return run


def time_methods(runners: dict[str, Callable[[], None]], rounds: int, reps: int) -> dict:
    """Median ms per step of each runner, round-robin so noise hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            for _ in range(WARMUP):
                run()
            for _ in range(reps):
                t = time.perf_counter()
                run()
                samples[name].append((time.perf_counter() - t) * 1e3 / STEPS_PER_SYNC)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def add_bandwidth_gbps(n: int, repeats: int = 20) -> float:
    """Median bandwidth of a donated jitted ``a + b`` over ``n`` float32 elements (12 B each)."""
    add = jax.jit(lambda a, b: a + b, donate_argnums=0)
    a, b = jnp.ones(n), jnp.ones(n)
    a = add(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a = add(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 12 * n / statistics.median(times) / 1e9


def compile_seconds(make, how: str, threshold: float | None) -> float:
    """Trace, lower and compile the jitted, donated step for the GPT-2 small tree."""
    tx = make()
    params = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in gpt2_small_shapes().items()}
    state = jax.eval_shape(tx.init, params)
    with tracing(how, threshold):
        t = time.perf_counter()
        jax.jit(_step(tx, how), donate_argnums=(0, 1)).lower(params, state, params).compile()
        return time.perf_counter() - t


def check_fused_against_xla(steps: int = 5) -> str:
    """Runs ``update_and_apply`` and the XLA path of ``adamw_8bit`` side by side from the same
    state; returns how many codes differed and the largest θ difference (in ulps of the
    larger of |θ| before and after)."""
    tx = fa.adamw_8bit(1e-2, weight_decay=0.1)
    shapes = [(768, 768), (50257 * 3,), (768,)]
    params = _arrays(shapes, 2)
    state = tx.init(params)
    fused = jax.jit(_step(tx, "apply"))
    with reference_path():
        xla = jax.jit(_step(tx, "xla")).lower(params, state, params).compile()
    differ, total, ulps = 0, 0, 0.0
    for t in range(steps):
        grads = [g * 10.0 ** (t - 2) for g in _arrays(shapes, 10 + t)]
        (p_f, s_f), (p_x, s_x) = fused(params, state, grads), xla(params, state, grads)
        for a, b in zip(jax.tree.leaves(s_f), jax.tree.leaves(s_x), strict=True):
            if a.ndim == 2 and a.dtype.itemsize == 1:
                differ += int(jnp.sum(a != b))
                total += a.size
        for a, b, before in zip(p_f, p_x, params, strict=True):
            scale = jnp.maximum(jnp.abs(b), jnp.abs(before))  # as tests/trees.py measures
            ulps = max(ulps, float(jnp.max(jnp.abs(a - b) / jnp.spacing(scale))))
        params, state = p_x, s_x
    return f"codes that differ: {differ} of {total}; largest θ difference: {ulps:.1f} ulps"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{jax.devices()[0].device_kind} ({jax.default_backend()}); {os.cpu_count()} cores, {cpu}; "
        f"Python {platform.python_version()}, jax {jax.__version__}, numpy {np.__version__}; "
        f"load average {load:.1f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=1e7, help="parameters in the one leaf")
    parser.add_argument("--rounds", type=int, default=7, help="round-robin rounds")
    parser.add_argument("--reps", type=int, default=5, help="timed steps per method per round")
    parser.add_argument("--no-compile", action="store_true", help="skip the compile table")
    parser.add_argument("--gpt2-steps", action="store_true", help="time the GPT-2 small tree")
    args = parser.parse_args(argv)
    n = int(args.size)
    print(f"# {machine()}\n")
    print(f"update_and_apply vs XLA path, adamw_8bit, 5 steps: {check_fused_against_xla()}\n")
    trees = {f"{n:.0e} params, 1 leaf": [(n,)]}
    if args.gpt2_steps:
        trees["GPT-2 small tree (148 leaves, 124M)"] = list(gpt2_small_shapes().values())
    for title, shapes in trees.items():
        size = sum(int(np.prod(s)) for s in shapes)
        gbps = add_bandwidth_gbps(size)
        runners = {name: runner(name, shapes) for name in METHODS}
        medians = time_methods(runners, args.rounds, args.reps)
        del runners
        reference = medians[REFERENCE]
        print(f"| {title} | ms/step (median) | vs `{REFERENCE}` |")
        print("|---|---:|---:|")
        for bytes_per_param in (28, 16):
            ms = bytes_per_param * size / (gbps * 1e9) * 1e3
            print(
                f"| streaming limit, {bytes_per_param} B/param at `a + b` ({gbps:.0f} GB/s) "
                f"| {ms:.2f} | {ms / reference:.2f}x |"
            )
        for name, ms in medians.items():
            print(f"| {name} | {ms:.2f} | {ms / reference:.2f}x |")
        print()
    if args.no_compile:
        return
    compile_seconds(lambda: fa.adam(1e-3), "update", None)  # one-time costs of a first compile
    print("| GPT-2 small tree (148 leaves, 124M) | trace + lower + compile, s |")
    print("|---|---:|")
    for name, (make, how, threshold) in (METHODS | COMPILE_ONLY).items():
        if name.startswith("fa.adamw"):
            continue
        print(f"| {name} | {compile_seconds(make, how, threshold):.2f} |")


if __name__ == "__main__":
    main()
