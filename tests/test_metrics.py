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
