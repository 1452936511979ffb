"""Optimizer state at scale: per-device bytes, step time and compile time by layout.

A GPT-2-small-shaped parameter tree (148 leaves, 124,439,808 parameters: token and
position embeddings, 12 blocks of attention and MLP with their norms, the final norm)
on an 8-device mesh ``("data",)`` with Auto axes, three layouts:

- ``replicated``: data parallel, parameters and state on every device;
- ``fsdp``: each parameter split over ``data`` on its first dimension 8 divides, the
  state following it (:func:`functional_adam.state_shardings`);
- ``zero1``: parameters replicated, the state partitioned over ``data``
  (``zero1_axis="data"``);

for ``adam`` (float32 moments), ``adam`` with bfloat16 moments and ``adam_8bit``.
Per-device optimizer-state bytes come from the shardings' shard shapes and from
``compiled.memory_analysis()`` of ``fa.jitted_init`` (``jax.jit(tx.init, out_shardings=...)``) lowered on
abstract parameters (nothing is allocated, so the 124M tree is used). Compile time is
that of the jitted ``update_and_apply`` step on the 124M tree. Step time is measured on a
narrower tree of the same 148 leaves (``--time-width``), as a ratio to the replicated step
of the same optimizer, together with what the compiled step gathers (all-gather,
all-to-all, collective-permute; MB per device per step).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/sharding.py
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/sharding.py --time-width 128 --steps 5
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/sharding.py --optimizers adam_8bit

``--kernel`` instead times ``adam``'s and ``adam_8bit``'s steps (``--kernel-optimizers``)
on the narrower tree per layout two ways in one run, step by step in turn:
``update_and_apply`` (the fused C++ kernel, run by each device on its shards) and
``tx.update`` + ``apply_updates`` (the XLA path): medians and their ratio, and what each
compiled step gathers.
"""

from __future__ import annotations

import argparse
import math
import platform
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import functional_adam as fa

LAYOUTS = ("replicated", "fsdp", "zero1")
OPTIMIZERS = {
    "adam": lambda: fa.adam(1e-3),
    "adam bf16 moments": lambda: fa.adam(1e-3, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16),
    "adam_8bit": lambda: fa.adam_8bit(1e-3),
}


def gpt2_shapes(width: int = 768, vocab: int = 50257, context: int = 1024, layers: int = 12):
    """The parameter shapes of GPT-2 (small by default): 2 + 12 * layers + 2 leaves."""
    block = {
        "ln_1": {"scale": (width,), "bias": (width,)},
        "attn": {
            "c_attn": {"kernel": (width, 3 * width), "bias": (3 * width,)},
            "c_proj": {"kernel": (width, width), "bias": (width,)},
        },
        "ln_2": {"scale": (width,), "bias": (width,)},
        "mlp": {
            "c_fc": {"kernel": (width, 4 * width), "bias": (4 * width,)},
            "c_proj": {"kernel": (4 * width, width), "bias": (width,)},
        },
    }
    return {
        "wte": (vocab, width),
        "wpe": (context, width),
        "h": [block] * layers,
        "ln_f": {"scale": (width,), "bias": (width,)},
    }


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def fsdp_spec(shape: tuple[int, ...], size: int) -> P:
    """``data`` on the first dimension ``size`` divides (replicated when none does)."""
    for dim, n in enumerate(shape):
        if n % size == 0:
            return P(*([None] * dim), "data")
    return P()


def abstract_params(shapes, mesh, layout: str):
    size = mesh.shape["data"]

    def leaf(shape):
        spec = fsdp_spec(shape, size) if layout == "fsdp" else P()
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec))

    return jax.tree.map(leaf, shapes, is_leaf=_is_shape)


def zero1_axis(layout: str) -> str | None:
    return "data" if layout == "zero1" else None


def state_bytes(tx, params, layout: str) -> tuple[int, int]:
    """(per-device bytes from shard shapes, compiled init's output bytes per device)."""
    abstract = fa.abstract_state(tx, params, zero1_axis=zero1_axis(layout))
    from_shards = sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
        for x in jax.tree.leaves(abstract)
    )
    init = fa.jitted_init(tx, params, zero1_axis=zero1_axis(layout)).lower(params).compile()
    return from_shards, init.memory_analysis().output_size_in_bytes


def step_function(tx, params, layout: str, via: str = "update_and_apply"):
    """The jitted, donated step: ``update_and_apply`` (the fused kernel where it applies) or
    ``via="update"``, ``tx.update`` then ``apply_updates`` (the XLA path)."""
    shardings = fa.state_shardings(tx, params, zero1_axis=zero1_axis(layout))
    out = (jax.tree.map(lambda x: x.sharding, params), shardings)

    def step(params, state, grads):
        if via == "update":
            updates, state = tx.update(grads, state, params)
            return fa.apply_updates(params, updates), state
        return fa.update_and_apply(tx, grads, state, params)

    return jax.jit(step, donate_argnums=(0, 1), out_shardings=out)


_MOVES = re.compile(r"=\s*(\w+)\[([\d,]*)\][^=]*?\s(all-gather|all-to-all|collective-permute)\(")
_ITEMSIZE = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}


def gathered_mb(hlo: str) -> float:
    """MB per device produced by the step's all-gathers, all-to-alls and collective-permutes."""
    total = 0
    for dtype, dims, _ in _MOVES.findall(hlo):
        elements = math.prod(int(d) for d in dims.split(",")) if dims else 1
        total += elements * _ITEMSIZE.get(dtype, 4)
    return total / 1e6


