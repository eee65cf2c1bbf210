"""Datasets as NumPy arrays: MNIST-style IDX files (checked against the official pins) or tensorflow-datasets.

Every split is {'image': (N, H, W, C) uint8 in 0-255, 'label': (N,) int32}; C is 1 for IDX files. IDX loading
uses only NumPy and the standard library, so it works offline and never imports TensorFlow or tensorflow-datasets.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import math
import os
import socket
import struct
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from digits_jax.config import Config

Split = dict[str, np.ndarray]
Splits = dict[str, Split]

DATA_DIR_ENV = "DIGITS_JAX_DATA_DIR"

# SHA-256 of the uncompressed content: .gz bytes differ between equally valid recompressions.
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# split -> (images file, labels file), by their standard names without .gz.
IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# ndim -> (magic number, what such a file holds). The magic is 0, 0, data type (0x08 = ubyte), ndim.
_MAGIC = {3: (0x00000803, "images"), 1: (0x00000801, "labels")}
_GZIP_MAGIC = b"\x1f\x8b"


class DataError(ValueError):
    """A data file or directory is missing or invalid; the message names it and says what to do."""


def read_idx(path: str | os.PathLike[str], *, ndim: int | None = None) -> np.ndarray:
    """Reads one IDX file, gzipped or not (told apart by content, not name).

    Args:
      path: the file.
      ndim: 3 to require an images file, 1 a labels file; None accepts either.

    Returns:
      uint8 array of the header's shape: (N, rows, cols) for images, (N,) for labels.
    """
    if ndim not in (*_MAGIC, None):
        raise ValueError(f"read_idx(ndim={ndim!r}): 3 (images), 1 (labels) or None (either)")
    path = Path(path)
    return _parse_idx(path, _read_bytes(path), ndim)


def _read_bytes(path: Path) -> bytes:
    """The file's uncompressed content: what the pins hash and what `_parse_idx` parses."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check the path or download the file again") from None
    if data[:2] != _GZIP_MAGIC:
        if path.suffix == ".gz":
            raise DataError(f"{path}: named .gz but is not gzip (starts with {data[:2].hex() or 'nothing'}, "
                            f"not 1f8b); if it is a raw IDX file remove the .gz, otherwise download it again")
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: corrupt gzip stream ({error}); the file is damaged or was cut short, "
                        f"download it again") from error


def _parse_idx(path: Path, data: bytes, ndim: int | None) -> np.ndarray:
    if len(data) < 4:
        raise DataError(f"{path}: truncated IDX header: expected at least 4 bytes, found {len(data)}; "
                        f"download the file again")
    magic = int.from_bytes(data[:4], "big")
    allowed = [_MAGIC[ndim]] if ndim is not None else list(_MAGIC.values())
    if magic not in [number for number, _ in allowed]:
        expected = " or ".join(f"0x{number:08x} for {kind}" for number, kind in allowed)
        detail = f" (data type byte 0x{data[2]:02x}; only 0x08, unsigned byte, is supported)" if data[2] != 8 else ""
        raise DataError(f"{path}: wrong magic number: expected {expected}, found 0x{magic:08x}{detail}; "
                        f"this is not the right kind of IDX file, check which file is where or download it again")
    file_ndim = data[3]
    header = 4 + 4 * file_ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header: expected {header} bytes, found {len(data)}; "
                        f"download the file again")
    shape = struct.unpack_from(f">{file_ndim}I", data, 4)
    expected, found = math.prod(shape), len(data) - header
    if found < expected:
        raise DataError(f"{path}: truncated: expected {expected} bytes of data for shape {shape}, found {found}; "
                        f"the download was probably interrupted, download the file again")
    if found > expected:
        raise DataError(f"{path}: too long: expected {expected} bytes of data for shape {shape}, found {found}; "
                        f"this is not a valid IDX file, download it again")
    # Copied so callers get an ordinary writable array rather than a view of immutable bytes.
    return np.frombuffer(data, np.uint8, expected, header).reshape(shape).copy()


def _find(directory: Path, name: str) -> Path:
    # Raw first: reading it skips decompression. The dotted spelling is common on mirrors.
    dotted = name.replace("-idx", ".idx")
    candidates = [name, f"{name}.gz", dotted, f"{dotted}.gz"]
    for candidate in candidates:
        if (directory / candidate).is_file():
            return directory / candidate
    raise DataError(f"{directory}: missing file: looked for {', '.join(candidates)}; put the IDX files there "
                    f"or point --data-dir / ${DATA_DIR_ENV} at the directory that has them")


