"""The whole pipeline at CPU size (experiment=cpu_pipeline): sweep -> tables and figures; resume after SIGKILL.

The sweep is tiny random BERT x {sst2, rte} x {map, temperature} x seeds {0, 1} (8 runs) on the real data
files. The resume test starts the real Hydra multirun in a subprocess, kills it (SIGKILL, whole process group)
once the first run has finished, re-runs the same command and checks that nothing was lost, nothing was
recomputed, nothing partial is left, and that the tables equal those of an uninterrupted sweep.
"""

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bayeslora.figures import make_figures
from bayeslora.results import collect
from bayeslora.run import compose, run
from bayeslora.tables import make_tables

METHODS, DATA, SEEDS = ("map", "temperature"), ("sst2", "rte"), (0, 1)
RUNS = [f"{d}/tiny-bert/{m}/seed_{s}" for m, d, s in itertools.product(METHODS, DATA, SEEDS)]
PATTERN = "*/*/*/*/seed_*/metrics.json"  # <data>/<model>/<method>/<setting id>/seed_<k>


def _name(run_dir) -> str:
    """A run directory without its setting id (``<data>/<model>/<method>/seed_<k>``)."""
    parts = str(run_dir).split("/")[-5:]
    return "/".join(parts[:3] + parts[4:])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shared_data):
    """The uninterrupted sweep, run in-process job by job (the order of the multirun)."""
    root = tmp_path_factory.mktemp("reference")
    for method, data, seed in itertools.product(METHODS, DATA, SEEDS):
        overrides = ["experiment=cpu_pipeline", f"method={method}", f"data={data}", f"seed={seed}"]
        run(compose([*overrides, f"data.root={shared_data}", f"results_dir={root}"]))
    return root


def _tables(root):
    return make_tables(root, ts_rows=True)


def test_cpu_pipeline_produces_tables_and_figures(reference, tmp_path):
    assert sorted(_name(r.directory) for r in collect(reference)) == sorted(RUNS)
    texts = make_tables(reference, tmp_path, ts_rows=True, name="cpu_pipeline", rows=["temperature", "map"])
    md = texts["md"]
    for block in ("ACC (%) ↑", "ECE (%) ↓", "NLL ↓", "Brier ↓"):
        assert f"**{block}**" in md
    assert "| method | rte | sst2 |" in md  # columns as found (sorted paths) unless ordered
    assert "| method | sst2 | rte |" in make_tables(reference, columns=["sst2", "rte"])["md"]
    rows = [line.split(" | ")[0][2:] for line in md.split("**ACC (%) ↑**")[1].split("\n\n")[1].splitlines()[2:]]
    assert rows == ["temperature", "temperature + TS", "map", "map + TS"]  # listed order, each with its + TS row
    # rows / columns select: one shared results store can feed several tables
    only = make_tables(reference, ts_rows=True, rows=["map", "vi_blob"], columns=["rte", "boolq"])
    assert "| method | rte |" in only["md"] and "sst2" not in only["md"] and "| temperature" not in only["md"]
    assert only["csv"].count("\n") == 1 + 2 * 1 * 4  # map, map + TS x rte x 4 metrics
    with pytest.raises(ValueError, match="columns: none of"):
        make_tables(reference, columns=["boolq"])
    assert " ± " in md  # two seeds: mean ± std
    assert texts["csv"].count("\n") == 1 + 4 * 2 * 4  # header + rows x datasets x metrics
    assert (tmp_path / "cpu_pipeline.tex").read_text().startswith("\\begin{tabular}{lcc}")
    figures = make_figures(reference, tmp_path, ts_rows=True, prefix="cpu_pipeline")
    assert sorted(p.name for p in figures) == sorted(
        f"cpu_pipeline_{kind}_{d}.png" for kind in ("reliability", "risk_coverage") for d in DATA
    )
    assert all(p.stat().st_size > 5000 for p in figures)
    only = make_figures(reference, tmp_path / "rte", prefix="cpu_pipeline", columns=["rte"])
    assert sorted(p.name for p in only) == [f"cpu_pipeline_{k}_rte.png" for k in ("reliability", "risk_coverage")]


def _sweep(results_dir, data_root):
    cmd = [sys.executable, "-m", "bayeslora.run", "-m", "experiment=cpu_pipeline", f"results_dir={results_dir}"]
    env = {**os.environ, "BAYESLORA_DATA": str(data_root), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def test_sweep_resumes_after_sigkill(reference, tmp_path, shared_data):
    root = tmp_path / "results"
    proc = _sweep(root, shared_data)
    deadline = time.monotonic() + 300
    while not list(root.glob(PATTERN)):
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended before it was killed:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("no run finished within 300 s")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    done = {
        p.parent: (p.stat().st_mtime_ns, (p.parent / "predictions.pt").stat().st_mtime_ns) for p in root.glob(PATTERN)
    }
    assert 1 <= len(done) < len(RUNS)
    # a run killed while writing leaves a hidden temporary file: plant one in an unfinished run directory
    names = {_name(d) for d in done}
    method, data, seed = next((m, d, s) for m, d, s in itertools.product(METHODS, DATA, SEEDS)
                              if f"{d}/tiny-bert/{m}/seed_{s}" not in names)  # fmt: skip
    overrides = ["experiment=cpu_pipeline", f"method={method}", f"data={data}", f"seed={seed}", f"results_dir={root}"]
    unfinished = Path(compose(overrides).run_dir)
    assert _name(unfinished) not in names
    unfinished.mkdir(parents=True, exist_ok=True)
    (unfinished / ".metrics.json.killed.tmp").write_text('{"acc": ')
    assert len(collect(root)) == len(done)  # partial state: only complete runs are visible

    proc = _sweep(root, shared_data)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]

    finished = sorted(root.glob(PATTERN))
    assert sorted(_name(p.parent) for p in finished) == sorted(RUNS)
    for path in finished:
        result = json.loads(path.read_text())
        assert {"acc", "ece", "nll", "brier", "splits", "config"} <= set(result)
    for run_dir, stamps in done.items():  # completed runs were skipped, not recomputed
        stamp = ((run_dir / "metrics.json").stat().st_mtime_ns, (run_dir / "predictions.pt").stat().st_mtime_ns)
        assert stamp == stamps
    leftovers = [p for p in root.rglob("*.tmp") if ".map_cache" not in p.parts]
    assert leftovers == []
    assert _tables(root) == _tables(reference)
