"""bench/layers.py and bench/scaling.py run (`--quick`) and write consistent, positive figures."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_KEYS = ("cupynet", "git_commit", "numpy", "python", "cpu_count", "date")


def run_quick(script, tmp_path):
    """Run bench/<script>.py --quick; return its JSON report."""
    out = tmp_path / f"{script}.json"
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", f"{script}.py"), "--quick", "--json", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["benchmark"] == script
    for key in ENV_KEYS:
        assert key in report["environment"]
    return report


def test_layers_quick_breaks_the_step_down_per_primitive(tmp_path):
    report = run_quick("layers", tmp_path)
    assert report["step_ms"] > 0 and report["peak_gbs"] > 0
    rows = {row["primitive"]: row for row in report["primitives"]}
    # The step's main primitives were seen; shape helpers and the timer's synchronize were not shimmed.
    for name in ("conv2d_forward", "conv2d_backward_data", "conv2d_backward_filter", "batchnorm_train_forward",
                 "batchnorm_backward", "softmax_cross_entropy", "sgd_momentum_update", "augment_train_batch",
                 "advance_step"):
        assert rows[name]["calls_per_step"] >= 1 and rows[name]["ms_per_step"] > 0, name
    assert "synchronize" not in rows and "activation_shape" not in rows
    assert rows["conv2d_forward"]["calls_per_step"] == 7            # ResNet-8: stem + 3 blocks x 2
    assert rows["sgd_momentum_update"]["calls_per_step"] == 1
    # Outermost calls only: the parts cannot add up to much more than the whole step.
    assert sum(row["ms_per_step"] for row in rows.values()) <= report["step_ms"] * 1.5
    for row in rows.values():
        assert 0 <= row["share"] <= 1
        assert row["bytes_per_step"] >= 0 and row["roofline_ms"] >= 0
        assert row["fraction_of_peak"] == pytest.approx(row["achieved_gbs"] / report["peak_gbs"], rel=0.01, abs=1e-3)
    assert rows["conv2d_forward"]["bytes_per_step"] > 0


def test_scaling_quick_reports_efficiency_and_all_reduce(tmp_path):
    report = run_quick("scaling", tmp_path)
    rows = report["results"]
    assert [row["workers"] for row in rows] == [1, 2]
    assert rows[0]["efficiency"] == 1.0
    for row in rows:
        assert row["global_batch"] == 8 and row["per_worker_batch"] * row["workers"] == 8
        assert row["images_per_sec_min"] <= row["images_per_sec"] <= row["images_per_sec_max"]
        assert row["images_per_sec"] > 0 and row["efficiency"] > 0
        assert row["all_reduce_s"] > 0 and row["gradient_elements"] > 0
    assert rows[1]["efficiency"] == pytest.approx(rows[1]["images_per_sec"] / rows[0]["images_per_sec"], rel=1e-3)
