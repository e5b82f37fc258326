"""Sweep support: GPU leases, the MAP-cache lock, stale temporaries, the parallel launcher and the study configs."""

import json
import threading
import time

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from bayeslora.posteriors import METHODS
from bayeslora.run import compose, config_dir
from bayeslora.sweep import file_lock, lease_gpu, remove_stale_temporaries, run_device

STUDIES = ("cpu_pipeline", "ood_cpu", "minilm_calibration", "minilm_paper_tasks", "llm_mc", "ood")
STORE = {"minilm_paper_tasks": "minilm_calibration"}  # one protocol, one results store: the BoolQ cells are shared


def test_leases_spread_over_gpus_then_slots_and_wait_when_all_taken(tmp_path):
    with lease_gpu(2, slots=1, lock_dir=tmp_path) as a, lease_gpu(2, slots=1, lock_dir=tmp_path) as b:
        assert (a, b) == (0, 1)
        got = []

        def third():
            with lease_gpu(2, slots=1, lock_dir=tmp_path, poll_s=0.01) as c:
                got.append(c)

        t = threading.Thread(target=third)
        t.start()
        time.sleep(0.2)
        assert got == []  # both GPUs busy: the third run waits
    t.join(timeout=5)
    assert got in ([0], [1])
    # two slots per GPU: every GPU's first slot before any second slot
    with lease_gpu(2, 2, tmp_path) as a, lease_gpu(2, 2, tmp_path) as b, lease_gpu(2, 2, tmp_path) as c:
        assert [a, b, c] == [0, 1, 0]


def test_lease_errors_and_devices_without_several_gpus(tmp_path):
    with pytest.raises(ValueError, match="device_count"), lease_gpu(0, lock_dir=tmp_path):
        pass
    with pytest.raises(ValueError, match="gpu_slots"), lease_gpu(2, slots=0, lock_dir=tmp_path):
        pass
    with run_device("cpu") as d:
        assert d == "cpu"
    with run_device("cuda:0") as d:
        assert d == "cuda:0"
    import torch

    if torch.cuda.device_count() <= 1:
        with run_device("auto", lock_dir=tmp_path) as d:
            assert d == "auto"  # nothing to lease: the run resolves auto itself
        assert not any(tmp_path.iterdir())


def test_file_lock_excludes_a_second_holder(tmp_path):
    order = []

    def second():
        with file_lock(tmp_path / "cache" / ".lock"):
            order.append("second")

    with file_lock(tmp_path / "cache" / ".lock"):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.2)
        order.append("first done")
    t.join(timeout=5)
    assert order == ["first done", "second"]


def test_remove_stale_temporaries_only_touches_tmp_files(tmp_path):
    (tmp_path / "ckpt").mkdir()
    keep = [tmp_path / "metrics.json", tmp_path / "predictions.pt", tmp_path / ".hydra.tmp.d"]
    stale = [tmp_path / ".metrics.json.abc123.tmp", tmp_path / "ckpt" / ".step_0000004.pt.x.tmp"]
    for p in keep[:2] + stale:
        p.write_text("x")
    keep[2].mkdir()
    removed = remove_stale_temporaries(tmp_path, tmp_path / "ckpt", tmp_path / "missing")
    assert sorted(removed) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)


def _hydra_cfg(overrides):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_parallel_launcher_is_joblib_with_one_job_by_default(monkeypatch):
    monkeypatch.delenv("BAYESLORA_JOBS", raising=False)
    cfg = _hydra_cfg(["hydra/launcher=parallel"])
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == 1 and cfg.hydra.launcher.backend == "loky"
    monkeypatch.setenv("BAYESLORA_JOBS", "3")
    assert _hydra_cfg(["hydra/launcher=parallel"]).hydra.launcher.n_jobs == 3


@pytest.mark.parametrize("study", STUDIES)
def test_study_configs_compose_and_sweep_registered_methods(study):
    cfg = _hydra_cfg([f"experiment={study}"])
    params = cfg.hydra.sweeper.params
    assert next(iter(params)) == "method"  # MAP runs first: they fill the MAP cache the other methods load
    assert set(params["method"].split(",")) <= set(METHODS)
    store = STORE.get(study, study)
    assert cfg.results_dir in (f"results/{store}", f"paper/results/{store}")  # a committed store: paper/results
    for data in params.get("data", cfg.data.name).split(","):
        job = compose([f"experiment={study}", f"data={data}"])
        assert job.data.name == data and job.run_dir.startswith(f"{cfg.results_dir}/{data}/")


