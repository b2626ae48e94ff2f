"""Tests of cupynet.checkpoint: round trip, pointer and retention, resume fallback, crash atomicity, refusal
of corrupt or pickled files, model dir checks, architecture compatibility. CPU only, a few seconds.

Run: python -m pytest tests/test_checkpoint.py -q
"""

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from cupynet.checkpoint import (
    check_compatible,
    latest_checkpoint,
    load_checkpoint,
    prepare_model_dir,
    save_checkpoint,
)
from cupynet.errors import CheckpointError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------------------
# helpers


def small_state(seed=0):
    """A few named arrays like a model's, different per seed so checkpoints can be told apart."""
    rng = np.random.default_rng(seed)
    return {
        "stage1/block0/conv1/w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "stage1/block0/bn1/running_mean": rng.standard_normal(4),
        "optimizer/step": np.array(seed, dtype=np.int64),
    }


def assert_same_arrays(got, want):
    """Same names, dtypes, shapes and bytes (bytes, so NaN and -0.0 count as equal only to themselves)."""
    assert sorted(got) == sorted(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype, name
        assert got[name].shape == array.shape, name
        assert got[name].tobytes() == np.ascontiguousarray(array).tobytes(), name


def assert_one_line_naming(exc_info, path):
    message = str(exc_info.value)
    assert "\n" not in message
    assert os.fspath(path) in message, message


def files_in(model_dir):
    return sorted(os.listdir(model_dir))


def tmp_files(model_dir):
    return [name for name in os.listdir(model_dir) if name.startswith(".tmp-")]


# ----------------------------------------------------------------------------------------------------------
# round trip


def test_round_trip_preserves_dtypes_shapes_names_and_meta(tmp_path):
    arrays = {
        "stage1/block0/conv1/w": np.arange(2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3),
        "stage1/block0/bn1/running_var": np.array([1.5, np.nan, -0.0, np.inf]),  # float64 specials
        "optimizer/step": np.array(123456789012, dtype=np.int64),  # 0-d
        "rng/key": np.array([0, 1, 2**32 - 1], dtype=np.uint32),
        "empty": np.zeros((0, 5), dtype=np.float32),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "strided": np.arange(20, dtype=np.int64)[::3],  # not contiguous
        # names that would clash with np.savez's own keyword arguments
        "file": np.ones(2),
        "allow_pickle": np.ones(1),
    }
    meta = {"config": {"num_layers": 20, "block_kind": "v1", "lr_steps": [0.1, 0.01]}, "note": "é ✓"}
    path = save_checkpoint(tmp_path, 42, arrays, meta)

    assert path == os.path.join(str(tmp_path), "ckpt-00000042.npz")
    got, got_meta = load_checkpoint(path)
    assert_same_arrays(got, arrays)
    assert got["fortran"].tolist() == arrays["fortran"].tolist()
    assert got_meta == dict(meta, step=42, format_version=1)
    assert "step" not in meta  # the caller's dict is not modified


def test_saved_file_is_a_plain_npz_with_json_meta(tmp_path):
    path = save_checkpoint(tmp_path, 7, {"a/b": np.ones(3)}, {"k": [1, {"x": None}]})
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["__meta__", "a/b"]
        raw = npz["__meta__"]
    assert raw.ndim == 0 and raw.dtype.kind == "U"
    assert json.loads(str(raw[()])) == {"k": [1, {"x": None}], "step": 7, "format_version": 1}


def test_load_reads_everything_and_closes_the_file(tmp_path):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to list open files")
    path = save_checkpoint(tmp_path, 1, small_state(), {})
    arrays, _ = load_checkpoint(path)
    open_files = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
    assert os.path.realpath(path) not in open_files
    os.remove(path)
    assert_same_arrays(arrays, small_state())  # still usable: data was copied, not mapped


@pytest.mark.parametrize(
    "arrays, error",
    [
        ({"__meta__": np.ones(1)}, ValueError),
        ({"w.npy": np.ones(1)}, ValueError),
        ({"": np.ones(1)}, ValueError),
        ({"objects": np.array([{"a": 1}], dtype=object)}, TypeError),
    ],
)
def test_save_refuses_bad_arrays_before_writing(tmp_path, arrays, error):
    with pytest.raises(error):
        save_checkpoint(tmp_path, 1, arrays, {})
    assert files_in(tmp_path) == []


def test_save_refuses_keep_below_one(tmp_path):
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path, 1, small_state(), {}, keep=0)
    assert files_in(tmp_path) == []


