"""Tests for digits_jax.data: IDX parsing and validation, splits, sources, and the real MNIST copy if present."""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from digits_jax import data
from digits_jax.config import Config
from digits_jax.data import DATA_DIR_ENV, DataError, load, load_idx_dir, load_tfds, read_idx

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_MNIST = Path(__file__).resolve().parents[2] / "shared/datasets/mnist"
N_TRAIN, N_TEST, NUM_CLASSES = 20, 8, 10


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic (0, 0, 0x08, ndim), big-endian dims, then the data."""
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(path: Path, array: np.ndarray, *, gz: bool | None = None) -> Path:
    """Writes `array` to `path` as IDX, gzipped if `gz` (default: if the name ends with .gz)."""
    payload = idx_bytes(np.asarray(array, np.uint8))
    path.write_bytes(gzip.compress(payload) if (path.suffix == ".gz" if gz is None else gz) else payload)
    return path


def make_idx_dir(directory: Path, *, gz: bool = True, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Writes tiny random train/test IDX files (standard names) to `directory`; returns what was written."""
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    written = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, NUM_CLASSES, n, dtype=np.uint8)
        image_name, label_name = data.IDX_FILES[split]
        write_idx(directory / f"{image_name}{suffix}", images)
        write_idx(directory / f"{label_name}{suffix}", labels)
        written[split] = {"image": images, "label": labels}
    return written


def custom_config(directory: Path, **changes: Any) -> Config:
    """A config reading `directory` without the MNIST pins (built directly: no need to import the models)."""
    values: dict[str, Any] = {"dataset": "custom", "data_dir": str(directory), "validation_size": 5,
                              "num_classes": NUM_CLASSES}
    return Config(**{**values, **changes})


# Reading.


def test_gz_and_raw_read_identically(tmp_path: Path) -> None:
    images = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    raw = read_idx(write_idx(tmp_path / "a-idx3-ubyte", images))
    gz = read_idx(write_idx(tmp_path / "b-idx3-ubyte.gz", images))
    # gzip is recognised by its magic bytes, not by the name.
    unnamed = read_idx(write_idx(tmp_path / "c-idx3-ubyte", images, gz=True))
    for array in (raw, gz, unnamed):
        assert array.dtype == np.uint8 and array.shape == (5, 28, 28)
        np.testing.assert_array_equal(array, images)
    labels = np.arange(7, dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "l.gz", labels), ndim=1), labels)
    with pytest.raises(ValueError, match=r"read_idx\(ndim=2\): 3 \(images\), 1 \(labels\) or None"):
        read_idx(tmp_path / "l.gz", ndim=2)


