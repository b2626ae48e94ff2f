"""Shared pytest set-up: tests marked `gpu` (declared in pyproject.toml) are skipped, with the reason
printed by `-ra` (pyproject's addopts), wherever the GPU stack cannot run:

    CuPy not installed | no CUDA device visible to CuPy: <error> | cuDNN Frontend (`cudnn`) not importable

    python -m pytest -q            # CPU machine: every gpu test shows as SKIPPED with its reason
    python -m pytest -m gpu -q     # GPU machine: only the GPU tests
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


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    problem = gpu_stack_problem()
    if problem is None:
        return
    skip = pytest.mark.skip(reason=f"GPU test skipped: {problem}")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def two_gpus():
    """Device ids [0, 1]; skips unless CuPy sees 2 GPUs (this project's GPU machines have one, the emulated
    GPU of tests/test_emulated_gpu.py has two)."""
    import cupy
    count = cupy.cuda.runtime.getDeviceCount()
    if count < 2:
        pytest.skip(f"needs 2 GPUs, CuPy sees {count}")
    return [0, 1]
