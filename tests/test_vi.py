"""Variational posteriors (Pyro SVI) against closed forms: a LoRA'd linear head with only B random and a Gaussian
likelihood is a conjugate linear-Gaussian model, so the mean-field optimum (mean = posterior mean, variance =
1 / diag(precision)) and the full posterior (which the low-rank guide can represent) are known exactly."""

import math

import pyro
import pytest
import torch
from helpers import TokenDataset, affine_posterior, linear_toy_fn, tiny_fn, token_batch

from bayeslora.posteriors import METHODS, make_posterior
from bayeslora.posteriors.vi import Variational
from bayeslora.posteriors.vi_guides import flipout_hooks, is_spread_param, site_names
from bayeslora.run import _instantiate, _run_level_options, compose

NOISE, LAM = 0.5, 4.0  # observation std and prior precision of the conjugate toy


# The shared tests' options for the methods this file tests (what each key means: helpers.method_options).
_VI_NON_DEFAULT = {
    "steps": 11, "epochs": 2.0, "lr": 3e-3, "scale_lr": 5e-2, "num_particles": 2, "elbo": "meanfield", "kl_weight": 0.5,
    "kl_warmup_steps": 3, "rank": 3, "init_scale": 2e-2, "prior_precision": 4.0, "prior_mean": "init",
    "flipout": False, "n_samples": 5, "likelihood": "gaussian", "noise_std": 0.3, "progress": False, "seed": 9,
}  # fmt: skip
METHOD_OPTIONS = {
    "vi_meanfield": {"fast": {"steps": 3, "n_samples": 3, "progress": False}, "non_default": _VI_NON_DEFAULT},
    "vi_lowrank": {"fast": {"steps": 3, "n_samples": 3, "rank": 2, "progress": False}, "non_default": _VI_NON_DEFAULT},
    "vi_blob": {"fast": {"steps": 3, "n_samples": 3, "progress": False}, "non_default": _VI_NON_DEFAULT},
}


def conjugate_toy(n: int):
    fn = linear_toy_fn()
    batch = token_batch(n)
    batch["labels"] = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))  # regression targets [B, C]
    return fn, batch


def exact_posterior(fn, batch):
    return affine_posterior(fn, batch, NOISE, LAM)


def fit_toy(guide: str, n: int, steps: int = 1500, **kw) -> tuple[Variational, object, dict]:
    fn, batch = conjugate_toy(n)
    kw = {"scale_lr": None, **kw}  # one lr for means and spreads: the toy tests the optimum, not the defaults
    vi = Variational(guide, steps=steps, lr=0.05, likelihood="gaussian", noise_std=NOISE, prior_precision=LAM,
                     init_scale=1e-2, progress=False, num_particles=2, **kw)  # fmt: skip
    vi.bind(fn, n, total_steps=steps)
    for _ in range(steps):
        vi.step(fn, batch)
    return vi, fn, batch


def meanfield_moments(vi: Variational, fn) -> tuple[torch.Tensor, torch.Tensor]:
    site = vi.model.sites[fn.params.names[0]]
    with vi.param_store():
        loc, scale = vi.guide._get_loc_and_scale(site)
    return loc.detach().reshape(-1).double(), scale.detach().reshape(-1).double()


@pytest.fixture(scope="module")
def meanfield_fits():
    return {n: fit_toy("meanfield", n) for n in (16, 128)}


@pytest.mark.parametrize("n", [16, 128])
def test_meanfield_matches_the_analytic_meanfield_optimum(meanfield_fits, n):
    vi, fn, batch = meanfield_fits[n]
    mean, precision = exact_posterior(fn, batch)
    mf_sd = precision.diagonal().rsqrt()
    loc, scale = meanfield_moments(vi, fn)
    assert float(((loc - mean) / mf_sd).abs().max()) < 0.25  # SGD noise of a 1500-step, 2-particle fit
    torch.testing.assert_close(scale, mf_sd, rtol=0.12, atol=0)
    full_sd = torch.linalg.inv(precision).diagonal().sqrt()
    assert float((full_sd / mf_sd).min()) > 1.1  # the toy tells mean-field from the full posterior


def test_spread_shrinks_with_more_data_and_samples_differ(meanfield_fits):
    (vi16, fn16, _), (vi128, fn128, batch128) = meanfield_fits[16], meanfield_fits[128]
    sd16, sd128 = meanfield_moments(vi16, fn16)[1], meanfield_moments(vi128, fn128)[1]
    assert bool((sd128 < 0.6 * sd16).all())
    pred = vi128.predict(fn128, batch128, n_samples=4, generator=torch.Generator().manual_seed(0))
    assert pred.logits.shape == (4, 128, 2)
    assert float((pred.logits[0] - pred.logits[1]).abs().max()) > 1e-3


