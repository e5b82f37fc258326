"""experiments/gpu_check.sh (the script a session lent a GPU runs) works end to end at toy size on a CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_script_runs_every_step_at_tiny_size(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "experiments" / "gpu_check.sh"), "--size", "tiny"], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["size"] == "tiny"
    assert {k: v["rc"] for k, v in summary.items() if k != "size"} == {"bench_tiny": 0, "obqa_run": 0, "obqa_table": 0}
    bench = json.loads((tmp_path / "bench_tiny.json").read_text())
    assert {"baseline", "train", "laplace", "vi", "ensemble", "peers"} <= set(bench["results"])
    assert bench["results"]["laplace"]["kfac_ggn"]["fit"]["median_s"] > 0
    runs = sorted(p.parent.parent.parent.name for p in (tmp_path / "results").rglob("metrics.json"))
    assert runs == ["kfac_laplace", "map", "temperature"]
    table = (tmp_path / "obqa.md").read_text()
    assert all(m in table for m in ("map", "kfac_laplace", "temperature"))
