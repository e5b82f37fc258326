"""Regression through the posteriors, against closed-form Bayesian linear regression.

The LoRA'd linear toy (``helpers.LinearToy``, one output) with only LoRA B random is linear in the random tensor,
``f(x; b) = c(x) + J(x) b``; with the prior ``N(0, λ⁻¹ I)`` and ``y ~ N(f, σ²)`` the posterior is exactly
``N(μ, Σ)``, ``Σ⁻¹ = JᵀJ / σ² + λ I``, ``μ = Σ Jᵀ (y − c) / σ²``, the predictive at a test input is
``N(c* + J* μ, J* Σ J*ᵀ + σ²)`` and the evidence is ``log N(y; c, σ² I + J Jᵀ / λ)``. The GGN Laplace posterior
around ``μ`` equals it (one output: K-FAC is exact), in float64 up to the engine's float32 Kronecker factors.
"""

import math

import pytest
import torch
from helpers import linear_toy_fn, token_batch
from torch.utils.data import DataLoader

from bayeslora.likelihoods import Gaussian
from bayeslora.posteriors import make_posterior
from bayeslora.posteriors.laplace import Laplace
from bayeslora.predictive import Predictive
from bayeslora.readout import SequenceRegression, readout_from_config

SIGMA, LAM = 0.4, 3.0
RTOL = 1e-6  # the model is float64; the engine keeps its Kronecker factors in float32 (about 1e-7 relative)


def regression_toy(seed: int = 0):
    fn = linear_toy_fn(num_classes=1, readout=SequenceRegression(SIGMA))
    fn.model.double()
    return fn


def targets(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def jacobian(fn, batch):
    """``(c [N], J [N, D])`` of the affine toy: outputs at b = 0 and their exact Jacobian in vec(B)."""
    (name,) = fn.params.names
    b = torch.zeros_like(fn.params.values()[name]).requires_grad_(True)
    f = fn({name: b}, batch)[:, 0]
    jac = torch.stack([torch.autograd.grad(f[i], b, retain_graph=True)[0].reshape(-1) for i in range(f.numel())])
    return f.detach(), jac


def conjugate(fn, batch, sigma=SIGMA, lam=LAM):
    c, jac = jacobian(fn, batch)
    precision = jac.T @ jac / sigma**2 + lam * torch.eye(jac.shape[1], dtype=torch.float64)
    cov = torch.linalg.inv(precision)
    mu = cov @ jac.T @ (batch["labels"][:, 0] - c) / sigma**2
    return mu, cov


class Rows(torch.utils.data.Dataset):
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return self.batch["input_ids"].shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def loader(batch, batch_size=8):
    return DataLoader(Rows(batch), batch_size=batch_size, collate_fn=torch.utils.data.default_collate)


@pytest.fixture(scope="module")
def fitted():
    fn = regression_toy()
    train = {**token_batch(40, seed=0), "labels": targets(40, 1)}
    test = {**token_batch(12, seed=5), "labels": targets(12, 6)}
    mu, cov = conjugate(fn, train)
    (name,) = fn.params.names
    with torch.no_grad():
        fn.params.tensors()[name].copy_(mu.reshape(fn.params.tensors()[name].shape))
    la = Laplace("kron", prior_fit="none", prior_precision=LAM).fit(fn, loader(train))
    return fn, la, train, test, mu, cov


def closed_form_predictive(fn, batch, mu, cov, sigma=SIGMA):
    c, jac = jacobian(fn, batch)
    return c + jac @ mu, (jac @ cov @ jac.T).diagonal() + sigma**2


def test_glm_laplace_predictive_is_the_conjugate_predictive(fitted):
    fn, la, _, test, mu, cov = fitted
    mean, var = closed_form_predictive(fn, test, mu, cov)
    pred = la.predict(fn, test)
    assert pred.num_samples == 1 and pred.variance is not None
    torch.testing.assert_close(pred.mean[:, 0], mean, rtol=RTOL, atol=0)
    torch.testing.assert_close(pred.predictive_variance[:, 0], var, rtol=RTOL, atol=0)
    log_density = torch.distributions.Normal(mean, var.sqrt()).log_prob(test["labels"][:, 0])
    torch.testing.assert_close(pred.log_likelihood(test["labels"]), log_density, rtol=RTOL, atol=0)
    lo, hi = pred.interval(0.9)
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.95, dtype=torch.float64))
    torch.testing.assert_close(hi[:, 0], mean + z * var.sqrt(), rtol=RTOL, atol=0)
    torch.testing.assert_close(lo[:, 0], mean - z * var.sqrt(), rtol=RTOL, atol=0)