def compile_seconds(tx, params, layout: str) -> tuple[float, str]:
    state = fa.abstract_state(tx, params, zero1_axis=zero1_axis(layout))
    t0 = time.perf_counter()
    compiled = step_function(tx, params, layout).lower(params, state, params).compile()
    return time.perf_counter() - t0, compiled.as_text()


def step_seconds(tx, params, layout: str, steps: int, vias=("update_and_apply",)) -> list:
    """Median seconds per step of each of ``vias``, taken in turn step by step, one step at a
    time (queued steps with collectives can deadlock XLA:CPU's rendezvous on few cores)."""
    rng = np.random.default_rng(0)

    def real(x):
        return jax.device_put(rng.normal(size=x.shape).astype(np.float32), x.sharding)

    grads = jax.tree.map(real, params)
    runs = []
    for via in vias:
        values = jax.tree.map(real, params)
        state = fa.init_sharded(tx, values, zero1_axis=zero1_axis(layout))
        runs.append([step_function(tx, params, layout, via), values, state, []])
    for i in range(steps + 2):
        for run in runs:
            step, values, state, times = run
            t0 = time.perf_counter()
            run[1:3] = jax.block_until_ready(step(values, state, grads))
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return [statistics.median(run[3]) for run in runs]


def kernel_vs_xla(mesh, shapes, steps: int, names: list[str]) -> None:
    """The step with the fused kernel per shard against the XLA path, per optimizer and layout."""
    print(
        "| optimizer | layout | kernel ms | XLA path ms | kernel / XLA "
        "| gathered MB/step (kernel, XLA) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, layout in ((name, layout) for name in names for layout in LAYOUTS):
        tx = OPTIMIZERS[name]()
        params = abstract_params(shapes, mesh, layout)
        state = fa.abstract_state(tx, params, zero1_axis=zero1_axis(layout))
        hlo = {
            via: step_function(tx, params, layout, via).lower(params, state, params).compile()
            for via in ("update_and_apply", "update")
        }
        hlo = {via: compiled.as_text() for via, compiled in hlo.items()}
        assert 'custom_call_target="functional_adam_adam' in hlo["update_and_apply"], "no kernel"
        kernel, xla = step_seconds(tx, params, layout, steps, ("update_and_apply", "update"))
        print(
            f"| {name} | {layout} | {kernel * 1e3:.1f} | {xla * 1e3:.1f} | {kernel / xla:.2f} | "
            f"{gathered_mb(hlo['update_and_apply']):,.1f}, {gathered_mb(hlo['update']):,.1f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-width", type=int, default=256, help="model width for step time")
    parser.add_argument("--time-vocab", type=int, default=8192, help="vocabulary for step time")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per cell (median)")
    parser.add_argument(
        "--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS),
        help="rows to measure (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--kernel", action="store_true", help="the fused kernel per shard vs the XLA path"
    )
    parser.add_argument(
        "--kernel-optimizers",
        default="adam,adam_8bit",
        help="with --kernel: comma-separated names among " + ", ".join(OPTIMIZERS),
    )
    args = parser.parse_args()
    if jax.device_count() < 8:
        raise SystemExit("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    # Auto axes, as in the table of BENCHMARKS.md (the tests cover Explicit axes).
    mesh = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8], axis_types=(AxisType.Auto,))
    shapes = gpt2_shapes()
    small = gpt2_shapes(width=args.time_width, vocab=args.time_vocab)
    count = sum(math.prod(s) for s in jax.tree.leaves(shapes, is_leaf=_is_shape))
    small_count = sum(math.prod(s) for s in jax.tree.leaves(small, is_leaf=_is_shape))
    leaves = len(jax.tree.leaves(shapes, is_leaf=_is_shape))
    print(
        f"jax {jax.__version__}, {platform.processor() or platform.machine()}, "
        f"{jax.device_count()} {jax.devices()[0].platform} devices, {len(mesh.devices.flat)} in the mesh"
    )
    print(
        f"GPT-2 small tree: {leaves} leaves, {count:,} parameters; "
        f"step time on {small_count:,} parameters (width {args.time_width}, vocab {args.time_vocab})"
    )
    print()
    if args.kernel:
        kernel_vs_xla(mesh, small, args.steps, args.kernel_optimizers.split(","))
        return
    print(
        "| optimizer | layout | state MB/device (shards) | (compiled init) | vs replicated "
        "| compile s (124M) | step vs replicated | gathered MB/step |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.optimizers:
        tx = OPTIMIZERS[name]()
        base_bytes = base_time = None
        for layout in LAYOUTS:
            params = abstract_params(shapes, mesh, layout)
            shards, compiled = state_bytes(tx, params, layout)
            seconds, hlo = compile_seconds(tx, params, layout)
            small_params = abstract_params(small, mesh, layout)
            (step,) = step_seconds(tx, small_params, layout, args.steps)
            base_bytes = base_bytes or shards
            base_time = base_time or step
            print(
                f"| {name} | {layout} | {shards / 1e6:,.1f} | {compiled / 1e6:,.1f} | "
                f"{shards / base_bytes:.3f} | {seconds:.1f} | {step / base_time:.2f} "
                f"({step * 1e3:.0f} ms) | {gathered_mb(hlo):,.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
