"""An installable package: the wheel carries the Hydra configs, and bayeslora-run works outside the repository."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]


def test_the_package_list_covers_every_python_package_of_the_source_tree():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "bayeslora").rglob("__init__.py")}
    assert listed == found | {"bayeslora.conf"}


@pytest.mark.slow
def test_a_non_editable_install_runs_the_smoke_experiment_from_any_directory(tmp_path):
    wheels, target, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)], check=True)
    wheel = next(wheels.glob("bayeslora-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    assert (target / "bayeslora" / "conf" / "config.yaml").is_file()
    assert (target / "bayeslora" / "conf" / "method" / "kfac_laplace.yaml").is_file()

    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    probe = "import bayeslora, bayeslora.run as r; print(bayeslora.__file__); print(r.config_dir())"
    out = subprocess.run([sys.executable, "-c", probe], cwd=work, env=env, capture_output=True, text=True, check=True)
    module, conf = out.stdout.split()
    assert module.startswith(str(target)) and conf == str(target / "bayeslora" / "conf")
    cmd = [
        sys.executable,
        "-m",
        "bayeslora.run",
        "experiment=smoke",
        "results_dir=out",
        "eval.reliability_diagram=false",
    ]
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert list((work / "out").rglob("metrics.json")) and "| map " in done.stdout


@pytest.mark.parametrize(
    ("code", "expect"),
    [
        ("from bayeslora.cli import run_main; sys.argv = ['bayeslora-run', '--help']; run_main()", "kfac_laplace"),
        ("from bayeslora.cli import tables_main; tables_main(['--help'])", "--ece-bins"),
        ("from bayeslora.bench import main; main(['--help'])", "--compare"),
    ],
    ids=["bayeslora-run", "bayeslora-tables", "bench"],
)
def test_command_line_help_needs_no_torch(code, expect):
    """The help of every command answers before torch is imported (it took 8-9 s when it imported torch)."""
    verdict = "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    probe = f"import sys\ntry:\n    {code}\nexcept SystemExit:\n    pass\n{verdict}"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert expect in out.stdout and out.stdout.strip().endswith("NO-TORCH"), out.stdout[-2000:]


def test_the_run_help_lists_the_real_options():
    from bayeslora.cli import METRIC_NAMES, run_help
    from bayeslora.posteriors import METHODS
    from bayeslora.tables import METRICS

    text = run_help()
    assert text.startswith("bayeslora-run:") and "powered by Hydra" not in text
    assert all(m in text for m in METHODS) and "openbookqa" in text and "debug=default" in text
    assert set(METRIC_NAMES) == set(METRICS)
