"""The benchmark scripts run (`--quick`) and write the JSON fields their readers rely on."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_layouts_quick_writes_positive_figures(tmp_path):
    out = tmp_path / "layouts.json"
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "layouts.py"), "--quick", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    env = report["environment"]
    for key in ("cupynet", "git_commit", "numpy", "python", "cpu_count", "date"):
        assert key in env
    rows = report["results"]
    assert {row["layout"] for row in rows} == {"NCHW", "NHWC"}
    for row in rows:
        assert row["images_per_sec_min"] <= row["images_per_sec"] <= row["images_per_sec_max"]
        assert row["images_per_sec"] > 0 and row["step_ms"] > 0 and row["windows"] == 2


def test_layouts_rows_record_conv_genstats(tmp_path):
    """--conv-genstats off,on: every row says which it ran (the backend's own setting), and the CPU reports no
    genstats counts (they are the GPU's cuDNN graphs)."""
    out = tmp_path / "layouts.json"
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "layouts.py"), "--quick", "--layouts", "NHWC",
                             "--conv-genstats", "off,on", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["results"]
    assert [row["conv_genstats"] for row in rows] == [False, True]
    assert all(row["genstats"] is None and row["images_per_sec"] > 0 for row in rows)


@pytest.mark.parametrize("field,column,recorded,shown", [
    ("conv_pixel_pairs", "px-pairs", [None, None], ["-", "-"]),
    ("residual_grad_sums", "res-sums", [False, True], ["off", "on"]),
])
def test_layouts_rows_record_an_option_as_the_backend_ran_it(tmp_path, field, column, recorded, shown):
    """--conv-pixel-pairs / --residual-grad-sums off,on: two rows, each recording the backend's own setting. The
    CPU's backend has no pixel pairs (GPU-only, like --conv-split-k): null in the JSON, "-" in the table, even where
    asked for; it has residual grad sums (both backends do): off, then on."""
    out = tmp_path / "layouts.json"
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "layouts.py"), "--quick", "--layouts", "NHWC",
                             f"--{field.replace('_', '-')}", "off,on", "--json", str(out)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["results"]
    assert [row[field] for row in rows] == recorded
    assert all(row["images_per_sec"] > 0 for row in rows)
    header, *table = [line.split() for line in result.stdout.splitlines()[1:4]]
    assert [line[header.index(column)] for line in table] == shown, result.stdout