def test_laplace_weight_samples_have_the_conjugate_covariance(fitted):
    fn, la, _, _, mu, cov = fitted
    (name,) = fn.params.names
    samples = torch.stack([v[name].reshape(-1) for v in la.sample(fn, 20000, torch.Generator().manual_seed(0))])
    torch.testing.assert_close(samples.mean(0), mu, atol=4 * cov.diagonal().sqrt().max().item() / 100, rtol=0)
    torch.testing.assert_close(torch.cov(samples.T), cov, atol=0.05 * cov.diagonal().max().item(), rtol=0)


def test_laplace_evidence_is_the_closed_form_evidence(fitted):
    fn, la, train, _, _, _ = fitted
    c, jac = jacobian(fn, train)
    n = jac.shape[0]
    evidence = torch.distributions.MultivariateNormal(
        c, SIGMA**2 * torch.eye(n, dtype=torch.float64) + jac @ jac.T / LAM
    ).log_prob(train["labels"][:, 0])
    assert la.log_marglik(LAM) == pytest.approx(float(evidence), rel=1e-7)  # float32 factors


def test_a_broken_noise_scale_is_caught(fitted):
    """The reference can fail: the precision without the 1/σ² (a GGN of JᵀJ) gives another predictive variance."""
    fn, la, _, test, mu, _ = fitted
    train = {**token_batch(40, seed=0), "labels": targets(40, 1)}
    _, jac = jacobian(fn, train)
    wrong = torch.linalg.inv(jac.T @ jac + LAM * torch.eye(jac.shape[1], dtype=torch.float64))
    _, var_wrong = closed_form_predictive(fn, test, mu, wrong)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(la.predict(fn, test).predictive_variance[:, 0], var_wrong, rtol=1e-6, atol=0)