def test_save_into_missing_dir_is_a_checkpoint_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError) as exc_info:
        save_checkpoint(missing, 1, small_state(), {})
    assert_one_line_naming(exc_info, missing)


# ----------------------------------------------------------------------------------------------------------
# pointer and retention


def test_keep_retains_newest_and_pointer_names_latest(tmp_path):
    for step in range(10, 80, 10):
        save_checkpoint(tmp_path, step, small_state(step), {"step_seen": step}, keep=3)

    names = ["ckpt-00000050.npz", "ckpt-00000060.npz", "ckpt-00000070.npz"]
    assert files_in(tmp_path) == ["checkpoint.json"] + names
    with open(tmp_path / "checkpoint.json") as f:
        assert json.load(f) == {"latest": "ckpt-00000070.npz", "all": names}
    latest = latest_checkpoint(tmp_path)
    assert latest == str(tmp_path / "ckpt-00000070.npz")
    arrays, meta = load_checkpoint(latest)
    assert meta["step"] == 70 and meta["step_seen"] == 70
    assert_same_arrays(arrays, small_state(70))


def test_keep_one_and_resaving_a_step(tmp_path):
    save_checkpoint(tmp_path, 1, small_state(1), {}, keep=1)
    save_checkpoint(tmp_path, 2, small_state(2), {}, keep=1)
    save_checkpoint(tmp_path, 2, small_state(3), {}, keep=1)  # same step again: replaced atomically
    assert files_in(tmp_path) == ["checkpoint.json", "ckpt-00000002.npz"]
    arrays, _ = load_checkpoint(latest_checkpoint(tmp_path))
    assert_same_arrays(arrays, small_state(3))


def test_saving_an_older_step_keeps_it_and_points_at_it(tmp_path):
    # A run resumed from an older checkpoint: the file just written must survive retention.
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, small_state(step), {}, keep=2)
    save_checkpoint(tmp_path, 15, small_state(15), {}, keep=2)
    assert files_in(tmp_path) == ["checkpoint.json", "ckpt-00000015.npz", "ckpt-00000030.npz"]
    assert latest_checkpoint(tmp_path) == str(tmp_path / "ckpt-00000015.npz")


# ----------------------------------------------------------------------------------------------------------
# resume fallback


