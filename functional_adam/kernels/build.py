"""The compiled CPU kernels behind the fused Adam steps: build, verify and load.

XLA:CPU compiles an Adam step into three loops per leaf (new m, new v, and the
direction fused with the parameter update: 40 bytes per float32 parameter
instead of 28, BENCHMARKS.md) and launches them leaf by leaf. The C++ kernel in
``kernels/adam_cpu.cc`` makes one pass over all leaves together, in place, on
XLA's intra-op thread pool, as ``torch.optim.Adam(fused=True)`` does;
``kernels/adam8_cpu.cc`` does the same for 8-bit moments (decode, step, new block
maxima, encode, one pass per block). Both are compiled into one library.

It is compiled on first use (a few seconds) with the machine's C++ compiler
(``$CXX`` or ``c++``) against the XLA FFI headers that ship with jaxlib, and
cached in ``$FUNCTIONAL_ADAM_CACHE`` (default ``~/.cache/functional_adam``; if
that cannot be written, ``$TMPDIR/functional_adam-<uid>``). A cache folder is
created private (mode 0o700, whatever the umask); a folder or library that is a
symbolic link, belongs to another user, or can be written by group or others is
refused, never loaded. A cached library that will not load, or lacks the
kernel's symbols, is deleted and built again once. Where that all fails (no
compiler, say) :func:`available` is ``False``, one ``RuntimeWarning`` says why,
and :func:`functional_adam.update_and_apply` takes the XLA path.
``FUNCTIONAL_ADAM_NATIVE=0`` switches the kernel off.
"""

from __future__ import annotations

import _ctypes
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jaxlib

SOURCES = (Path(__file__).parent / "adam_cpu.cc", Path(__file__).parent / "adam8_cpu.cc")
HEADERS = (Path(__file__).parent / "adam8_avx512.cc",)  # included by adam8_cpu.cc, not compiled
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-std=c++20", "-w")
TARGETS = {"float32": "functional_adam_adam_f32", "float64": "functional_adam_adam_f64"}
TARGET_8BIT = "functional_adam_adam8_f32"  # 8-bit moments, float32 parameters (adam8_cpu.cc)
_SYMBOLS = {
    TARGETS["float32"]: "FunctionalAdamStepF32",
    TARGETS["float64"]: "FunctionalAdamStepF64",
    TARGET_8BIT: "FunctionalAdam8bitStepF32",
}


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


def _compiler() -> list[str]:
    """``$CXX`` (default ``c++``) split as a shell would; a ``RuntimeError`` if it cannot be."""
    cxx = os.environ.get("CXX", "c++")
    try:
        compiler = shlex.split(cxx)
    except ValueError as error:
        raise RuntimeError(f"CXX={cxx!r} cannot be split into a command: {error}") from error
    if not compiler:
        raise RuntimeError(f"CXX={cxx!r} names no compiler")
    return compiler


def library_name(compiler: list[str] | None = None) -> str:
    """The cached library's file name: a hash of sources, headers, compiler, flags, jaxlib, CPU."""
    compiler = _compiler() if compiler is None else compiler
    headers = f"{jax.ffi.include_dir()} jaxlib {jaxlib.__version__}"
    sources = [source.read_text() for source in (*SOURCES, *HEADERS)]
    key = "\n".join([*sources, " ".join(compiler), *FLAGS, headers, _cpu_flags()])
    return f"adam_cpu-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def unsafe_reason(path: Path) -> str | None:
    """Why ``path`` may not be trusted (``None`` if it may): a link, another user's, or writable.

    Only the last component is checked; the folders above it are the user's choice.
    """
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link"
    uid = getattr(os, "getuid", None)
    if uid is not None and info.st_uid != uid():
        return f"belongs to uid {info.st_uid}, not to this user (uid {uid()})"
    if uid is not None and info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"can be written by group or others (mode {stat.S_IMODE(info.st_mode):#o})"
    return None


def _refuse_unless_safe(path: Path, what: str) -> None:
    reason = unsafe_reason(path)
    if reason is not None:
        raise RuntimeError(
            f"refusing the kernel {what} {path}: it {reason}. Remove it (or set "
            f"FUNCTIONAL_ADAM_CACHE to a folder of your own) and it is built again."
        )


