"""Atomic save and restore of training state, without pickle.

What: a checkpoint is everything needed to resume a run (parameters, BN statistics, optimizer state, step,
RNG state, config) split into named NumPy arrays plus a JSON-able `meta` dict. The caller flattens its state
into that form (CuPy arrays must be copied to the host first); this module only moves it to and from disk.

Format: `<model_dir>/ckpt-<step:08d>.npz`, a plain uncompressed `.npz` (what `np.savez` writes) with one
member per array, named exactly like the array ('stage1/block0/conv1/w' is a valid member name), and a
0-d unicode array under the key `__meta__` holding `json.dumps(meta)` with `step` and `format_version`
added. Object arrays are refused on save and on load (`allow_pickle=False`), so reading a checkpoint never
runs pickle and a file from elsewhere cannot execute code. A second file, `<model_dir>/checkpoint.json`,
is the pointer: `{"latest": "ckpt-....npz", "all": [names kept, oldest first]}`.

Atomicity: every file is first written to a temp file `.tmp-*` in the same directory, flushed and fsynced,
then renamed onto its final name with `os.replace` (atomic on POSIX within one file system), and the
directory is fsynced so the rename itself survives a power loss. The checkpoint is renamed into place before
the pointer is rewritten, and old checkpoints are deleted only after that. So a writer killed at any moment
leaves either the old state or the new state readable, and a file under a final name is always complete;
at worst a `.tmp-*` leftover remains, which readers ignore and the next save removes.

Resume: `latest_checkpoint(model_dir)` trusts the pointer when it names an existing checkpoint, and otherwise
(pointer missing, corrupt or stale) scans `ckpt-*.npz` and takes the highest step.

Usage:
    model_dir = prepare_model_dir(cfg.model_dir)          # fail early if the dir is not writable
    path = latest_checkpoint(model_dir)
    if path is not None:
        arrays, meta = load_checkpoint(path)
        check_compatible(meta, expected=arch, keys=arch.keys())
    ...
    save_checkpoint(model_dir, step, arrays, meta={"config": ..., "rng": ...}, keep=5)
"""

import contextlib
import errno
import json
import os
import re
import secrets
import zipfile

try:
    import fcntl           # POSIX; elsewhere model dirs are not locked (model_dir_lock)
except ImportError:        # pragma: no cover
    fcntl = None

import numpy as np

from cupynet.errors import CheckpointError

FORMAT_VERSION = 1
META_KEY = "__meta__"
POINTER_NAME = "checkpoint.json"
LOCK_NAME = ".lock"
TMP_PREFIX = ".tmp-"
_CKPT_RE = re.compile(r"^ckpt-(\d+)\.npz$")


# ----------------------------------------------------------------------------------------------------------
# small helpers


def _one_line(text):
    """Collapse whitespace so that an OS or library message fits the one-line error contract."""
    return " ".join(str(text).split())


def _os_reason(exc):
    """The human part of an OSError ('Permission denied'), or the whole exception text for other errors."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return _one_line(f"{type(exc).__name__}: {exc}")


def checkpoint_name(step):
    """File name of the checkpoint of `step`; zero-padded so that names sort like steps for steps < 1e8."""
    return f"ckpt-{step:08d}.npz"


def _step_of(name):
    """Step encoded in a checkpoint file name, or None if `name` is not a checkpoint name."""
    match = _CKPT_RE.match(name)
    return int(match.group(1)) if match else None


def _fsync_dir(path):
    """Make renames and creations in directory `path` durable.

    Without it a power loss after os.replace can bring back the old directory entry even though the data
    of the new file was fsynced. Some file systems cannot fsync a directory (EINVAL); there the rename is
    still atomic, only its durability is up to the file system, so that case is not an error.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _new_tmp_path(model_dir, final_name):
    """A fresh temp path in `model_dir`; pid and random bits make collisions between writers impossible."""
    return os.path.join(model_dir, f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{final_name}")


def _atomic_write(model_dir, final_name, write_fn):
    """Write a file with `write_fn(fileobj)` so that `final_name` is either the old file or the new one.

    Temp file in the same dir (so os.replace stays on one file system), flush + fsync of the data, rename,
    fsync of the dir. On any error the temp file is removed and the exception propagates; `final_name` is
    untouched unless the rename itself happened.
    """
    tmp_path = _new_tmp_path(model_dir, final_name)
    final_path = os.path.join(model_dir, final_name)
    try:
        # O_EXCL: never write through a file or link we did not create; 0o666 lets the umask decide the
        # permissions, as for any file the user's program creates (mkstemp would force 0o600).
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, final_path)
    except BaseException:
        # BaseException too: a KeyboardInterrupt mid-write must not leave the temp file behind either.
        _remove_quietly(tmp_path)
        raise
    _fsync_dir(model_dir)
    return final_path


