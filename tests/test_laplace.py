"""Laplace posterior against dense references: naive J P⁻¹ Jᵀ, dense log-determinants, dense sampling covariances."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TokenDataset, randomize_lora_b, tiny_fn
from test_kfac import dense, examples

from bayeslora import BayesianLoRA
from bayeslora.io import load_torch, save_torch
from bayeslora.posteriors import METHODS, make_posterior
from bayeslora.posteriors.glm import mc_logits, probit
from bayeslora.posteriors.kfac import DiagFactor, as_matrix
from bayeslora.posteriors.laplace import Laplace
from bayeslora.predictive import Predictive
from bayeslora.run import compose

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "method"


# The shared tests' options for the methods this file tests (what each key means: helpers.method_options).
_LAPLACE_NON_DEFAULT = {
    "backend": "own", "fisher": "mc", "mc_samples": 3, "kfac_approx": "expand", "rank": 4, "lowrank_threshold": 16,
    "predictive": "sampling", "n_samples": 7, "prior_precision": 2.5, "prior_fit": "val_nll", "prior_per_layer": True,
    "prior_grid": [1e-2, 1e2, 5], "chunk_size": 3, "seed": 4,
}  # fmt: skip
METHOD_OPTIONS = {
    "kfac_laplace": {
        "fast": {"prior_fit": "val_nll", "prior_grid": [1e-2, 1e2, 5]},
        "non_default": _LAPLACE_NON_DEFAULT,
    },
    "diag_laplace": {"fast": {}, "non_default": _LAPLACE_NON_DEFAULT},
    "last_layer_laplace": {"fast": {}, "non_default": _LAPLACE_NON_DEFAULT},
}


def setup(kind="bert", n=24, seed=0, include_head=True, **kw):
    fn, _ = tiny_fn(kind, r=2, include_head=include_head, **kw)
    randomize_lora_b(fn, scale=0.3, seed=seed)
    return fn, TokenDataset(n, seed=seed).loader(8), TokenDataset(8, seed=seed + 100).loader(4)


def dense_precision(la: Laplace) -> torch.Tensor:
    blocks = []
    for factor, lam in zip(la.engine.factors, la.prior.tolist()):
        if isinstance(factor, DiagFactor):
            k = torch.diag(factor.diag.reshape(-1))
        else:
            g, a = dense(factor)
            k = torch.kron(g, a)
        blocks.append(la.engine.num_data * k + lam * torch.eye(k.shape[0], dtype=torch.float64))
    return torch.block_diag(*blocks)


def naive_jacobian(fn, la: Laplace, ex) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example loop: logits [C] and the Jacobian [C, D] w.r.t. the random layers (row-major [W | b])."""
    groups = la.engine.match_groups(fn, la.select(fn))
    names = [n for g in groups for n in g.names]
    values = {k: v.clone().requires_grad_(k in names) for k, v in la.engine.values.items()}
    logits = fn(values, ex)[0]
    rows = []
    for c in range(len(logits)):
        grads = dict(zip(names, torch.autograd.grad(logits[c], [values[n] for n in names], retain_graph=True)))
        rows.append(torch.cat([as_matrix(grads, g).reshape(-1) for g in groups]).double())
    return logits.detach(), torch.stack(rows)


def naive_moments(fn, la, batch):
    p_inv = torch.linalg.inv(dense_precision(la))
    out = [naive_jacobian(fn, la, ex) for ex in examples([batch])]
    return torch.stack([m for m, _ in out]), torch.stack([j @ p_inv @ j.T for _, j in out])


# ----------------------------------------------------------------------------- GLM predictive vs naive J P⁻¹ Jᵀ
@pytest.mark.parametrize(
    "options",
    [
        {"structure": "kron"},
        {"structure": "kron", "rank": 3, "lowrank_threshold": 16},  # low-rank sides below the spectrum
        {"structure": "diag"},
        {"structure": "last_layer"},
        {"structure": "kron", "prior_per_layer": True},
    ],
)
def test_glm_covariance_equals_naive_j_sigma_jt(options):
    fn, loader, val = setup()
    la = Laplace(**options).fit(fn, loader)
    if options.get("prior_per_layer"):
        assert la.prior.unique().numel() > 1
    batch = next(iter(val))
    mean, cov = la.glm_moments(fn, batch)
    ref_mean, ref_cov = naive_moments(fn, la, batch)
    torch.testing.assert_close(mean.double(), ref_mean.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cov, ref_cov, rtol=1e-4, atol=1e-8)


