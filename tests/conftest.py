"""Shared pytest set-up."""

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# The examples (e.g. examples/mnist) are imported by their tests as top-level packages.
if str(REPO_ROOT / "examples") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "examples"))

MNIST_DIR = REPO_ROOT.parent / "shared" / "data" / "mnist"
"""The offline MNIST copy that tests and CI read: ``../shared/data/mnist`` from the repo root."""


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The shared MNIST directory (``../shared/data/mnist`` relative to the repository root)."""
    return MNIST_DIR


@pytest.fixture(scope="session")
def mnist(mnist_dir):
    """MNIST read once per session from :data:`MNIST_DIR`, checksums verified, no download."""
    from mnist.data import load_mnist

    return load_mnist(mnist_dir, download_missing=False, progress=False)