def _remove_quietly(path):
    """Remove `path` if it exists; used on error paths, where the original error is the one to report."""
    try:
        os.remove(path)
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------------------
# model dir


def prepare_model_dir(model_dir):
    """Create `model_dir` (with parents) if missing, prove it is writable, and return its absolute path.

    Writability is proven by creating and removing a temp file, because permission bits do not tell the
    whole story (read-only mounts, root squash, ACLs). Raises CheckpointError naming the dir and the OS
    reason. Leaves no file behind (directories it created stay).
    """
    path = os.path.abspath(os.fspath(model_dir))
    try:
        os.makedirs(path, exist_ok=True)
        probe = _new_tmp_path(path, "probe")
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        if isinstance(exc, FileExistsError):
            # makedirs(exist_ok=True) raises this only when the path exists and is not a directory.
            reason = "exists and is not a directory"
        else:
            reason = _os_reason(exc)
        raise CheckpointError(f"model dir {path} is not usable: {reason}") from None
    return path


@contextlib.contextmanager
def model_dir_lock(model_dir):
    """Held for a training run's whole life, so that a second run on the same model dir (the same command started
    twice, say) is refused at its start: the two would train on, each resuming nothing of the other's, writing
    checkpoints and metrics into one folder. An flock on <model_dir>/.lock: the OS drops it when the process
    ends however it ends, so a killed run leaves no stale lock. The file, left in place, holds the holder's pid
    for the message. Where the file system has no flock, the run goes on unlocked."""
    path = os.path.join(model_dir, LOCK_NAME)
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise CheckpointError(f"model dir {model_dir}: cannot open its lock file {LOCK_NAME}: {_os_reason(exc)}") \
            from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise CheckpointError(f"model dir {model_dir} is in use by another run (pid {holder}); wait for it to "
                                  f"end, or pass another --model-dir") from None
        except OSError:       # no flock on this file system (some network ones): unlocked, as before
            pass
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)          # and with it the lock


@contextlib.contextmanager
def claim_model_dir(model_dir):
    """A training run's model dir for its whole life: prepared (prepare_model_dir) and locked (model_dir_lock).
    A dir the run created and leaves holding only its lock file (the run failed before writing anything: bad data,
    an output it cannot write) is removed again, while still locked, so that the failure leaves nothing behind."""
    path = os.path.abspath(os.fspath(model_dir))
    created = not os.path.lexists(path)
    path = prepare_model_dir(path)
    with model_dir_lock(path):
        try:
            yield path
        finally:
            if created:
                with contextlib.suppress(OSError):
                    if os.listdir(path) == [LOCK_NAME]:
                        os.remove(os.path.join(path, LOCK_NAME))
                        os.rmdir(path)


def _remove_stale_tmp_files(model_dir):
    """Delete `.tmp-*` leftovers in `model_dir`.

    A temp file outlives its writer only when that writer was killed mid-save (every error path removes its
    own). A model dir has one writer (the chief worker), and the save that calls this has not created its
    temp file yet, so every `.tmp-*` found here is garbage: removing it reclaims what can be gigabytes. If two
    runs were pointed at one dir despite its lock (model_dir_lock), the other run's save fails loudly at its
    rename (CheckpointError), it never produces a corrupt checkpoint.
    """
    for entry in os.scandir(model_dir):
        if entry.name.startswith(TMP_PREFIX) and entry.is_file(follow_symlinks=False):
            _remove_quietly(entry.path)


def _list_checkpoints(model_dir):
    """[(step, name)] of the checkpoint files in `model_dir`, sorted by step; temp files are not listed."""
    found = []
    for entry in os.scandir(model_dir):
        step = _step_of(entry.name)
        if step is not None and entry.is_file():
            found.append((step, entry.name))
    return sorted(found)


# ----------------------------------------------------------------------------------------------------------
# save


def _validate_arrays(arrays):
    """Check names and dtypes before touching the disk; returns {name: np.ndarray}.

    These are programming errors in the caller, not user errors, so they raise ValueError/TypeError.
    """
    checked = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not name or "\0" in name:
            raise ValueError(f"array name {name!r} must be a non-empty string without NUL")
        if name == META_KEY:
            raise ValueError(f"array name {META_KEY!r} is reserved for the metadata")
        if name.endswith(".npy"):
            # np.load strips one '.npy' from member names, so 'a' and 'a.npy' would be confused on load.
            raise ValueError(f"array name {name!r} must not end in '.npy'")
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise TypeError(f"array {name!r} has dtype {array.dtype}; object arrays would need pickle")
        checked[name] = array
    return checked


