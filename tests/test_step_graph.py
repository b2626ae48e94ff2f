"""StepRunner's policy on the CPU: eager warm-up steps, one recording, then one launch per step.

    python -m pytest tests/test_step_graph.py -q

CUDA graphs need a GPU (tests/test_step_graph_gpu.py checks the real thing bit for bit there). Here a
stand-in for the GPU backend's `capture` records which calls happen, so the runner's sequencing is
checked everywhere: when the step function runs for real, when it is recorded, and that every later
step is a launch of that one recording.
"""
import pytest

from cupynet.backends.numpy_backend import NumpyBackend
from cupynet.step_graph import WARMUP_STEPS, StepRunner


class RecordingBackend:
    """Stands in for CupyBackend.capture: `run` is called once while 'recording'; launches are counted."""

    name = "recording"

    def __init__(self):
        self.recording = False
        self.captures = 0
        self.launches = 0

    def capture(self, run):
        self.captures += 1
        self.recording = True
        try:
            run()
        finally:
            self.recording = False
        return self                  # the "graph": launch() and launches, as CapturedGraph

    def launch(self):
        self.launches += 1


def test_warm_up_eagerly_then_record_once_then_launch():
    backend = RecordingBackend()
    calls = []
    runner = StepRunner(backend, capture=True)
    for _ in range(6):
        runner(lambda: calls.append("recorded" if backend.recording else "eager"))
    assert calls == ["eager"] * WARMUP_STEPS + ["recorded"]     # the function ran 3 times in 6 steps
    assert backend.captures == 1 and runner.captured
    assert runner.replays == backend.launches == 6 - WARMUP_STEPS   # the recording step is launched too


def test_without_capture_every_step_runs_eagerly():
    runner = StepRunner(RecordingBackend(), capture=False)
    calls = []
    for _ in range(4):
        runner(lambda: calls.append(1))
    assert len(calls) == 4 and not runner.captured and runner.replays == 0


def test_capture_needs_a_backend_that_can_record():
    with pytest.raises(ValueError, match="GPU backend"):
        StepRunner(NumpyBackend("NHWC", "float32"), capture=True)


@pytest.mark.parametrize("option", ["--stream-priorities", "--programmatic-launch"])
def test_the_graph_options_need_the_cuda_driver_and_say_so_in_one_line(option):
    """--stream-priorities and --programmatic-launch instantiate the captured step through the driver library
    (backends/cuda_driver.py): where it cannot be loaded (this CPU machine), a one-line DeviceError that names the
    option and the library; where it can, each function called is declared with its C signature."""
    import ctypes

    from cupynet.backends import cuda_driver
    from cupynet.errors import DeviceError
    try:
        cuda_driver.driver(option)
    except DeviceError as error:
        message = str(error)
        assert option in message and "libcuda.so.1" in message and "\n" not in message
    else:
        call = cuda_driver.function(option, "cuGraphInstantiateWithFlags")
        assert call.restype is ctypes.c_int and len(call.argtypes) == 3