def _read_verified(path: Path, name: str, ndim: int, verify_mnist: bool) -> np.ndarray:
    data = _read_bytes(path)
    array = _parse_idx(path, data, ndim)
    if verify_mnist:
        actual = hashlib.sha256(data).hexdigest()
        if actual != MNIST_SHA256[name]:
            raise DataError(f"{path}: checksum mismatch: expected sha256 {MNIST_SHA256[name]}, found {actual} "
                            f"(of the uncompressed content); the file is corrupt or not the official MNIST. "
                            f"Download it again, or read it without the MNIST pins as another dataset: --data-dir DIR "
                            f"with `train --set dataset=custom` or `eval`/`report --dataset custom`")
    return array


def _load_idx_dir(directory: Path, verify_mnist: bool, files: tuple[str, ...] = tuple(IDX_FILES)
                  ) -> tuple[Splits, dict[str, Path]]:
    """`load_idx_dir` of the `files` splits ('train' and/or 'test'), plus each one's labels file (for messages)."""
    if directory.is_file():
        raise DataError(f"{directory}: a file, not a directory; give the directory that holds the IDX files")
    if not directory.is_dir():
        raise DataError(f"{directory}: data directory does not exist; create it with the MNIST IDX files "
                        f"({', '.join(name for pair in IDX_FILES.values() for name in pair)}, .gz or not) "
                        f"or fix --data-dir / ${DATA_DIR_ENV}")
    # Look for all four before reading any, so a missing file is reported at once.
    paths = {split: (_find(directory, image), _find(directory, label)) for split, (image, label) in IDX_FILES.items()
             if split in files}
    return _load_idx_files(paths, verify_mnist)


def _load_idx_files(paths: dict[str, tuple[Path, Path]], verify_mnist: bool) -> tuple[Splits, dict[str, Path]]:
    """Reads each split's (images, labels) files (the pins go by `IDX_FILES` names); also returns the labels files."""
    splits: Splits = {}
    label_paths: dict[str, Path] = {}
    for split, (image_path, label_path) in paths.items():
        image_name, label_name = IDX_FILES[split]
        images = _read_verified(image_path, image_name, 3, verify_mnist)
        labels = _read_verified(label_path, label_name, 1, verify_mnist)
        if len(images) != len(labels):
            raise DataError(f"image/label count mismatch: {image_path} has {len(images)} images but {label_path} "
                            f"has {len(labels)} labels; the files belong to different datasets or one is "
                            f"damaged, download both again")
        splits[split] = {"image": images[..., None], "label": labels.astype(np.int32)}
        label_paths[split] = label_path
    return splits, label_paths


def load_idx_dir(directory: str | os.PathLike[str], *, verify_mnist: bool) -> Splits:
    """Reads the four standard MNIST IDX files (each gzipped or not) from `directory`.

    Args:
      directory: holds train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and
        t10k-labels-idx1-ubyte, each optionally with .gz (or spelled train-images.idx3-ubyte).
      verify_mnist: check the SHA-256 of each file's uncompressed content against `MNIST_SHA256`.

    Returns:
      {'train', 'test'}, each {'image': (N, H, W, 1) uint8, 'label': (N,) int32}.
    """
    return _load_idx_dir(Path(directory), verify_mnist)[0]


_USE_IDX_DIR = (f"give --data-dir a directory of IDX files (train-images-idx3-ubyte.gz etc.) instead (for MNIST, "
                f"${DATA_DIR_ENV} works too)")