@pytest.mark.parametrize("study", ["minilm_calibration", "minilm_paper_tasks"])
def test_study_stages_live_in_the_experiment_config_and_compose(study):
    from bayeslora.config_check import check_run_config
    from bayeslora.run import study_stages

    stages = study_stages([f"experiment={study}"])
    assert stages[0] == ["method=map,temperature,kfac_laplace"]  # the MAP runs first: they fill the MAP cache
    swept = set()
    for stage in stages:
        sweep = [o for o in stage if o.startswith("method=")]
        rest = [o for o in stage if not o.startswith("method=")]
        for method in sweep[0].removeprefix("method=").split(","):
            job = compose([f"experiment={study}", f"method={method}", *rest])
            check_run_config(OmegaConf.to_container(job, resolve=True))
            swept.add(job.method_label)
    assert {"map", "kfac_laplace", "kfac_laplace_val", "vi_blob", "ensemble", "mc_dropout"} <= swept
    assert {"swag", "tfb", "ivon", "multiswag"} <= swept
    # the stages are not part of a run's identity: editing them does not change the run directory
    from bayeslora.results import run_identity

    cfg = compose([f"experiment={study}"])
    edited = cfg.copy()
    edited.stages = [["method=map"]]
    assert run_identity(cfg) == run_identity(edited) and "stages" in cfg and edited.stages != cfg.stages


STAGED = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml") if "\nstages:" in p.read_text())


@pytest.mark.parametrize("study", STAGED)
def test_every_stage_of_every_staged_study_composes_into_a_checked_run(study):
    """What experiments/study.sh runs: each stage's jobs (a comma list of methods is a sweep) compose and pass the
    run checks, in the study's own results store; the MAP runs come first where the study trains MAPs."""
    from bayeslora.config_check import check_run_config
    from bayeslora.run import study_stages

    stages = study_stages([f"experiment={study}"])
    assert stages, study
    methods_of = [next(o for o in s if o.startswith("method=")).removeprefix("method=").split(",") for s in stages]
    for stage, methods in zip(stages, methods_of):
        # a swept value (seed=0,1,2) composes as its first value
        rest = [o.split(",")[0] if "[" not in o else o for o in stage if not o.startswith("method=")]
        for method in methods:
            job = compose([f"experiment={study}", f"method={method}", *rest])
            check_run_config(OmegaConf.to_container(job, resolve=True))
            assert job.run_dir.startswith(f"{job.results_dir}/")
    if any("map" in m for m in methods_of):
        assert "map" in methods_of[0]


@pytest.mark.slow
def test_parallel_sweep_trains_a_shared_map_once(tmp_path, shared_data):
    """Two jobs in parallel worker processes that need the same MAP adapter: one trains it, the other waits and
    loads it (the MAP-cache lock); both match a sequential run."""
    import json
    import os
    import subprocess
    import sys

    from bayeslora.run import run

    cmd = [sys.executable, "-m", "bayeslora.run", "-m", "experiment=cpu_pipeline", "hydra/launcher=parallel"]
    cmd += ["hydra.launcher.n_jobs=2", "method=map,temperature", "data=sst2", "seed=0", f"results_dir={tmp_path}"]
    env = {**os.environ, "BAYESLORA_DATA": str(shared_data), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in out.stdout + out.stderr
    results = {
        m: json.loads(next((tmp_path / "sst2" / "tiny-bert" / m).glob("*/seed_0/metrics.json")).read_text())
        for m in ("map", "temperature")
    }
    assert sorted(r["map"]["cached"] for r in results.values()) == [False, True]
    sequential = run(compose(["experiment=cpu_pipeline", f"data.root={shared_data}", f"results_dir={tmp_path}/seq"]))
    assert results["map"]["splits"]["test"] == pytest.approx(sequential["splits"]["test"])


def _multirun(tmp_path, *overrides, timeout=600):
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "bayeslora.run", "-m", "experiment=smoke", f"results_dir={tmp_path}", *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out


@pytest.mark.slow
def test_the_slurm_launcher_config_runs_jobs_as_separate_processes(tmp_path):
    """hydra/launcher=slurm and local_processes share submitit; the local executor runs each job in a subprocess."""
    _multirun(tmp_path, "hydra/launcher=local_processes", "seed=0,1")
    records = sorted(tmp_path.rglob("metrics.json"))
    assert [json.loads(p.read_text())["seed"] for p in records] == [0, 1]
    assert list((tmp_path / ".submitit").glob("*/*_submitted.pkl"))  # submitted through submitit
    cfg = _hydra_cfg(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    assert cfg.hydra.launcher.partition == "gpu" and "SlurmLauncher" in cfg.hydra.launcher._target_


@pytest.mark.slow
def test_the_optuna_sweeper_minimises_validation_nll(tmp_path):
    _multirun(tmp_path, "hydra/sweeper=optuna_nll", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=0")
    runs = [json.loads(p.read_text()) for p in tmp_path.rglob("metrics.json")]
    assert len(runs) == 2 and len({r["config"]["train"]["lr"] for r in runs}) == 2  # two trials, two settings
    best = (tmp_path / "optimization_results.yaml").read_text()
    assert f"best_value: {min(r['splits']['validation']['nll'] for r in runs)}" in best
