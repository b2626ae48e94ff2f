"""Tests of cupynet.data as a library: reading and writing the official CIFAR-10 batches, splits, the
built-in sample, refusal of bad or malicious files, and synthetic data. CPU only, a few seconds.

    python -m pytest tests/test_data.py -q

Set CIFAR10_DIR to a full CIFAR-10 folder (or build /tmp/cifar_full with shared/data/cifar10_from_jpeg.py)
to also check the full 45,000 / 5,000 / 10,000 split.
"""

import os
import pickle

import numpy as np
import pytest

from cupynet import data
from cupynet.errors import DataError

IMAGES_PER_BATCH = 20  # small fake dataset: 5 x 20 = 100 training images, 30 test images
TEST_IMAGES = 30


# --------------------------------------------------------------------------------------------------------
# Helpers


def random_images(rng, num_images):
    return rng.integers(0, 256, size=(num_images, *data.IMAGE_SHAPE), dtype=np.uint8)  # (N, 32, 32, 3)


def write_fake_cifar(root, seed=0):
    """Write a small CIFAR-10 folder under root; return (dir, train images, train labels, test images, labels)."""
    rng = np.random.default_rng(seed)
    batches_dir = root / "cifar-10-batches-py"
    batches_dir.mkdir()
    train_images, train_labels = [], []
    for i, name in enumerate(data.TRAIN_BATCH_NAMES, start=1):
        images = random_images(rng, IMAGES_PER_BATCH)
        labels = rng.integers(0, 10, size=IMAGES_PER_BATCH)
        data.write_batch_file(batches_dir / name, images, labels, f"training batch {i} of 5")
        train_images.append(images)
        train_labels.append(labels)
    test_images = random_images(rng, TEST_IMAGES)
    test_labels = rng.integers(0, 10, size=TEST_IMAGES)
    data.write_batch_file(batches_dir / data.TEST_BATCH_NAME, test_images, test_labels, "testing batch 1 of 1")
    data.write_meta_file(batches_dir / data.META_NAME, data.CLASS_NAMES)
    return (batches_dir, np.concatenate(train_images), np.concatenate(train_labels), test_images, test_labels)


def dump(path, obj, protocol=2):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def good_batch(num_images=4):
    """A valid batch dict as Python 3 writes it with pickle.dump(..., protocol=2)."""
    return {
        b"batch_label": b"training batch 1 of 5",
        b"labels": [i % 10 for i in range(num_images)],
        b"data": np.zeros((num_images, 3072), dtype=np.uint8),
        b"filenames": [b"x.png"] * num_images,
    }


def assert_one_line_naming(error, name):
    message = str(error.value)
    assert "\n" not in message, message
    assert str(name) in message, message


# --------------------------------------------------------------------------------------------------------
# Round trip and layout


def test_round_trip_gives_identical_arrays(tmp_path):
    batches_dir, train_images, train_labels, test_images, test_labels = write_fake_cifar(tmp_path)
    ds = data.load_cifar10(batches_dir, validation_size=0)

    assert ds.train.images.dtype == np.uint8 and ds.train.images.shape == (100, 32, 32, 3)
    assert ds.train.labels.dtype == np.int32 and ds.train.labels.shape == (100,)
    assert ds.train.images.flags["C_CONTIGUOUS"] and ds.test.images.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(ds.train.images, train_images)
    np.testing.assert_array_equal(ds.train.labels, train_labels)
    np.testing.assert_array_equal(ds.test.images, test_images)
    np.testing.assert_array_equal(ds.test.labels, test_labels)
    assert ds.label_names == list(data.CLASS_NAMES)
    assert len(ds.validation) == 0


def test_parent_dir_is_accepted(tmp_path):
    batches_dir = write_fake_cifar(tmp_path)[0]
    assert data.find_batches_dir(tmp_path) == str(batches_dir)
    assert data.find_batches_dir(batches_dir) == str(batches_dir)
    assert len(data.load_cifar10(tmp_path).test) == TEST_IMAGES