def load_tfds(name: str, *, data_dir: str | os.PathLike[str] | None = None) -> Splits:
    """Loads `name`'s train and test splits with tensorflow-datasets (downloading and preparing if needed).

    Reads through `tfds.data_source` (random access to ArrayRecord files; reading needs no TensorFlow, images
    are decoded with Pillow). Preparing needs TensorFlow in tensorflow-datasets 4.9.10: without it, a dataset
    that tfds downloads as IDX files (mnist, fashion_mnist, kmnist) and has not prepared is fetched by
    `_download_idx` instead; others raise a `DataError` saying what to do.

    Args:
      name: the tfds dataset name, e.g. 'mnist'.
      data_dir: where tfds keeps datasets and downloads; None for its default ($TFDS_DATA_DIR or
        ~/tensorflow_datasets).

    Returns:
      {'train', 'test'}, each {'image': (N, H, W, C) uint8, 'label': (N,) int32}, in tfds's order (shuffled
      once, when tfds prepares the dataset), or the IDX files' order when read by `_download_idx`.
    """
    try:
        import tensorflow_datasets as tfds  # here, not at the top: IDX loading must not need or import it

        builder = tfds.builder(name, data_dir=data_dir)
        urls = _idx_urls(builder)
        # Without TensorFlow tfds would download such a dataset, then fail to prepare it: let it only read a
        # prepared one, and otherwise fetch the IDX files with `_download_idx`.
        idx_fallback = urls is not None and importlib.util.find_spec("tensorflow") is None
        # tfds picks ArrayRecord (random access, written without TensorFlow) only when data_dir is None;
        # with a data_dir it would write TFRecord, which needs TensorFlow and has no data source.
        builder_kwargs = {"file_format": "array_record"}
        with _one_try_offline(repr(name), list(builder.url_infos or ())):
            try:
                sources = {split: tfds.data_source(name, split=split, data_dir=data_dir, download=not idx_fallback,
                                                   builder_kwargs=builder_kwargs) for split in ("train", "test")}
            except Exception:
                if not idx_fallback:
                    raise
                sources = {}
        if urls and not sources:
            return _download_idx(builder, urls)
        return {split: _to_arrays(source, f"tensorflow-datasets {name!r} split {split!r}")
                for split, source in sources.items()}
    except DataError:
        raise
    except Exception as error:
        detail = _first_line(error)
        if _missing_tensorflow(error):
            raise DataError(f"tensorflow-datasets could not prepare {name!r}: its download and preparation code "
                            f"needs TensorFlow, which digits_jax does not install ({detail}); install tensorflow, or "
                            f"prepare it where TensorFlow is (`tfds build {name} --file_format=array_record`) and "
                            f"point $TFDS_DATA_DIR at the result, or {_USE_IDX_DIR}") from error
        raise DataError(f"tensorflow-datasets could not download, prepare or read {name!r} ({detail}); "
                        f"without network access, {_USE_IDX_DIR}") from error


def _first_line(error: BaseException) -> str:
    """'Type: first line of the message': for an unknown name tfds appends every dataset it knows (~260 lines)."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"


def _idx_urls(builder: Any) -> dict[str, str] | None:
    """{IDX file name: URL} if `builder` downloads IDX .gz files as tfds's MNIST does, with registered checksums.

    MNIST, Fashion-MNIST and KMNIST share MNIST's download code (its URL + these names); EMNIST has its own.
    """
    from tensorflow_datasets.image_classification import mnist

    if type(builder)._split_generators is not mnist.MNIST._split_generators:
        return None
    urls = {name: urllib.parse.urljoin(builder.URL, f"{name}.gz") for pair in IDX_FILES.values() for name in pair}
    return urls if set(urls.values()) <= set(builder.url_infos or ()) else None


def _unreachable(urls: list[str]) -> str:
    """Why `urls` cannot be downloaded from here: '' unless a host's name does not resolve (and no proxy would
    look it up for us)."""
    proxies = urllib.request.getproxies()
    for scheme, host in sorted({(parts.scheme, parts.hostname or "") for parts in map(urllib.parse.urlsplit, urls)
                                if parts.scheme in ("http", "https")}):
        if scheme in proxies and not urllib.request.proxy_bypass(host):
            continue
        try:
            socket.getaddrinfo(host, None)
        except OSError as error:
            return f"the name {host} does not resolve ({error}): no network access"
    return ""


@contextlib.contextmanager
def _one_try_offline(what: str, urls: list[str]) -> Iterator[None]:
    """Exists because tfds retries a failed download 10 times with back-off (about 3.5 minutes in all) before
    it says that the machine has no network: where `urls` cannot be reached, it tries each once, and an error
    names `what` and why. What tfds has prepared or keeps in its download cache is read as before."""
    offline = _unreachable(urls)
    if not offline:
        yield
        return
    from tensorflow_datasets.core.download import downloader

    retries = downloader.MAX_RETRIES
    downloader.MAX_RETRIES = 0
    try:
        yield
    except Exception as error:
        # Not restored here: tfds's download threads for the other files may not have started yet, and with
        # 10 retries they would hold the process's exit for minutes after this error.
        # A failed connection is what `offline` explains; another error (a damaged prepared copy) is named.
        detail = "" if isinstance(error, OSError) else f" ({_first_line(error)})"
        raise DataError(f"tensorflow-datasets could not read or download {what}{detail}: {offline}; "
                        f"{_USE_IDX_DIR}") from error
    downloader.MAX_RETRIES = retries


def _download_idx(builder: Any, urls: dict[str, str]) -> Splits:
    """Exists because tfds 4.9.10 cannot prepare MNIST-style datasets without TensorFlow, not a dependency of ours.

    (It extracts the .gz files with tf.io.gfile and encodes images with tf.image.) Its download manager needs no
    TensorFlow: set up as the builder sets it up, it keeps the files in <data_dir>/downloads/<name> (reused by later
    calls, and by tfds once TensorFlow is there) and checks tfds's registered sizes and checksums; we read the IDX.
    """
    from tensorflow_datasets.core import download

    try:
        manager = download.DownloadManager(download_dir=builder.data_dir_root / "downloads", dataset_name=builder.name,
                                           url_infos=builder.url_infos, force_checksums_validation=True)
        with _one_try_offline(f"the IDX files of {builder.name!r}", list(urls.values())):
            files = {name: Path(path) for name, path in manager.download(urls).items()}
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"tensorflow-datasets cannot prepare {builder.name!r} without TensorFlow, and downloading its "
                        f"IDX files with its download manager failed ({type(error).__name__}: {error}); without "
                        f"network access, {_USE_IDX_DIR}") from error
    paths = {split: (files[image], files[label]) for split, (image, label) in IDX_FILES.items()}
    return _load_idx_files(paths, verify_mnist=builder.name == "mnist")[0]


def _missing_tensorflow(error: BaseException | None) -> bool:
    """Whether `error` or any exception it was raised from is TensorFlow failing to import."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ImportError) and (error.name == "tensorflow" or "'tensorflow'" in str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