@pytest.fixture
def three_checkpoints(tmp_path):
    """A model dir with steps 5, 100, 20 (saved in that order) and a sibling dir holding a higher step."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for step in (5, 100, 20):  # saved out of order: the fallback must go by step, not by time
        save_checkpoint(model_dir, step, small_state(step), {}, keep=10)
    outside = tmp_path / "outside"
    outside.mkdir()
    save_checkpoint(outside, 500, small_state(500), {})
    return model_dir


def test_latest_follows_the_pointer(three_checkpoints):
    # The pointer names step 20, the last one written, even though step 100 exists.
    assert latest_checkpoint(three_checkpoints) == str(three_checkpoints / "ckpt-00000020.npz")


@pytest.mark.parametrize(
    "pointer_bytes",
    [
        None,  # deleted
        b"\x00\xffnot json",
        b'["a list"]',
        b'{"latest": "ckpt-00000999.npz"}',  # names a missing file
        b'{"latest": "../outside/ckpt-00000500.npz"}',  # exists, but outside the model dir
        b'{"latest": "OUTSIDE_ABSOLUTE"}',  # the same file by absolute path
        b'{"latest": 20}',
    ],
)
def test_latest_falls_back_to_highest_step(three_checkpoints, pointer_bytes):
    pointer = three_checkpoints / "checkpoint.json"
    pointer.unlink()
    if pointer_bytes is not None:
        outside = str(three_checkpoints.parent / "outside" / "ckpt-00000500.npz")
        pointer.write_bytes(pointer_bytes.replace(b"OUTSIDE_ABSOLUTE", outside.encode()))
    # Leftovers of killed writers, with names that would win if they were taken for checkpoints.
    (three_checkpoints / ".tmp-xyz").write_bytes(b"partial")
    (three_checkpoints / ".tmp-123-abcd-ckpt-00005000.npz").write_bytes(b"partial")
    assert latest_checkpoint(three_checkpoints) == str(three_checkpoints / "ckpt-00000100.npz")


def test_latest_is_none_without_dir_or_checkpoints(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / ".tmp-xyz").write_bytes(b"partial")
    (tmp_path / "checkpoint.json").write_text('{"latest": "ckpt-00000001.npz", "all": []}')
    assert latest_checkpoint(tmp_path) is None


def test_save_removes_stale_tmp_files(tmp_path):
    (tmp_path / ".tmp-999-dead-ckpt-00000001.npz").write_bytes(b"x" * 100)
    (tmp_path / "notes.txt").write_text("user file")
    save_checkpoint(tmp_path, 1, small_state(), {})
    assert files_in(tmp_path) == ["checkpoint.json", "ckpt-00000001.npz", "notes.txt"]


# ----------------------------------------------------------------------------------------------------------
# atomicity under a crash

# A writer process: saves step 2 with one big array. Argument: model dir, number of float32 elements.
_WRITER = """
import sys
import numpy as np
from cupynet.checkpoint import save_checkpoint
big = np.full(int(sys.argv[2]), 1.25, dtype=np.float32)
save_checkpoint(sys.argv[1], 2, {"big": big}, {"writer": "killed"})
"""


def _wait_for_partial_write(model_dir, proc, deadline):
    """Poll until a file (temp or final) for step 2 holds some bytes; True if seen before the writer ended."""
    while time.monotonic() < deadline and proc.poll() is None:
        for entry in os.scandir(model_dir):
            if "ckpt-00000002" in entry.name and entry.stat().st_size > 0:
                return True
        time.sleep(0.0005)
    return False


def _kill_writer_mid_write(model_dir, n_elements):
    """Start a writer, SIGKILL it once it has written part of the file; True if it died mid-write."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(model_dir), str(n_elements)], env=env)
    try:
        seen = _wait_for_partial_write(model_dir, proc, deadline=time.monotonic() + 20)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=20)
    # Mid-write means the kill landed and the new checkpoint never made it to the pointer.
    pointer = (model_dir / "checkpoint.json").read_text()
    return seen and proc.returncode == -signal.SIGKILL and "ckpt-00000002" not in pointer


def test_writer_killed_mid_write_leaves_previous_checkpoint(tmp_path):
    old_path = save_checkpoint(tmp_path, 1, small_state(1), {"writer": "parent"})
    # 16 Mi float32 = 64 MiB takes a while to write and fsync, and the kill lands within a millisecond of
    # the first bytes; a bigger array is tried only if a fast disk let the writer finish before the kill.
    for n_elements in (16 * 2**20, 64 * 2**20):
        if _kill_writer_mid_write(tmp_path, n_elements):
            break
    else:
        pytest.fail("the writer finished every time before it could be killed mid-write")

    # Previous state intact: pointer, resume choice and contents.
    assert latest_checkpoint(tmp_path) == old_path
    arrays, meta = load_checkpoint(old_path)
    assert_same_arrays(arrays, small_state(1))
    assert meta["writer"] == "parent"
    # No final name holds a half-written file: every checkpoint-named file loads completely.
    for name in os.listdir(tmp_path):
        if name.startswith("ckpt-"):
            load_checkpoint(tmp_path / name)
    assert "ckpt-00000002.npz" not in os.listdir(tmp_path)
    # The killed writer's temp file is what remains, and the fallback scan ignores it too.
    assert tmp_files(tmp_path)
    (tmp_path / "checkpoint.json").unlink()
    assert latest_checkpoint(tmp_path) == old_path

    # The next save cleans up after the dead writer.
    save_checkpoint(tmp_path, 3, small_state(3), {})
    assert tmp_files(tmp_path) == []


def _no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")


def _prepare_failed_save(tmp_path):
    """An existing good checkpoint and the pointer bytes, to compare with after a failed save."""
    old_path = save_checkpoint(tmp_path, 1, small_state(1), {})
    return old_path, (tmp_path / "checkpoint.json").read_bytes()


def _assert_old_state_intact(tmp_path, old_path, old_pointer):
    assert tmp_files(tmp_path) == []
    assert (tmp_path / "checkpoint.json").read_bytes() == old_pointer
    assert latest_checkpoint(tmp_path) == old_path
    arrays, _ = load_checkpoint(old_path)
    assert_same_arrays(arrays, small_state(1))


