"""Every registered method through the one Posterior protocol and the façade: fit -> predict -> determinism ->
save -> load -> identical predictions -> config() round trip."""

import pytest
import torch
from helpers import RegressionTokens, TokenDataset, method_options, options_of, tiny_fn

from bayeslora import BayesianLoRA
from bayeslora.models import load_model
from bayeslora.posteriors import METHODS, Needs, Posterior, make_posterior


def _fit(bl, train, val, tmp_path, *, max_steps, checkpoint_every):
    """What the façade's caller provides per ``needs``: the MAP (with checkpoints) first, validation if asked."""
    if bl.posterior.needs.map_adapter:
        ckpt = {"checkpoint_every": checkpoint_every, "checkpoint_dir": str(tmp_path / "ckpt")}
        bl.fit_map(train, {"lr": 1e-2, "max_steps": max_steps, "progress": False, **ckpt})
    bl.fit(train, val_loader=val if bl.posterior.needs.validation else None)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_through_the_protocol_and_the_facade(method, tmp_path):
    fn, _ = tiny_fn("bert", r=2, dropout=0.1)
    bl = BayesianLoRA(fn.model, fn.readout, method, prior_precision=1.0, **options_of(method)["fast"])
    assert isinstance(bl.posterior, Posterior) and isinstance(bl.posterior.needs, Needs)
    ds = TokenDataset(24, seed=3)
    train, val = ds.loader(8, shuffle=True), ds.loader(8)
    _fit(bl, train, val, tmp_path, max_steps=4, checkpoint_every=2)
    batch = next(iter(val))
    first = bl.predict(batch, generator=torch.Generator().manual_seed(5))
    again = bl.predict(batch, generator=torch.Generator().manual_seed(5))
    assert first.logits.ndim == 3 and first.logits.shape[1:] == (8, 2) and torch.isfinite(first.logits).all()
    torch.testing.assert_close(first.logits, again.logits, rtol=0, atol=0)  # deterministic under a generator

    bl.save(tmp_path / "saved")
    loaded = BayesianLoRA.load(load_model("tiny-bert", device="cpu", seed=0)[0], tmp_path / "saved")
    assert loaded.method == method
    after = loaded.predict(batch, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(after.logits, first.logits)
    config = bl.posterior.config()
    assert make_posterior(method, **config).config() == config == loaded.posterior.config()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_n_samples_means_one_thing(method, tmp_path):
    """None: the default; 0: the posterior mean (a point predictive) where the method has one; negative: an error."""
    fn, _ = tiny_fn("bert", r=2, dropout=0.1)
    bl = BayesianLoRA(fn.model, fn.readout, method, prior_precision=1.0, **options_of(method)["fast"])
    ds = TokenDataset(16, seed=4)
    _fit(bl, ds.loader(8), ds.loader(8), tmp_path, max_steps=2, checkpoint_every=1)
    batch = next(iter(ds.loader(8)))
    with pytest.raises(ValueError, match="n_samples: expected None"):
        bl.predict(batch, n_samples=-1)
    declared = options_of(method)
    if declared["fixed_members"]:
        with pytest.raises(ValueError, match="fixed members"):
            bl.predict(batch, n_samples=7)
    if not declared["posterior_mean"]:  # mixtures: no one posterior mean
        with pytest.raises(ValueError, match="n_samples: .* has no posterior-mean predictive"):
            bl.predict(batch, n_samples=0)
        return
    assert bl.predict(batch, n_samples=0).num_samples == 1


@pytest.mark.parametrize("method", sorted(m for m in METHODS if m != "temperature"))
def test_regression_through_the_protocol_and_the_facade(method, tmp_path):
    """The same protocol with a one-output Gaussian readout: the predictive is a Gaussian mixture, deterministic under
    a generator, and survives save -> load (the readout's σ included)."""
    fn, _ = tiny_fn("bert", r=2, dropout=0.1, noise_std=0.3)
    regression = {"tfb": {"metric": "nll"}}.get(method, {})  # TFB's default search metric is accuracy
    bl = BayesianLoRA(fn.model, fn.readout, method, prior_precision=1.0, **options_of(method)["fast"], **regression)
    ds = RegressionTokens(24, seed=3)
    train, val = ds.loader(8, shuffle=True), ds.loader(8)
    _fit(bl, train, val, tmp_path, max_steps=4, checkpoint_every=2)
    batch = next(iter(val))
    first = bl.predict(batch, generator=torch.Generator().manual_seed(5))
    again = bl.predict(batch, generator=torch.Generator().manual_seed(5))
    assert not first.is_categorical and first.logits.shape[1:] == (8, 1) and torch.isfinite(first.logits).all()
    torch.testing.assert_close(first.logits, again.logits, rtol=0, atol=0)
    assert bool((first.predictive_variance >= 0.3**2 * (1 - 1e-6)).all())
    assert torch.isfinite(first.log_likelihood(batch["labels"])).all()
    metrics = bl.evaluate(val)
    assert set(metrics) == {"nll", "rmse", "cov50", "cov90", "cov95", "rce"}

    bl.save(tmp_path / "saved")
    loaded = BayesianLoRA.load(load_model("tiny-bert", device="cpu", seed=0, num_labels=1)[0], tmp_path / "saved")
    assert loaded.fn.likelihood.config() == fn.likelihood.config()
    after = loaded.predict(batch, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(after.logits, first.logits)
    torch.testing.assert_close(after.predictive_variance, first.predictive_variance)


def test_every_method_declares_its_test_options_in_its_own_test_file():
    """The shared tests take each method's options from the test file that tests it (helpers.method_options): every
    registered method has them and every declaration names a registered method."""
    declared = method_options()
    assert sorted(declared) == sorted(METHODS), set(METHODS) ^ set(declared)
    with pytest.raises(LookupError, match="add METHOD_OPTIONS\\['no_such_method'\\]"):
        options_of("no_such_method")