def test_lowrank_covers_the_spectrum_exactly_and_degrades_conservatively():
    fn, loader, val = setup()
    batch = next(iter(val))
    full = Laplace(prior_fit="none", prior_precision=0.5).fit(fn, loader)
    _, cov_full = full.glm_moments(fn, batch)
    covers = Laplace(prior_fit="none", prior_precision=0.5, rank=24, lowrank_threshold=16).fit(fn, loader)
    torch.testing.assert_close(covers.glm_moments(fn, batch)[1], cov_full, rtol=1e-4, atol=1e-8)
    assert covers.log_marglik() == pytest.approx(full.log_marglik(), rel=1e-6)
    errors = []
    for rank in (1, 2, 4, 8):
        low = Laplace(prior_fit="none", prior_precision=0.5, rank=rank, lowrank_threshold=16).fit(fn, loader)
        diff = low.glm_moments(fn, batch)[1] - cov_full
        assert float(torch.linalg.eigvalsh(diff).min()) > -1e-7  # dropped curvature only adds variance
        errors.append(float(diff.norm() / cov_full.norm()))
        assert low.factor_bytes() < full.factor_bytes()
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0]


def test_chunked_glm_equals_unchunked():
    fn, loader, val = setup()
    la = Laplace(prior_fit="none").fit(fn, loader)
    batch = next(iter(val))
    mean, cov = la.glm_moments(fn, batch)
    la.chunk_size = 1
    mean1, cov1 = la.glm_moments(fn, batch)
    torch.testing.assert_close(mean1, mean)
    torch.testing.assert_close(cov1, cov)


# ----------------------------------------------------------------------------- marginal likelihood
def dense_marglik(la, fn, lam):
    """log p(D|θ*) − ½ [log det P − log det P₀ + θ*ᵀ P₀ θ*] with dense matrices."""
    saved, la.engine.prior = la.prior, torch.full_like(la.prior, lam)
    p = dense_precision(la)
    la.engine.prior = saved
    theta = torch.cat(
        [as_matrix(la.engine.values, g).reshape(-1).double() for g in la.engine.match_groups(fn, la.select(fn))]
    )
    logdet_ratio = torch.linalg.slogdet(p)[1] - theta.numel() * math.log(lam)
    return -la.engine.loss - 0.5 * float(logdet_ratio + lam * theta.square().sum())


@pytest.mark.parametrize("options", [{}, {"structure": "diag"}, {"rank": 3, "lowrank_threshold": 16}])
def test_marglik_matches_dense_formula_and_is_maximised(options):
    fn, loader, _ = setup()
    la = Laplace(prior_fit="marglik", **options).fit(fn, loader)
    lam = float(la.prior[0])
    assert la.log_marglik(2.0) == pytest.approx(dense_marglik(la, fn, 2.0), rel=1e-6)
    assert la.log_marglik() == pytest.approx(dense_marglik(la, fn, lam), rel=1e-6)
    for factor in (0.9, 1.1):
        assert la.log_marglik(lam * factor) < la.log_marglik()


def test_per_layer_marglik_beats_scalar():
    fn, loader, _ = setup()
    scalar = Laplace(prior_fit="marglik").fit(fn, loader)
    layers = Laplace(prior_fit="marglik", prior_per_layer=True).fit(fn, loader)
    assert layers.log_marglik() >= scalar.log_marglik() - 1e-9
    assert layers.log_marglik(layers.prior * 1.2) < layers.log_marglik()


