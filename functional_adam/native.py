"""The compiled CPU kernel behind the fused Adam step: build, load and call.

XLA:CPU compiles an Adam step into three loops per leaf (new m, new v, and the
direction fused with the parameter update: 40 bytes per float32 parameter
instead of 28, BENCHMARKS.md) and launches them leaf by leaf. The C++ kernel in
``kernels/adam_cpu.cc`` makes one pass over all leaves together, in place, on
XLA's intra-op thread pool, as ``torch.optim.Adam(fused=True)`` does.

It is compiled on first use (about 3 s) with the machine's C++ compiler
(``$CXX`` or ``c++``) against the XLA FFI headers that ship with jaxlib, and
cached in ``$FUNCTIONAL_ADAM_CACHE`` (default ``~/.cache/functional_adam``; if
that cannot be written, a folder in the temporary directory). Where the build
fails (no compiler, say) :func:`available` is ``False``, one warning says why,
and :func:`functional_adam.update_and_apply` takes the XLA path.
``FUNCTIONAL_ADAM_NATIVE=0`` switches the kernel off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

SOURCE = Path(__file__).parent / "kernels" / "adam_cpu.cc"
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-std=c++20", "-w")
TARGETS = {"float32": "functional_adam_adam_f32", "float64": "functional_adam_adam_f64"}
_SYMBOLS = {"float32": "FunctionalAdamStepF32", "float64": "FunctionalAdamStepF64"}

# Leaves per kernel call. XLA's compile time grows about cubically with the number of
# aliased operands of one call (1,000 leaves in one call: 31 s; in calls of 32: 0.8-0.9 s).
LEAVES_PER_CALL = 32

# The order of the kernel's `scalars` operand (the enum Scalar in adam_cpu.cc).
SCALARS = ("b1", "one_minus_b1", "b2", "one_minus_b2", "eps", "eps_root", "1/bc1", "1/bc2")
SCALARS += ("1/bc1_next", "neg_lr", "wd")


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` builds differ between CPUs)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "functional_adam"
    return Path(os.environ.get("FUNCTIONAL_ADAM_CACHE", default))


def build(cache_dir: Path | None = None) -> Path:
    """Compiles the kernel (once per source, compiler, flags, jaxlib and CPU); returns its path.

    Raises:
        RuntimeError: naming the compiler command and its error output.
    """
    compiler = shlex.split(os.environ.get("CXX", "c++"))
    headers = f"{jax.ffi.include_dir()} jaxlib {jaxlib.__version__}"
    key = "\n".join([SOURCE.read_text(), " ".join(compiler), *FLAGS, headers, _cpu_flags()])
    name = f"adam_cpu-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    cache_dir = cache_dir or _cache_dir()
    if (cache_dir / name).exists():
        return cache_dir / name
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=cache_dir).cleanup()  # writable?
    except OSError:  # a read-only home: build in the temporary directory instead
        user = getattr(os, "getuid", lambda: "user")()  # one folder per user (POSIX)
        cache_dir = Path(tempfile.gettempdir()) / f"functional_adam-{user}"
        cache_dir.mkdir(parents=True, exist_ok=True)
    library = cache_dir / name
    if library.exists():
        return library
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        partial = Path(tmp) / library.name
        command = [*compiler, *FLAGS, "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}"]
        command += [str(SOURCE), "-o", str(partial)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise RuntimeError(f"`{shlex.join(command)}` could not run: {error}") from error
        if result.returncode != 0:
            raise RuntimeError(f"`{shlex.join(command)}` failed:\n{result.stderr[-2000:]}")
        os.replace(partial, library)  # atomic: a concurrent build leaves one whole file
    return library


@functools.cache
def available() -> bool:
    """Whether the CPU kernel is built, loaded and registered with XLA (tried once)."""
    if os.environ.get("FUNCTIONAL_ADAM_NATIVE", "1") == "0":
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
        for dtype, target in TARGETS.items():
            handler = jax.ffi.pycapsule(getattr(library, _SYMBOLS[dtype]))
            jax.ffi.register_ffi_target(target, handler, platform="cpu")
    except (OSError, RuntimeError) as error:
        warnings.warn(
            f"functional_adam: the fused CPU Adam kernel is unavailable, so update_and_apply "
            f"uses the XLA path ({error}). Set FUNCTIONAL_ADAM_NATIVE=0 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def reference_step(
    scalars: jax.Array,
    leaves: Sequence[tuple[jax.Array, jax.Array, jax.Array, jax.Array]],
    decay: Sequence[bool],
    nesterov: bool,
) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    """The kernel's arithmetic in ``jax.numpy``: its derivative rule, equal to it within rounding.

    Example:
        >>> import jax.numpy as jnp
        >>> one = jnp.ones(1)
        >>> s = jnp.array([0.9, 0.1, 0.999, 0.001, 1e-8, 0.0, 10.0, 1000.0, 1 / 0.19, -0.1, 0.0])
        >>> p, m, v = reference_step(s, [(one, one, 0 * one, 0 * one)], [False], False)[0]
        >>> [round(float(x[0]), 4) for x in (p, m, v)]  # p = 1 - 0.1 · m̂/sqrt(v̂), m̂ = v̂ = 1
        [0.9, 0.1, 0.001]
    """
    b1, omb1, b2, omb2, eps, eps_root, inv_bc1, inv_bc2, inv_bc1_next, neg_lr, wd = scalars
    out = []
    for (p, g, m, v), decays in zip(leaves, decay, strict=True):
        m = omb1 * g + b1 * m
        v = omb2 * (g * g) + b2 * v
        m_hat = b1 * (m * inv_bc1_next) + omb1 * (g * inv_bc1) if nesterov else m * inv_bc1
        u = m_hat / (jnp.sqrt(v * inv_bc2 + eps_root) + eps)
        if decays:
            u = u + wd * p
        out.append((p + neg_lr * u, m, v))
    return out


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def adam_step(
    scalars: jax.Array,
    leaves: Sequence[tuple[jax.Array, jax.Array, jax.Array, jax.Array]],
    decay: tuple[bool, ...],
    nesterov: bool,
) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    """Calls the kernel: ``(p, g, m, v)`` per leaf in, ``(p, m, v)`` per leaf out, in place.

    ``scalars`` holds :data:`SCALARS` in the leaves' dtype; every array of every
    leaf has that dtype. ``p``, ``m`` and ``v`` are aliased to their results, so
    with donated inputs the step writes into the buffers it reads. Leaves go in
    calls of :data:`LEAVES_PER_CALL`. Differentiable (through
    :func:`reference_step`) and batchable (``jax.vmap`` calls the kernel once per
    batch element).
    """
    return _call_kernel(scalars, list(leaves), tuple(decay), nesterov)


@adam_step.defjvp
def _adam_step_jvp(decay, nesterov, primals, tangents):
    return jax.jvp(lambda s, x: reference_step(s, x, decay, nesterov), primals, tangents)


def _call_kernel(scalars, leaves, decay, nesterov):
    if len(leaves) > LEAVES_PER_CALL:  # XLA's compile time grows ~cubically in aliases per call
        return [
            out
            for i in range(0, len(leaves), LEAVES_PER_CALL)
            for out in _call_kernel(
                scalars,
                leaves[i : i + LEAVES_PER_CALL],
                decay[i : i + LEAVES_PER_CALL],
                nesterov,
            )
        ]
    dtype = scalars.dtype
    operands = [scalars]
    results = []
    aliases = {}
    for k, (p, g, m, v) in enumerate(leaves):
        operands += [p, g, m, v]  # any shape: the kernel sees element counts (no reshape,
        results += [jax.ShapeDtypeStruct(p.shape, dtype)] * 3  # which would cost a copy)
        aliases |= {1 + 4 * k: 3 * k, 3 + 4 * k: 3 * k + 1, 4 + 4 * k: 3 * k + 2}
    call = jax.ffi.ffi_call(
        TARGETS[np.dtype(dtype).name],
        results,
        input_output_aliases=aliases,
        vmap_method="sequential",  # under jax.vmap: one call per batch element
    )
    flat = call(*operands, decay=np.asarray(decay, np.int64), nesterov=bool(nesterov))
    return [tuple(flat[3 * k : 3 * k + 3]) for k in range(len(leaves))]