def _private_dir(path: Path) -> Path:
    """``path`` as a folder of this user's, created with mode 0o700 if missing.

    Raises:
        OSError: the folder cannot be created or written (the caller falls back).
        RuntimeError: it exists but may not be trusted (:func:`unsafe_reason`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # mkdir's mode is masked by the umask; chmod's is not
    except FileExistsError:
        pass
    if not path.is_symlink() and not path.is_dir():
        raise NotADirectoryError(f"{path} is not a folder")
    _refuse_unless_safe(path, "cache folder")
    tempfile.TemporaryDirectory(dir=path).cleanup()  # writable?
    return path


def _usable_cache_dir(cache_dir: Path) -> Path:
    """``cache_dir``, or where it cannot be written, ``$TMPDIR/functional_adam-<uid>``."""
    try:
        return _private_dir(cache_dir)
    except OSError:  # a read-only home: build in the temporary directory instead
        user = getattr(os, "getuid", lambda: "user")()  # one folder per user (POSIX)
        return _private_dir(Path(tempfile.gettempdir()) / f"functional_adam-{user}")


def _compile(compiler: list[str], library: Path) -> None:
    """Compiles the kernel into ``library`` (atomically, mode 0o700)."""
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        partial = Path(tmp) / library.name
        command = [*compiler, *FLAGS, "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}"]
        command += [*map(str, SOURCES), "-o", str(partial)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise RuntimeError(f"`{shlex.join(command)}` could not run: {error}") from error
        if result.returncode != 0:
            raise RuntimeError(f"`{shlex.join(command)}` failed:\n{result.stderr[-2000:]}")
        os.chmod(partial, 0o700)  # the compiler's mode follows the umask (0o777 under 000)
        os.replace(partial, library)  # atomic: a concurrent build leaves one whole file


def build(cache_dir: Path | None = None) -> Path:
    """Compiles the kernel (once per source, compiler, flags, jaxlib and CPU); returns its path.

    A cached library is returned only once :func:`unsafe_reason` finds nothing
    wrong with it and with its folder.

    Raises:
        RuntimeError: naming the compiler command and its error output, or the
            folder or library refused and why.
    """
    compiler = _compiler()
    cache_dir = _usable_cache_dir(cache_dir or _cache_dir())
    library = cache_dir / library_name(compiler)
    if os.path.lexists(library):
        _refuse_unless_safe(library, "library")
        return library
    _compile(compiler, library)
    return library


_SIMD_8BIT: list[bool] = []  # set when the library is registered


def _register(library: Path) -> None:
    """Loads ``library`` and registers its targets with XLA; unloads it if a symbol is missing."""
    handle = ctypes.CDLL(str(library))
    try:
        handlers = {target: getattr(handle, symbol) for target, symbol in _SYMBOLS.items()}
        simd_8bit = bool(handle.FunctionalAdam8bitSimd())
    except AttributeError:
        _unload(handle)  # or loading the rebuilt file at this path returns this handle again
        raise
    for target, handler in handlers.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    _SIMD_8BIT[:] = [simd_8bit]


def has_8bit_simd() -> bool:
    """Whether the loaded kernel has the AVX-512 code of the 8-bit step (``False`` if not loaded)."""
    return available() and _SIMD_8BIT == [True]


def _unload(handle: ctypes.CDLL) -> None:
    """Unloads ``handle`` (POSIX ``dlclose``; where there is none, nothing)."""
    dlclose = getattr(_ctypes, "dlclose", None)
    if dlclose is not None:
        dlclose(handle._handle)


def load() -> None:
    """Builds (or finds), loads and registers the kernel; rebuilds once a library that will not load.

    Raises:
        Exception: whatever kept the kernel from loading (:func:`available` catches it).
    """
    library = build()
    try:
        _register(library)
    except (OSError, AttributeError):  # truncated, empty or foreign: build it again, once
        library.unlink(missing_ok=True)
        _register(build())


@functools.cache
def available() -> bool:
    """Whether the CPU kernel is built, loaded and registered with XLA (tried once per process).

    Any failure gives ``False`` and one ``RuntimeWarning`` naming its cause.
    """
    if os.environ.get("FUNCTIONAL_ADAM_NATIVE", "1") == "0":
        return False
    try:
        load()
    except Exception as error:  # a kernel that fails must never stop a step
        warnings.warn(
            f"functional_adam: the fused CPU Adam kernel is unavailable, so update_and_apply "
            f"uses the XLA path ({type(error).__name__}: {error}). "
            f"Set FUNCTIONAL_ADAM_NATIVE=0 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True