def test_marglik_prior_fit_uses_the_gaussian_evidence(fitted):
    """The fitted λ is a stationary point of the (Gaussian) Laplace evidence at the held MAP."""
    fn, _, train, _, _, _ = fitted
    la = Laplace("kron", prior_fit="marglik", prior_precision=LAM).fit(fn, loader(train))
    lam = float(la.prior[0])
    best = la.log_marglik(lam)
    assert best > la.log_marglik(lam * 1.05) and best > la.log_marglik(lam / 1.05)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_laplace_torch_regression_oracle(fitted):
    """laplace-torch's regression Laplace (full-data K-FAC GGN with σ_noise) gives the same predictive."""
    fn, la, train, test, _, _ = fitted
    oracle = Laplace("kron", backend="laplace-torch", prior_fit="none", prior_precision=LAM).fit(fn, loader(train))
    mine, theirs = la.predict(fn, test), oracle.predict(fn, test)
    torch.testing.assert_close(theirs.mean, mine.mean, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(theirs.predictive_variance, mine.predictive_variance, rtol=1e-6, atol=1e-8)


def test_regression_readout_round_trips_and_refuses_class_shapes():
    r = SequenceRegression(0.3, noise="fit")
    back = readout_from_config(r.config())
    assert isinstance(back, SequenceRegression) and back.config() == r.config()
    assert isinstance(back.likelihood, Gaussian) and back.likelihood.noise_std == 0.3
    with pytest.raises(ValueError, match="noise: expected one of"):
        SequenceRegression(1.0, noise="learned")
    from transformers.modeling_outputs import SequenceClassifierOutput

    with pytest.raises(ValueError, match="num_labels=1"):
        r(SequenceClassifierOutput(logits=torch.zeros(3, 2)), {})
    from bayeslora.readout import SequenceClassificationLogits

    with pytest.raises(ValueError, match="SequenceRegression"):
        SequenceClassificationLogits(1)


def test_gaussian_mixture_predictive_against_naive_formulas():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(5, 7, 1, generator=g, dtype=torch.float64)
    v = torch.rand(7, 1, generator=g, dtype=torch.float64)
    y = torch.randn(7, 1, generator=g, dtype=torch.float64)
    sigma = 0.6
    pred = Predictive(f, likelihood=Gaussian(sigma), variance=v)
    sd = (v + sigma**2).sqrt()
    dens = sum(torch.distributions.Normal(f[s], sd).log_prob(y).exp() for s in range(5)) / 5
    torch.testing.assert_close(pred.log_likelihood(y), dens.log()[:, 0])
    torch.testing.assert_close(pred.mean, f.mean(0))
    second = (f.square() + sd.square()).mean(0)  # E[y²] of the mixture
    torch.testing.assert_close(pred.predictive_variance, second - f.mean(0).square())
    for q in (0.05, 0.5, 0.9):  # the quantile inverts the mixture CDF
        torch.testing.assert_close(pred.cdf(pred.quantile(q)), torch.full((7, 1), q, dtype=torch.float64))
    with pytest.raises(ValueError, match="log_probs / probs|is defined for class logits"):
        _ = pred.log_probs
    with pytest.raises(ValueError, match="variance: expected the function-space variance"):
        Predictive(f, likelihood=Gaussian(sigma), variance=v[:3])


@pytest.mark.parametrize("method", ["map", "kfac_laplace", "diag_laplace", "mc_dropout", "ensemble", "vi_meanfield"])
def test_every_regression_posterior_predicts_a_gaussian_mixture(method):
    fn = regression_toy()
    train = {**token_batch(24, seed=0), "labels": targets(24, 1)}
    options = {"ensemble": {"k": 2, "train": {"epochs": 1, "lr": 1e-2}, "progress": False},
               "vi_meanfield": {"steps": 5, "progress": False},
               "mc_dropout": {"n_samples": 3, "include_model_dropout": True}}.get(method, {})  # fmt: skip
    post = make_posterior(method, **options).fit(fn, loader(train))
    pred = post.predict(fn, train, generator=torch.Generator().manual_seed(0))
    assert not pred.is_categorical and pred.logits.shape[1:] == (24, 1)
    assert torch.isfinite(pred.log_likelihood(train["labels"])).all()
    assert bool((pred.predictive_variance >= SIGMA**2 * (1 - 1e-9)).all())


def test_temperature_scaling_refuses_regression_and_names_the_alternative():
    fn = regression_toy()
    train = {**token_batch(8, seed=0), "labels": targets(8, 1)}
    with pytest.raises(ValueError, match="noise='fit'"):
        make_posterior("temperature").fit(fn, loader(train), val_loader=loader(train))


def test_noise_fit_is_the_maximum_likelihood_std():
    from bayeslora.train import fit_noise_std

    fn = linear_toy_fn(num_classes=1, readout=SequenceRegression(1.0, noise="fit"))
    fn.model.double()
    train = {**token_batch(30, seed=0), "labels": targets(30, 1)}
    sigma = fit_noise_std(fn, loader(train))
    resid = train["labels"] - fn(None, train).detach()
    assert sigma == pytest.approx(math.sqrt(float(resid.square().mean())), rel=1e-12)
    assert fn.likelihood.noise_std == sigma and fn.readout.config()["noise_std"] == sigma
    nll = [Gaussian(s).nll(fn(None, train).detach(), train["labels"]).item() for s in (0.9 * sigma, sigma, sigma / 0.9)]
    assert nll[1] < nll[0] and nll[1] < nll[2]


def test_meanfield_vi_on_the_regression_readout_reaches_the_conjugate_meanfield_optimum():
    """VI takes σ from the readout's Gaussian likelihood (no override): on the conjugate toy the mean-field optimum is
    the posterior mean with variances 1 / diag(Σ⁻¹)."""
    from bayeslora.posteriors.vi import Variational

    fn = regression_toy()
    n, steps = 64, 1500
    train = {**token_batch(n, seed=0), "labels": targets(n, 1)}
    mu, cov = conjugate(fn, train)
    vi = Variational("meanfield", steps=steps, lr=0.05, scale_lr=None, prior_precision=LAM, init_scale=1e-2,
                     progress=False, num_particles=2)  # fmt: skip
    vi.bind(fn, n, total_steps=steps)
    for _ in range(steps):
        vi.step(fn, train)
    site = vi.model.sites[fn.params.names[0]]
    with vi.param_store():
        loc, scale = vi.guide._get_loc_and_scale(site)
    mf_sd = torch.linalg.inv(cov).diagonal().rsqrt()
    assert float(((loc.detach().reshape(-1).double() - mu) / mf_sd).abs().max()) < 0.25
    torch.testing.assert_close(scale.detach().reshape(-1).double(), mf_sd, rtol=0.12, atol=0)
    pred = vi.predict(fn, train, n_samples=64, generator=torch.Generator().manual_seed(0))
    assert pred.likelihood.noise_std == SIGMA and not pred.is_categorical
