import math

import pytest
import torch

from bayeslora.predictive import Predictive


def test_bma_entropy_and_mi_match_naive_loops():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(7, 5, 4, generator=g)
    pred = Predictive(logits)
    probs = torch.zeros(5, 4, dtype=torch.float64)
    exp_ent = torch.zeros(5, dtype=torch.float64)
    for s in range(7):
        p = torch.softmax(logits[s].double(), -1)
        probs += p / 7
        exp_ent += -(p * p.log()).sum(-1) / 7
    ent = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(pred.probs, probs)
    assert pred.log_probs.dtype == torch.float64
    torch.testing.assert_close(pred.entropy, ent)
    torch.testing.assert_close(pred.expected_entropy, exp_ent)
    torch.testing.assert_close(pred.mutual_information, ent - exp_ent)
    assert bool((pred.mutual_information > 0).all())
    torch.testing.assert_close(pred.mean_logits, logits.mean(0))


def test_point_and_identical_samples_have_zero_mi():
    x = torch.randn(3, 2)
    assert Predictive.point(x).mutual_information.abs().max() == 0
    same = Predictive(x.expand(4, 3, 2))
    assert same.mutual_information.abs().max() < 1e-12
    torch.testing.assert_close(same.log_probs, torch.log_softmax(x.double(), -1))


def test_bma_is_stable_for_extreme_logits():
    x = torch.tensor([[[1e4, -1e4]], [[-1e4, 1e4]]])
    lp = Predictive(x).log_probs
    torch.testing.assert_close(lp, torch.full((1, 2), math.log(0.5), dtype=torch.float64))


def test_cat_and_bad_shapes():
    a, b = Predictive(torch.randn(2, 3, 4)), Predictive(torch.randn(2, 5, 4))
    assert Predictive.cat([a, b]).logits.shape == (2, 8, 4)
    with pytest.raises(ValueError, match="same number of samples"):
        Predictive.cat([a, Predictive(torch.randn(3, 1, 4))])
    with pytest.raises(ValueError, match=r"\[S, B, C\]"):
        Predictive(torch.randn(3, 4))
    with pytest.raises(ValueError, match="at least one"):
        Predictive.cat([])