def test_lowrank_guide_recovers_the_full_posterior():
    # the posterior is 2 blocks of 2x2: diagonal + rank 2 holds it exactly
    vi, fn, batch = fit_toy("lowrank", 16, steps=1000, rank=2)
    mean, precision = exact_posterior(fn, batch)
    cov = torch.linalg.inv(precision)
    with vi.param_store():
        q = vi.guide.get_posterior()
    sd = cov.diagonal().sqrt()
    assert float(((q.loc.detach().double() - mean) / sd).abs().max()) < 0.25
    torch.testing.assert_close(q.covariance_matrix.detach().double().diagonal().sqrt(), sd, rtol=0.12, atol=0)
    corr = cov / (sd[:, None] * sd[None, :])
    q_cov = q.covariance_matrix.detach().double()
    q_corr = q_cov / (q_cov.diagonal().sqrt()[:, None] * q_cov.diagonal().sqrt()[None, :])
    torch.testing.assert_close(q_corr, corr, rtol=0, atol=0.12)  # the correlations mean-field cannot represent


# ----------------------------------------------------------------------------- classification, all guides
@pytest.mark.parametrize("guide", ["meanfield", "lowrank", "blob"])
def test_elbo_decreases_on_a_tiny_classification_task(guide):
    fn, _ = tiny_fn("bert")
    loader = TokenDataset(64, seed=0).loader(16, shuffle=True)
    vi = Variational(guide, epochs=8, lr=3e-2, init_scale=1e-3, progress=False, rank=4).fit(fn, loader)
    loss = torch.tensor(vi.history["loss"])
    assert len(loss) == 32 and torch.isfinite(loss).all()
    assert float(loss[-8:].mean()) < float(loss[:8].mean()) - 0.02
    before = {k: v.clone() for k, v in fn.params.values().items()}
    vi.predict(fn, next(iter(loader)), n_samples=2)
    for k, v in fn.params.values().items():  # fitting and predicting never change the model
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


@pytest.mark.parametrize("guide", ["meanfield", "lowrank", "blob"])
def test_scale_lr_applies_to_the_spread_parameters_only(guide):
    fn, _ = tiny_fn("bert")
    loader = TokenDataset(16, seed=0).loader(8)
    vi = Variational(guide, steps=2, lr=1e-3, scale_lr=0.05, progress=False, rank=2).fit(fn, loader)
    lrs = {}
    with vi.param_store():
        store = pyro.get_param_store()
        for name in store:
            lrs[name] = vi._svi.optim._get_optim_args(store[name].unconstrained())["lr"]
    spread = {n for n in lrs if is_spread_param(n)}
    expected = {"meanfield": "AutoNormal.scales.", "lowrank": "AutoLowRankMultivariateNormal.", "blob": "blob.g."}
    assert spread and all(n.startswith(expected[guide]) for n in spread)
    assert spread != set(lrs)  # the locations are there too
    for name, lr in lrs.items():
        assert lr == (0.05 if name in spread else 1e-3), name


def test_scale_lr_lets_a_short_post_hoc_fit_reach_the_meanfield_spread():
    """The post-hoc setting: the guide starts at the MAP (here the exact posterior mean) with a small σ."""
    fn, batch = conjugate_toy(128)
    mean, precision = exact_posterior(fn, batch)
    fn.params.load(fn.params.unflatten(mean.float()))
    target = precision.diagonal().rsqrt()
    errors, shifts = {}, {}
    for scale_lr in (None, 0.05):
        vi = Variational("meanfield", steps=200, lr=1e-3, scale_lr=scale_lr, likelihood="gaussian", noise_std=NOISE,
                         prior_precision=LAM, init_scale=1e-2, progress=False, num_particles=2)  # fmt: skip
        vi.bind(fn, 128, total_steps=200)
        for _ in range(200):
            vi.step(fn, batch)
        loc, sd = meanfield_moments(vi, fn)
        errors[scale_lr] = float((sd.log() - target.log()).abs().mean())
        shifts[scale_lr] = float(((loc - mean) * precision.diagonal().sqrt()).abs().max())
    assert errors[None] > 1.5  # lr 1e-3 leaves σ near init_scale, 6x below the optimum: it predicts like the MAP
    assert errors[0.05] < 0.15  # within ~15% of the mean-field σ in 200 steps
    assert max(shifts.values()) < 0.2  # and the means stay at the MAP (in posterior sd)


def test_blob_is_gaussian_on_lora_a_only_and_point_estimates_the_rest():
    fn, _ = tiny_fn("bert")
    batch = next(iter(TokenDataset(8).loader(8)))
    vi = Variational("blob", steps=3, progress=False).fit(fn, TokenDataset(8).loader(8))
    with vi.param_store(), torch.no_grad():
        draws = [vi.guide(batch) for _ in range(2)]
    sites = site_names(fn.params.names)
    kinds = {g.weight: g.kind for g in fn.params.groups}
    for name, site in sites.items():
        same = torch.equal(draws[0][site], draws[1][site])
        assert same == (kinds.get(name) != "lora_A"), name


