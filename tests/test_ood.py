"""OOD evaluation: metrics against naive references, the runner's eval.ood, the OOD table layout."""

import json
import math
from pathlib import Path

import pytest
import torch

from bayeslora.calibration import temperature_scaled
from bayeslora.metrics import Predictions, ood_auroc
from bayeslora.ood import ood_metrics, ood_report, prepare_ood
from bayeslora.predictive import Predictive
from bayeslora.run import compose, run
from bayeslora.tables import make_tables


def _preds(n, c, seed, samples=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(samples, n, c, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    return Predictions.from_predictive(Predictive(logits), labels)


def _naive_auroc(score_in, score_out):
    """P(score_out > score_in) + P(tie) / 2 over all pairs (Mann-Whitney)."""
    wins = 0.0
    for o in score_out.tolist():
        for i in score_in.tolist():
            wins += 1.0 if o > i else 0.5 if o == i else 0.0
    return wins / (len(score_in) * len(score_out))


def test_ood_metrics_match_naive_references():
    p_in, p_out = _preds(40, 4, 0, samples=5, scale=3.0), _preds(30, 4, 1, samples=5, scale=1.0)
    m = ood_metrics(p_in, p_out)
    assert m["auroc_entropy"] == pytest.approx(_naive_auroc(p_in.entropy, p_out.entropy), abs=1e-6)
    assert m["auroc_mi"] == pytest.approx(_naive_auroc(p_in.mutual_information, p_out.mutual_information), abs=1e-6)
    assert m["auroc_entropy"] > 0.6  # the shifted set is less confident by construction
    assert m["n"] == 30
    for k, v in p_out.metrics().items():
        assert m[k] == pytest.approx(v)
    # point predictions have no epistemic score: no MI AUROC (not a constant 0.5)
    point = ood_metrics(_preds(20, 4, 2), _preds(20, 4, 3))
    assert "auroc_mi" not in point and "auroc_entropy" in point
    flat = _preds(20, 4, 2, samples=3, scale=0.0)  # samples that agree exactly: MI constant 0, cannot rank
    assert "auroc_mi" not in ood_metrics(flat, _preds(20, 4, 3, samples=3, scale=0.0))
    with pytest.raises(ValueError, match="expected 4 classes"):
        ood_metrics(p_in, _preds(10, 2, 4))


def test_temperature_scaled_and_report():
    p = _preds(16, 4, 0, samples=3)
    scaled = temperature_scaled(p, 2.0)
    bma = p.log_probs.exp()  # reference: the model average, each probability to the power 1/T, renormalised
    powered = bma**0.5
    assert torch.allclose(scaled.log_probs.exp(), powered / powered.sum(-1, keepdim=True), atol=1e-9)
    assert torch.equal(scaled.mutual_information, torch.zeros(16))
    in_dist = {"test": _preds(16, 4, 1), "test_ts": _preds(16, 4, 2)}
    metrics, saved = ood_report(in_dist, {"arc": p}, "test", 2.0)
    assert set(metrics) == {"arc", "arc_ts"} and set(saved) == {"ood/arc", "ood/arc_ts"}
    assert metrics["arc_ts"]["auroc_entropy"] == pytest.approx(_naive_auroc(in_dist["test_ts"].entropy, scaled.entropy))
    assert set(ood_report(in_dist, {"arc": p}, "test", None)[0]) == {"arc"}


def test_ood_config_errors(tmp_path):
    data_cfg = {"root": None, "max_length": 64, "max_eval": 8}
    kw = {"data_cfg": data_cfg, "format": "mc", "num_classes": 4}
    with pytest.raises(TypeError, match=r"eval.ood.arc: unexpected key\(s\) \['subjects'\]"):
        prepare_ood(None, {"arc": {"subjects": ["x"]}}, **kw)
    with pytest.raises(TypeError, match="eval.ood: expected a mapping"):
        prepare_ood(None, ["arc_easy"], **kw)
    with pytest.raises(FileNotFoundError, match="eval.ood.mine.path: no file"):
        prepare_ood(None, {"mine": {"path": str(tmp_path / "missing.txt")}}, **kw)
    with pytest.raises(TypeError, match="eval.ood.mine: 'path' .* cannot be combined"):
        prepare_ood(None, {"mine": {"path": "x.txt", "task": "arc_easy"}}, **kw)


def _ood_run(tmp_path, root, *extra):
    return run(compose(["experiment=ood_cpu", f"data.root={root}", f"results_dir={tmp_path}", *extra]))


def _ood_run_with(tmp_path, root, sets, *extra):
    from omegaconf import open_dict

    cfg = compose(["experiment=ood_cpu", f"data.root={root}", f"results_dir={tmp_path}", *extra])
    with open_dict(cfg):
        cfg.eval.ood = sets
    return run(cfg)


def test_run_evaluates_shifted_sets_and_builds_the_ood_table(tmp_path, shared_data):
    first = _ood_run(tmp_path, shared_data, "method=map")
    _ood_run(tmp_path, shared_data, "method=temperature")
    run_dir = Path(first["run_dir"])
    stored = json.loads((run_dir / "metrics.json").read_text())
    assert stored == json.loads(json.dumps(first))
    assert set(stored["ood"]) == {"arc_challenge", "arc_challenge_ts", "mmlu_chem", "mmlu_chem_ts"}
    assert stored["ood_info"]["sets"]["mmlu_chem"]["subjects"] == ["college_chemistry"]
    preds = torch.load(run_dir / "predictions.pt", weights_only=True)
    test = Predictions.from_state_dict(preds["test"])
    for name in ("arc_challenge", "mmlu_chem"):
        shifted = Predictions.from_state_dict(preds[f"ood/{name}"])
        assert shifted.log_probs.shape == (stored["ood"][name]["n"], 4)
        assert stored["ood"][name]["acc"] == pytest.approx(shifted.metrics()["acc"])
        want = _naive_auroc(test.entropy, shifted.entropy)
        assert stored["ood"][name]["auroc_entropy"] == pytest.approx(want, abs=1e-6)

    texts = make_tables(tmp_path, tmp_path / "tables", layout="ood", ts_rows=True, name="ood")
    md = texts["md"]
    assert "| method | openbookqa (ID) | arc_challenge | mmlu_chem |" in md
    assert "**OOD AUROC, entropy (%) ↑**" in md and "**OOD AUROC, MI (%) ↑**" in md
    assert "| map | – | " in md.split("**OOD AUROC, MI (%) ↑**")[1]  # no AUROC for the in-distribution column
    assert "| temperature + TS |" in md and "OOD AUROC" in texts["tex"]
    assert texts["csv"].count(",auroc_entropy,") == 4 * 2  # 4 rows x 2 shifted sets
    # ECE with other bins, recomputed from the saved OOD predictions
    shifted = Predictions.from_state_dict(preds["ood/mmlu_chem"])
    five = make_tables(tmp_path, layout="ood", ece_bins=5, metrics=["ece"])["csv"]
    want = f"map,mmlu_chem,ece,{shifted.metrics(n_bins=5)['ece']:.6g}"
    assert want in five

    with pytest.raises(ValueError, match="eval.ood.rte: task 'rte' has 2 classes"):
        _ood_run(tmp_path, shared_data, "method_label=mismatch", "+eval.ood.rte={}")
    with pytest.raises(ValueError, match="data: no runs with data='nope'"):
        make_tables(tmp_path, layout="ood", data="nope")


def test_auroc_keeps_score_differences_below_float32_resolution():
    score_in = math.log(4) + torch.arange(6, dtype=torch.float64) * 1e-12  # all equal in float32
    score_out = math.log(4) + torch.tensor([0.5, 1.5, 2.5], dtype=torch.float64) * 1e-12
    assert ood_auroc(score_in, score_out) == pytest.approx(_naive_auroc(score_in, score_out), abs=1e-6)


def test_unlabelled_text_files_give_detection_metrics(tmp_path, shared_data):
    rows = [json.loads(line) for line in (shared_data / "mmlu" / "test.jsonl").read_text().splitlines()[:12]]
    (tmp_path / "mine.txt").write_text("\n".join(r["question"] for r in rows) + "\n")
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps({"body": r["question"]}) for r in rows) + "\n")
    sets = {"txt": {"path": f"{tmp_path}/mine.txt"}, "js": {"path": f"{tmp_path}/mine.jsonl", "text_field": "body"}}
    result = _ood_run_with(tmp_path / "r", shared_data, sets, "method=kfac_laplace")
    for name in ("txt", "js"):
        m = result["ood"][name]
        assert m["n"] == 12 and 0.0 <= m["auroc_entropy"] <= 1.0 and "acc" not in m and "nll" not in m
        assert "auroc_mi" in m  # the GLM probit predictive has an epistemic score
        assert result["ood_info"]["sets"][name]["labelled"] is False
    assert result["ood"]["txt"]["auroc_entropy"] == pytest.approx(result["ood"]["js"]["auroc_entropy"])
    md = make_tables(tmp_path / "r", layout="ood")["md"]
    assert make_tables(tmp_path / "r", layout="ood", ece_bins=10)["md"]  # recomputed ECE skips unlabelled sets
    assert "| kfac_laplace | – | " in md.split("**ACC (%) ↑**")[1] and "mutual information" in md


def test_a_bad_ood_entry_fails_before_any_training(tmp_path, shared_data):
    with pytest.raises(ValueError, match="eval.ood.nope: .*unknown task 'nope'"):
        _ood_run_with(tmp_path, shared_data, {"nope": {}}, "method=map")
    with pytest.raises(ValueError, match="eval.ood.rte: task 'rte' has 2 classes"):
        _ood_run_with(tmp_path, shared_data, {"rte": {}}, "method=map")
    assert not list(tmp_path.rglob("map.pt")) and not list(tmp_path.rglob("metrics.json"))  # nothing was trained