def test_failure_partway_through_the_arrays(tmp_path, monkeypatch):
    old_path, old_pointer = _prepare_failed_save(tmp_path)
    real_write_array = np.lib.format.write_array
    calls = []

    def write_then_fail(fp, array, *args, **kwargs):
        calls.append(array.shape)
        if len(calls) == 1:
            return real_write_array(fp, array, *args, **kwargs)
        fp.write(b"\x93NUMPY partial")  # some bytes of the second member, then the disk is full
        _no_space()

    monkeypatch.setattr(np.lib.format, "write_array", write_then_fail)
    new_path = tmp_path / "ckpt-00000002.npz"
    with pytest.raises(CheckpointError) as exc_info:
        save_checkpoint(tmp_path, 2, small_state(2), {})
    assert len(calls) == 2  # the failure really happened partway
    assert_one_line_naming(exc_info, new_path)
    assert "No space left on device" in str(exc_info.value)
    assert not new_path.exists()
    _assert_old_state_intact(tmp_path, old_path, old_pointer)


def test_failure_at_the_rename(tmp_path, monkeypatch):
    old_path, old_pointer = _prepare_failed_save(tmp_path)
    monkeypatch.setattr(os, "replace", _no_space)
    with pytest.raises(CheckpointError) as exc_info:
        save_checkpoint(tmp_path, 2, small_state(2), {})
    assert_one_line_naming(exc_info, tmp_path / "ckpt-00000002.npz")
    assert not (tmp_path / "ckpt-00000002.npz").exists()
    _assert_old_state_intact(tmp_path, old_path, old_pointer)


def test_failure_at_the_pointer_update_keeps_the_old_pointer(tmp_path, monkeypatch):
    old_path, old_pointer = _prepare_failed_save(tmp_path)
    real_replace = os.replace

    def fail_for_pointer(src, dst):
        if os.path.basename(dst) == "checkpoint.json":
            _no_space()
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_for_pointer)
    with pytest.raises(CheckpointError) as exc_info:
        save_checkpoint(tmp_path, 2, small_state(2), {}, keep=1)
    assert_one_line_naming(exc_info, tmp_path / "checkpoint.json")
    # The new checkpoint is complete, the old one was not deleted, the pointer still names the old one.
    load_checkpoint(tmp_path / "ckpt-00000002.npz")
    _assert_old_state_intact(tmp_path, old_path, old_pointer)


# ----------------------------------------------------------------------------------------------------------
# load errors