def test_splits_of_different_image_sizes_are_refused_naming_both(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    small = np.zeros((N_TEST, 20, 24), np.uint8)
    write_idx(tmp_path / f"{data.IDX_FILES['test'][0]}.gz", small)
    with pytest.raises(DataError, match=r"differ in size \(height, width, channels\): "
                                        r"\S*train-labels\S* \(28, 28, 1\); \S*t10k-labels\S* \(20, 24, 1\)"):
        load(custom_config(tmp_path))


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_dir_shapes_dtypes_and_values(tmp_path: Path, gz: bool) -> None:
    written = make_idx_dir(tmp_path, gz=gz)
    splits = load_idx_dir(tmp_path, verify_mnist=False)
    assert set(splits) == {"train", "test"}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        image, label = splits[split]["image"], splits[split]["label"]
        assert image.shape == (n, 28, 28, 1) and image.dtype == np.uint8
        assert label.shape == (n,) and label.dtype == np.int32
        np.testing.assert_array_equal(image[..., 0], written[split]["image"])
        np.testing.assert_array_equal(label, written[split]["label"])


def test_dotted_file_names_are_accepted(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    for path in tmp_path.iterdir():
        path.rename(path.with_name(path.name.replace("-idx", ".idx")))
    assert load_idx_dir(tmp_path, verify_mnist=False)["train"]["image"].shape == (N_TRAIN, 28, 28, 1)


# Each kind of bad input has its own message, naming the file.


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data directory does not exist") as info:
        load_idx_dir(tmp_path / "nowhere", verify_mnist=False)
    assert str(tmp_path / "nowhere") in str(info.value)


def test_a_file_given_as_the_directory(tmp_path: Path) -> None:
    (tmp_path / "mnist.npz").write_bytes(b"")
    with pytest.raises(DataError, match=r"mnist.npz: a file, not a directory; give the directory that holds the IDX "
                                        r"files"):
        load_idx_dir(tmp_path / "mnist.npz", verify_mnist=False)


def test_missing_file(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing file: looked for t10k-labels-idx1-ubyte, t10k-labels-idx1-ubyte.gz"):
        load_idx_dir(tmp_path, verify_mnist=False)


def test_truncated_file(tmp_path: Path) -> None:
    make_idx_dir(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=f"truncated: expected {N_TRAIN * 784} bytes of data .*, found "
                                        f"{N_TRAIN * 784 - 10}") as info:
        load_idx_dir(tmp_path, verify_mnist=False)
    assert str(path) in str(info.value)


def test_file_too_long(tmp_path: Path) -> None:
    path = tmp_path / "x-idx1-ubyte"
    path.write_bytes(idx_bytes(np.zeros(4, np.uint8)) + b"\0")
    with pytest.raises(DataError, match="too long: expected 4 bytes of data .*, found 5"):
        read_idx(path)


def test_wrong_magic(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    # A labels file where the training images belong.
    path = write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros(N_TRAIN, np.uint8))
    with pytest.raises(DataError, match="wrong magic number: expected 0x00000803 for images, found 0x00000801") as info:
        load_idx_dir(tmp_path, verify_mnist=False)
    assert str(path) in str(info.value)


def test_unsupported_data_type(tmp_path: Path) -> None:
    path = tmp_path / "floats-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 1) + b"\0" * 4)
    with pytest.raises(DataError, match=r"wrong magic number: .* found 0x00000d01 \(data type byte 0x0d"):
        read_idx(path)


def test_count_mismatch(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(N_TRAIN - 1, np.uint8))
    with pytest.raises(DataError, match=f"count mismatch: .* has {N_TRAIN} images but .* has {N_TRAIN - 1} labels") \
            as info:
        load_idx_dir(tmp_path, verify_mnist=False)
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in str(info.value)
    assert str(tmp_path / "train-labels-idx1-ubyte.gz") in str(info.value)


def test_checksum_mismatch(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    expected = data.MNIST_SHA256["train-images-idx3-ubyte"]
    with pytest.raises(DataError, match=f"checksum mismatch: expected sha256 {expected}, found [0-9a-f]{{64}}.*"
                                        f"not the official MNIST.*--data-dir DIR with `train --set dataset=custom` or "
                                        f"`eval`/`report --dataset custom`") as info:
        load_idx_dir(tmp_path, verify_mnist=True)
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in str(info.value)
    # The pins apply to config.dataset == "mnist" only.
    with pytest.raises(DataError, match="checksum mismatch"):
        load(custom_config(tmp_path, dataset="mnist"))
    assert len(load(custom_config(tmp_path))["train"]["label"]) == N_TRAIN - 5


def test_corrupt_gzip(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])  # cut short
    with pytest.raises(DataError, match="corrupt gzip stream") as info:
        load_idx_dir(tmp_path, verify_mnist=False)
    assert str(path) in str(info.value)


def test_gz_name_without_gzip_content(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8), gz=False)
    with pytest.raises(DataError, match="named .gz but is not gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_labels_out_of_range(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(N_TRAIN, dtype=np.uint8) % 5)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(N_TEST, 7, np.uint8))
    with pytest.raises(DataError, match=rf"{N_TEST} labels outside \[0, 5\) \(e.g. \[7\]\)") as info:
        load(custom_config(tmp_path, num_classes=5))
    assert str(tmp_path / "t10k-labels-idx1-ubyte.gz") in str(info.value)


# Splits and sources.


def test_validation_is_the_last_training_images(tmp_path: Path) -> None:
    written = make_idx_dir(tmp_path)
    splits = load(custom_config(tmp_path, validation_size=5))
    assert set(splits) == {"train", "validation", "test"}
    np.testing.assert_array_equal(splits["train"]["label"], written["train"]["label"][:15])
    np.testing.assert_array_equal(splits["validation"]["image"][..., 0], written["train"]["image"][15:])
    np.testing.assert_array_equal(splits["validation"]["label"], written["train"]["label"][15:])
    np.testing.assert_array_equal(splits["test"]["label"], written["test"]["label"])
    # The seed does not change the split.
    other = load(custom_config(tmp_path, validation_size=5, seed=123))
    np.testing.assert_array_equal(other["validation"]["image"], splits["validation"]["image"])


def test_the_test_split_alone_needs_only_the_test_files(tmp_path: Path) -> None:
    written = make_idx_dir(tmp_path, gz=False)
    for name in data.IDX_FILES["train"]:
        (tmp_path / name).unlink()
    splits = load(custom_config(tmp_path), ("test",))
    assert set(splits) == {"test"}
    np.testing.assert_array_equal(splits["test"]["image"][..., 0], written["test"]["image"])
    np.testing.assert_array_equal(splits["test"]["label"], written["test"]["label"])
    for asked in (("validation",), ("train", "test")):
        with pytest.raises(DataError, match=f"{tmp_path}: missing file: looked for train-images-idx3-ubyte"):
            load(custom_config(tmp_path), asked)
    with pytest.raises(ValueError, match=r"\['valid'\] are not splits"):
        load(custom_config(tmp_path), ("valid",))
    with pytest.raises(TypeError, match=r"splits='test'\): give a tuple of split names, e.g. \('test',\)"):
        load(custom_config(tmp_path), "test")  # was "['e', 's', 't'] are not splits"


def test_train_limit_leaves_validation_alone(tmp_path: Path) -> None:
    written = make_idx_dir(tmp_path)
    splits = load(custom_config(tmp_path, validation_size=5, train_limit=4))
    np.testing.assert_array_equal(splits["train"]["image"][..., 0], written["train"]["image"][:4])
    np.testing.assert_array_equal(splits["validation"]["label"], written["train"]["label"][15:])
    assert len(splits["test"]["label"]) == N_TEST


def test_empty_validation(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    splits = load(custom_config(tmp_path, validation_size=0))
    assert splits["validation"]["image"].shape == (0, 28, 28, 1) and splits["validation"]["image"].dtype == np.uint8
    assert splits["validation"]["label"].shape == (0,) and splits["validation"]["label"].dtype == np.int32
    assert len(splits["train"]["label"]) == N_TRAIN


def test_validation_size_too_large(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    with pytest.raises(ValueError, match=f"config.validation_size = {N_TRAIN}: .* {N_TRAIN} training images"):
        load(custom_config(tmp_path, validation_size=N_TRAIN))


def test_data_dir_from_environment_is_for_mnist_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_idx_dir(tmp_path)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    # For "mnist" the variable is used: these small files then fail the MNIST pins, naming the directory.
    with pytest.raises(DataError, match=f"{tmp_path}.*checksum mismatch"):
        load(custom_config(tmp_path, dataset="mnist", data_dir=None))
    # Another dataset never picks up MNIST's directory: it goes to tensorflow-datasets.
    asked = []
    splits = load_idx_dir(tmp_path, verify_mnist=False)  # (N, 28, 28, 1), as load_tfds gives them
    monkeypatch.setattr(data, "load_tfds", lambda name: asked.append(name) or splits)
    load(custom_config(tmp_path, dataset="fashion_mnist", data_dir=None))
    assert asked == ["fashion_mnist"]
    # config.data_dir wins over the environment.
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "nowhere"))
    assert len(load(custom_config(tmp_path))["validation"]["label"]) == 5


def test_idx_loading_imports_no_tensorflow(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    code = ("import sys; from digits_jax.config import Config; from digits_jax.data import load; "
            f"load(Config(dataset='custom', data_dir={str(tmp_path)!r}, validation_size=2)); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'tensorflow_datasets'}))")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_tfds_mock(monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorflow_datasets as tfds
    # USE_CODE builds random records from the dataset's feature spec: no network, no TensorFlow.
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=12):
        splits = load_tfds("mnist")
        monkeypatch.delenv(DATA_DIR_ENV, raising=False)
        loaded = load(Config(dataset="mnist", validation_size=3))
    for split in ("train", "test"):
        assert splits[split]["image"].shape == (12, 28, 28, 1) and splits[split]["image"].dtype == np.uint8
        assert splits[split]["label"].shape == (12,) and splits[split]["label"].dtype == np.int32
        assert splits[split]["label"].min() >= 0 and splits[split]["label"].max() < 10
    assert [len(loaded[s]["label"]) for s in ("train", "validation", "test")] == [9, 3, 12]


def test_tfds_failure_explains_the_alternative(monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorflow_datasets as tfds

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(tfds, "data_source", offline)
    resolves(monkeypatch)
    # Not a dataset tfds downloads as IDX files: without TensorFlow those never get here (see the tests below).
    with pytest.raises(DataError, match=f"could not download, prepare or read 'cifar10'.*give --data-dir a "
                                        f"directory of IDX files.*for MNIST, \\${DATA_DIR_ENV} works too") as info:
        load_tfds("cifar10")
    assert isinstance(info.value.__cause__, ConnectionError)


MNIST_URLS = [f"https://storage.googleapis.com/cvdf-datasets/mnist/{name}.gz"
              for pair in data.IDX_FILES.values() for name in pair]


def fake_downloads(monkeypatch: pytest.MonkeyPatch, tfds: Any, directory: Path) -> list[str]:
    """Makes tfds's `DownloadManager.download_and_extract` map each URL to the uncompressed file in `directory`.

    Download and extraction both stood in for. Returns the list of URLs asked for.
    """
    requested: list[str] = []

    def download_and_extract(self: Any, url_or_urls: dict[str, str]) -> dict[str, Any]:
        requested.extend(url_or_urls.values())
        return {key: directory / url.rsplit("/", 1)[-1].removesuffix(".gz") for key, url in url_or_urls.items()}

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", download_and_extract)
    resolves(monkeypatch)
    return requested


def serve_urls(monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]) -> list[str]:
    """Fakes only the network: tfds's HTTP GET serves each URL in `files` from that local file, others fail.

    Everything above it is tfds's own: its download manager, cache, INFO files and checksum checks. Returns the
    list of URLs fetched.
    """
    from tensorflow_datasets.core.download import downloader
    requested: list[str] = []

    @contextlib.contextmanager
    def open_with_requests(url: str, **kwargs: Any) -> Iterator[tuple[Any, Iterator[bytes]]]:
        requested.append(url)
        if url not in files:
            raise ConnectionError(f"no network in this test: {url}")
        content = files[url].read_bytes()
        yield SimpleNamespace(url=url, headers={"Content-length": str(len(content))}), iter([content])

    monkeypatch.setattr(downloader, "_open_with_requests", open_with_requests)
    resolves(monkeypatch)
    return requested


def resolves(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every host name resolves (these machines have no DNS): what `data` checks before tfds downloads."""
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *args, **kwargs: [])


def does_not_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    def getaddrinfo(host: str, *args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def registered(files: dict[str, Path]) -> dict[str, Any]:
    """tfds `UrlInfo`s (size, SHA-256 of the .gz bytes) of the files served at these URLs."""
    from tensorflow_datasets.core.download import checksums
    return {url: checksums.compute_url_info(path) for url, path in files.items()}


def without_tensorflow() -> None:
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed: this checks what happens without it")


def fail_like_missing_tensorflow(*args: object, **kwargs: object) -> None:
    """Stands in for `tfds.data_source` failing as tfds 4.9.10 does without TensorFlow (after downloading)."""
    raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")


@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason=f"real MNIST not found at {REAL_MNIST}")
def test_tfds_without_tensorflow_downloads_mnist_idx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorflow_datasets.image_classification import mnist
    without_tensorflow()
    files = {url: REAL_MNIST / url.rsplit("/", 1)[-1] for url in MNIST_URLS}
    # Three of the shared .gz files are the official archives, checked against tfds's registered checksums. The
    # fourth was recompressed (same content, other bytes): for this test only, register what is served for it.
    url_infos = dict(mnist.MNIST.url_infos)
    recompressed = MNIST_URLS[0]
    assert recompressed.endswith("/train-images-idx3-ubyte.gz")
    assert url_infos[recompressed] != registered(files)[recompressed]
    url_infos[recompressed] = registered(files)[recompressed]
    monkeypatch.setattr(mnist.MNIST, "url_infos", url_infos)
    requested = serve_urls(monkeypatch, files)

    # Not prepared, and tfds cannot prepare it without TensorFlow: its download manager fetches the IDX files.
    splits = load_tfds("mnist", data_dir=tmp_path)
    assert sorted(requested) == sorted(MNIST_URLS)
    assert len(list((tmp_path / "downloads/mnist").glob("*.gz"))) == 4
    assert not list(tmp_path.glob("mnist/*/*.array_record*"))  # not prepared by tfds
    expected = load_idx_dir(REAL_MNIST, verify_mnist=True)
    for split in ("train", "test"):  # in the IDX files' order: tfds would have shuffled them
        np.testing.assert_array_equal(splits[split]["image"], expected[split]["image"])
        np.testing.assert_array_equal(splits[split]["label"], expected[split]["label"])
        assert splits[split]["label"].dtype == np.int32
    does_not_resolve(monkeypatch)  # offline now: read from tfds's download cache
    again = load_tfds("mnist", data_dir=tmp_path)
    assert len(requested) == len(MNIST_URLS)  # nothing downloaded again
    np.testing.assert_array_equal(again["train"]["image"], splits["train"]["image"])
    assert "tensorflow" not in sys.modules


FASHION_URLS = [f"http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{name}.gz"
                for pair in data.IDX_FILES.values() for name in pair]


def test_tfds_without_tensorflow_downloads_through_tfds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorflow_datasets as tfds
    from tensorflow_datasets.image_classification import mnist
    without_tensorflow()
    (tmp_path / "served").mkdir()
    make_idx_dir(tmp_path / "served")
    files = {url: tmp_path / "served" / url.rsplit("/", 1)[-1] for url in FASHION_URLS}
    assert set(files) == set(mnist.FashionMNIST.url_infos)  # the builder's own URLs
    monkeypatch.setattr(mnist.FashionMNIST, "url_infos", registered(files))  # tiny stand-ins for the real files
    requested = serve_urls(monkeypatch, files)
    managers: list[Any] = []
    init = tfds.download.DownloadManager.__init__

    def recording_init(self: Any, **kwargs: Any) -> None:
        managers.append(kwargs)
        init(self, **kwargs)

    monkeypatch.setattr(tfds.download.DownloadManager, "__init__", recording_init)

    splits = load_tfds("fashion_mnist", data_dir=tmp_path / "tfds")
    assert sorted(requested) == sorted(FASHION_URLS)
    assert managers[0]["download_dir"] == tmp_path / "tfds/downloads"
    assert managers[0]["dataset_name"] == "fashion_mnist"
    assert len(list((tmp_path / "tfds/downloads/fashion_mnist").glob("*.gz.INFO"))) == 4  # tfds's bookkeeping
    expected = load_idx_dir(tmp_path / "served", verify_mnist=False)
    for split in ("train", "test"):
        for key in ("image", "label"):
            np.testing.assert_array_equal(splits[split][key], expected[split][key])
    again = load_tfds("fashion_mnist", data_dir=tmp_path / "tfds")
    assert len(requested) == len(FASHION_URLS) and len(managers) == 2
    np.testing.assert_array_equal(again["test"]["label"], splits["test"]["label"])
    assert "tensorflow" not in sys.modules


def test_tfds_without_tensorflow_checks_tfds_checksums(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    without_tensorflow()
    make_idx_dir(tmp_path)
    # Served as the real MNIST but not it: tfds's registered checksums reject the download.
    requested = serve_urls(monkeypatch, {url: tmp_path / url.rsplit("/", 1)[-1] for url in MNIST_URLS})
    with pytest.raises(DataError, match="downloading its IDX files with its download manager failed "
                                        "\\(NonMatchingChecksumError"):
        load_tfds("mnist", data_dir=tmp_path / "tfds")
    assert requested


def test_tfds_without_tensorflow_checks_mnist_pins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorflow_datasets.image_classification import mnist
    without_tensorflow()
    make_idx_dir(tmp_path)
    files = {url: tmp_path / url.rsplit("/", 1)[-1] for url in MNIST_URLS}
    monkeypatch.setattr(mnist.MNIST, "url_infos", registered(files))  # tfds accepts them; our pins do not
    serve_urls(monkeypatch, files)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*checksum mismatch"):
        load_tfds("mnist", data_dir=tmp_path / "tfds")


def test_tfds_without_tensorflow_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    without_tensorflow()
    requested = serve_urls(monkeypatch, {})
    with pytest.raises(DataError, match="cannot prepare 'mnist' without TensorFlow, and downloading its IDX files "
                                        "with its download manager failed .*no network.*give --data-dir a "
                                        "directory of IDX files") as info:
        load_tfds("mnist", data_dir=tmp_path)
    assert requested and set(requested) <= set(MNIST_URLS)
    assert isinstance(info.value.__cause__, ConnectionError)


def test_tfds_without_tensorflow_other_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorflow_datasets as tfds
    requested = serve_urls(monkeypatch, {})
    monkeypatch.setattr(tfds, "data_source", fail_like_missing_tensorflow)
    # EMNIST's builder derives from MNIST's but downloads a zip: no IDX fallback, the TensorFlow advice instead.
    with pytest.raises(DataError, match="could not prepare 'emnist': .* needs TensorFlow, which digits_jax does not "
                                        "install .*tfds build emnist.*give --data-dir a directory of IDX files"):
        load_tfds("emnist", data_dir=tmp_path)
    assert requested == []


def sorted_records(split: dict[str, np.ndarray]) -> np.ndarray:
    """Each record as one row (pixels, then label), rows sorted: equal for the same records in any order."""
    rows = np.concatenate([split["image"].reshape(len(split["label"]), -1).astype(np.int64),
                           split["label"][:, None].astype(np.int64)], axis=1)
    return rows[np.lexsort(rows.T[::-1])]


def test_tfds_prepared_mnist_reads_like_the_idx_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorflow_datasets as tfds
    from PIL import Image as pil_image
    from tensorflow_datasets.core.data_sources import base
    from tensorflow_datasets.core.features import image_feature
    from tensorflow_datasets.image_classification import mnist
    (tmp_path / "downloads").mkdir()
    make_idx_dir(tmp_path / "downloads", gz=False)
    requested = fake_downloads(monkeypatch, tfds, tmp_path / "downloads")
    idx_urls = data._idx_urls
    monkeypatch.setattr(data, "_idx_urls", lambda builder: None)  # no IDX fallback: tfds prepares it here
    # tfds 4.9.10's MNIST preparation calls TensorFlow three times: to extract (stood in for just above), to read
    # MNIST's files and to encode images. Stand in for those, so the rest of it is tfds's own code: MNIST's builder,
    # feature encoding, serialization, shuffling and the ArrayRecord writer, then the real data source.
    monkeypatch.setattr(mnist, "tf", SimpleNamespace(io=SimpleNamespace(gfile=SimpleNamespace(GFile=open))))
    monkeypatch.setattr(image_feature._ImageEncoder, "_encode_image",  # tf.image.encode_png
                        lambda self, image: self._encode_pil_image(pil_image.fromarray(image[..., 0])))
    monkeypatch.setattr(mnist, "_TRAIN_EXAMPLES", N_TRAIN)  # the builder reads exactly this many per split
    monkeypatch.setattr(mnist, "_TEST_EXAMPLES", N_TEST)
    batch_sizes: list[int] = []
    getitems = base.BaseDataSource.__getitems__

    def counting_getitems(self: Any, keys: Any) -> Any:
        batch_sizes.append(len(keys))
        return getitems(self, keys)

    monkeypatch.setattr(base.BaseDataSource, "__getitems__", counting_getitems)

    splits = load_tfds("mnist", data_dir=tmp_path / "tfds")
    assert sorted(requested) == sorted(MNIST_URLS)
    assert list((tmp_path / "tfds/mnist").glob("*/mnist-train.array_record-*"))
    assert sorted(batch_sizes) == [N_TEST, N_TRAIN]  # one batched read per split, not one read per record
    expected = load_idx_dir(tmp_path / "downloads", verify_mnist=False)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        image, label = splits[split]["image"], splits[split]["label"]
        assert image.shape == (n, 28, 28, 1) and image.dtype == np.uint8
        assert label.shape == (n,) and label.dtype == np.int32
        # tfds shuffles the examples once, when it prepares them: the same records, in another order.
        np.testing.assert_array_equal(sorted_records(splits[split]), sorted_records(expected[split]))
    # Prepared once: the second call reads what is there through tfds (IDX fallback back on: it is not needed) and
    # downloads nothing (any download would fail at once).
    monkeypatch.setattr(data, "_idx_urls", idx_urls)
    serve_urls(monkeypatch, {})
    again = load_tfds("mnist", data_dir=tmp_path / "tfds")
    assert len(requested) == len(MNIST_URLS)
    np.testing.assert_array_equal(again["train"]["image"], splits["train"]["image"])
    assert "tensorflow" not in sys.modules


@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason=f"real MNIST not found at {REAL_MNIST}")
def test_real_mnist() -> None:
    splits = load_idx_dir(REAL_MNIST, verify_mnist=True)
    assert splits["train"]["image"].shape == (60000, 28, 28, 1) and splits["train"]["label"].shape == (60000,)
    assert splits["test"]["image"].shape == (10000, 28, 28, 1) and splits["test"]["label"].shape == (10000,)
    assert splits["train"]["image"].dtype == np.uint8 and splits["train"]["label"].dtype == np.int32
    assert set(np.unique(splits["train"]["label"]).tolist()) == set(range(10))
    # Exact moments from the pixel histogram: no float32 or large temporary arrays.
    counts = np.bincount(splits["train"]["image"].ravel(), minlength=256).astype(np.float64)
    values = np.arange(256, dtype=np.float64)
    mean = counts @ values / counts.sum()
    std = np.sqrt(counts @ (values - mean) ** 2 / counts.sum())
    assert abs(mean - 33.318421449829934) < 1e-9
    assert abs(std - 78.56748998339798) < 1e-6


def test_fingerprint_changes_with_any_pixel_label_or_order(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    splits = load(custom_config(tmp_path))
    base = data.fingerprint(splits)
    assert base == data.fingerprint({k: {kk: vv.copy() for kk, vv in v.items()} for k, v in splits.items()})
    changed_pixel = {k: dict(v) for k, v in splits.items()}
    changed_pixel["test"]["image"] = splits["test"]["image"].copy()
    changed_pixel["test"]["image"][0, 0, 0, 0] ^= 1
    reordered = {k: dict(v) for k, v in splits.items()}
    reordered["train"]["label"] = splits["train"]["label"][::-1].copy()
    assert len({base, data.fingerprint(changed_pixel), data.fingerprint(reordered)}) == 3


def test_configs_with_the_same_load_key_get_the_same_splits(tiny_config):
    other = tiny_config.replace(model="bn", seed=3, learning_rate=0.5)  # fields load does not read
    assert data.load_key(other) == data.load_key(tiny_config)
    first, second = data.load(tiny_config), data.load(other)
    for split in first:
        for key in ("image", "label"):
            np.testing.assert_array_equal(first[split][key], second[split][key])
    assert data.load_key(tiny_config.replace(validation_size=64)) != data.load_key(tiny_config)


def test_an_unknown_tensorflow_datasets_name_is_one_short_line():
    """tfds's error lists every dataset it knows: ~260 lines for `--set dataset=custom` without --data-dir."""
    with pytest.raises(data.DataError, match=r"'no_such_dataset_xyz' \(DatasetNotFoundError: Dataset "
                                             r"no_such_dataset_xyz not found\.\); without network access, give "
                                             r"--data-dir") as info:
        data.load_tfds("no_such_dataset_xyz")
    assert "\n" not in str(info.value) and len(str(info.value)) < 600


@pytest.mark.parametrize("tensorflow", [False, True])
def test_tfds_without_network_tries_each_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   tensorflow: bool) -> None:
    """tfds itself retries each download 10 times with back-off, about 3.5 minutes, before it reports the failure;
    its threads for the other files go on after the first file's error, and the process waits for them to exit."""
    import urllib3
    from tensorflow_datasets.core.download import downloader

    looked_up: list[str] = []
    # tfds waits on the files in the sorted order of their keys, the test images' first in both paths: that
    # file's failure ends the load, and the other files' downloads are held until then, so that they start after
    # the error, as they can on a busy machine.
    first = next(url for url in MNIST_URLS if "t10k-images" in url)
    lock, released = threading.Lock(), threading.Event()
    started: list[str] = []
    finished: list[str] = []
    held_until_the_error: list[bool] = []
    open_url = downloader._open_url

    @contextlib.contextmanager
    def held_open_url(url: str, **kwargs: object) -> Iterator[object]:
        with lock:
            started.append(url)
        if url != first:
            held_until_the_error.append(released.wait(timeout=30))
        try:
            with open_url(url, **kwargs) as opened:
                yield opened
        finally:
            with lock:
                finished.append(url)

    def getaddrinfo(host: str, *args: object, **kwargs: object) -> None:
        looked_up.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(urllib3.util.retry.Retry, "sleep", lambda self, *args: None)  # no back-off waits here
    monkeypatch.setattr(downloader, "_open_url", held_open_url)
    monkeypatch.setattr(downloader, "MAX_RETRIES", downloader.MAX_RETRIES)  # put back after the test
    if tensorflow:  # installed or not: tfds downloads before it prepares
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *args: object() if name == "tensorflow" else find_spec(name, *args))
    with pytest.raises(DataError, match=r"could not read or download (the IDX files of )?'mnist': the name "
                                        r"storage.googleapis.com does not resolve \(.*Name or service not known\): "
                                        r"no network access; give --data-dir"):
        load_tfds("mnist", data_dir=tmp_path)
    released.set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (len(started) < len(MNIST_URLS) or len(finished) < len(started)):
        time.sleep(0.01)
    assert sorted(finished) == sorted(MNIST_URLS) and held_until_the_error == [True] * 3
    # Our check (once per download attempt at most), then one try per file: tfds alone looked up 11 times per file.
    assert set(looked_up) == {"storage.googleapis.com"} and len(looked_up) <= 2 + len(MNIST_URLS)


def test_tfds_without_network_still_names_an_error_of_another_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorflow_datasets as tfds

    def damaged(*args: object, **kwargs: object) -> None:
        raise NotImplementedError("no data source for the tfrecord format")

    monkeypatch.setattr(tfds, "data_source", damaged)
    does_not_resolve(monkeypatch)
    with pytest.raises(DataError, match=r"could not read or download 'cifar10' \(NotImplementedError: no data source "
                                        r"for the tfrecord format\): the name .* does not resolve"):
        load_tfds("cifar10")


def test_another_dataset_is_scored_whole_whatever_the_runs_limits(tiny_config):
    """eval --dataset custom --split train of a tiny run (train_limit 512) scored 512 of 60,000 images, silently."""
    other = data.with_source(tiny_config, "/elsewhere", "custom")
    assert (other.dataset, other.data_dir, other.validation_size, other.train_limit) == ("custom", "/elsewhere", 0,
                                                                                         None)
    same = data.with_source(tiny_config, "/elsewhere", tiny_config.dataset)  # the run's own: its splits as trained
    assert (same.validation_size, same.train_limit) == (tiny_config.validation_size, tiny_config.train_limit)