def test_chw_rows_become_nhwc(tmp_path):
    # One image, all zeros except green (channel 1) at row 5, column 7: in a CHW row that is
    # index 1 * 1024 + 5 * 32 + 7.
    rows = np.zeros((1, 3072), dtype=np.uint8)
    rows[0, 1 * 1024 + 5 * 32 + 7] = 200
    rows[0, 2 * 1024 + 0 * 32 + 31] = 99  # blue at row 0, column 31
    path = tmp_path / "batch"
    dump(path, {b"data": rows, b"labels": [3]})

    images, labels = data.read_batch_file(path)

    assert images.shape == (1, 32, 32, 3)
    assert images[0, 5, 7, 1] == 200
    assert images[0, 0, 31, 2] == 99
    assert int(images.sum()) == 299
    assert labels.tolist() == [3]


def test_written_file_has_official_layout(tmp_path):
    rng = np.random.default_rng(1)
    images = random_images(rng, 3)
    path = tmp_path / "batch"
    data.write_batch_file(path, images, [0, 9, 4], "my batch", filenames=["a.png", "b.png", "c.png"])

    for encoding in ("bytes", "latin1"):  # the two ways CIFAR-10 readers open the official files
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding=encoding)
        key = (lambda k: k) if encoding == "bytes" else (lambda k: k.decode())
        assert set(batch) == {key(b"batch_label"), key(b"labels"), key(b"data"), key(b"filenames")}
        assert batch[key(b"labels")] == [0, 9, 4]
        assert batch[key(b"data")].dtype == np.uint8 and batch[key(b"data")].shape == (3, 3072)
        # CHW rows: the first 1024 values are the red plane.
        np.testing.assert_array_equal(batch[key(b"data")][1, :1024], images[1, :, :, 0].reshape(-1))
    assert not [p for p in os.listdir(tmp_path) if p != "batch"]  # no temporary file left behind


def test_written_pixels_cost_one_byte_each(tmp_path):
    # The official files store pixels as raw byte strings. Python 3's default protocol-2 encoding would store
    # each pixel >= 128 as two bytes (UTF-8 of latin-1 text): 10 white images would take ~61 KB, not ~31 KB.
    path = tmp_path / "batch"
    data.write_batch_file(path, np.full((10, 32, 32, 3), 255, dtype=np.uint8), [1] * 10, "white")
    assert 10 * 3072 < os.path.getsize(path) < 10 * 3072 + 1000
    assert b"_codecs" not in path.read_bytes()


