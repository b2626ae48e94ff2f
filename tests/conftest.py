"""Shared pytest set-up: tests marked `gpu` (declared in pyproject.toml) are skipped, with the reason
printed by `-ra` (pyproject's addopts), wherever the GPU stack cannot run:

    CuPy not installed | no CUDA device visible to CuPy: <error> | cuDNN Frontend (`cudnn`) not importable

    python -m pytest -q            # CPU machine: every gpu test shows as SKIPPED with its reason
    python -m pytest -m gpu -q     # GPU machine: only the GPU tests

On the emulated GPU (tests/emulated_gpu, driven by tests/test_emulated_gpu.py) the gpu tests run too,
except those also marked `real_gpu`: they depend on what only a device has (work running
asynchronously after it is enqueued, real timings) and are skipped there with that reason.
"""
import functools

import pytest


def _one_line(error):
    return " ".join(f"{type(error).__name__}: {error}".split())


@functools.lru_cache(maxsize=None)
def gpu_stack_problem():
    """None when CuPy, a CUDA device and the cuDNN Frontend are all usable, else why not (one line)."""
    try:
        import cupy
    except ImportError:
        return "CuPy not installed"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:      # no driver, a driver older than CuPy's CUDA, ...
        return f"no CUDA device visible to CuPy: {_one_line(error)}"
    if count == 0:
        return "no CUDA device visible to CuPy: 0 devices"
    try:
        import cudnn  # noqa: F401  (the cuDNN Frontend's Python package)
    except Exception as error:      # ImportError, or OSError when libcudnn cannot be loaded
        return f"cuDNN Frontend (`cudnn`) not importable: {_one_line(error)}"
    return None


def emulated_gpu():
    """Whether `cupy` is the emulated CuPy of tests/emulated_gpu (kernels run on the CPU)."""
    try:
        import cupy
    except ImportError:
        return False
    return str(getattr(cupy, "__version__", "")).endswith("+emulated")


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    problem = gpu_stack_problem()
    if problem is None:
        if emulated_gpu():
            for item in items:
                marker = item.get_closest_marker("real_gpu")
                if marker:
                    why = marker.args[0] if marker.args else "needs a real device"
                    item.add_marker(pytest.mark.skip(reason=f"not on the emulated GPU: {why}"))
        return
    skip = pytest.mark.skip(reason=f"GPU test skipped: {problem}")
    for item in gpu_items:
        item.add_marker(skip)