# Records per batched read: ~2.5x faster than one at a time, without holding a whole split's records as dicts.
_BATCH = 4096


def _to_arrays(source: Any, origin: str) -> Split:
    n = len(source)
    if n == 0:
        raise DataError(f"{origin}: has no examples; prepare the dataset again or use --data-dir")
    first = source[0]
    # Filled in place: stacking 70,000 small arrays would hold every record twice.
    images = np.empty((n, *np.shape(first["image"])), np.uint8)
    labels = np.empty((n,), np.int32)
    batched = hasattr(source, "__getitems__")
    for start in range(0, n, _BATCH):
        indices = range(start, min(start + _BATCH, n))
        records = None
        if batched:
            try:
                records = source.__getitems__(list(indices))
            except TypeError:
                # tfds.testing.mock_data installs an unbound `__getitems__` that fails with TypeError: read
                # one record at a time instead (a real error then shows up on that path too).
                batched = False
        if records is None:
            records = [source[i] for i in indices]
        for i, record in zip(indices, records, strict=True):
            images[i] = record["image"]
            labels[i] = record["label"]
    return {"image": images, "label": labels}


def check(splits: Splits, num_classes: int, origins: dict[str, str] | None = None) -> None:
    """Raises DataError unless `splits` holds 'train', 'validation' and 'test', each as `check_split` wants,
    with the same (H, W, C) in every split. `origins` names each split's source in the messages (default: "the
    SPLIT split")."""
    shapes = {}
    for split in ("train", "validation", "test"):
        origin = (origins or {}).get(split, f"the {split} split")
        arrays = splits.get(split)
        if arrays is None or "image" not in arrays or "label" not in arrays:
            raise DataError(f"{origin}: missing; give 'train', 'validation' and 'test', each {{'image', 'label'}} "
                            "(a split may have 0 rows)")
        check_split(arrays, origin, num_classes)
        shapes[origin] = arrays["image"].shape[1:]
    if len(set(shapes.values())) > 1:
        raise DataError("the splits' images differ in size (height, width, channels): "
                        f"{'; '.join(f'{o} {shape}' for o, shape in shapes.items())}; a model takes one size: "
                        "give every split the same")


def check_split(arrays: dict[str, Any], origin: str, num_classes: int | None = None) -> None:
    """Raises DataError, naming `origin`, unless `arrays` is {'image': (N, H, W, C) uint8, 'label': (N,) integers}
    (NumPy or device arrays), the labels in [0, num_classes) when it is given (that check reads them)."""
    for key in ("image", "label"):  # a list would pass the checks below and fail where it is put on the device
        if not hasattr(arrays[key], "dtype"):
            raise DataError(f"{origin}: the {key}s are a {type(arrays[key]).__name__}; give a NumPy or JAX array")
    images, labels = arrays["image"], arrays["label"]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"{origin}: images are {images.dtype} of shape {images.shape}; give uint8 pixels 0-255 "
                        "shaped (N, height, width, channels): the model scales them itself")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{origin}: labels are {labels.dtype} of shape {labels.shape} for {len(images)} images; "
                        "give one integer class per image")
    if num_classes is not None:
        labels = np.asarray(labels)
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.size:
            examples = sorted(set(bad[:10].tolist()))
            raise DataError(f"{origin}: {bad.size} labels outside [0, {num_classes}) (e.g. {examples}); set "
                            "config.num_classes to cover them or fix the labels")