# ----------------------------------------------------------------------------- validation tuning
def test_val_nll_picks_the_grid_minimiser():
    fn, loader, val = setup()
    la = Laplace(prior_fit="val_nll", prior_grid=[1e-2, 1e3, 6]).fit(fn, loader, val_loader=val)
    nll = []
    for lam in la.engine.val_curve["prior"]:
        la.engine.prior = torch.full_like(la.prior, lam)
        lp = torch.cat([la.predict(fn, b).log_probs for b in val])
        labels = torch.cat([b["labels"] for b in val])
        nll.append(-float(lp.gather(1, labels[:, None]).mean()))
    assert nll == pytest.approx(la.engine.val_curve["nll"], rel=1e-6)
    with pytest.raises(ValueError, match="val_loader: prior_fit='val_nll'"):
        Laplace(prior_fit="val_nll").fit(fn, loader)


# ----------------------------------------------------------------------------- predictives
def test_probit_and_mc_agree_for_small_variance_and_reduce_to_map():
    fn, loader, val = setup()
    batch = next(iter(val))
    la = Laplace(prior_fit="none", prior_precision=1e4).fit(fn, loader)
    mean, cov = la.glm_moments(fn, batch)
    assert float(cov.diagonal(dim1=1, dim2=2).max()) < 1e-3
    gen = torch.Generator().manual_seed(0)
    p_probit = Predictive.point(probit(mean, cov)).probs
    p_mc = Predictive(mc_logits(mean, cov, 20000, gen)).probs
    torch.testing.assert_close(p_mc, p_probit, atol=2e-3, rtol=0)
    torch.testing.assert_close(p_probit, torch.softmax(mean.double(), -1), atol=1e-3, rtol=0)


def test_mc_logit_samples_have_the_glm_moments():
    mean = torch.tensor([[1.0, -1.0, 0.5]])
    a = torch.tensor([[1.0, 0.3, 0.0], [0.0, 0.5, 0.2], [0.0, 0.0, 0.1]], dtype=torch.float64)
    cov = (a @ a.T)[None]
    s = mc_logits(mean, cov, 200000, torch.Generator().manual_seed(1)).double()
    torch.testing.assert_close(s.mean(0), mean.double(), atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(s[:, 0].T), cov[0], atol=0.01, rtol=0)


def test_weight_sampling_reproduces_map_with_tiny_prior_variance():
    fn, loader, val = setup()
    batch = next(iter(val))
    la = Laplace(prior_fit="none", prior_precision=1e12, predictive="sampling").fit(fn, loader)
    pred = la.predict(fn, batch, n_samples=3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = fn(None, batch)
    assert pred.logits.shape == (3, 4, 2)
    torch.testing.assert_close(pred.logits, ref.expand(3, -1, -1), atol=1e-5, rtol=0)
    assert not torch.equal(pred.logits[0], pred.logits[1])  # still random


@pytest.mark.parametrize("options", [{"structure": "last_layer"}, {"structure": "last_layer", "rank": 4,
                                                                      "lowrank_threshold": 16}])  # fmt: skip
def test_weight_samples_have_covariance_p_inverse(options):
    fn, loader, _ = setup()
    la = Laplace(prior_fit="none", prior_precision=3.0, **options).fit(fn, loader)
    groups = la.engine.match_groups(fn, la.select(fn))
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [torch.cat([as_matrix(v, g).reshape(-1) for g in groups]).double() for v in la.sample(fn, 20000, gen)]
    )
    ref = torch.linalg.inv(dense_precision(la))
    scale = float(ref.diagonal().max())
    torch.testing.assert_close(torch.cov(draws.T), ref, atol=0.05 * scale, rtol=0)
    theta = torch.cat([as_matrix(la.engine.values, g).reshape(-1) for g in groups]).double()
    torch.testing.assert_close(draws.mean(0), theta, atol=0.05 * scale**0.5, rtol=0)


def test_predict_leaves_the_model_untouched():
    fn, loader, val = setup(dropout=0.1)
    fn.model.train()
    before = {k: v.clone() for k, v in fn.model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in fn.model.named_parameters()}
    for predictive in ("glm_probit", "glm_mc", "sampling"):
        la = Laplace(predictive=predictive).fit(fn, loader)
        la.predict(fn, next(iter(val)), n_samples=2)
    assert fn.model.training and all(m.training for m in fn.model.modules())
    assert all(torch.equal(before[k], v) for k, v in fn.model.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in fn.model.named_parameters()}


