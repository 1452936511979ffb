"""The MNIST IDX loader of examples/mnist: parsing, checksums, lookup order, download, errors."""

import gzip
import hashlib
import struct

import numpy as np
import pytest
from mnist import data as mdata
from mnist.data import FILES, MnistError, load_idx, load_mnist


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding written here from the format's definition (not with the loader's code)."""
    codes = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}
    code = codes[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path, array: np.ndarray) -> str:
    """Writes ``array`` as IDX (gzip when ``path`` ends in .gz); returns the raw bytes' MD5."""
    raw = idx_bytes(array)
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return hashlib.md5(raw).hexdigest()


def fake_mnist(directory, n_train=12, n_test=5, gz=True, seed=0):
    """Four small MNIST-shaped IDX files in ``directory``; returns (arrays, md5 by name)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    md5 = {}
    for role, name in FILES.items():
        md5[name] = write_idx(directory / (name + (".gz" if gz else "")), arrays[role])
    return arrays, md5


@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([7, 2, 1, 0], np.uint8),
        np.array([[1, -2], [300000, 4]], np.int32),
        np.array([0.5, -1.25], np.float32),
    ],
    ids=["u8-3d", "u8-1d", "i32-2d", "f32-1d"],
)
def test_load_idx_shapes_dtypes_values(tmp_path, suffix, array):
    path = tmp_path / f"x-idx{suffix}"
    md5 = write_idx(path, array)
    out = load_idx(path, md5)
    assert out.shape == array.shape
    assert out.dtype == array.dtype  # native byte order, same type
    np.testing.assert_array_equal(out, array)


def test_truncated_file_names_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    raw = idx_bytes(np.zeros((3, 28, 28), np.uint8))
    path.write_bytes(raw[:-10])
    with pytest.raises(MnistError, match=r"train-images-idx3-ubyte.*truncated"):
        load_idx(path)


def test_truncated_header_names_the_file(tmp_path):
    path = tmp_path / "short-idx.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(MnistError, match=r"short-idx\.gz.*truncated"):
        load_idx(path)


def test_wrong_magic_names_the_file(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(idx_bytes(np.zeros(4, np.uint8)))
    raw[0:4] = b"\x1f\x8b\x08\x00"  # e.g. a gzip file gzipped twice
    with gzip.open(path, "wb") as f:
        f.write(bytes(raw))
    with pytest.raises(MnistError, match=r"t10k-labels-idx1-ubyte\.gz.*not an IDX file"):
        load_idx(path)


def test_wrong_checksum_names_the_file(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(path, np.array([5, 0, 4], np.uint8))
    with pytest.raises(MnistError, match=r"train-labels-idx1-ubyte\.gz.*wrong checksum"):
        load_idx(path, "0" * 32)


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    with pytest.raises(MnistError, match=r"t10k-images-idx3-ubyte\.gz.*not found"):
        load_idx(path)


def test_damaged_gzip_names_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(MnistError, match=r"train-images-idx3-ubyte\.gz.*cannot read"):
        load_idx(path)


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    """No MNIST_DIR, and a per-user cache inside tmp_path."""
    monkeypatch.delenv(mdata.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "functional_adam" / "mnist"


@pytest.mark.parametrize("gz", [True, False])
def test_load_mnist_reads_a_directory(tmp_path, no_env, gz):
    arrays, md5 = fake_mnist(tmp_path / "d", gz=gz)
    ds = load_mnist(tmp_path / "d", download_missing=False, md5=md5)
    assert ds.directory == tmp_path / "d"
    for role, array in arrays.items():
        got = getattr(ds, role)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, array)


def test_lookup_order_data_dir_then_env_then_cache(tmp_path, monkeypatch, no_env):
    cache = no_env
    _, md5_cache = fake_mnist(cache, seed=1)
    _, md5_env = fake_mnist(tmp_path / "env", seed=2)
    _, md5_arg = fake_mnist(tmp_path / "arg", seed=3)
    assert load_mnist(None, download_missing=False, md5=md5_cache).directory == cache
    monkeypatch.setenv(mdata.ENV_VAR, str(tmp_path / "env"))
    assert load_mnist(None, download_missing=False, md5=md5_env).directory == tmp_path / "env"
    ds = load_mnist(tmp_path / "arg", download_missing=False, md5=md5_arg)
    assert ds.directory == tmp_path / "arg"
    # an incomplete --data-dir is skipped in favour of the next complete candidate
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    ds = load_mnist(tmp_path / "partial", download_missing=False, md5=md5_env)
    assert ds.directory == tmp_path / "env"


def test_download_from_a_mirror_into_the_first_candidate(tmp_path, no_env):
    mirror = tmp_path / "mirror"
    arrays, md5 = fake_mnist(mirror)
    target = tmp_path / "target"
    ds = load_mnist(target, mirrors=[mirror.as_uri() + "/"], md5=md5, progress=False)
    assert ds.directory == target
    assert sorted(p.name for p in target.iterdir()) == sorted(n + ".gz" for n in FILES.values())
    np.testing.assert_array_equal(ds.train_images, arrays["train_images"])


def test_download_skips_a_mirror_with_a_bad_file(tmp_path, no_env):
    good, bad = tmp_path / "good", tmp_path / "bad"
    arrays, md5 = fake_mnist(good, seed=0)
    fake_mnist(bad, seed=5)  # same names, other content: fails the checksum
    ds = load_mnist(tmp_path / "t", mirrors=[bad.as_uri(), good.as_uri()], md5=md5, progress=False)
    np.testing.assert_array_equal(ds.test_labels, arrays["test_labels"])


def test_offline_without_files_says_what_to_put_where(tmp_path, no_env):
    target = tmp_path / "nothing-here"
    with pytest.raises(MnistError) as info:
        load_mnist(target, mirrors=["http://127.0.0.1:9/"], progress=False)
    message = str(info.value)
    assert str(target) in message
    for name in FILES.values():
        assert f"{name}.gz" in message
    assert "--data-dir" in message and mdata.ENV_VAR in message
    assert not any(p.suffix == ".part" for p in target.iterdir())


def test_no_download_lists_the_searched_directories(tmp_path, no_env):
    with pytest.raises(MnistError, match=r"not downloading; searched .*nowhere"):
        load_mnist(tmp_path / "nowhere", download_missing=False)


def test_shared_mnist_matches_its_readme(mnist):
    """The copy in ../shared/data/mnist, with the facts stated in its README."""
    assert mnist.train_images.shape == (60000, 28, 28)
    assert mnist.test_images.shape == (10000, 28, 28)
    assert mnist.train_images.dtype == mnist.train_labels.dtype == np.uint8
    assert mnist.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert mnist.test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert mnist.train_images.mean() / 255 == pytest.approx(0.1307, abs=1e-4)
