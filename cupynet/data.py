"""CIFAR-10 data: the official python-pickle batches -> uint8 arrays, train/validation/test splits,
a built-in sample, and synthetic data.

    from cupynet import data
    ds = data.load_cifar10("/path/to/cifar-10-batches-py")     # or its parent folder
    ds.train.images    # uint8 (45000, 32, 32, 3) NHWC, C-contiguous
    ds.train.labels    # int32 (45000,) in 0..9
    ds = data.load_cifar10(data.builtin_sample_dir())           # 900 / 100 / 500 real images, no download
    ds = data.synthetic_dataset(num_train=512, num_test=128)    # random pixels, for timing and smoke tests

The files are those of `cifar-10-python.tar.gz`: `data_batch_1` .. `data_batch_5` (10,000 training images
each), `test_batch` (10,000) and `batches.meta` (label names). Each batch is a pickled dict with b'data', a
uint8 array (N, 3072) whose rows hold one image in CHW order (1024 red, 1024 green, 1024 blue values, each
plane row-major), and b'labels', a list of N ints in 0..9.

Reading is safe: the unpickler admits only the few NumPy and codec callables that array pickles need, so a
crafted file cannot run code. Every problem with the files is a one-line `DataError` naming the file.

Images stay uint8 here; normalization and augmentation happen later, batch by batch (on the GPU for the CuPy
backend), so the whole dataset costs 1 byte per value wherever it sits.
"""

import _codecs
import os
import pickle
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cupynet.errors import DataError

try:  # NumPy >= 2 keeps the array pickling helpers in numpy._core; NumPy 1.x in numpy.core.
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
    from numpy._core.multiarray import scalar as _np_scalar
except ImportError:  # pragma: no cover - depends on the installed NumPy
    from numpy.core.multiarray import _reconstruct as _np_reconstruct
    from numpy.core.multiarray import scalar as _np_scalar


CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (32, 32, 3)  # H, W, C
NUM_CLASSES = len(CLASS_NAMES)

TRAIN_BATCH_NAMES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH_NAME = "test_batch"
META_NAME = "batches.meta"
BATCHES_DIR_NAME = "cifar-10-batches-py"

_PIXELS_PER_IMAGE = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]  # 3072
# An official batch is ~31 MB (~45 MB when re-pickled by Python 3 at protocol 2). Anything far larger is not
# a CIFAR-10 batch, and refusing it before reading keeps a wrong path from eating the host's memory.
MAX_FILE_BYTES = 200 * 1024 * 1024


# --------------------------------------------------------------------------------------------------------
# Containers


@dataclass
class Split:
    """One split of the data: images uint8 (N, 32, 32, 3) NHWC, C-contiguous; labels int32 (N,) in 0..9."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        # A wrong layout or dtype here is a bug in the caller, not bad user data, hence ValueError.
        if self.images.dtype != np.uint8 or self.images.shape[1:] != IMAGE_SHAPE:
            raise ValueError(f"Split images must be uint8 (N, 32, 32, 3), got {self.images.dtype} {self.images.shape}")
        if self.labels.dtype != np.int32 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"Split labels must be int32 (N,), got {self.labels.dtype} {self.labels.shape}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Dataset:
    """Train, validation (may be empty) and test splits, the class names, and a one-line description."""

    train: Split
    validation: Split
    test: Split
    label_names: list[str]
    description: str


# --------------------------------------------------------------------------------------------------------
# Safe unpickling


class _SafeUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild NumPy arrays, lists, dicts, numbers and strings, and nothing else.

    `pickle.load` would import and call whatever a file names; a CIFAR-10 batch needs only the callables
    below, so every other name is refused before it is imported.
    """

    # (module, name) as written in the file -> the object to use. Official batches (Python 2, NumPy 1.x) name
    # numpy.core.multiarray; NumPy 2 writes numpy._core.multiarray; Python 3 writes bytes at protocol 2 as
    # _codecs.encode(latin-1 text). `scalar` rebuilds NumPy scalars (labels saved as a list of np.int64).
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
        ("numpy.core.multiarray", "scalar"): _np_scalar,
        ("numpy._core.multiarray", "scalar"): _np_scalar,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs.encode,
    }

    def __init__(self, file, path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module, name):
        allowed = self.ALLOWED.get((module, name))
        if allowed is None:
            raise DataError(
                f"{self.path}: refuses to load '{module}.{name}' (a CIFAR-10 batch holds only arrays, lists "
                f"and strings; this file tries to call code)"
            )
        return allowed