class _PickleBomb:
    """Unpickling this creates a marker file: proof that pickle ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_zip(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def _npy_bytes(array, allow_pickle=False):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


_GOOD_META = _npy_bytes(np.array(json.dumps({"step": 1, "format_version": 1})))


def _truncated(path, good):
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])


def _flipped_byte(path, good):
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the array data: caught by the zip CRC
    path.write_bytes(bytes(data))


def _random_bytes(path, good):
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def _plain_npy(path, good):
    path.write_bytes(_npy_bytes(np.ones(3)))


def _object_array(path, good):
    # What np.savez writes by default for an object array: a pickle inside the .npy member.
    marker = path.parent / "PICKLE_RAN"
    bomb = _npy_bytes(np.array([_PickleBomb(str(marker))], dtype=object), allow_pickle=True)
    _write_zip(path, {"w.npy": bomb, "__meta__.npy": _GOOD_META})


def _raw_pickle_member(path, good):
    _write_zip(path, {"w.npy": pickle.dumps([1, 2]), "__meta__.npy": _GOOD_META})


def _no_meta(path, good):
    _write_zip(path, {"w.npy": _npy_bytes(np.ones(2))})


def _meta_not_json(path, good):
    _write_zip(path, {"__meta__.npy": _npy_bytes(np.array("{not json"))})


def _meta_wrong_version(path, good):
    meta = _npy_bytes(np.array(json.dumps({"step": 1, "format_version": 99})))
    _write_zip(path, {"__meta__.npy": meta})


def _meta_with(**fields):
    """A checkpoint maker whose meta has these fields (a file edited by hand, or written by something else)."""
    def make(path, good):
        meta = {"step": 1, "format_version": 1, **fields}
        _write_zip(path, {"w.npy": _npy_bytes(np.ones(2)), "__meta__.npy": _npy_bytes(np.array(json.dumps(meta)))})
    make.__name__ = "_meta_with_" + "_".join(f"{k}_{v}" for k, v in fields.items())
    return make


def _missing(path, good):
    pass


@pytest.mark.parametrize(
    "make_bad",
    [
        _truncated,
        _flipped_byte,
        _random_bytes,
        _plain_npy,
        _object_array,
        _raw_pickle_member,
        _no_meta,
        _meta_not_json,
        _meta_wrong_version,
        _meta_with(step=-5),
        _meta_with(step=10**30),
        _meta_with(step=True),
        _meta_with(step="7"),
        _meta_with(step=None),
        _meta_with(config=[1, 2]),
        _missing,
    ],
    ids=lambda make: make.__name__.strip("_"),
)
def test_load_refuses_bad_files(tmp_path, make_bad):
    good_dir = tmp_path / "good"
    good_dir.mkdir()
    good = save_checkpoint(good_dir, 1, {"w": np.arange(50_000, dtype=np.float64)}, {})
    bad = tmp_path / "ckpt-00000001.npz"
    make_bad(bad, good_dir / os.path.basename(good))

    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(bad)
    assert_one_line_naming(exc_info, bad)
    assert not (tmp_path / "PICKLE_RAN").exists()  # refused without unpickling
    assert "allow_pickle" not in str(exc_info.value)  # NumPy's advice to unpickle a file from anywhere: not passed on


@pytest.mark.parametrize("value, what", [
    (np.array([1.0, np.nan], dtype=np.float32), "holds NaN or infinity"),
    (np.array([np.inf]), "holds NaN or infinity"),
    (np.array([1 + 2j]), "holds complex128 values, not real numbers"),
    (np.zeros(2, dtype=[("a", "f4")]), "not real numbers"),
])
def test_a_training_state_must_be_finite_real_numbers(value, what):
    from cupynet.checkpoint import check_training_state
    check_training_state("ckpt-00000001.npz", {"params/w": np.ones(3, np.float32), "step": np.array(4)})
    with pytest.raises(CheckpointError) as exc_info:
        check_training_state("ckpt-00000001.npz", {"params/w": np.ones(3, np.float32), "params/b": value})
    assert str(exc_info.value).startswith("ckpt-00000001.npz is corrupt: 'params/b' holds ") and what in str(exc_info.value)
    assert_one_line_naming(exc_info, "ckpt-00000001.npz")


# ----------------------------------------------------------------------------------------------------------
# model dir


def test_prepare_model_dir_creates_nested_dirs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = prepare_model_dir(os.path.join("runs", "a", "b"))
    assert path == str(tmp_path / "runs" / "a" / "b")
    assert os.path.isabs(path) and os.path.isdir(path)
    assert files_in(path) == []


def test_prepare_model_dir_leaves_existing_contents_alone(tmp_path):
    save_checkpoint(tmp_path, 3, small_state(), {})
    before = files_in(tmp_path)
    assert prepare_model_dir(tmp_path) == str(tmp_path)
    assert files_in(tmp_path) == before


def test_prepare_model_dir_refuses_a_regular_file(tmp_path):
    a_file = tmp_path / "afile"
    a_file.write_text("not a dir")
    with pytest.raises(CheckpointError) as exc_info:
        prepare_model_dir(a_file)
    assert_one_line_naming(exc_info, a_file)
    assert "not a directory" in str(exc_info.value)
    assert files_in(tmp_path) == ["afile"]


def test_prepare_model_dir_refuses_a_path_under_a_regular_file(tmp_path):
    (tmp_path / "afile").write_text("not a dir")
    target = tmp_path / "afile" / "sub"
    with pytest.raises(CheckpointError) as exc_info:
        prepare_model_dir(target)
    assert_one_line_naming(exc_info, target)
    assert files_in(tmp_path) == ["afile"]


def test_prepare_model_dir_refuses_an_unwritable_dir(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 0o500 does not stop root from writing")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(CheckpointError) as exc_info:
            prepare_model_dir(locked)
        assert_one_line_naming(exc_info, locked)
        assert "Permission denied" in str(exc_info.value)
        assert files_in(locked) == []
    finally:
        locked.chmod(0o700)


def test_prepare_model_dir_reports_a_failing_probe(tmp_path, monkeypatch):
    # Stands in for a read-only mount or an unwritable dir where chmod cannot simulate one (root).
    real_open = os.open

    def read_only_fs(path, flags, *args, **kwargs):
        if os.path.basename(path).startswith(".tmp-"):
            raise OSError(30, "Read-only file system")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_fs)
    with pytest.raises(CheckpointError) as exc_info:
        prepare_model_dir(tmp_path)
    assert_one_line_naming(exc_info, tmp_path)
    assert "Read-only file system" in str(exc_info.value)
    assert files_in(tmp_path) == []


def test_latest_checkpoint_on_a_regular_file_is_a_checkpoint_error(tmp_path):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    with pytest.raises(CheckpointError) as exc_info:
        latest_checkpoint(a_file)
    assert_one_line_naming(exc_info, a_file)


# ----------------------------------------------------------------------------------------------------------
# compatibility


ARCH = {"num_layers": 20, "block_kind": "v1", "widths": (16, 32, 64)}


def test_check_compatible_accepts_equal_values():
    meta = {"step": 70, "num_layers": 20, "block_kind": "v1", "widths": [16, 32, 64], "other": 1}
    check_compatible(meta, ARCH, ARCH.keys())  # the tuple compares equal to the list it became in JSON
    check_compatible(meta, {"num_layers": 20}, ["num_layers"])  # only the listed keys matter


def test_check_compatible_lists_every_differing_key():
    meta = {"step": 70, "num_layers": 44, "block_kind": "v2", "widths": [16, 32, 64]}
    with pytest.raises(CheckpointError) as exc_info:
        check_compatible(meta, ARCH, ARCH.keys())
    message = str(exc_info.value)
    assert "\n" not in message
    assert message == (
        "checkpoint ckpt-00000070.npz was written for num_layers=44, block_kind=v2 "
        "but this run is num_layers=20, block_kind=v1; use another --model-dir"
    )


def test_check_compatible_reports_a_missing_key():
    with pytest.raises(CheckpointError, match=r"widths=<missing> but this run is widths=\[16, 32, 64\]"):
        check_compatible({"step": 1, "num_layers": 20, "block_kind": "v1"}, ARCH, ARCH.keys())


def test_check_compatible_on_loaded_meta(tmp_path):
    path = save_checkpoint(tmp_path, 5, small_state(), dict(ARCH))
    _, meta = load_checkpoint(path)
    check_compatible(meta, ARCH, ARCH.keys())
    with pytest.raises(CheckpointError, match="num_layers=20 but this run is num_layers=56"):
        check_compatible(meta, dict(ARCH, num_layers=56), ARCH.keys())


# ----------------------------------------------------------------------------------------------------------
# one run per model dir


def test_model_dir_lock_refuses_a_second_holder_until_the_first_lets_go(tmp_path):
    """Two holders in one process take two open file descriptions, as two processes would: the second is refused
    with the holder's pid; after the first has let go, it is free again, and the lock file stays."""
    from cupynet.checkpoint import LOCK_NAME, model_dir_lock
    with model_dir_lock(str(tmp_path)):
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(CheckpointError) as exc_info:
            with model_dir_lock(str(tmp_path)):
                pass
        assert_one_line_naming(exc_info, tmp_path)
        assert f"is in use by another run (pid {os.getpid()})" in str(exc_info.value)
    with model_dir_lock(str(tmp_path)):
        pass
    assert latest_checkpoint(tmp_path) is None and os.listdir(tmp_path) == [LOCK_NAME]


def test_a_model_dir_claimed_and_left_unused_is_removed_only_if_the_run_made_it(tmp_path):
    """A run that fails before writing anything leaves no folder it made; a folder that was there stays, and so
    does one the run wrote into."""
    from cupynet.checkpoint import LOCK_NAME, claim_model_dir
    made = tmp_path / "new" / "run"
    with pytest.raises(RuntimeError):
        with claim_model_dir(made) as path:
            assert path == str(made) and os.listdir(made) == [LOCK_NAME]
            raise RuntimeError("bad input found after the model dir was claimed")
    assert not made.exists() and (tmp_path / "new").is_dir()       # its parents stay
    with claim_model_dir(tmp_path / "kept"):
        pass
    assert not (tmp_path / "kept").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with claim_model_dir(existing):
        pass
    assert os.listdir(existing) == [LOCK_NAME]
    with claim_model_dir(made) as path:
        save_checkpoint(path, 1, {"w": np.ones(2)}, {})
    assert sorted(os.listdir(made)) == [LOCK_NAME, "checkpoint.json", "ckpt-00000001.npz"]
