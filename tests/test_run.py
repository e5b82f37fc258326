import json
from pathlib import Path

import pytest
import torch

from bayeslora.run import compose, config_dir, format_table, run
from bayeslora.tables import make_tables

SMOKE = ["experiment=smoke", "eval.reliability_diagram=true"]


def _cfg(tmp_path, *extra):
    return compose([*SMOKE, f"results_dir={tmp_path}", *extra])


def test_config_dir_and_groups():
    root = config_dir()
    for group in ("model", "lora", "data", "method", "train", "experiment", "hydra"):
        assert (root / group).is_dir(), group
    cfg = compose([])
    assert cfg.model.name == "minilm" and cfg.data.root == "demo" and cfg.method.name == "map"


def test_smoke_run_writes_metrics_predictions_and_plot(tmp_path):
    result = run(_cfg(tmp_path))
    run_dir = Path(result["run_dir"])
    assert run_dir.parent.parent == tmp_path / "sst2_demo" / "tiny-bert" / "map" and run_dir.name == "seed_0"
    assert run_dir.parent.name == result["setting_id"]
    stored = json.loads((run_dir / "metrics.json").read_text())
    for key in ("task", "model", "method", "seed", "acc", "ece", "nll", "brier", "timings", "config", "identity"):
        assert key in stored
    assert stored["identity"]["prior_precision"] == 1.0 and "device" not in stored["identity"]
    assert (
        stored["label_counts"]["test"]
        == torch.load(run_dir / "predictions.pt")["test"]["labels"].bincount(minlength=2).tolist()
    )
    assert stored["task"] == "sst2" and stored["num_test"] == 128 and stored["num_classes"] == 2
    preds = torch.load(run_dir / "predictions.pt", weights_only=True)
    assert set(preds) >= {"test", "validation", "test_ts"}
    assert preds["test"]["log_probs"].shape == (128, 2)
    assert stored["acc"] == pytest.approx(stored["splits"]["test"]["acc"])
    assert stored["splits"]["test_ts"]["acc"] == pytest.approx(stored["acc"])  # temperature keeps the argmax
    assert (run_dir / "reliability.png").stat().st_size > 1000
    assert "| map " in format_table(stored) and "temperature" in format_table(stored)


def test_completed_run_is_skipped_only_for_the_same_identity_and_map_cache_is_reused(tmp_path, capsys):
    first = run(_cfg(tmp_path))
    metrics = Path(first["run_dir"]) / "metrics.json"
    stamp = metrics.stat().st_mtime_ns
    again = run(_cfg(tmp_path))
    assert "same identity" in again.pop("skipped") and again == json.loads(metrics.read_text())
    assert metrics.stat().st_mtime_ns == stamp
    # runtime-only keys do not make a new run
    assert run(_cfg(tmp_path, "device=cpu", "eval.batch_size=32"))["run_dir"] == first["run_dir"]
    # another method with the same MAP setting re-uses the cached adapter
    second = run(_cfg(tmp_path, "method=temperature"))
    assert first["map"]["cached"] is False and second["map"]["cached"] is True
    assert second["splits"]["test"]["acc"] == pytest.approx(first["splits"]["test"]["acc"])
    forced = run(_cfg(tmp_path, "force=true"))
    assert metrics.stat().st_mtime_ns != stamp and forced["map"]["cached"] is True


def test_changed_settings_are_new_runs_never_the_stored_one(tmp_path):
    """The stale-cell bug: data.max_train / train.lr / prior_precision changes returned the old metrics.json."""
    first = run(_cfg(tmp_path))
    changed = run(_cfg(tmp_path, "data.max_train=32", "train.lr=1e-2"))
    assert "skipped" not in changed and changed["run_dir"] != first["run_dir"]
    assert changed["num_train"] == 32 and first["num_train"] == 128
    assert changed["map"]["cached"] is False  # a different MAP setting trains its own MAP
    lam = [run(_cfg(tmp_path, "method=kfac_laplace", "method.prior_fit=none", f"prior_precision={v}")) for v in
           (0.01, 100.0)]  # fmt: skip
    assert lam[0]["run_dir"] != lam[1]["run_dir"] and lam[0]["nll"] != lam[1]["nll"]
    assert lam[0]["identity"]["prior_precision"] == 0.01 and lam[1]["identity"]["prior_precision"] == 100.0
    # the tables keep them apart: one row per prior precision, not a 2-seed mean
    md = make_tables(tmp_path, rows=["kfac_laplace"], metrics=["nll"])["md"]
    assert "| kfac_laplace (prior_precision=0.01) |" in md and "| kfac_laplace (prior_precision=100) |" in md
    assert "±" not in md


