import json

import pytest
import torch

from bayeslora.run import compose, config_dir, format_table, run

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
    run_dir = tmp_path / "sst2_demo" / "tiny-bert" / "map" / "seed_0"
    assert result["run_dir"] == str(run_dir)
    stored = json.loads((run_dir / "metrics.json").read_text())
    for key in ("task", "model", "method", "seed", "acc", "ece", "nll", "brier", "timings", "config"):
        assert key in stored
    assert stored["task"] == "sst2" and stored["num_test"] == 128 and stored["num_classes"] == 2
    preds = torch.load(run_dir / "predictions.pt", weights_only=True)
    assert set(preds) >= {"test", "validation", "test_ts"}
    assert preds["test"]["log_probs"].shape == (128, 2)
    assert stored["acc"] == pytest.approx(stored["splits"]["test"]["acc"])
    assert stored["splits"]["test_ts"]["acc"] == pytest.approx(stored["acc"])  # temperature keeps the argmax
    assert (run_dir / "reliability.png").stat().st_size > 1000
    assert "| map " in format_table(stored) and "temperature" in format_table(stored)


def test_completed_run_is_skipped_and_map_cache_is_reused(tmp_path):
    first = run(_cfg(tmp_path))
    metrics = tmp_path / "sst2_demo" / "tiny-bert" / "map" / "seed_0" / "metrics.json"
    stamp = metrics.stat().st_mtime_ns
    assert run(_cfg(tmp_path)) == json.loads(metrics.read_text())
    assert metrics.stat().st_mtime_ns == stamp
    # another method with the same MAP setting re-uses the cached adapter
    second = run(_cfg(tmp_path, "method=temperature"))
    assert first["map"]["cached"] is False and second["map"]["cached"] is True
    assert second["splits"]["test"]["acc"] == pytest.approx(first["splits"]["test"]["acc"])
    forced = run(_cfg(tmp_path, "force=true"))
    assert metrics.stat().st_mtime_ns != stamp and forced["map"]["cached"] is True


def test_ensemble_run_reuses_the_cached_map_as_its_first_member(tmp_path):
    first = run(_cfg(tmp_path))
    one = run(_cfg(tmp_path, "method=ensemble", "method.k=1", "method_label=ens1"))
    two = run(_cfg(tmp_path, "method=ensemble", "method.k=2", "method_label=ens2"))
    assert first["map"]["cached"] is False and one["map"]["cached"] is True and two["map"]["cached"] is True

    def load(label):
        return torch.load(tmp_path / f"sst2_demo/tiny-bert/{label}/seed_0/predictions.pt", weights_only=True)

    map_test, one_test, two_test = (load(label)["test"] for label in ("map", "ens1", "ens2"))
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
    path = tmp_path / "sst2_demo/tiny-bert/map/seed_0/predictions.pt"
    first_preds = torch.load(path, weights_only=True)
    again = run(_cfg(tmp_path, *extra, "force=true"))
    assert first["map"]["cached"] is False and again["map"]["cached"] is True
    stored = torch.load(path, weights_only=True)["test"]["mean_logits"]
    torch.testing.assert_close(stored, first_preds["test"]["mean_logits"])