def _write_npz(f, arrays):
    """Write `arrays` to `f` as an uncompressed .npz, exactly as np.savez would.

    Not np.savez itself: its keyword arguments would clash with arrays named 'file' or 'allow_pickle', and
    it pickles object arrays by default. Zip64 is forced per member like np.savez does, so members > 4 GiB work.
    """
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(name + ".npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def _choose_kept(checkpoints, written_name, keep):
    """Names to keep, oldest first: the one just written plus the newest `keep - 1` others by step.

    The just-written checkpoint is always kept even if checkpoints with higher steps exist (a run resumed
    from an older checkpoint), so the pointer never names a deleted file.
    """
    others = [name for _, name in checkpoints if name != written_name]
    kept = set(others[max(0, len(others) - (keep - 1)):]) | {written_name}
    return [name for _, name in checkpoints if name in kept]


def save_checkpoint(model_dir, step, arrays, meta, keep=5):
    """Atomically write `<model_dir>/ckpt-<step:08d>.npz`, update the pointer, keep the newest `keep`.

    arrays: {name: host ndarray}; names may contain '/'. meta: JSON-serializable dict; 'step' and
    'format_version' are added (and override keys of those names). Returns the path written.
    Raises CheckpointError (one line) when the disk refuses (full, permissions, ...): the temp file is
    removed and the previous checkpoint and pointer stay intact. Bad names, object arrays or meta that is
    not JSON are caller bugs and raise ValueError/TypeError before anything is written.
    """
    model_dir = os.path.abspath(os.fspath(model_dir))
    step = int(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    arrays = _validate_arrays(arrays)
    full_meta = dict(meta, step=step, format_version=FORMAT_VERSION)
    # The 0-d unicode array is how the meta travels inside the npz without pickle.
    arrays[META_KEY] = np.array(json.dumps(full_meta))

    name = checkpoint_name(step)
    path = os.path.join(model_dir, name)
    try:
        _remove_stale_tmp_files(model_dir)
        _atomic_write(model_dir, name, lambda f: _write_npz(f, arrays))
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {_os_reason(exc)}") from None

    # The new checkpoint is complete under its final name. From here on a failure leaves the old pointer,
    # which still names a complete checkpoint, and resume works from either.
    try:
        kept = _choose_kept(_list_checkpoints(model_dir), name, keep)
        pointer = json.dumps({"latest": name, "all": kept}, indent=1).encode()
        _atomic_write(model_dir, POINTER_NAME, lambda f: f.write(pointer))
    except OSError as exc:
        pointer_path = os.path.join(model_dir, POINTER_NAME)
        raise CheckpointError(f"wrote {path} but cannot update {pointer_path}: {_os_reason(exc)}") from None

    _delete_old(model_dir, kept, path)
    return path


def _delete_old(model_dir, kept, written_path):
    """Delete checkpoints not in `kept`; runs after the pointer update so the pointer never dangles."""
    for _, old_name in _list_checkpoints(model_dir):
        if old_name in kept:
            continue
        old_path = os.path.join(model_dir, old_name)
        try:
            os.remove(old_path)
        except FileNotFoundError:
            pass  # already gone: the goal is reached
        except OSError as exc:
            raise CheckpointError(
                f"wrote {written_path} but cannot delete old checkpoint {old_path}: {_os_reason(exc)}"
            ) from None


# ----------------------------------------------------------------------------------------------------------
# find and load


def _read_pointer(model_dir):
    """Name of the latest checkpoint per checkpoint.json, or None if the pointer is missing/corrupt/stale."""
    try:
        with open(os.path.join(model_dir, POINTER_NAME), encoding="utf-8") as f:
            pointer = json.load(f)
    except (OSError, ValueError):
        return None
    latest = pointer.get("latest") if isinstance(pointer, dict) else None
    # Only a bare checkpoint name is accepted: the pointer must not send us outside the model dir.
    if not isinstance(latest, str) or _step_of(latest) is None:
        return None
    if not os.path.isfile(os.path.join(model_dir, latest)):
        return None
    return latest


def latest_checkpoint(model_dir):
    """Absolute path of the checkpoint to resume from, or None if there is none (or no such dir).

    The pointer wins when it names an existing checkpoint; otherwise the highest step found on disk.
    """
    model_dir = os.path.abspath(os.fspath(model_dir))
    if not os.path.exists(model_dir):
        return None
    try:
        name = _read_pointer(model_dir)
        if name is None:
            checkpoints = _list_checkpoints(model_dir)
            name = checkpoints[-1][1] if checkpoints else None
    except OSError as exc:
        raise CheckpointError(f"cannot read model dir {model_dir}: {_os_reason(exc)}") from None
    return None if name is None else os.path.join(model_dir, name)


def list_checkpoints(model_dir):
    """Absolute paths of the checkpoints in `model_dir`, oldest step first ([] if there is none)."""
    model_dir = os.path.abspath(os.fspath(model_dir))
    try:
        return [os.path.join(model_dir, name) for _, name in _list_checkpoints(model_dir)]
    except OSError as exc:
        raise CheckpointError(f"cannot read model dir {model_dir}: {_os_reason(exc)}") from None


def _read_members(path):
    """All members of the npz at `path` as in-memory arrays, read without pickle.

    Any exception while parsing is a property of the file (truncated, not a zip, object array, ...), so all
    are turned into one CheckpointError; the body is kept to the parsing so our own bugs are not masked.
    """
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise CheckpointError(f"checkpoint {path} is not an .npz archive")
        with loaded as npz:
            # npz[key] reads the member into a new array; the file is closed when the `with` ends.
            members = {key: npz[key] for key in npz.files}
    except CheckpointError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc):       # NumPy's text suggests allow_pickle=True: never, for a file from anywhere
            raise CheckpointError(f"cannot read checkpoint {path}: it holds pickled Python objects, which a cupynet "
                                  f"checkpoint never does (not loaded)") from None
        raise CheckpointError(f"cannot read checkpoint {path}: {_os_reason(exc)}") from None
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {_os_reason(exc)}") from None
    for key, value in members.items():
        # NpzFile returns raw bytes for a member that is not .npy data; a checkpoint never has one.
        if not isinstance(value, np.ndarray):
            raise CheckpointError(f"checkpoint {path} is corrupt: member {key!r} is not a NumPy array")
    return members


def check_training_state(source, arrays):
    """A training state (a model's parameters, statistics, momenta) is real numbers, all finite: the trainer never
    saves a diverged state, so NaN or infinity means a damaged or foreign file, which would otherwise load and train
    or evaluate on as garbage. (The storage itself round-trips any numeric array.)"""
    for key, value in arrays.items():
        if value.dtype.kind not in "fiu":
            raise CheckpointError(f"{source} is corrupt: {key!r} holds {value.dtype} values, not real numbers")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise CheckpointError(f"{source} is corrupt: {key!r} holds NaN or infinity")


def _parse_meta(path, members):
    """The meta dict stored under '__meta__', checked for presence, JSON form and format version."""
    raw = members.pop(META_KEY, None)
    if raw is None or raw.ndim != 0 or raw.dtype.kind != "U":
        raise CheckpointError(f"checkpoint {path} has no valid {META_KEY}; it was not written by cupynet")
    try:
        meta = json.loads(str(raw[()]))
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path} has corrupt metadata: {_one_line(exc)}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path} has corrupt metadata: not a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format_version {version!r}; this cupynet reads version {FORMAT_VERSION}"
        )
    step = meta.get("step")
    if type(step) is not int or not 0 <= step < 2**62:     # bool is an int too: type(), not isinstance()
        raise CheckpointError(f"checkpoint {path} has corrupt metadata: its step {step!r} is not a step count")
    if not isinstance(meta.get("config", {}), dict):
        raise CheckpointError(f"checkpoint {path} has corrupt metadata: its record of the run is not a JSON object")
    return meta


