"""Byte-level text data every machine has: the Python standard library's source files.

Tokens are bytes (vocabulary 256), so there is no tokenizer to download. The corpus is

- by default, every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` (site-packages
  and dist-packages left out);
- with ``--data PATH``, the text file PATH, or every text file under the folder PATH
  (hidden entries and files with a NUL byte in their first 8 KiB left out).

Train and validation are split **by file**, deterministically: a file is in validation when
the CRC-32 of its path relative to the root falls in the first ``val_fraction`` of the range,
so the split does not depend on the order files are listed in, nor on which other files
exist. Where that leaves a side empty (a single file, a handful of files), the last
``val_fraction`` of the concatenated bytes is the validation set instead.

Batches are windows of ``seq_len + 1`` bytes at random offsets drawn from a generator seeded
with ``(seed, step)``: the batch of a step depends on nothing else, so a resumed run sees the
batches an uninterrupted one would.
"""

from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
"""Folder names never read: installed third-party packages and bytecode."""

SEPARATOR = b"\n\n"
"""Put between consecutive files of the corpus."""


class DataError(ValueError):
    """A data source that cannot be used; the message names ``--data`` and the path."""


@dataclass(frozen=True)
class Corpus:
    """Training and validation tokens (uint8 byte values) and where they came from."""

    train: np.ndarray
    val: np.ndarray
    source: str
    train_files: int
    val_files: int

    def describe(self) -> str:
        """One line: where the tokens came from and how many there are."""
        return (
            f"data: {self.source}: {self.train_files} train files, {self.val_files} validation "
            f"files; {len(self.train):,} train tokens, {len(self.val):,} validation tokens "
            "(bytes, vocabulary 256)"
        )


def stdlib_root() -> Path:
    """The folder of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _visible(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return not any(p.startswith(".") or p in SKIPPED_DIRS for p in parts)


def list_files(root: Path, pattern: str = "*") -> list[Path]:
    """Regular files under ``root`` matching ``pattern``, sorted, hidden and skipped folders out."""
    return sorted(p for p in root.rglob(pattern) if p.is_file() and _visible(p, root))


def is_validation(relative_path: str, val_fraction: float) -> bool:
    """Whether the file at ``relative_path`` belongs to the validation set (CRC-32 rule)."""
    return zlib.crc32(relative_path.encode()) < val_fraction * 2**32


def _read(path: Path, flag_path: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"--data {flag_path}: cannot read {path}: {e.strerror or e}") from e


def _text_files(root: Path, pattern: str, flag_path: str) -> list[tuple[str, bytes]]:
    """``(relative path, content)`` of the text files under ``root``."""
    files = []
    for path in list_files(root, pattern):
        content = _read(path, flag_path)
        if b"\0" not in content[:8192]:
            files.append((path.relative_to(root).as_posix(), content))
    return files


def _join(contents: list[bytes]) -> np.ndarray:
    return np.frombuffer(SEPARATOR.join(contents), np.uint8)


def split_files(files: list[tuple[str, bytes]], val_fraction: float, source: str) -> Corpus:
    """The corpus of ``files`` split by file (see the module docstring)."""
    val = [c for name, c in files if is_validation(name, val_fraction)]
    train = [c for name, c in files if not is_validation(name, val_fraction)]
    if train and val:
        return Corpus(_join(train), _join(val), source, len(train), len(val))
    tokens = _join([c for _, c in files])
    cut = int(len(tokens) * (1 - val_fraction))
    return Corpus(tokens[:cut], tokens[cut:], f"{source} (split by position)", len(files), 0)


def load_corpus(data: str | None = None, val_fraction: float = 0.05) -> Corpus:
    """Reads the corpus: the standard library's ``*.py`` files, or ``data`` (a file or folder).

    Args:
      data: the ``--data`` path, or ``None`` for the standard library.
      val_fraction: the share of files (or, for a single file, of bytes) held out.

    Returns:
      A :class:`Corpus`.

    Raises:
      DataError: ``data`` does not exist, cannot be read, or holds no text; the message
        names ``--data`` and the path.
    """
    if data is None:
        root = stdlib_root()
        return split_files(_text_files(root, "*.py", str(root)), val_fraction, f"{root} (*.py)")
    path = Path(data).expanduser()
    if path.is_file():
        files = [(path.name, _read(path, data))]
    elif path.is_dir():
        files = _text_files(path, "*", data)
    else:
        raise DataError(f"--data {data}: no such file or folder")
    if not files or not any(c for _, c in files):
        raise DataError(f"--data {data}: no text found (empty, or only binary files)")
    return split_files(files, val_fraction, str(path))


def check_length(corpus: Corpus, seq_len: int) -> None:
    """Raises :class:`DataError` unless both splits hold a window of ``seq_len + 1`` tokens."""
    for name, tokens in (("train", corpus.train), ("validation", corpus.val)):
        if len(tokens) < seq_len + 1:
            raise DataError(
                f"--data {corpus.source}: the {name} split has {len(tokens)} tokens, fewer than "
                f"--seq-len {seq_len} + 1; use more text or a shorter --seq-len"
            )


def train_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int):
    """The ``(batch_size, seq_len + 1)`` uint8 windows of training step ``step``.

    Example:
        >>> tokens = np.arange(100, dtype=np.uint8)
        >>> b = train_batch(tokens, 4, 8, seed=0, step=3)
        >>> b.shape, bool((np.diff(b.astype(int), axis=1) == 1).all())
        ((4, 9), True)
        >>> bool((b == train_batch(tokens, 4, 8, seed=0, step=3)).all())
        True
    """
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    windows = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)
    return np.ascontiguousarray(windows[starts])


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int):
    """``(n_batches, batch_size, seq_len + 1)`` uint8 windows evenly spread over ``tokens``.

    The same windows at every evaluation, so validation losses are comparable across steps.
    """
    n = n_batches * batch_size
    starts = np.linspace(0, len(tokens) - seq_len - 1, n).astype(np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)
    return np.ascontiguousarray(windows[starts]).reshape(n_batches, batch_size, seq_len + 1)
