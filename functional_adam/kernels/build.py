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
from pathlib import Path

import jax
import jaxlib

SOURCE = Path(__file__).parent / "adam_cpu.cc"
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-std=c++20", "-w")
TARGETS = {"float32": "functional_adam_adam_f32", "float64": "functional_adam_adam_f64"}
_SYMBOLS = {"float32": "FunctionalAdamStepF32", "float64": "FunctionalAdamStepF64"}


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