def _one_line(text) -> str:
    """Messages of DataError are one line, even when they quote an exception from a corrupt file."""
    return " ".join(str(text).split())


def _load_pickle(path):
    """Unpickle one data file safely; any failure becomes a one-line DataError naming the file."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise DataError(
                    f"{path}: file is {size / 2**20:.0f} MiB, larger than any CIFAR-10 batch "
                    f"(limit {MAX_FILE_BYTES // 2**20} MiB); not loading it"
                )
            try:
                return _SafeUnpickler(f, path).load()
            except DataError:
                raise
            except EOFError:
                raise DataError(f"{path}: file is truncated (the pickle ends early)") from None
            except Exception as e:  # noqa: BLE001
                # Arbitrary bytes can make the unpickler fail in many ways (UnpicklingError, ValueError,
                # KeyError, TypeError, struct.error, MemoryError, ...): all of them mean a corrupt file.
                reason = _one_line(f"{type(e).__name__}: {e}")
                raise DataError(f"{path}: not a readable CIFAR-10 pickle ({reason})") from None
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a CIFAR-10 batch file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({_one_line(e.strerror or e)})") from None


# --------------------------------------------------------------------------------------------------------
# Reading


def _get_key(batch, key, path):
    """batch[key] for a batch dict from `path`, or a DataError saying the key is missing."""
    if key not in batch:
        found = ", ".join(repr(k) for k in list(batch)[:8])
        raise DataError(f"{path}: no {key!r} entry (found keys: {found})")
    return batch[key]


def _check_data(data, path) -> np.ndarray:
    """b'data' -> uint8 (N, 3072), or a DataError saying what is wrong with it."""
    if not isinstance(data, np.ndarray):
        raise DataError(f"{path}: b'data' is a {type(data).__name__}, expected a uint8 array of shape (N, 3072)")
    if data.ndim != 2 or data.shape[1] != _PIXELS_PER_IMAGE:
        raise DataError(f"{path}: b'data' has shape {data.shape}, expected (N, 3072)")
    if data.dtype == np.uint8:
        return data
    # Accept another integer dtype only when every value fits a pixel; never round floats silently.
    if data.dtype.kind not in "iu":
        raise DataError(f"{path}: b'data' has dtype {data.dtype}, expected uint8 pixel values")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise DataError(f"{path}: b'data' has values outside 0..255")
    return data.astype(np.uint8)


def _check_labels(labels, num_images, path) -> np.ndarray:
    """b'labels' -> int32 (N,) in 0..9, or a DataError saying what is wrong with it."""
    if not isinstance(labels, (list, tuple, np.ndarray)):
        raise DataError(f"{path}: b'labels' is a {type(labels).__name__}, expected a list of ints")
    try:
        array = np.asarray(labels)
    except (ValueError, RecursionError):       # ragged ([[1, 2], 3]) or nested past NumPy's depth
        raise DataError(f"{path}: b'labels' is not a flat list of ints") from None
    # Booleans and floats are not class indices even when they look like 0 and 1.
    if array.size and array.dtype.kind not in "iu":
        raise DataError(f"{path}: b'labels' are not integers (dtype {array.dtype})")
    if array.shape != (num_images,):
        raise DataError(f"{path}: {array.size} labels for {num_images} images")
    if array.size and (array.min() < 0 or array.max() >= NUM_CLASSES):
        raise DataError(
            f"{path}: labels outside 0..{NUM_CLASSES - 1} (found {array.min()}..{array.max()}); "
            f"is this CIFAR-10?"
        )
    return array.astype(np.int32)


def _rows_to_nhwc(rows: np.ndarray) -> np.ndarray:
    """uint8 (N, 3072) rows in CHW order -> uint8 (N, 32, 32, 3) NHWC, C-contiguous."""
    height, width, channels = IMAGE_SHAPE
    planes = rows.reshape(-1, channels, height, width)  # (N, 3, 32, 32)
    images = np.empty((planes.shape[0], height, width, channels), dtype=np.uint8)
    for c in range(channels):                           # a plane at a time: 2x faster than one 4-D transpose
        images[..., c] = planes[:, c]
    return images


def _nhwc_to_rows(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 32, 32, 3) NHWC -> uint8 (N, 3072) rows in CHW order, as the official files store them."""
    chw = images.transpose(0, 3, 1, 2)  # (N, 3, 32, 32)
    return np.ascontiguousarray(chw).reshape(-1, _PIXELS_PER_IMAGE)