def test_flipout_perturbs_each_example_by_a_sign_flipped_copy_of_the_weight_noise():
    fn, _ = tiny_fn("bert")
    group = next(g for g in fn.params.groups if g.kind == "lora_A")
    delta = torch.randn_like(group.module.weight)
    x = torch.randn(64, 3, group.module.in_features)
    base = group.module(x).detach()
    with flipout_hooks(fn, {group.weight: delta}):
        noisy = group.module(x)
    pert = (noisy - base).detach()  # ((x ∘ s) ΔAᵀ) ∘ r with s, r random signs per example
    plain = (x @ delta.T).detach()
    torch.testing.assert_close(pert.pow(2).mean(), plain.pow(2).mean(), rtol=0.2, atol=0)
    assert float(pert.mean(0).abs().mean()) < float(pert.abs().mean()) / 3  # mean zero over examples
    assert not torch.allclose(pert, plain)  # not the plain perturbation


def test_prior_scale_to_zero_reproduces_the_map():
    fn, _ = tiny_fn("bert")
    from helpers import randomize_lora_b

    randomize_lora_b(fn, scale=0.3)
    loader = TokenDataset(16).loader(8)
    batch = next(iter(loader))
    vi = Variational("meanfield", steps=5, prior_precision=1e10, prior_mean="init", progress=False).fit(fn, loader)
    map_logits = make_posterior("map").fit(fn).predict(fn, batch).logits
    pred = vi.predict(fn, batch, n_samples=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pred.logits, map_logits.expand_as(pred.logits), rtol=0, atol=1e-3)
    torch.testing.assert_close(vi.predict(fn, batch, n_samples=0).logits, map_logits, rtol=0, atol=1e-3)


def test_param_store_is_local_and_state_dict_round_trips():
    pyro.clear_param_store()
    fn, _ = tiny_fn("bert")
    loader = TokenDataset(16).loader(8)
    batch = next(iter(loader))
    vi = Variational("meanfield", steps=3, progress=False).fit(fn, loader)
    other = Variational("blob", steps=3, progress=False).fit(fn, loader)
    assert len(pyro.get_param_store()) == 0  # nothing leaked into the global store
    with vi.param_store():
        assert not any(k.startswith("blob.") for k in pyro.get_param_store())
    with other.param_store():
        assert all(k.startswith("blob.") for k in pyro.get_param_store())
    state = vi.state_dict()
    fresh = Variational("meanfield", steps=3, progress=False)
    fresh.load_state_dict(state)
    a = vi.predict(fn, batch, n_samples=3, generator=torch.Generator().manual_seed(5))
    b = fresh.predict(fn, batch, n_samples=3, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a.logits, b.logits)
    assert fresh.history == vi.history
    with pytest.raises(ValueError, match="Variational state_dict"):
        fresh.load_state_dict({"guide": {}})


def test_bad_options_give_clear_errors():
    with pytest.raises(ValueError, match="guide"):
        Variational("fullrank")
    with pytest.raises(ValueError, match="explicit rank"):
        Variational("lowrank", rank=None)
    with pytest.raises(ValueError, match="rank"):
        Variational("lowrank", rank=0)
    with pytest.raises(ValueError, match="elbo"):
        Variational(elbo="renyi")
    with pytest.raises(ValueError, match="n_samples"):
        Variational(n_samples=-1)
    with pytest.raises(ValueError, match="prior_precision"):
        Variational(prior_precision=0.0)
    fn, _ = tiny_fn("bert")
    with pytest.raises(ValueError, match="at most D"):
        Variational("lowrank", rank=fn.params.numel + 1, progress=False).fit(fn, TokenDataset(8).loader(8))
    with pytest.raises(RuntimeError, match="not fitted|bind"):
        Variational().predict(fn, next(iter(TokenDataset(8).loader(8))))


@pytest.mark.parametrize("method", ["vi_meanfield", "vi_lowrank", "vi_blob"])
def test_hydra_method_configs_build_the_posterior(method):
    cfg = compose(["experiment=smoke", f"method={method}"])
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True)
    posterior = _instantiate(plain["method"], **_run_level_options(plain))  # what bayeslora-run builds
    assert posterior.name == method and method in METHODS
    assert posterior.prior_precision == pytest.approx(float(cfg.prior_precision))
    assert math.isclose(posterior.prior_std, float(cfg.prior_precision) ** -0.5)


def test_meanfield_over_two_minibatches_matches_the_full_data_optimum():
    """The data term is scaled by N/B: fit on two alternating half-batches, the optimum is that of all N examples
    (scaling by the batch alone would give the posterior of N/2 examples, sqrt(2) too wide)."""
    n, steps = 64, 2000
    fn, batch = conjugate_toy(n)
    halves = [{k: v[i : i + n // 2] for k, v in batch.items()} for i in (0, n // 2)]
    vi = Variational("meanfield", steps=steps, lr=0.05, scale_lr=None, likelihood="gaussian", noise_std=NOISE,
                     prior_precision=LAM, init_scale=1e-2, progress=False, num_particles=2)  # fmt: skip
    vi.bind(fn, n, total_steps=steps)
    pyro.set_rng_seed(0)
    for t in range(steps):
        vi.step(fn, halves[t % 2])
    mean, precision = exact_posterior(fn, batch)
    mf_sd = precision.diagonal().rsqrt()
    loc, scale = meanfield_moments(vi, fn)
    assert float(((loc - mean) / mf_sd).abs().max()) < 0.35
    torch.testing.assert_close(scale, mf_sd, rtol=0.15, atol=0)
