import json
import math

import pytest
import torch

from bayeslora.metrics import Predictions
from bayeslora.results import collect
from bayeslora.tables import aggregate, main, make_tables


def _write_run(root, data, method, seed, acc, ece, nll=0.5, brier=0.3, c=2, n=200, preds=None, counts=None, **identity):
    d = root / data / "m" / method / f"seed_{seed}"
    d.mkdir(parents=True)
    m = {"acc": acc, "ece": ece, "nll": nll, "brier": brier, "aurc": 0.1}
    run = {
        "data": data,
        "task": data,
        "model": "m",
        "method": method,
        "method_label": method,
        "seed": seed,
        "num_classes": c,
        "num_test": n,
        "splits": {"test": m, "test_ts": {**m, "ece": ece / 2}},
        **m,
    }
    if counts is not None:
        run["label_counts"] = {"test": counts}
    if identity:
        run["identity"] = {"seed": seed, **identity}
    (d / "metrics.json").write_text(json.dumps(run))
    if preds is not None:
        torch.save({"test": preds.state_dict()}, d / "predictions.pt")


def test_aggregate_mean_std_best_and_chance(tmp_path):
    for s, (a, e) in enumerate([(0.80, 0.10), (0.84, 0.14)]):
        _write_run(tmp_path, "rte", "map", s, a, e)
    for s, (a, e) in enumerate([(0.82, 0.04), (0.82, 0.06)]):
        _write_run(tmp_path, "rte", "kfac", s, a, e)
    _write_run(tmp_path, "arc", "map", 0, 0.26, 0.02, c=4, n=100)  # chance level for 4 classes
    (tmp_path / ".map_cache" / "x").mkdir(parents=True)
    (tmp_path / ".map_cache" / "x" / "metrics.json").write_text("{}")  # ignored
    runs = collect(tmp_path)
    assert len(runs) == 5
    table, methods, datasets = aggregate(runs)
    assert methods == ["map", "kfac"] and datasets == ["arc", "rte"]  # order of discovery (sorted paths)
    cell = table["acc"]["map"]["rte"]
    assert cell.mean == pytest.approx(0.82) and cell.std == pytest.approx(0.028284, rel=1e-4)
    assert table["acc"]["map"]["arc"].chance and not table["acc"]["map"]["rte"].chance
    md = make_tables(tmp_path)["md"]
    assert "| kfac | – | 82.0 ± 0.0 |" in md
    assert "**5.0 ± 1.4**" in md and "†" in md  # best ECE on rte is kfac's; arc is at chance
    assert "| map | **26.0 (n=1)** † |" in md and "(n=k): mean over k seeds only (the other cells: 2)." in md
    texts = make_tables(tmp_path, tmp_path / "out", ts_rows=True)
    assert "| kfac + TS | – | **2.5 ± 0.7** |" in texts["md"]
    assert "\\textbf{" in texts["tex"] and "\\toprule" in texts["tex"]
    assert (tmp_path / "out" / "table.csv").read_text().startswith("method,dataset,metric,mean,std,n_seeds,chance")


def test_recompute_ece_with_other_bins_from_predictions(tmp_path):
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(2 * torch.randn(200, 2, generator=g).double(), -1)
    # correct with probability 0.75 whatever the confidence: under- and over-confident bins, so the binning matters
    correct = torch.rand(200, generator=g) < 0.75
    y = torch.where(correct, lp.argmax(-1), 1 - lp.argmax(-1))
    p = Predictions(lp, y, lp.float(), torch.zeros(200), torch.zeros(200))
    m15, m5 = p.metrics(), p.metrics(n_bins=5)
    _write_run(tmp_path, "rte", "map", 0, m15["acc"], m15["ece"], preds=p)
    table, _, _ = aggregate(collect(tmp_path), ece_bins=5)
    assert table["ece"]["map"]["rte"].mean == pytest.approx(m5["ece"])
    assert m5["ece"] != pytest.approx(m15["ece"])


def test_cli_and_errors(tmp_path, capsys):
    _write_run(tmp_path, "rte", "map", 0, 0.8, 0.1)
    main([str(tmp_path), "--metrics", "acc", "ece"])
    assert "**ACC (%) ↑**" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no metrics.json"):
        (tmp_path / "empty").mkdir()
        make_tables(tmp_path / "empty")
    with pytest.raises(ValueError, match="not a directory"):
        collect(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown \\['f1'\\]"):
        make_tables(tmp_path, metrics=["f1"])


def test_chance_is_the_majority_rate_of_the_split_and_the_constant_predictor_is_the_reference(tmp_path):
    """75% of the test labels are class 0: 70% accuracy is below the majority rate (1/C = 50% would pass it)."""
    _write_run(tmp_path, "imb", "map", 0, 0.70, 0.1, n=200, counts=[150, 50])
    _write_run(tmp_path, "bal", "map", 0, 0.70, 0.1, n=200, counts=[100, 100])
    md = make_tables(tmp_path, metrics=["acc", "nll"], columns=["imb", "bal"])["md"]
    row = next(line for line in md.splitlines() if line.startswith("| map |"))
    imb, bal = row.split(" | ")[1:3]
    assert imb.endswith("†") and not bal.rstrip(" |").endswith("†")
    assert "majority-class rate" in md
    # the constant predictor of the split's class frequencies: NLL = H(0.75, 0.25), Brier = 1 - (0.75² + 0.25²)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert f"imb {h:.3f} / {1 - 0.75**2 - 0.25**2:.3f}" in md and f"bal {math.log(2):.3f} / 0.500" in md


def test_runs_of_one_label_with_different_settings_get_one_row_each(tmp_path):
    for seed in (0, 1):
        for lam in (0.1, 10.0):
            _write_run(tmp_path, "rte", f"kfac/{lam}", seed, 0.8, 0.1 if lam < 1 else 0.2, prior_precision=lam)
    for path in tmp_path.rglob("metrics.json"):  # one method label, two settings (a prior-precision sweep)
        path.write_text(json.dumps({**json.loads(path.read_text()), "method_label": "kfac"}))
    table, methods, _ = aggregate(collect(tmp_path))
    assert methods == ["kfac (prior_precision=0.1)", "kfac (prior_precision=10)"]
    assert [len(table["ece"][m]["rte"].values) for m in methods] == [2, 2]  # seeds pooled, settings kept apart


def test_run_record_round_trips_keeps_unknown_keys_and_refuses_foreign_files(tmp_path):
    from bayeslora.results import RunRecord

    _write_run(tmp_path, "rte", "map", 0, 0.8, 0.1, counts=[100, 100], prior_precision=1.0)
    path = next(tmp_path.rglob("metrics.json"))
    raw = json.loads(path.read_text())
    record = RunRecord.read(path)
    assert record.directory == path.parent and record.splits["test"]["acc"] == 0.8 and record.label_counts
    assert record.to_dict() == raw
    future = {**raw, "a_new_field": [1, 2]}
    assert RunRecord.from_dict(future).to_dict() == future  # a later version's keys survive a rewrite
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "metrics.json").write_text('{"acc": 0.5}')
    with pytest.raises(ValueError, match=r"x/metrics.json: not a bayeslora run record \(missing \['task'"):
        collect(tmp_path)
