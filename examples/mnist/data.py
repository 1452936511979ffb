"""MNIST in IDX format: find, download, verify and read the four files.

The files are looked for, in this order, in ``--data-dir``, in the directory named by the
environment variable ``MNIST_DIR``, and in a per-user cache directory
(``$XDG_CACHE_HOME/functional_adam/mnist``, default ``~/.cache/functional_adam/mnist``). The
first directory that holds all four files (``.gz`` or decompressed) is used. If none does,
the files are downloaded from a public mirror into the first of those directories, with a
progress bar. Every file is checked against the published MD5 of its *decompressed* content,
so a re-gzipped copy is accepted and a damaged one is refused.

The IDX format (LeCun et al.): a big-endian header ``0 0 <dtype code> <ndim>``, then ``ndim``
big-endian uint32 sizes, then the data in C order.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
"""The four MNIST files, by role, without the ``.gz`` suffix."""

MD5: dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
"""Published MD5 of each file's decompressed content."""

MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
"""Public mirrors serving ``<name>.gz``; tried in order."""

ENV_VAR = "MNIST_DIR"

_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class MnistError(RuntimeError):
    """A problem with the MNIST files: missing, damaged, or not downloadable."""


@dataclass(frozen=True)
class Mnist:
    """MNIST as numpy arrays: images ``(n, 28, 28)`` uint8, labels ``(n,)`` uint8."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    directory: Path


def read_idx_bytes(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parses the bytes of one decompressed IDX file into a numpy array.

    Args:
      raw: the whole decompressed file.
      name: the file's name, used in error messages.

    Returns:
      The array, in native byte order, with the shape given by the header.

    Raises:
      MnistError: a wrong magic number, an unknown type code, or a file shorter or longer than
        its header says; the message names the file.
    """
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        magic = raw[:4].hex() if len(raw) >= 4 else f"only {len(raw)} bytes"
        raise MnistError(
            f"{name}: not an IDX file (magic number {magic}; expected 0000 then a type code "
            f"in {sorted(hex(c) for c in _IDX_DTYPES)} and the number of dimensions)"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise MnistError(f"{name}: truncated IDX header ({len(raw)} bytes, needs {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "too long"
        raise MnistError(
            f"{name}: {what}: {len(raw)} bytes, but its header (shape {shape}, {dtype.name}) "
            f"says {expected}"
        )
    data = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def read_file_bytes(path: Path) -> bytes:
    """Reads a file, decompressing it when its name ends in ``.gz``.

    Raises:
      MnistError: the file is missing or is not valid gzip; the message names it.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError as e:
        raise MnistError(f"{path}: file not found") from e
    except (OSError, EOFError) as e:
        raise MnistError(f"{path}: cannot read it ({e}); delete it and retry") from e


def load_idx(path: str | os.PathLike, md5: str | None = None) -> np.ndarray:
    """Reads one IDX file (``.gz`` or raw), checking the MD5 of its decompressed content.

    Args:
      path: the file.
      md5: the expected hex MD5 of the decompressed bytes, or ``None`` to skip the check.

    Returns:
      The array (see :func:`read_idx_bytes`).

    Raises:
      MnistError: missing, unreadable, wrong checksum or malformed; the message names the file.
    """
    path = Path(path)
    raw = read_file_bytes(path)
    if md5 is not None:
        got = hashlib.md5(raw).hexdigest()
        if got != md5.lower():
            raise MnistError(
                f"{path}: wrong checksum: MD5 of the decompressed content is {got}, expected "
                f"{md5}. The file is damaged or is not the MNIST file of that name; delete it "
                "to download it again."
            )
    return read_idx_bytes(raw, str(path))


def default_cache_dir() -> Path:
    """The per-user cache directory: ``$XDG_CACHE_HOME/functional_adam/mnist``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "functional_adam" / "mnist"


def candidate_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where the files are looked for, in order: ``data_dir``, ``$MNIST_DIR``, the cache."""
    dirs = [Path(data_dir)] if data_dir else []
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]))
    dirs.append(default_cache_dir())
    return [d.expanduser() for d in dirs]


def find_file(directory: Path, name: str) -> Path | None:
    """``directory/name.gz`` or ``directory/name``, whichever exists first, else ``None``."""
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def _complete(directory: Path, names: Sequence[str]) -> bool:
    return all(find_file(directory, n) is not None for n in names)


def download_file(url: str, dest: Path, *, progress: bool = True, timeout: float = 30.0) -> None:
    """Downloads ``url`` to ``dest`` (through a temporary file), with a tqdm progress bar."""
    tmp = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False)
        while chunk := response.read(1 << 16):
            out.write(chunk)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
    tmp.replace(dest)


def download(
    directory: Path,
    names: Sequence[str] = tuple(FILES.values()),
    *,
    mirrors: Sequence[str] = MIRRORS,
    md5: Mapping[str, str] = MD5,
    progress: bool = True,
) -> None:
    """Downloads the missing ``<name>.gz`` files into ``directory`` and verifies each.

    Raises:
      MnistError: no mirror served a file (offline, say); the message lists the files
        and the directories where they may be put by hand.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        if find_file(directory, name) is not None:
            continue
        dest = directory / f"{name}.gz"
        errors = []
        for mirror in mirrors:
            try:
                download_file(mirror.rstrip("/") + f"/{name}.gz", dest, progress=progress)
                load_idx(dest, md5.get(name))
                break
            except (urllib.error.URLError, OSError, ValueError, MnistError) as e:
                errors.append(f"{mirror}: {e}")
                dest.unlink(missing_ok=True)
                dest.with_name(dest.name + ".part").unlink(missing_ok=True)
        else:
            raise MnistError(_missing_message(names, directory, errors))


def _missing_message(names: Sequence[str], directory: Path, errors: Sequence[str]) -> str:
    files = "\n".join(f"  {n}.gz   (MD5 of decompressed content {MD5.get(n, '?')})" for n in names)
    tried = "\n".join(f"  {e}" for e in errors)
    return (
        f"MNIST not found and could not be downloaded into {directory}.\n"
        f"Download errors:\n{tried}\n"
        f"Put these files (gzip or decompressed) into {directory}, or into a directory you "
        f"name with --data-dir or the environment variable {ENV_VAR}:\n{files}\n"
        f"They are served, e.g., at {MIRRORS[0]}<name>.gz"
    )


def resolve_dir(
    data_dir: str | os.PathLike | None = None,
    *,
    download_missing: bool = True,
    mirrors: Sequence[str] = MIRRORS,
    md5: Mapping[str, str] = MD5,
    progress: bool = True,
) -> Path:
    """The directory holding all four files, downloading them into the first candidate if none.

    Args:
      data_dir: the directory the user named (``--data-dir``), or ``None``.
      download_missing: download when no candidate holds the files; otherwise raise.
      mirrors: base URLs to download ``<name>.gz`` from.
      md5: expected MD5 of each decompressed file, by name.
      progress: show download progress bars.

    Returns:
      The directory.

    Raises:
      MnistError: the files are not found and cannot be downloaded; the message says which
        files to put where.
    """
    names = tuple(FILES.values())
    dirs = candidate_dirs(data_dir)
    for d in dirs:
        if _complete(d, names):
            return d
    target = dirs[0]
    if not download_missing:
        searched = ", ".join(str(d) for d in dirs)
        raise MnistError(_missing_message(names, target, [f"not downloading; searched {searched}"]))
    try:
        download(target, names, mirrors=mirrors, md5=md5, progress=progress)
    except PermissionError as e:
        raise MnistError(f"{target}: cannot write there to download MNIST ({e})") from e
    return target


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    download_missing: bool = True,
    mirrors: Sequence[str] = MIRRORS,
    md5: Mapping[str, str] = MD5,
    progress: bool = True,
) -> Mnist:
    """Finds (or downloads), verifies and reads MNIST.

    Args:
      data_dir: see :func:`resolve_dir`.
      download_missing: see :func:`resolve_dir`.
      mirrors: see :func:`resolve_dir`.
      md5: expected MD5 of each decompressed file, by name; a name not in it is not checked.
      progress: show download progress bars.

    Returns:
      An :class:`Mnist` with uint8 images ``(n, 28, 28)`` and uint8 labels ``(n,)``.

    Raises:
      MnistError: a file is missing, damaged, or inconsistent with its partner file.
    """
    directory = resolve_dir(
        data_dir, download_missing=download_missing, mirrors=mirrors, md5=md5, progress=progress
    )
    arrays = {}
    for role, name in FILES.items():
        path = find_file(directory, name)
        if path is None:  # removed between resolve_dir and here
            raise MnistError(f"{directory / name}.gz: file not found")
        arrays[role] = load_idx(path, md5.get(name))
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise MnistError(
                f"{directory}: {split} images {images.shape} and labels {labels.shape} do not "
                "match (expected (n, rows, cols) and (n,))"
            )
    return Mnist(**arrays, directory=directory)
