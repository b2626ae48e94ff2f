"""CPU checks of the one-shot GPU verification script and the PyTorch reference it calls.

    python -m pytest tests/test_device_check_script.py -q

The script itself only does its real work on the GPU machine; here we check that it parses, that the
PyTorch reference compiles (PyTorch need not be installed), that a run with no time budget left still
records every stage, writes the summary and exits non-zero, and that PyTorch stays out of cupynet.
"""
import os
import pathlib
import py_compile
import re
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "device_check.sh"
TORCH_REFERENCE = REPO / "bench" / "torch_eager_reference.py"
STAGE_NAMES = ("install", "versions", "gpu_tests", "cifar", "train", "layouts", "torch")

needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


@needs_bash
def test_device_check_script_parses():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_torch_reference_compiles(tmp_path):
    py_compile.compile(str(TORCH_REFERENCE), cfile=str(tmp_path / "torch_eager_reference.pyc"), doraise=True)


@needs_bash
def test_spent_budget_records_every_stage_and_fails(tmp_path):
    """DEVICE_CHECK_BUDGET=1: no stage may start, yet each is recorded, a summary is written, exit != 0."""
    env = dict(os.environ, OUT=str(tmp_path), DEVICE_CHECK_BUDGET="1")
    env.pop("CIFAR_JPEG", None)
    result = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0, result.stdout + result.stderr
    recorded = [line.split("\t")[0] for line in (tmp_path / "stages.tsv").read_text().splitlines()]
    assert recorded == list(STAGE_NAMES)
    summary = (tmp_path / "summary.txt").read_text()
    assert "NOT RUN" in summary and "result: FAILED" in summary


def test_cupynet_never_imports_torch():
    """PyTorch is a benchmark peer only: no module of the package may import it."""
    offenders = []
    for path in (REPO / "cupynet").rglob("*.py"):
        for line in path.read_text().splitlines():
            if re.match(r"\s*(import|from)\s+torch\b", line) or "torch_eager_reference" in line:
                offenders.append(f"{path.relative_to(REPO)}: {line.strip()}")
    assert not offenders, offenders
