"""cupynet/background.py: setup work in a thread of its own (the data load, the cuDNN Frontend's import).

No timing in the assertions: the concurrency test makes the call wait for something the caller does only once the
constructor has returned, so a call run in the caller's thread would give up waiting (30 s) and report it.
"""
import sys
import threading

import pytest

from cupynet.background import Background
from cupynet.errors import DeviceError


def test_the_call_runs_in_its_own_thread_beside_the_caller():
    constructor_returned = threading.Event()

    def wait_for_the_caller(value):
        waited = constructor_returned.wait(timeout=30)
        return value, waited, threading.current_thread().name

    job = Background(wait_for_the_caller, 42, name="probe")
    assert not job.done()
    constructor_returned.set()
    value, waited, thread = job.result()
    assert (value, waited) == (42, True)
    assert thread.startswith("cupynet-probe") and thread != threading.current_thread().name
    assert job.done() and job.seconds is not None and job.seconds >= 0


def test_the_calls_error_is_raised_by_result_and_the_time_still_taken():
    def fail():
        raise ValueError("the data file is truncated")

    job = Background(fail, name="probe")
    with pytest.raises(ValueError, match="truncated"):
        job.result()
    assert job.seconds is not None


def test_a_missing_frontend_is_the_one_line_device_error_from_the_import_thread(monkeypatch):
    """What the GPU backend gets from the import it started beside the CUDA context when `cudnn` is not there."""
    from cupynet.backends.cudnn_conv import import_frontend_in_background
    monkeypatch.setitem(sys.modules, "cudnn", None)          # `import cudnn` raises ImportError
    job = import_frontend_in_background()
    with pytest.raises(DeviceError) as error:
        job.result()
    assert "cuDNN Frontend is not importable" in str(error.value) and "\n" not in str(error.value)