def test_bf16_model_fits_and_predicts_close_to_fp32():
    fn, loader, val = setup()
    batch = next(iter(val))
    ref = Laplace(prior_fit="none").fit(fn, loader).glm_moments(fn, batch)
    fn.model.to(torch.bfloat16)
    for predictive in ("glm_probit", "glm_mc", "sampling"):
        la = Laplace(prior_fit="none", predictive=predictive).fit(fn, loader)
        assert torch.isfinite(la.predict(fn, batch, n_samples=4).logits).all()
    mean, cov = la.glm_moments(fn, batch)
    torch.testing.assert_close(mean, ref[0], atol=0.05, rtol=0.05)
    torch.testing.assert_close(cov, ref[1], atol=0.1 * float(ref[1].abs().max()), rtol=0.1)


# ----------------------------------------------------------------------------- persistence and configuration
def test_state_dict_round_trip_through_weights_only_load(tmp_path):
    fn, loader, val = setup()
    batch = next(iter(val))
    la = Laplace(prior_per_layer=True, rank=3, lowrank_threshold=16).fit(fn, loader)
    save_torch(la.state_dict(), tmp_path / "post.pt")
    fresh = make_posterior(la.name, **la.config())
    fresh.load_state_dict(load_torch(tmp_path / "post.pt"))
    assert fresh.config() == la.config() and fresh.factor_bytes() == la.factor_bytes()
    torch.testing.assert_close(fresh.predict(fn, batch).logits, la.predict(fn, batch).logits, rtol=0, atol=0)