def read_batch_file(path) -> tuple[np.ndarray, np.ndarray]:
    """Read one official batch file -> (images uint8 (N, 32, 32, 3) NHWC, labels int32 (N,))."""
    path = os.fspath(path)
    batch = _load_pickle(path)
    if not isinstance(batch, dict):
        raise DataError(f"{path}: holds a {type(batch).__name__}, expected the dict of a CIFAR-10 batch")
    rows = _check_data(_get_key(batch, b"data", path), path)  # (N, 3072)
    labels = _check_labels(_get_key(batch, b"labels", path), rows.shape[0], path)  # (N,)
    return _rows_to_nhwc(rows), labels


def _decode_name(name, path) -> str:
    """A label name from batches.meta (bytes from Python 2 files, str from Python 3 ones) -> str."""
    if isinstance(name, bytes):
        try:
            return name.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path}: label name {name!r} is not text") from None
    if isinstance(name, str):
        return name
    raise DataError(f"{path}: label name {name!r} is a {type(name).__name__}, expected a string")


def read_meta_file(path) -> list[str]:
    """Read batches.meta -> the 10 label names, as str."""
    path = os.fspath(path)
    meta = _load_pickle(path)
    if not isinstance(meta, dict):
        raise DataError(f"{path}: holds a {type(meta).__name__}, expected the dict of batches.meta")
    names = _get_key(meta, b"label_names", path)
    if not isinstance(names, (list, tuple)) or len(names) != NUM_CLASSES:
        count = len(names) if isinstance(names, (list, tuple)) else type(names).__name__
        raise DataError(f"{path}: b'label_names' should list {NUM_CLASSES} names, found {count}")
    return [_decode_name(name, path) for name in names]


def find_batches_dir(data_dir) -> str:
    """The cifar-10-batches-py folder: `data_dir` itself if it holds data_batch_1, else that child of it."""
    data_dir = os.fspath(data_dir)
    if os.path.isfile(data_dir):
        raise DataError(f"{data_dir}: a file, not a data folder (an archive such as cifar-10-python.tar.gz? extract "
                        f"it, tar xf FILE, and pass the folder it makes)")
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: data directory not found")
    for candidate in (data_dir, os.path.join(data_dir, BATCHES_DIR_NAME)):
        if os.path.isfile(os.path.join(candidate, TRAIN_BATCH_NAMES[0])):
            return candidate
    raise DataError(
        f"{data_dir}: no CIFAR-10 batches here (expected {TRAIN_BATCH_NAMES[0]} in it or in "
        f"{BATCHES_DIR_NAME}/ under it; get cifar-10-python.tar.gz and extract it)"
    )


