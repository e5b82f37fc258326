import math

import numpy as np
import pytest
import torch

from bayeslora import metrics as M


def _data(n=500, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 2.5 * torch.randn(n, c, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    return torch.log_softmax(logits.double(), -1), labels


def _naive_ece(probs, labels, n_bins=15):
    conf = probs.max(1)
    pred = probs.argmax(1)
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs((pred[m] == labels[m]).mean() - conf[m].mean())
    return total


def test_metrics_match_naive_references():
    lp, y = _data()
    p = lp.exp().numpy()
    yn = y.numpy()
    assert M.accuracy(lp, y) == pytest.approx((p.argmax(1) == yn).mean())
    assert M.nll(lp, y) == pytest.approx(-np.log(p[np.arange(len(yn)), yn]).mean())
    onehot = np.eye(3)[yn]
    assert M.brier(lp, y) == pytest.approx(((p - onehot) ** 2).sum(1).mean())
    assert M.ece(lp, y) == pytest.approx(_naive_ece(p, yn), abs=1e-5)
    assert M.ece(lp, y, n_bins=5) == pytest.approx(_naive_ece(p, yn, 5), abs=1e-5)


def test_whole_dataset_not_mean_of_batch_means():
    lp, y = _data(n=301)
    parts = [
        M.Predictions(
            lp[i : i + 100],
            y[i : i + 100],
            lp[i : i + 100].float(),
            torch.zeros(len(y[i : i + 100])),
            torch.zeros(len(y[i : i + 100])),
        )
        for i in range(0, 301, 100)
    ]
    whole = M.Predictions.cat(parts).metrics()
    assert whole["ece"] == pytest.approx(M.ece(lp, y))
    batch_mean = float(np.mean([M.ece(p.log_probs, p.labels) for p in parts]))
    assert whole["ece"] != pytest.approx(batch_mean)


def test_risk_coverage_and_aurc_reference():
    lp, y = _data(n=50, seed=2)
    cov, risk = M.risk_coverage(lp, y)
    conf, pred = lp.max(1)
    order = np.argsort(-conf.numpy(), kind="stable")
    err = (pred.numpy() != y.numpy())[order]
    ref = np.cumsum(err) / np.arange(1, 51)
    np.testing.assert_allclose(risk.numpy(), ref)
    assert cov[-1] == 1.0 and risk[-1].item() == pytest.approx(1 - M.accuracy(lp, y))
    assert M.aurc(lp, y) == pytest.approx(ref.mean())


def test_ood_auroc_matches_pairwise_count():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, generator=g), torch.randn(30, generator=g) + 0.7
    pairs = (b[None, :] > a[:, None]).double().mean().item()
    assert M.ood_auroc(a, b) == pytest.approx(pairs, abs=1e-6)
    assert M.ood_auroc(torch.zeros(3), torch.ones(3)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="non-empty"):
        M.ood_auroc(torch.zeros(0), torch.ones(2))


def test_bad_labels_are_rejected():
    lp, y = _data(n=10)
    with pytest.raises(ValueError, match=r"labels: expected integers in \[0, 3\)"):
        M.accuracy(lp, torch.full((10,), 3))
    with pytest.raises(ValueError, match="one per row"):
        M.nll(lp, y[:5])
    with pytest.raises(ValueError, match="empty"):
        M.brier(lp[:0], y[:0])


def _regression_predictions(mu, sd, y):
    from bayeslora.likelihoods import Gaussian
    from bayeslora.metrics import RegressionPredictions
    from bayeslora.predictive import Predictive

    # a point predictive N(mu, sd²): the observation noise is sd (no function-space variance); two batches
    preds = [RegressionPredictions.from_predictive(Predictive.point(m[:, None], likelihood=Gaussian(sd)), t)
             for m, t in zip(mu.tensor_split(2), y.tensor_split(2))]  # fmt: skip
    return RegressionPredictions.cat(preds)


def test_regression_metrics_against_naive_loops():
    from bayeslora.metrics import regression_metrics

    g = torch.Generator().manual_seed(0)
    n = 300
    mu = torch.randn(n, generator=g, dtype=torch.float64)
    y = mu + 0.7 * torch.randn(n, generator=g, dtype=torch.float64)
    sd = 0.5  # too narrow
    p = _regression_predictions(mu, sd, y[:, None])
    m = regression_metrics(p.log_density, p.mean, p.pit, p.labels)
    normal = torch.distributions.Normal(0.0, 1.0)
    nll = sum(0.5 * math.log(2 * math.pi * 0.25) + (float(y[i] - mu[i]) ** 2) / (2 * 0.25) for i in range(n)) / n
    assert m["nll"] == pytest.approx(nll, rel=1e-12)
    assert m["rmse"] == pytest.approx(math.sqrt(sum(float(y[i] - mu[i]) ** 2 for i in range(n)) / n), rel=1e-12)

    def coverage(level):  # count labels inside the central interval, one by one
        z = float(normal.icdf(torch.tensor(0.5 + level / 2, dtype=torch.float64)))
        return sum(float(mu[i]) - z * 0.5 <= float(y[i]) <= float(mu[i]) + z * 0.5 for i in range(n)) / n

    for level, key in ((0.5, "cov50"), (0.9, "cov90"), (0.95, "cov95")):
        assert m[key] == pytest.approx(coverage(level), abs=1e-12)
    levels = [0.05 * k for k in range(1, 20)]
    assert m["rce"] == pytest.approx(sum(abs(coverage(p) - p) for p in levels) / len(levels), abs=1e-12)
    assert m["cov90"] < 0.85  # too narrow: under-covers


def test_coverage_of_a_calibrated_gaussian_is_nominal_and_a_miscalibrated_one_is_not():
    from bayeslora.metrics import interval_coverage, regression_calibration_error

    g = torch.Generator().manual_seed(1)
    n = 20000
    mu = torch.randn(n, generator=g, dtype=torch.float64)
    y = mu + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    calibrated = _regression_predictions(mu, 0.3, y[:, None])
    for level in (0.5, 0.9, 0.95):  # binomial std at n = 20000 is at most 0.0036
        assert interval_coverage(calibrated.pit, level) == pytest.approx(level, abs=0.012)
    assert regression_calibration_error(calibrated.pit) < 0.01
    wide = _regression_predictions(mu, 0.6, y[:, None])
    assert regression_calibration_error(wide.pit) > 0.1 and interval_coverage(wide.pit, 0.5) > 0.8


def test_regression_predictions_round_trip_through_the_saved_state():
    from bayeslora.metrics import Predictions, RegressionPredictions

    g = torch.Generator().manual_seed(2)
    mu, y = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, 1, generator=g, dtype=torch.float64)
    p = _regression_predictions(mu, 1.0, y)
    back = Predictions.from_state_dict(p.state_dict())
    assert isinstance(back, RegressionPredictions) and back.metrics() == p.metrics()
    assert set(p.metrics()) == {"nll", "rmse", "cov50", "cov90", "cov95", "rce"}
    with pytest.raises(ValueError, match="pit: expected"):
        from bayeslora.metrics import interval_coverage

        interval_coverage(torch.tensor([1.5]), 0.5)