def test_numpy1_python2_global_names_load(tmp_path):
    # The official batches were pickled by Python 2 and NumPy 1.x, naming numpy.core.multiarray._reconstruct.
    payload = pickle.dumps(good_batch(), protocol=2)
    assert b"numpy._core.multiarray" in payload
    path = tmp_path / "old_batch"
    path.write_bytes(payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    images, labels = data.read_batch_file(path)
    assert images.shape == (4, 32, 32, 3) and labels.tolist() == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------------------
# Splits


@pytest.mark.parametrize("validation_size, expected", [(None, 10), (25, 25), (0, 0), (99, 99)])
def test_split_sizes(tmp_path, validation_size, expected):
    batches_dir = write_fake_cifar(tmp_path)[0]
    ds = data.load_cifar10(batches_dir, validation_size=validation_size)
    assert len(ds.validation) == expected
    assert len(ds.train) == 100 - expected
    assert len(ds.test) == TEST_IMAGES
    assert f"{100 - expected} train, {expected} validation, {TEST_IMAGES} test" in ds.description


def test_validation_is_the_last_images(tmp_path):
    batches_dir, train_images, train_labels, _, _ = write_fake_cifar(tmp_path)
    ds = data.load_cifar10(batches_dir, validation_size=30)
    np.testing.assert_array_equal(ds.validation.images, train_images[70:])
    np.testing.assert_array_equal(ds.validation.labels, train_labels[70:])
    np.testing.assert_array_equal(ds.train.images, train_images[:70])
    assert ds.validation.images.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("validation_size", [100, 1000, -1, 2.5, True])
def test_bad_validation_size_is_refused(tmp_path, validation_size):
    batches_dir = write_fake_cifar(tmp_path)[0]
    with pytest.raises(DataError, match="validation size") as error:
        data.load_cifar10(batches_dir, validation_size=validation_size)
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------------------
# The built-in sample


def test_builtin_sample_loads():
    ds = data.load_cifar10(data.builtin_sample_dir())
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (900, 100, 500)
    assert ds.label_names == list(data.CLASS_NAMES)
    assert ds.train.images.shape == (900, 32, 32, 3) and ds.train.images.dtype == np.uint8
    # Class-balanced by construction: 100 training images (train + validation) and 50 test images per class.
    all_train = np.concatenate([ds.train.labels, ds.validation.labels])
    assert np.bincount(all_train, minlength=10).tolist() == [100] * 10
    assert np.bincount(ds.test.labels, minlength=10).tolist() == [50] * 10
    assert set(ds.validation.labels.tolist()) == set(range(10))
    # Real photographs, not zeros or noise: neighbouring pixels are strongly correlated.
    pixels = ds.test.images.astype(np.float32)
    assert np.corrcoef(pixels[:, :, :-1].ravel(), pixels[:, :, 1:].ravel())[0, 1] > 0.8


def test_builtin_sample_is_small():
    sample_dir = data.builtin_sample_dir()
    total = sum(os.path.getsize(os.path.join(sample_dir, name)) for name in os.listdir(sample_dir))
    assert total < 5_000_000


def full_cifar_dir():
    for candidate in (os.environ.get("CIFAR10_DIR"), "/tmp/cifar_full"):
        if candidate and os.path.isdir(candidate):
            return candidate
    return None


@pytest.mark.skipif(full_cifar_dir() is None, reason="full CIFAR-10 not found (set CIFAR10_DIR)")
def test_full_cifar10_split():
    ds = data.load_cifar10(full_cifar_dir())
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (45000, 5000, 10000)
    assert np.bincount(ds.test.labels, minlength=10).tolist() == [1000] * 10


# --------------------------------------------------------------------------------------------------------
# Bad input: each is a one-line DataError naming the file or folder


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as error:
        data.load_cifar10(missing)
    assert_one_line_naming(error, missing)


def test_dir_without_batches(tmp_path):
    with pytest.raises(DataError) as error:
        data.load_cifar10(tmp_path)
    assert_one_line_naming(error, tmp_path)


@pytest.mark.parametrize("emptied", [data.TEST_BATCH_NAME, "every training batch"])
def test_a_split_without_images_is_refused(tmp_path, emptied):
    """A test batch of 0 images would train and then fail at the evaluation (no accuracy of no images)."""
    batches_dir = write_fake_cifar(tmp_path)[0]
    names = data.TRAIN_BATCH_NAMES if emptied == "every training batch" else [emptied]
    for name in names:
        data.write_batch_file(batches_dir / name, random_images(np.random.default_rng(0), 0), [], "empty")
    with pytest.raises(DataError, match="holds no images|hold no images") as error:
        data.load_cifar10(batches_dir)
    assert_one_line_naming(error, batches_dir)


def test_missing_batch_file(tmp_path):
    batches_dir = write_fake_cifar(tmp_path)[0]
    os.remove(batches_dir / "data_batch_3")
    with pytest.raises(DataError) as error:
        data.load_cifar10(batches_dir)
    assert_one_line_naming(error, batches_dir / "data_batch_3")


def test_truncated_pickle(tmp_path):
    batches_dir = write_fake_cifar(tmp_path)[0]
    path = batches_dir / "data_batch_2"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="truncated") as error:
        data.load_cifar10(batches_dir)
    assert_one_line_naming(error, path)


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes(tmp_path, seed):
    path = tmp_path / "data_batch_1"
    path.write_bytes(np.random.default_rng(seed).bytes(3000))
    with pytest.raises(DataError) as error:
        data.read_batch_file(path)
    assert_one_line_naming(error, path)


def test_not_a_dict(tmp_path):
    path = tmp_path / "batch"
    dump(path, [1, 2, 3])
    with pytest.raises(DataError, match="expected the dict") as error:
        data.read_batch_file(path)
    assert_one_line_naming(error, path)


def test_missing_data_key(tmp_path):
    path = tmp_path / "batch"
    batch = good_batch()
    del batch[b"data"]
    dump(path, batch)
    with pytest.raises(DataError, match="b'data'") as error:
        data.read_batch_file(path)
    assert_one_line_naming(error, path)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((4, 3071), dtype=np.uint8),  # one value short
        np.zeros((4, 3, 32, 32), dtype=np.uint8),  # already 4-D
        np.zeros((4, 3072), dtype=np.float32),  # not pixel bytes
        np.full((4, 3072), 256, dtype=np.int64),  # does not fit uint8
    ],
    ids=["short-rows", "4d", "float", "out-of-range"],
)
def test_wrong_data_array(tmp_path, array):
    path = tmp_path / "batch"
    batch = good_batch()
    batch[b"data"] = array
    dump(path, batch)
    with pytest.raises(DataError, match="b'data'") as error:
        data.read_batch_file(path)
    assert_one_line_naming(error, path)


