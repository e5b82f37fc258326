"""TFB: the bisection returns the documented σ within its resolution on a threshold known in closed form; on a tiny
model it agrees with a brute-force grid of the validation metric; its A noise is isotropic in B's column space."""

import math

import pytest
import torch
from helpers import TokenDataset, randomize_lora_b, tiny_fn

from bayeslora.posteriors import make_posterior
from bayeslora.posteriors.tfb import TFB, a_noise_bases, bisect_log_sigma
from bayeslora.train import TrainConfig, train_map

# The shared tests' options for the methods this file tests (what each key means: helpers.method_options).
METHOD_OPTIONS = {
    "tfb": {
        "fast": {},
        "non_default": {"metric": "nll", "tolerance": 0.02, "sigma_min": 1e-3, "sigma_max": 0.5, "n_search": 5,
                        "n_search_samples": 3, "n_samples": 5, "seed": 2},
    },
}  # fmt: skip


@pytest.mark.parametrize("threshold", [1.3e-4, 3.7e-3, 0.02, 0.5, 0.99])
def test_bisection_finds_a_known_threshold_within_its_resolution(threshold):
    calls = []

    def passes(sigma):
        calls.append(sigma)
        return sigma <= threshold

    sigma, (lo, hi) = bisect_log_sigma(passes, 1e-4, 1.0, 10)
    width = math.log(1.0 / 1e-4) / 2**10  # the resolution in log σ
    assert sigma == lo and lo <= threshold < hi
    assert math.log(hi) - math.log(lo) == pytest.approx(width)
    assert len(calls) == 11  # sigma_max first, then n_search halvings
    assert bisect_log_sigma(lambda s: True, 1e-4, 1.0, 10)[0] == 1.0  # sigma_max passes: the answer
    assert bisect_log_sigma(lambda s: False, 1e-4, 1.0, 10)[0] == pytest.approx(1e-4)  # nothing passes: sigma_min


def _fitted(metric="nll", tolerance=0.02):
    fn, _ = tiny_fn("bert", r=2)
    val = TokenDataset(32, seed=6).loader(16)
    train_map(fn, val, TrainConfig(lr=2e-2, max_steps=40, progress=False))  # a confident MAP on the anchor set
    tfb = TFB(metric=metric, tolerance=tolerance, sigma_min=1e-3, sigma_max=10.0, n_search=8, n_search_samples=4)
    return tfb.fit(fn, val_loader=val), fn, val


def test_search_agrees_with_a_brute_force_grid_of_the_metric():
    tfb, fn, val = _fitted()
    batches = list(val)
    reference = tfb.validation_metric(fn, batches, 0.0)
    grid = torch.logspace(-3, 1, 81).tolist()
    values = [tfb.validation_metric(fn, batches, s) for s in grid]
    ok = [v <= reference + 0.02 for v in values]
    first_fail = ok.index(False)
    assert all(ok[:first_fail]) and not any(ok[first_fail + 3 :])  # monotone here: the threshold is well defined
    width = math.log(1e4) / 2**8
    step = math.log(grid[1] / grid[0])
    assert math.log(grid[first_fail - 1]) - width - step <= math.log(tfb.sigma) <= math.log(grid[first_fail]) + step
    assert tfb.validation_metric(fn, batches, tfb.sigma) <= reference + 0.02  # the answer passes ...
    assert tfb.validation_metric(fn, batches, tfb.sigma * math.exp(width)) > reference + 0.02  # ... one step up fails
    assert any(abs(s - tfb.sigma) < 1e-12 for s, _ in tfb.history)


def test_accuracy_metric_and_predict():
    tfb, fn, val = _fitted(metric="acc", tolerance=0.1)
    batches = list(val)
    assert tfb.validation_metric(fn, batches, tfb.sigma) >= tfb.validation_metric(fn, batches, 0.0) - 0.1
    batch = batches[0]
    pred = tfb.predict(fn, batch, n_samples=3, generator=torch.Generator().manual_seed(0))
    assert pred.logits.shape == (3, 16, 2) and not torch.equal(pred.logits[0], pred.logits[1])
    mean = tfb.predict(fn, batch, n_samples=0)
    torch.testing.assert_close(mean.logits, tfb._predict(fn, batch, 0, None, 0.0).logits)


def test_a_noise_is_isotropic_in_the_column_space_of_b():
    fn, _ = tiny_fn("bert", r=3)
    randomize_lora_b(fn, scale=0.5)
    tfb = TFB()
    tfb.values, tfb.bases, sigma = fn.params.values(), a_noise_bases(fn), 0.3
    name = next(n for n in fn.params.names if ".lora_A." in n)
    b = dict(fn.model.named_parameters())[name.replace(".lora_A.", ".lora_B.")].detach().double()
    u = torch.linalg.svd(b, full_matrices=False)[0]
    draws = tfb.sample(400, torch.Generator().manual_seed(0), sigma)
    assert all(torch.equal(d[n], tfb.values[n]) for d in draws for n in d if ".lora_A." not in n)  # B etc. fixed
    delta = torch.stack([b @ (d[name].double() - tfb.values[name].double()) for d in draws])  # [S, out, in]
    cov = torch.einsum("sij,skj->ik", delta, delta) / (delta.shape[0] * delta.shape[2])
    torch.testing.assert_close(cov, sigma**2 * u @ u.T, rtol=0, atol=0.1 * sigma**2)


def test_options_and_errors():
    p = make_posterior("tfb", metric="nll", tolerance=0.02, n_search=5)
    assert TFB().metric == "acc"
    assert make_posterior("tfb", **p.config()).config() == p.config()
    for kwargs, match in (({"metric": "ece"}, "metric: expected one of"), ({"tolerance": 0}, "tolerance: expected"),
                          ({"sigma_min": 1.0, "sigma_max": 0.5}, "expected sigma_min < sigma_max"),
                          ({"n_search": 0}, "n_search: expected a positive integer")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            TFB(**kwargs)
    fn, _ = tiny_fn("bert")
    with pytest.raises(ValueError, match="val_loader: TFB searches"):
        TFB().fit(fn, None)
    with pytest.raises(RuntimeError, match="not fitted"):
        TFB().predict(fn, next(iter(TokenDataset(4).loader(4))))