def _split_off_validation(images, labels, validation_size, source) -> tuple[Split, Split]:
    """Split training data into (train, validation): validation is the LAST `validation_size` images.

    The official batches are already shuffled, so the tail is a fair, deterministic sample of every class.
    images: uint8 (N, 32, 32, 3); labels: int32 (N,).
    """
    num_images = labels.shape[0]
    if isinstance(validation_size, bool) or not isinstance(validation_size, (int, np.integer)):
        raise DataError(f"{source}: validation size must be an integer, got {validation_size!r}")
    if not num_images:
        raise DataError(f"{source}: the training batches hold no images")
    if not 0 <= validation_size < num_images:
        raise DataError(
            f"{source}: validation size {validation_size} must be at least 0 and less than the "
            f"{num_images} training images"
        )
    cut = num_images - int(validation_size)
    # Slices along N of a C-contiguous array are C-contiguous views: no copy.
    train = Split(images[:cut], labels[:cut])
    validation = Split(images[cut:], labels[cut:])
    return train, validation


def _default_validation_size(num_train_images: int) -> int:
    """10% of the training images: 5,000 of CIFAR-10's 50,000, the split of He et al. and the reference."""
    return num_train_images // 10


def load_cifar10(data_dir, validation_size=None) -> Dataset:
    """Load CIFAR-10 from `data_dir` (cifar-10-batches-py or its parent).

    Reads all five training batches (the TF reference read only four), the test batch and the label names.
    validation_size: how many of the training images to hold out (the last ones); None means 10%.
    """
    batches_dir = find_batches_dir(data_dir)
    label_names = read_meta_file(os.path.join(batches_dir, META_NAME))

    # The six files side by side: unpickling holds the GIL, but the NHWC copies do not, so threads halve the
    # load on two cores (1.11 s -> 0.57 s here). The first error raised, in file order, is the one reported.
    names = (*TRAIN_BATCH_NAMES, TEST_BATCH_NAME)
    with ThreadPoolExecutor(max_workers=min(len(names), os.cpu_count() or 1)) as pool:
        *parts, (test_images, test_labels) = pool.map(read_batch_file,
                                                      [os.path.join(batches_dir, name) for name in names])
    train_images = np.concatenate([images for images, _ in parts])  # (50000, 32, 32, 3)
    train_labels = np.concatenate([labels for _, labels in parts])  # (50000,)
    del parts  # the per-batch copies; the concatenation is what we keep

    if validation_size is None:
        validation_size = _default_validation_size(train_labels.shape[0])
    train, validation = _split_off_validation(train_images, train_labels, validation_size, batches_dir)
    test = Split(test_images, test_labels)
    if not len(test):                 # an evaluation over no images has no accuracy
        raise DataError(f"{os.path.join(batches_dir, TEST_BATCH_NAME)}: holds no images")

    description = (
        f"CIFAR-10 from {batches_dir}: {len(train)} train, {len(validation)} validation, {len(test)} test"
    )
    return Dataset(train, validation, test, label_names, description)


def builtin_sample_dir() -> str:
    """The cifar-10-batches-py folder of the small real sample shipped inside the package."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_data", BATCHES_DIR_NAME)


# --------------------------------------------------------------------------------------------------------
# Writing


class _Python2BytesPickler(pickle._Pickler):
    """A protocol-2 pickler that writes bytes as Python 2 byte strings, as the official batches do.

    Python 3's pickler stores bytes at protocol 2 as `_codecs.encode(<latin-1 text>)`, and that text is
    UTF-8 inside the pickle: pixels >= 128 take two bytes, so a batch grows from ~31 MB to ~45 MB and the
    file no longer matches the official ones. Writing bytes with the BINSTRING opcodes gives the exact
    encoding of the original release, which every CIFAR-10 reader (encoding='bytes' or 'latin1') loads.
    The pure-Python pickler is used because only it lets a subclass replace how one type is saved.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes_as_python2_str(self, obj):
        size = len(obj)
        if size < 256:
            self.write(pickle.SHORT_BINSTRING + struct.pack("<B", size) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", size) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes_as_python2_str


def _atomic_pickle(path, obj) -> None:
    """Pickle `obj` to `path` at protocol 2 through a temporary file, so readers never see half a file."""
    path = os.fspath(path)
    tmp_path = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp_path, "wb") as f:
            _Python2BytesPickler(f, protocol=2).dump(obj)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def _as_bytes(text) -> bytes:
    return text if isinstance(text, bytes) else str(text).encode("utf-8")