def load_checkpoint(path):
    """Read a checkpoint: returns (arrays without '__meta__', meta). Raises CheckpointError naming the file."""
    path = os.fspath(path)
    members = _read_members(path)
    meta = _parse_meta(path, members)
    return members, meta


# ----------------------------------------------------------------------------------------------------------
# compatibility


def _as_json_value(value):
    """`value` as it would come back from JSON (tuples become lists), so config values compare to meta."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return value


def check_compatible(meta, expected, keys, way_out="use another --model-dir"):
    """Raise CheckpointError unless meta[key] == expected[key] for every key in `keys`; its message ends with
    `way_out`, what the user can do instead.

    Values are compared after a JSON round trip, because meta went through JSON: a config tuple (3, 3) equals
    the stored list [3, 3]. The message lists every differing key with both values on one line.
    """
    differing = [k for k in keys if _as_json_value(meta.get(k)) != _as_json_value(expected[k])]
    if not differing:
        return
    stored = ", ".join(f"{k}={_show(meta, k)}" for k in differing)
    wanted = ", ".join(f"{k}={_show(expected, k)}" for k in differing)
    source = checkpoint_name(meta["step"]) if isinstance(meta.get("step"), int) else "in the model dir"
    raise CheckpointError(
        f"checkpoint {source} was written for {stored} but this run is {wanted}; {way_out}"
    )


def _show(mapping, key):
    """A value for the error message: strings bare (block_kind=v1), others as JSON, absent keys marked."""
    if key not in mapping:
        return "<missing>"
    value = mapping[key]
    if isinstance(value, str):
        return value
    try:
        return json.dumps(_as_json_value(value))
    except (TypeError, ValueError):
        return repr(value)
