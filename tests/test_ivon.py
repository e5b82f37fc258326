"""IVON against closed forms: on the conjugate linear-Gaussian toy (a LoRA'd linear head, only B trained and random,
Gaussian likelihood) IVON's diagonal Gaussian converges to the mean-field optimum of the exact posterior (mean =
the posterior mean, variance = 1 / diag(precision)); its mean fit classifies like AdamW's MAP on a learnable toy."""

import pytest
import torch
from helpers import LinearToy, affine_posterior, linear_toy_fn, token_batch
from torch.utils.data import DataLoader

from bayeslora.function import model_mode
from bayeslora.likelihoods import Gaussian
from bayeslora.metrics import accuracy
from bayeslora.posteriors import make_posterior
from bayeslora.posteriors.ivon import IVONPosterior
from bayeslora.train import TrainConfig, train_map

NOISE, LAM = 0.5, 4.0  # observation std and prior precision of the conjugate toy


# The shared tests' options for the methods this file tests (what each key means: helpers.method_options).
METHOD_OPTIONS = {
    "ivon": {
        "fast": {"max_steps": 3, "n_samples": 3, "progress": False},
        "non_default": {"lr": 0.2, "epochs": 2.0, "max_steps": 7, "ess": 1e4, "hess_init": 0.3, "beta1": 0.8,
                        "beta2": 0.999, "weight_decay": 1e-3, "prior_precision": 2.0, "clip_radius": 0.01,
                        "warmup_ratio": 0.1, "grad_accum": 2, "clip": 1.0, "n_samples": 5, "seed": 3,
                        "progress": False},
    },
}  # fmt: skip


def loader(batch, batch_size, shuffle=False):
    n = batch["labels"].shape[0]
    rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]
    return DataLoader(rows, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(0))


def conjugate_toy(n: int):
    fn = linear_toy_fn()
    fn.readout.likelihood = Gaussian(NOISE)
    for name, p in fn.model.named_parameters():
        if "lora_A" in name:  # A fixed: the outputs are affine in B
            p.requires_grad_(False)
    batch = token_batch(n)
    batch["labels"] = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    return fn, batch


def exact_posterior(fn, batch):
    return affine_posterior(fn, batch, NOISE, LAM)


@pytest.mark.parametrize("n", [64, 256])
def test_ivon_reaches_the_meanfield_optimum_of_the_conjugate_posterior(n):
    fn, batch = conjugate_toy(n)
    ivp = IVONPosterior(lr=0.1, max_steps=2000, beta2=0.999, hess_init=1.0, prior_precision=LAM, progress=False)
    ivp.fit(fn, loader(batch, n))  # full batch; ess = N and weight decay = λ / N by default
    assert ivp.optimizer_options(n) == {"ess": float(n), "weight_decay": LAM / n}
    mean, precision = exact_posterior(fn, batch)
    mf_sd = precision.diagonal().rsqrt()
    m, sd = fn.params.flatten(ivp.mean).double(), fn.params.flatten(ivp.std).double()
    assert float(((m - mean) / mf_sd).abs().max()) < 0.2  # IVON's sampled gradients: a noisy optimiser
    torch.testing.assert_close(sd, mf_sd, rtol=0.12, atol=0)  # σ² = 1 / (ess (hess + δ)) = 1 / diag(precision)
    torch.testing.assert_close(fn.params.flatten(fn.params.values()), fn.params.flatten(ivp.mean), rtol=0, atol=0)
    draws = torch.stack([fn.params.flatten(v) for v in ivp.sample(4000, torch.Generator().manual_seed(0))]).double()
    torch.testing.assert_close(draws.std(0), sd, rtol=0.06, atol=0)  # predict samples q


def _teacher_data(n, seed):
    batch = token_batch(n, seed=seed)
    teacher = LinearToy(seed=0)
    with torch.no_grad():
        teacher.head.weight.copy_(torch.randn(2, 6, generator=torch.Generator().manual_seed(7)))
        teacher.head.bias.copy_(-3 * teacher.head.weight.sum(1))
        batch["labels"] = teacher(batch["input_ids"]).logits.argmax(-1)
    return batch


def _acc(fn, batch, values=None):
    with torch.no_grad(), model_mode(fn.model, False):
        return accuracy(torch.log_softmax(fn(values, batch).double(), -1), batch["labels"])


def test_ivon_mean_classifies_like_adamw():
    """A learnable toy (labels from a linear teacher on the pooled embeddings): IVON's mean within 3 points of the
    AdamW MAP's held-out accuracy, both well above chance."""
    train, test = _teacher_data(256, 1), _teacher_data(512, 2)
    adamw = linear_toy_fn(lora_tensors=("A", "B"))
    train_map(adamw, loader(train, 16, shuffle=True), TrainConfig(lr=2e-2, epochs=20, progress=False))
    fn = linear_toy_fn(lora_tensors=("A", "B"))
    ivp = IVONPosterior(lr=0.3, hess_init=0.5, epochs=20, beta2=0.999, progress=False)
    ivp.fit(fn, loader(train, 16, shuffle=True))
    want, got = _acc(adamw, test), _acc(fn, test, ivp.mean)
    assert want > 0.8 and got > want - 0.03, (want, got)
    pred = ivp.predict(fn, test, n_samples=8, generator=torch.Generator().manual_seed(0))
    assert pred.logits.shape == (8, 512, 2) and not torch.equal(pred.logits[0], pred.logits[1])
    assert accuracy(pred.log_probs, test["labels"]) > want - 0.05


def test_options_state_and_errors():
    p = make_posterior("ivon", lr=0.2, ess=1e4, weight_decay=1e-3, n_samples=3, progress=False)
    assert make_posterior("ivon", **p.config()).config() == p.config()
    assert p.optimizer_options(100) == {"ess": 1e4, "weight_decay": 1e-3}
    assert make_posterior("ivon", prior_precision=2.0).optimizer_options(50)["weight_decay"] == pytest.approx(0.04)
    for kwargs, match in (({"lr": 0}, "lr: expected a positive"), ({"beta2": 1.0}, "beta2: expected a number in"),
                          ({"ess": -1}, "ess: expected a positive"), ({"n_samples": -1}, "n_samples: expected"),
                          ({"weight_decay": -1.0}, "weight_decay: expected a number >= 0"),
                          ({"grad_accum": 0}, "grad_accum")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            IVONPosterior(**kwargs)
    fn = linear_toy_fn()
    with pytest.raises(RuntimeError, match="not fitted"):
        IVONPosterior().predict(fn, token_batch(2))
    values = fn.params.values()
    bad = {"values": values, "std": {k: -torch.ones_like(v) for k, v in values.items()}}
    with pytest.raises(ValueError, match="expected finite positive σ"):
        IVONPosterior().load_state_dict(bad)