def write_batch_file(path, images, labels, batch_label: str, filenames=None) -> None:
    """Write one batch in the official layout (pickle protocol 2, atomically).

    images: uint8 (N, 32, 32, 3) NHWC; labels: ints (N,) in 0..9; filenames: N names (default image_00000.png..).
    The file holds b'batch_label', b'labels' (list of int), b'data' uint8 (N, 3072) CHW rows, b'filenames'.
    """
    path = os.fspath(path)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{path}: images to write must be uint8 (N, 32, 32, 3), got {images.dtype} {images.shape}")
    num_images = images.shape[0]
    labels = _check_labels(labels, num_images, path)
    if filenames is None:
        filenames = [f"image_{i:05d}.png" for i in range(num_images)]
    if len(filenames) != num_images:
        raise DataError(f"{path}: {len(filenames)} filenames for {num_images} images")

    batch = {
        b"batch_label": _as_bytes(batch_label),
        b"labels": [int(label) for label in labels],
        b"data": _nhwc_to_rows(images),  # uint8 (N, 3072)
        b"filenames": [_as_bytes(name) for name in filenames],
    }
    _atomic_pickle(path, batch)


def write_meta_file(path, label_names, num_cases_per_batch: int = 10000) -> None:
    """Write batches.meta in the official layout: b'label_names', b'num_cases_per_batch', b'num_vis'."""
    meta = {
        b"label_names": [_as_bytes(name) for name in label_names],
        b"num_cases_per_batch": int(num_cases_per_batch),
        b"num_vis": _PIXELS_PER_IMAGE,
    }
    _atomic_pickle(path, meta)


# --------------------------------------------------------------------------------------------------------
# Synthetic data


def synthetic_dataset(num_train=50000, num_test=10000, seed=0, validation_size=0) -> Dataset:
    """Random uint8 images and labels with CIFAR-10's shapes: for timing and tests, learns nothing.

    num_train counts the training images before the validation split, like CIFAR-10's 50,000; the
    validation split is the last `validation_size` of them. The same seed gives the same data.
    """
    for name, value, minimum in (("num_train", num_train, 1), ("num_test", num_test, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise DataError(f"synthetic data: {name} must be an integer >= {minimum}, got {value!r}")
    rng = np.random.default_rng(seed)
    # One vectorized draw per array: fast even for the full 60,000 images.
    train_images = rng.integers(0, 256, size=(num_train, *IMAGE_SHAPE), dtype=np.uint8)  # (N, 32, 32, 3)
    train_labels = rng.integers(0, NUM_CLASSES, size=num_train, dtype=np.int32)  # (N,)
    test_images = rng.integers(0, 256, size=(num_test, *IMAGE_SHAPE), dtype=np.uint8)
    test_labels = rng.integers(0, NUM_CLASSES, size=num_test, dtype=np.int32)

    source = f"synthetic data (seed {seed})"
    train, validation = _split_off_validation(train_images, train_labels, validation_size, source)
    test = Split(test_images, test_labels)
    description = (
        f"synthetic random CIFAR-10-shaped data (seed {seed}): {len(train)} train, "
        f"{len(validation)} validation, {len(test)} test"
    )
    return Dataset(train, validation, test, list(CLASS_NAMES), description)