def test_save_load_into_a_fresh_process_gives_identical_predictions(tmp_path):
    fn, loader, val = setup()
    bl = BayesianLoRA(fn.model, fn.readout, "kfac_laplace", prior_precision=2.0, predictive="glm_mc", n_samples=64)
    assert bl.posterior.prior_precision == 2.0 and bl.method == "kfac_laplace"
    bl.fit(loader)
    batch = next(iter(val))
    save_torch(batch, tmp_path / "batch.pt")
    expected = bl.predict(batch, generator=torch.Generator().manual_seed(3)).logits
    bl.save(tmp_path / "run")
    script = f"""
import json, torch
from bayeslora import BayesianLoRA
from bayeslora.io import load_torch
from bayeslora.models import load_model
base, _ = load_model("tiny-bert", device="cpu", seed=0)
bl = BayesianLoRA.load(base, {str(tmp_path / "run")!r})
out = bl.predict(load_torch({str(tmp_path / "batch.pt")!r}), generator=torch.Generator().manual_seed(3)).logits
print(json.dumps(out.tolist()))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    got = torch.tensor(json.loads(res.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_registry_names_configs_and_yaml():
    from omegaconf import OmegaConf

    for method, structure in [("kfac_laplace", "kron"), ("diag_laplace", "diag"), ("last_layer_laplace", "last_layer")]:
        post = make_posterior(method, prior_precision=0.5)
        assert post.name == method and post.structure == structure and post.prior_precision == 0.5
        json.dumps(post.config())
        cfg = OmegaConf.to_container(compose([f"method={method}"]).method, resolve=True)
        assert cfg.pop("name") == method and cfg.pop("_target_") == "bayeslora.posteriors.build"
        assert make_posterior(method, **cfg).config() == {**post.config(), "prior_precision": 1.0, **cfg}
        assert METHODS[method][1]["structure"] == structure


# ----------------------------------------------------------------------------- bad input
def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="structure: expected one of"):
        Laplace(structure="full")
    with pytest.raises(ValueError, match="prior_precision: expected a finite number > 0"):
        Laplace(prior_precision=0.0)
    with pytest.raises(ValueError, match="predictive: expected one of"):
        Laplace(predictive="bridge")
    with pytest.raises(ValueError, match="rank: expected a positive integer or None"):
        Laplace(rank=0)
    with pytest.raises(ValueError, match=r"prior_grid: expected \[low, high, points\]"):
        Laplace(prior_grid=[1.0, 0.1, 5])
    with pytest.raises(RuntimeError, match="not fitted"):
        Laplace().predict(None, {})


def test_mismatched_adapter_is_a_clear_error():
    fn, loader, val = setup()
    la = Laplace().fit(fn, loader)
    other, _ = tiny_fn("bert", r=2, target_modules=["query"])
    with pytest.raises(ValueError, match="do not match the fitted posterior"):
        la.predict(other, next(iter(val)))
    wider, _ = tiny_fn("bert", r=3)
    with pytest.raises(ValueError, match="expected shape"):
        la.predict(wider, next(iter(val)))


def test_non_psd_factors_in_a_state_are_rejected():
    fn, loader, _ = setup()
    state = Laplace().fit(fn, loader).state_dict()
    state["factors"][0]["a_vals"] = -state["factors"][0]["a_vals"] - 1.0
    with pytest.raises(ValueError, match="not positive semi-definite"):
        Laplace().load_state_dict(state)
    with pytest.raises(ValueError, match="saved with structure='kron'"):
        Laplace(structure="diag").load_state_dict(Laplace().fit(fn, loader).state_dict())


def test_zero_data_no_head_and_frozen_models():
    fn, _, _ = setup()
    with pytest.raises(ValueError, match="training dataset is empty"):
        Laplace().fit(fn, TokenDataset(0).loader(4))
    no_head, loader, _ = setup(include_head=False)
    with pytest.raises(ValueError, match="'last_layer' needs a head"):
        Laplace(structure="last_layer").fit(no_head, loader)
    # requires_grad flags do not select the random tensors: a fully frozen model gives the same posterior
    ref = Laplace().fit(fn, loader)
    for p in fn.model.parameters():
        p.requires_grad_(False)
    frozen = Laplace().fit(fn, loader)
    assert frozen.log_marglik() == pytest.approx(ref.log_marglik())


def test_probit_matches_a_monte_carlo_integral_at_unit_variance():
    """E[softmax(f)] for f ~ N(μ, Σ) with one free logit (the other fixed at 0): the probit link's classic regime.
    Variances 0.5-2 and logits up to ±4, where the constant matters (π/4 or π/16 instead of π/8: off by > 0.025)."""
    mus = torch.tensor([-4.0, -2.0, -0.5, 1.0, 2.0, 4.0])
    variances = torch.tensor([0.5, 1.0, 2.0])
    mean = torch.stack([torch.zeros(18), mus.repeat_interleave(3)], -1)  # [B, 2]
    cov = torch.zeros(18, 2, 2, dtype=torch.float64)
    cov[:, 1, 1] = variances.repeat(6).double()
    approx = torch.softmax(probit(mean, cov).double(), -1)[:, 1]
    g = torch.Generator().manual_seed(0)
    draws = mean[:, 1].double() + cov[:, 1, 1].sqrt() * torch.randn(400_000, 18, generator=g, dtype=torch.float64)
    exact = torch.sigmoid(draws).mean(0)  # MC s.e. < 1e-3
    assert float((approx - exact).abs().max()) < 1e-2  # π/8: 0.0071; π/4: 0.039, π/16: 0.029
    assert float((approx - exact).abs().max()) > 1e-4  # an approximation, not the integral: the test can see it


def test_glm_probit_reports_the_mutual_information_of_its_logit_gaussian():
    """The probit predictive is one adjusted-logit sample, but its epistemic score is the MI of N(f_μ, f_Σ):
    checked against 200k Monte Carlo logit samples of the same Gaussian."""
    fn, _ = tiny_fn("bert", r=2)
    randomize_lora_b(fn, 1.0)
    ds = TokenDataset(32, seed=3)
    la = Laplace(prior_fit="none", prior_precision=0.05).fit(fn, ds.loader(8))
    batch = next(iter(ds.loader(8)))
    pred = la.predict(fn, batch, generator=torch.Generator().manual_seed(0))
    assert pred.num_samples == 1 and pred.has_epistemic
    mean, cov = la.glm_moments(fn, batch)
    reference = Predictive(mc_logits(mean, cov, 200_000, torch.Generator().manual_seed(1))).mutual_information
    assert float(reference.min()) > 1e-3  # the toy has real epistemic uncertainty
    torch.testing.assert_close(pred.mutual_information, reference, rtol=0.15, atol=2e-3)