@pytest.mark.parametrize(
    "labels, match",
    [
        ([0, 1, 2, 10], "outside 0..9"),
        ([0, -1, 2, 3], "outside 0..9"),
        ([0, 1, 2], "3 labels for 4 images"),
        ([0.0, 1.0, 2.0, 3.0], "not integers"),
        ([b"cat", b"dog", b"cat", b"dog"], "not integers"),
        ([[1, 2], 3, 4, 5], "not a flat list of ints"),
    ],
    ids=["too-large", "negative", "too-few", "float", "bytes", "ragged"],
)
def test_bad_labels(tmp_path, labels, match):
    path = tmp_path / "batch"
    batch = good_batch()
    batch[b"labels"] = labels
    dump(path, batch)
    with pytest.raises(DataError, match=match) as error:
        data.read_batch_file(path)
    assert_one_line_naming(error, path)


def test_meta_with_wrong_number_of_names(tmp_path):
    batches_dir = write_fake_cifar(tmp_path)[0]
    meta = batches_dir / data.META_NAME
    dump(meta, {b"label_names": [b"a", b"b"], b"num_cases_per_batch": 10000, b"num_vis": 3072})
    with pytest.raises(DataError, match="10 names") as error:
        data.load_cifar10(batches_dir)
    assert_one_line_naming(error, meta)


def test_oversized_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        f.truncate(data.MAX_FILE_BYTES + 1)  # sparse: costs no disk and no time
    with pytest.raises(DataError, match="larger than") as error:
        data.read_batch_file(path)
    assert_one_line_naming(error, path)


class RunsShellCommand:
    """Unpickling this with plain pickle.load would run a shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class CallsPrint:
    def __reduce__(self):
        return (print, ("pwned",))


def test_malicious_pickle_does_not_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    batches_dir = write_fake_cifar(tmp_path)[0]
    path = batches_dir / "data_batch_4"
    batch = good_batch()
    batch[b"labels"] = RunsShellCommand(f"touch {marker}")
    dump(path, batch)

    with pytest.raises(DataError, match="refuses to load") as error:
        data.load_cifar10(batches_dir)

    assert not marker.exists()
    assert "system" in str(error.value)
    assert_one_line_naming(error, path)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_pickle_calling_any_function_is_refused(tmp_path, capsys, protocol):
    path = tmp_path / "batches.meta"
    dump(path, {b"label_names": CallsPrint()}, protocol=protocol)
    with pytest.raises(DataError, match=r"(__builtin__|builtins)\.print") as error:
        data.read_meta_file(path)
    assert "pwned" not in capsys.readouterr().out
    assert_one_line_naming(error, path)


# --------------------------------------------------------------------------------------------------------
# Synthetic data


def test_synthetic_shapes_and_dtypes():
    ds = data.synthetic_dataset(num_train=300, num_test=40, seed=3, validation_size=50)
    assert ds.train.images.shape == (250, 32, 32, 3) and ds.train.images.dtype == np.uint8
    assert ds.train.labels.shape == (250,) and ds.train.labels.dtype == np.int32
    assert ds.validation.images.shape == (50, 32, 32, 3)
    assert ds.test.images.shape == (40, 32, 32, 3) and ds.test.labels.dtype == np.int32
    assert ds.train.labels.min() >= 0 and ds.train.labels.max() <= 9
    assert ds.train.images.flags["C_CONTIGUOUS"]
    assert "synthetic" in ds.description
    assert ds.label_names == list(data.CLASS_NAMES)


def test_synthetic_is_seeded():
    first = data.synthetic_dataset(num_train=64, num_test=16, seed=7)
    again = data.synthetic_dataset(num_train=64, num_test=16, seed=7)
    other = data.synthetic_dataset(num_train=64, num_test=16, seed=8)
    np.testing.assert_array_equal(first.train.images, again.train.images)
    np.testing.assert_array_equal(first.test.labels, again.test.labels)
    assert not np.array_equal(first.train.images, other.train.images)


def test_synthetic_default_size_is_cifar10():
    ds = data.synthetic_dataset()
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (50000, 0, 10000)
