"""The kernel's cache is private and verified; a broken cache falls back or rebuilds, never crashes."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from functional_adam.kernels import build as native

STEP = """
    import jax, jax.numpy as jnp
    import functional_adam as fa
    tx = fa.adam(0.1)
    p = jnp.ones(3)
    step = jax.jit(lambda p, s, g: fa.update_and_apply(tx, g, s, p))
    print("kernel:", "functional_adam_adam" in step.lower(p, tx.init(p), p).as_text())
    print("params:", step(p, tx.init(p), p)[0].tolist())
"""

PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
  const char *marker = getenv("PLANTED_MARKER");
  if (marker) { FILE *f = fopen(marker, "w"); if (f) { fputs("ran", f); fclose(f); } }
}
int nothing_useful(void) { return 0; }
"""


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=os.environ | env,
    )


def _compile_c(path: Path, source: str) -> Path:
    """A shared library from C ``source`` at ``path`` (the kernel's symbols are not in it)."""
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-x", "c", "-", "-o", str(path)],
        input=source,
        text=True,
        check=True,
    )
    return path


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory) -> str:
    """The file name the kernel is cached under, learnt from a real build."""
    return native.build(tmp_path_factory.mktemp("good") / "cache").name


@pytest.fixture
def fallback(tmp_path, monkeypatch) -> Path:
    """An unwritable cache (a file where the folder should be) and a fresh ``$TMPDIR``;
    returns the fallback folder's path, ``$TMPDIR/functional_adam-<uid>``."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setenv("FUNCTIONAL_ADAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "tmp" / f"functional_adam-{os.getuid()}"


def test_planted_library_in_a_shared_fallback_folder_is_never_loaded(
    tmp_path, fallback, kernel_name
):
    fallback.mkdir()
    fallback.chmod(0o777)  # as another user (or umask 000) would leave it
    _compile_c(fallback / kernel_name, PLANTED)
    marker = tmp_path / "planted-ran"
    out = _run(STEP, PLANTED_MARKER=str(marker))
    assert out.returncode == 0, out.stderr
    assert not marker.exists()
    assert "kernel: False" in out.stdout and "params: [0.9" in out.stdout
    assert out.stderr.count("RuntimeWarning") == 1
    assert str(fallback) in out.stderr and "written by group or others" in out.stderr


def test_fallback_folder_that_is_a_symlink_is_refused(tmp_path, fallback, kernel_name):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    _compile_c(elsewhere / kernel_name, PLANTED)
    fallback.symlink_to(elsewhere)
    with pytest.raises(RuntimeError, match="symbolic link"):
        native.build(tmp_path / "cache")


def test_folder_of_another_user_is_refused(tmp_path, monkeypatch, kernel_name):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(cache).st_uid + 1)
    with pytest.raises(RuntimeError, match=r"refusing the kernel cache folder .* belongs to uid"):
        native.build(cache)
    assert not (cache / kernel_name).exists()


@pytest.mark.parametrize("plant", ["mode_666", "symlink", "other_owner"])
def test_untrusted_library_in_the_cache_is_refused(tmp_path, monkeypatch, kernel_name, plant):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    library = cache / kernel_name
    if plant == "mode_666":
        _compile_c(library, PLANTED).chmod(0o666)
    elif plant == "symlink":
        library.symlink_to(_compile_c(tmp_path / "planted.so", PLANTED))
    else:  # as if another user had put it there: lstat reports a foreign owner
        _compile_c(library, PLANTED)
        real_lstat = os.lstat

        def lstat(path, *args, **kwargs):
            info = real_lstat(path, *args, **kwargs)
            if Path(path) == library:
                fields = list(info[:10])
                fields[stat.ST_UID] += 1
                return os.stat_result(fields)
            return info

        monkeypatch.setattr(os, "lstat", lstat)
    reason = {"mode_666": "mode 0o666", "symlink": "symbolic link", "other_owner": "belongs to"}
    with pytest.raises(RuntimeError, match=f"refusing the kernel library .*{reason[plant]}"):
        native.build(cache)


def test_umask_000_still_creates_private_folders_and_library(tmp_path, monkeypatch):
    old = os.umask(0)
    try:
        library = native.build(tmp_path / "new" / "cache")
        assert stat.S_IMODE(os.stat(library.parent).st_mode) == 0o700
        assert not os.stat(library).st_mode & 0o022
        assert native.build(tmp_path / "new" / "cache") == library  # accepted when cached
    finally:
        os.umask(old)


def test_umask_000_fallback_folder_is_private(tmp_path, fallback, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")  # stop after the folder is made
    old = os.umask(0)
    try:
        with pytest.raises(RuntimeError, match="could not run"):
            native.build(tmp_path / "cache")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(fallback).st_mode) == 0o700


def test_unparsable_cxx_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv("CXX", 'g++ "')
    with pytest.warns(RuntimeWarning, match="CXX") as record:
        assert native.available.__wrapped__() is False  # the uncached function
    assert len(record) == 1


@pytest.mark.parametrize("broken", ["zero_bytes", "no_symbols"])
def test_broken_cached_library_is_rebuilt_once(tmp_path, kernel_name, broken):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    library = cache / kernel_name
    if broken == "zero_bytes":
        library.write_bytes(b"")
    else:
        _compile_c(library, "int nothing_useful(void) { return 0; }")
    out = _run(STEP, FUNCTIONAL_ADAM_CACHE=str(cache))
    assert out.returncode == 0, out.stderr
    assert "kernel: True" in out.stdout and "params: [0.9" in out.stdout
    assert "RuntimeWarning" not in out.stderr
    assert library.stat().st_size > 1000
    assert _run(STEP, FUNCTIONAL_ADAM_CACHE=str(cache)).stdout.count("kernel: True") == 1


def test_library_that_never_loads_gives_up_after_one_rebuild(tmp_path, monkeypatch):
    """A compiler that writes empty files: two builds, then the XLA path and one warning."""
    calls = tmp_path / "calls"
    compiler = tmp_path / "fake-c++"
    compiler.write_text(
        '#!/bin/sh\necho x >> "$CALLS"\nwhile [ "$1" != "-o" ]; do shift; done\n: > "$2"\n'
    )
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("CALLS", str(calls))
    monkeypatch.setenv("FUNCTIONAL_ADAM_CACHE", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match="unavailable") as record:
        assert native.available.__wrapped__() is False
    assert len(record) == 1
    assert calls.read_text().count("x") == 2
    shutil.rmtree(tmp_path / "cache")