def with_source(config: Config, data_dir: str | None = None, dataset: str | None = None) -> Config:
    """`config` reading its data from `data_dir`, as `dataset` (any name but "mnist" skips the MNIST checksums),
    where given: `eval`'s and `report`'s --data-dir and --dataset. With a `dataset` other than config's, no
    training images are held out (validation_size 0) and none are left out (train_limit None): another dataset's
    files are scored whole, however many training images they have."""
    changes: dict[str, Any] = {"data_dir": data_dir} if data_dir else {}
    if dataset and dataset != config.dataset:  # nor cut to the run's train_limit (a tiny run scored 256 of 60,000)
        changes |= {"dataset": dataset, "validation_size": 0, "train_limit": None}
    return config.replace(**changes)


def load_key(config: Config) -> tuple[object, ...]:
    """The fields of `config` that `load` reads: configs with equal keys get the same splits."""
    return config.dataset, config.data_dir, config.num_classes, config.validation_size, config.train_limit


SPLITS = ("train", "validation", "test")


def load(config: Config, splits: tuple[str, ...] = SPLITS) -> Splits:
    """The `splits` (default: train, validation and test) that `config` asks for.

    The source is config.data_dir, else (for "mnist" only: it names where MNIST's files are)
    ${DIGITS_JAX_DATA_DIR}, else tensorflow-datasets `config.dataset`. IDX
    files are checked against the MNIST pins iff config.dataset == "mnist"; for the test split alone only the
    t10k files are read (and needed). Validation is the last config.validation_size training images (independent
    of the seed); config.train_limit then keeps only the first images of the rest.

    Returns:
      {split: {'image': (N, H, W, C) uint8, 'label': (N,) int32}} for each of `splits`, the same H, W, C in every
      split.
    """
    if isinstance(splits, str):  # iterated, it would be one letter per split
        raise TypeError(f"data.load(splits={splits!r}): give a tuple of split names, e.g. ({splits!r},)")
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"data.load(splits={splits!r}): {unknown} are not splits; choose from {SPLITS}")
    directory = config.data_dir or (os.environ.get(DATA_DIR_ENV) if config.dataset == "mnist" else None)
    if directory:
        files = ("test",) if set(splits) == {"test"} else tuple(IDX_FILES)  # validation is cut from train
        read, label_paths = _load_idx_dir(Path(directory), verify_mnist=config.dataset == "mnist", files=files)
        origins = {split: str(path) for split, path in label_paths.items()}
    else:
        read = load_tfds(config.dataset)
        origins = {split: f"tensorflow-datasets {config.dataset!r} split {split!r}" for split in read}
    if "train" not in read:  # the test split alone: checked beside empty others of its image size
        test = read["test"]
        empty = {"image": test["image"][:0], "label": test["label"][:0]}
        check({"train": empty, "validation": empty, "test": test}, config.num_classes, origins)
        return {"test": test}

    train, n = read["train"], len(read["train"]["label"])
    if not 0 <= config.validation_size < n:
        raise ValueError(f"config.validation_size = {config.validation_size}: must be >= 0 and smaller than the "
                         f"{n} training images of {origins['train']}")
    cut = n - config.validation_size
    validation = {key: array[cut:] for key, array in train.items()}
    train = {key: array[:cut] for key, array in train.items()}
    if config.train_limit is not None:
        train = {key: array[:config.train_limit] for key, array in train.items()}
    loaded = {"train": train, "validation": validation, "test": read["test"]}
    check(loaded, config.num_classes, origins | {"validation": origins["train"]})
    return {split: loaded[split] for split in splits}


def fingerprint(splits: Splits) -> str:
    """SHA-256 over every split's images and labels: which exact data a run saw, in which order."""
    digest = hashlib.sha256()
    for name in sorted(splits):
        for key in sorted(splits[name]):
            digest.update(f"{name}/{key}{splits[name][key].shape}".encode())
            digest.update(np.ascontiguousarray(splits[name][key]).tobytes())
    return digest.hexdigest()