def test_a_run_directory_holding_another_config_is_an_error_naming_the_keys(tmp_path):
    fixed = f"run_dir={tmp_path}/fixed"
    run(_cfg(tmp_path, fixed))
    with pytest.raises(ValueError, match=r"different config \(train.lr: stored 0.001, requested 0.01\).*force=true"):
        run(_cfg(tmp_path, fixed, "train.lr=1e-2"))
    record = json.loads((tmp_path / "fixed" / "metrics.json").read_text())
    del record["identity"]  # a store from an older bayeslora: nothing to check it against
    (tmp_path / "fixed" / "metrics.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="without a stored identity"):
        run(_cfg(tmp_path, fixed))
    assert "skipped" not in run(_cfg(tmp_path, fixed, "force=true"))


def test_map_cache_key_covers_every_setting_that_changes_the_map():
    from bayeslora.results import run_identity
    from bayeslora.run import _map_key

    def key(overrides):
        return _map_key(run_identity(compose(overrides)))

    base = key(SMOKE)
    same = ["method=kfac_laplace", "eval.n_samples=4", "device=cpu", "method_label=x", "eval.batch_size=8"]
    for override in same:
        assert key([*SMOKE, override]) == base, override
    differ = ["train.lr=0.1", "train.warmup_ratio=0.1", "lora.r=4", "lora.dropout=0.0", "data.max_train=16",
              "data.val_size=0.2", "seed=1", "prior_precision=2", "params.include_head=false", "dtype=bfloat16",
              "model=tiny_llama", "data.max_length=32", "train.batch_size=8", "train.grad_accum=2"]  # fmt: skip
    for override in differ:
        assert key([*SMOKE, override]) != base, override


def test_a_skipped_run_says_so_instead_of_reprinting_as_new(tmp_path, capsys):
    from bayeslora.run import _report

    _report(run(_cfg(tmp_path)))
    assert "nothing was recomputed" not in capsys.readouterr().out
    _report(run(_cfg(tmp_path)))
    out = capsys.readouterr().out
    assert "skipped" in out and "nothing was recomputed" in out and "stored results" in out


def test_ensemble_run_reuses_the_cached_map_as_its_first_member(tmp_path):
    first = run(_cfg(tmp_path))
    one = run(_cfg(tmp_path, "method=ensemble", "method.k=1", "method_label=ens1"))
    two = run(_cfg(tmp_path, "method=ensemble", "method.k=2", "method_label=ens2"))
    assert first["map"]["cached"] is False and one["map"]["cached"] is True and two["map"]["cached"] is True

    def load(result):
        return torch.load(Path(result["run_dir"]) / "predictions.pt", weights_only=True)

    map_test, one_test, two_test = (load(r)["test"] for r in (first, one, two))
    torch.testing.assert_close(one_test["log_probs"], map_test["log_probs"])  # k=1: the cached MAP itself
    assert not torch.allclose(two_test["log_probs"], map_test["log_probs"])  # k=2: the MAP and a trained member
    assert float(two_test["mutual_information"].min()) >= 0 and float(two_test["mutual_information"].max()) > 0


def test_unknown_names_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        run(_cfg(tmp_path, "method.name=nope"))
    with pytest.raises(ValueError, match="unknown task"):
        run(_cfg(tmp_path, "data.task=nope"))


def test_map_cache_restores_every_trained_tensor_not_only_the_random_ones(tmp_path):
    """With the head outside the posterior (include_head=false) it is still trained and comes back from the cache."""
    extra = ("params.include_head=false",)
    first = run(_cfg(tmp_path, *extra))
    path = Path(first["run_dir"]) / "predictions.pt"
    first_preds = torch.load(path, weights_only=True)
    again = run(_cfg(tmp_path, *extra, "force=true"))
    assert first["map"]["cached"] is False and again["map"]["cached"] is True
    stored = torch.load(path, weights_only=True)["test"]["mean_logits"]
    torch.testing.assert_close(stored, first_preds["test"]["mean_logits"])


def test_two_processes_on_one_run_directory_wait_for_each_other(tmp_path):
    """The second process must neither delete the first one's temporaries nor recompute: it waits, then skips."""
    import os
    import subprocess
    import sys
    import time

    overrides = [*SMOKE, f"results_dir={tmp_path}", "train.epochs=4"]
    code = (
        "import sys; from bayeslora.run import compose, run; r = run(compose(sys.argv[1:])); "
        "print('SKIPPED' if r.get('skipped') else 'RAN', r['run_id'])"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run_dir = Path(compose(overrides).run_dir)

    def start():
        cmd = [sys.executable, "-c", code, *overrides]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    first = start()
    deadline = time.monotonic() + 120
    while not (run_dir / ".run.lock").exists():  # the first process holds the run
        assert first.poll() is None, first.stdout.read()[-2000:]
        assert time.monotonic() < deadline, "the first process never locked its run directory"
        time.sleep(0.02)
    second = start()
    outs = [p.communicate(timeout=300)[0] for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], "\n".join(o[-2000:] for o in outs)
    verdicts = sorted(o.strip().splitlines()[-1].split()[0] for o in outs)
    assert verdicts == ["RAN", "SKIPPED"], outs
    assert not list(run_dir.glob(".*.tmp"))


def test_unknown_keys_in_any_group_are_errors(tmp_path):
    cases = {
        "+model.target_modules=[x]": "model.target_modules: unknown key",  # LoRA settings live in the lora group
        "+lora.bogus=1": "lora.bogus: unknown key",
        "+train.learning_rate=1": "train.learning_rate: unknown key",
        "+data.max_trian=3": "data.max_trian: unknown key",
        "+eval.samples=3": "eval.samples: unknown key",
        "+params.include_heads=true": "params.include_heads: unknown key",
        "+method.prior_fit=none": "method.prior_fit: unknown key",  # map takes no options
        "+seeds=3": "seeds: unknown key",
    }
    for override, message in cases.items():
        with pytest.raises(ValueError, match=message):
            run(_cfg(tmp_path, override))
    assert not list(tmp_path.rglob("metrics.json"))


def test_lora_target_modules_are_read_from_the_lora_group(tmp_path):
    with pytest.raises(ValueError, match=r"target_modules: \['nonexistent'\] match no module"):
        run(_cfg(tmp_path, "lora.target_modules=[nonexistent]"))
    cfg = compose([*SMOKE, "lora.target_modules=[query]"])
    assert list(cfg.lora.target_modules) == ["query"] and list(compose(SMOKE).lora.target_modules) == ["query", "value"]
    result = run(_cfg(tmp_path, "lora.target_modules=[query]", "params.include_head=false"))
    assert result["acc"] >= 0
    values = torch.load(next((tmp_path / ".map_cache").glob("*/map.pt")), weights_only=True)["values"]
    lora = [n for n in values if "lora_" in n]
    assert lora and all(".query." in n for n in lora)


def test_a_diverging_training_fails_and_leaves_nothing_in_the_cache(tmp_path):
    from bayeslora.train import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"diverged at optimizer step \d+.*lower lr \(now 1e\+06\)"):
        run(_cfg(tmp_path, "train.lr=1e6"))
    assert not list(tmp_path.rglob("map.pt")) and not list(tmp_path.rglob("step_*.pt"))
    assert not list(tmp_path.rglob("metrics.json"))


def test_mc_answer_strings_from_the_config(tmp_path):
    result = run(_cfg(tmp_path, "model=tiny_llama", "data.answers=[negative,positive]", "eval.temperature_row=false"))
    assert result["data_info"]["answers"] == ["negative", "positive"]
    letters = run(_cfg(tmp_path, "model=tiny_llama", "eval.temperature_row=false"))
    assert letters["data_info"]["answers"] == ["A", "B"] and letters["run_dir"] != result["run_dir"]


def test_the_debug_group_runs_any_config_in_seconds(tmp_path):
    result = run(compose(["debug=default", "model=tiny_bert", "method=vi_blob", f"results_dir={tmp_path}"]))
    assert result["map"]["steps"] == 2 and result["num_train"] == 16 and result["num_test"] == 16
    assert "reliability_diagram" not in result and result["run_dir"].startswith(str(tmp_path))


def test_keys_wired_to_the_seed_do_not_split_a_setting():
    """vi_blob wires method.seed to ${seed}: its seeds share one setting (one table row with mean ± std)."""
    from bayeslora.results import RunRecord, label_runs, run_identity, setting_id

    cfgs = [compose([*SMOKE, "method=vi_blob", f"seed={s}"]) for s in (0, 1)]
    ids = [run_identity(c) for c in cfgs]
    assert "seed" not in ids[0]["method"] and setting_id(ids[0]) == setting_id(ids[1])
    assert Path(cfgs[0].run_dir).parent == Path(cfgs[1].run_dir).parent
    records = [RunRecord(task="sst2", data="d", model="m", method="vi_blob", method_label="vi_blob", seed=s, identity=i)
               for s, i in enumerate(ids)]  # fmt: skip
    assert [r.label for r in label_runs(records)] == ["vi_blob", "vi_blob"]
    other = RunRecord(task="sst2", data="d", model="m2", method="vi_blob", method_label="vi_blob", seed=0,
                      identity={**ids[0], "model": {"name": "m2"}})  # fmt: skip
    assert {r.label for r in label_runs([*records, other])} == {"vi_blob"}  # settings differ only across models


def test_the_identity_holds_the_effective_dtype_and_resolves_references_to_runtime_keys():
    from bayeslora.results import effective_dtype, run_identity

    assert effective_dtype("auto", "cuda:0") == "bfloat16" and effective_dtype("auto", "cpu") == "float32"
    assert effective_dtype("bf16", "cpu") == "bfloat16"
    cpu_auto = run_identity(compose([*SMOKE, "device=cpu"]))
    assert cpu_auto["dtype"] == "float32" and cpu_auto == run_identity(compose([*SMOKE, "dtype=float32", "device=cpu"]))
    assert run_identity(compose([*SMOKE, "dtype=bfloat16"]))["dtype"] == "bfloat16"
    cfg = compose([*SMOKE, "method=checkpoint_ensemble", "method.checkpoint_dir=${results_dir}/ckpts"])
    assert cfg.run_dir.startswith("results/smoke/")  # the setting resolver resolves a reference to a runtime key


def test_the_divergence_rule_allows_negative_losses():
    from bayeslora.train import TrainConfig, TrainingDiverged, _check_divergence

    _check_divergence([-1.3, -1.2, -0.5], TrainConfig())  # a Gaussian NLL below 0 that moves a little
    _check_divergence([0.69, 5.0], TrainConfig())
    with pytest.raises(TrainingDiverged, match="diverged at optimizer step 2"):
        _check_divergence([0.69, 12.0], TrainConfig())
    with pytest.raises(TrainingDiverged):
        _check_divergence([-1.3, 20.0], TrainConfig())  # 21.3 nats up: more than 10 x 1.3


def test_a_run_logs_its_stages_and_leaves_no_progress_bar_debris(tmp_path):
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "bayeslora.run", "experiment=smoke", f"results_dir={tmp_path}", "train.progress=true"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    log = next(tmp_path.rglob("run.log")).read_text()
    for line in ("config: ", "data: ", "MAP adapter trained", "posterior map fitted", "predicted test", "wrote "):
        assert line in log, (line, log[-2000:])
    assert "\x1b[A" not in out.stderr and "\r" not in out.stderr  # bars switch off when stderr is not a terminal
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert "skipped" in again.stdout and "skipped" in next(tmp_path.rglob("run.log")).read_text()


def test_the_peft_deprecation_is_silenced_for_library_users():
    import warnings

    import bayeslora  # noqa: F401

    assert any("is_gradient_checkpointing" in str(f[1].pattern) for f in warnings.filters if f[1] is not None)


def test_the_logger_group_writes_tensorboard_events_and_an_offline_wandb_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run(_cfg(tmp_path, "logger=tensorboard"))
    events = list((Path(result["run_dir"]) / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert len(acc.Scalars("train/loss")) == result["map"]["steps"]  # one point per MAP step, through the callback
    assert acc.Scalars("test/nll")[0].value == pytest.approx(result["splits"]["test"]["nll"], rel=1e-6)
    assert run(_cfg(tmp_path, "logger=tensorboard"))["run_dir"] == result["run_dir"]  # a tracker is not a setting
    wb = run(_cfg(tmp_path, "logger=wandb", "seed=1"))
    assert list((Path(wb["run_dir"]) / "wandb").glob("offline-run-*"))


def test_identity_details_found_in_review(tmp_path):
    from omegaconf import OmegaConf

    from bayeslora.results import run_identity

    ident = run_identity(compose(SMOKE))
    assert ident["eval"]["splits"] == ["test"] and ident["params"]["lora_tensors"] == ["A", "B"]  # real lists
    wired = run_identity(compose([*SMOKE, "method=ensemble", "method.train.lr=${device}"]))
    assert wired["method"]["train"]["lr"] == "auto"  # a reference to a runtime key is kept (resolved)
    with pytest.raises(TypeError, match="cfg: expected the composed config"):
        run(OmegaConf.to_container(_cfg(tmp_path), resolve=True))
    assert "/missing/" in compose(["data=jsonl"]).run_dir  # ??? values: run() then names the key
    with pytest.raises(Exception, match="refers to run_dir or run_name"):
        _ = compose([*SMOKE, "method=checkpoint_ensemble", "method.checkpoint_dir=${run_dir}/ck"]).run_dir


def _regression_files(tmp_path, n_train=48, n_test=24):
    """Real sentences of the packaged SST-2 subset with a target derived from the text: log(1 + words)."""
    import math

    from bayeslora.data.sources import data_root

    rows = [json.loads(line) for line in (data_root("demo") / "sst2" / "train.jsonl").read_text().splitlines()]
    paths = {}
    for split, part in (("train", rows[:n_train]), ("test", rows[n_train : n_train + n_test])):
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps({"text": r["sentence"], "y": math.log1p(len(r["sentence"].split()))}) + "\n"
                                for r in part))  # fmt: skip
        paths[split] = path
    return paths


@pytest.mark.parametrize("method", ["map", "kfac_laplace"])
def test_regression_run_writes_regression_metrics(tmp_path, method):
    paths = _regression_files(tmp_path)
    cfg = _cfg(tmp_path / "results", "data=jsonl", f"data.options.paths.train={paths['train']}",
               f"data.options.paths.test={paths['test']}", "data.options.label_field=y",
               "data.options.label_names=null", "data.options.task_type=regression", "data.options.noise=fit",
               f"method={method}", "data.max_train=null", "data.max_eval=null")  # fmt: skip
    result = run(cfg)
    run_dir = Path(result["run_dir"])
    stored = json.loads((run_dir / "metrics.json").read_text())
    for key in ("nll", "rmse", "cov50", "cov90", "cov95", "rce"):
        assert stored[key] == pytest.approx(stored["splits"]["test"][key])
    assert "acc" not in stored and "ece" not in stored and "test_ts" not in stored["splits"]
    assert stored["num_classes"] == 1 and stored["map"]["noise_std"] > 0
    assert not (run_dir / "reliability.png").exists()
    from bayeslora.metrics import Predictions

    saved = Predictions.from_state_dict(torch.load(run_dir / "predictions.pt", weights_only=True)["test"])
    assert saved.labels.shape == (24, 1) and saved.metrics() == pytest.approx(stored["splits"]["test"])
    assert "RMSE" in format_table(stored) and "ACC" not in format_table(stored)
    tables = make_tables(tmp_path / "results")
    assert "RMSE" in tables["md"] and "ACC" not in tables["md"] and "ECE" not in tables["md"]
    from bayeslora.figures import make_figures

    with pytest.raises(ValueError, match="regression runs have no reliability figures"):
        make_figures(tmp_path / "results", tmp_path / "figures")
