import json
import math

import pytest
import torch
from helpers import TokenDataset, tiny_fn

from bayeslora import BayesianLoRA, SequenceClassificationLogits
from bayeslora.models import load_model
from bayeslora.posteriors import METHODS, make_posterior
from bayeslora.posteriors.map import MAP


def _bl(method="map", **kw):
    fn, _ = tiny_fn("bert", r=2)
    return BayesianLoRA(fn.model, fn.readout, method, **kw)


def test_fit_map_fit_predict_evaluate():
    bl = _bl(prior_precision=2.0)
    ds = TokenDataset(48, seed=1)
    res = bl.fit_map(ds.loader(8, shuffle=True), {"lr": 1e-2, "max_steps": 5, "progress": False})
    assert res.steps == 5 and res.config["prior_precision"] == 2.0
    bl.fit(ds.loader(8))
    batch = next(iter(ds.loader(8)))
    pred = bl.predict(batch)
    assert pred.logits.shape == (1, 8, 2)
    with torch.no_grad():
        torch.testing.assert_close(pred.logits[0], bl.fn(None, batch))
    m = bl.evaluate(ds.loader(16))
    assert set(m) == {"acc", "ece", "nll", "brier", "aurc"}
    preds = bl.predictions(ds.loader(16))
    assert preds.log_probs.shape == (48, 2) and torch.equal(
        preds.labels, torch.cat([b["labels"] for b in ds.loader(16)])
    )
    # an independent computation: the model's logits one example at a time, metrics by plain loops
    rows = []
    with torch.no_grad():
        for b in ds.loader(1):
            p = torch.softmax(bl.fn(None, b)[0].double(), -1).tolist()
            rows.append((p, int(b["labels"][0])))
    n = len(rows)
    nll = sum(-math.log(p[y]) for p, y in rows) / n
    acc = sum(max(range(2), key=lambda c, p=p: p[c]) == y for p, y in rows) / n
    brier = sum(sum((p[c] - (c == y)) ** 2 for c in range(2)) for p, y in rows) / n
    bins = [[] for _ in range(15)]
    for p, y in rows:
        conf = max(p)
        bins[min(int(conf * 15 - 1e-12), 14)].append((conf, p.index(conf) == y))
    ece = sum(abs(sum(c for c, _ in b) / len(b) - sum(h for _, h in b) / len(b)) * len(b) / n for b in bins if b)
    assert m["nll"] == pytest.approx(nll, abs=1e-5) and m["acc"] == pytest.approx(acc)
    assert m["brier"] == pytest.approx(brier, abs=1e-5) and m["ece"] == pytest.approx(ece, abs=1e-5)


def test_predict_before_fit_is_a_clear_error():
    bl = _bl()
    with pytest.raises(RuntimeError, match="not fitted; call fit"):
        bl.predict(next(iter(TokenDataset(4).loader(4))))


def test_save_load_round_trip_gives_identical_predictions(tmp_path):
    bl = _bl()
    ds = TokenDataset(32, seed=2)
    bl.fit_map(ds.loader(8), {"lr": 1e-2, "max_steps": 4, "progress": False})
    bl.fit(ds.loader(8))
    before = bl.predictions(ds.loader(16)).log_probs
    bl.save(tmp_path / "run")
    bl.save(tmp_path / "run")  # overwriting an existing save is atomic and allowed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    base, _ = load_model("tiny-bert", device="cpu", seed=0)
    loaded = BayesianLoRA.load(base, tmp_path / "run")
    after = loaded.predictions(ds.loader(16)).log_probs
    torch.testing.assert_close(before, after)
    assert loaded.method == "map" and loaded.params.names == bl.params.names
    with pytest.raises(ValueError, match="not a saved BayesianLoRA"):
        BayesianLoRA.load(base, tmp_path)


def test_temperature_method_needs_validation_split():
    bl = _bl("temperature")
    ds = TokenDataset(16)
    with pytest.raises(ValueError, match="val_loader: method .temperature. fits on a validation split"):
        bl.fit(ds.loader(8))
    bl.fit(ds.loader(8), val_loader=ds.loader(8))
    assert bl.posterior.temperature > 0


def test_bad_method_and_readout_arguments():
    fn, _ = tiny_fn("bert")
    with pytest.raises(ValueError, match="unknown method 'laplacian'.*expected one of"):
        BayesianLoRA(fn.model, fn.readout, "laplacian")
    with pytest.raises(TypeError, match="readout: expected a Readout"):
        BayesianLoRA(fn.model, "logits")
    with pytest.raises(TypeError, match="unexpected option"):
        BayesianLoRA(fn.model, SequenceClassificationLogits(2), "map", n_samples=3)
    with pytest.raises(TypeError, match="configure it"):
        BayesianLoRA(fn.model, fn.readout, MAP(), n_samples=3)


def test_registry_fixed_options_cannot_be_contradicted():
    assert {"map", "temperature", "kfac_laplace", "vi_meanfield", "ensemble"} <= set(METHODS)
    with pytest.raises(ValueError, match="structure='kron' conflicts with the method"):
        make_posterior("diag_laplace", structure="kron")


def test_float32_on_a_gpu_computes_in_float32_and_bf16_in_bf16(monkeypatch):
    """The device check is mocked (no GPU here): AdapterFn autocasts on 'cuda' only to the model's half dtype."""
    import contextlib

    from bayeslora.function import AdapterFn
    from bayeslora.models import LoraSpec, add_lora

    calls = []

    @contextlib.contextmanager
    def fake_autocast(device_type, dtype=None, **kw):
        calls.append((device_type, dtype))
        yield

    monkeypatch.setattr(torch, "autocast", fake_autocast)
    monkeypatch.setattr(AdapterFn, "device", property(lambda self: torch.device("cuda")))
    seen = {}
    for dtype in ("float32", "bfloat16"):
        model, _ = load_model("tiny-bert", device="cpu", dtype=dtype)  # what bayeslora-run loads for cfg.dtype
        bl = BayesianLoRA(add_lora(model, LoraSpec(r=2)), SequenceClassificationLogits(2))
        calls.clear()
        with bl.fn._autocast():
            pass
        seen[dtype] = (bl.fn.autocast_dtype, list(calls))
    assert seen["float32"] == (None, [])  # no autocast: fp32 compute
    assert seen["bfloat16"] == (torch.bfloat16, [("cuda", torch.bfloat16)])
    explicit = BayesianLoRA(add_lora(load_model("tiny-bert", device="cpu")[0], LoraSpec(r=2)),
                            SequenceClassificationLogits(2), autocast_dtype=torch.bfloat16)  # fmt: skip
    assert explicit.fn.autocast_dtype is torch.bfloat16


def test_the_prior_precision_is_a_verb():
    """An explicit prior_precision is the prior until optimize_prior_precision is called; it is saved after."""
    from bayeslora.wrapper import UnusedArgumentWarning

    fn, _ = tiny_fn("bert", r=2)
    ds = TokenDataset(32, seed=6)
    bl = BayesianLoRA(fn.model, fn.readout, "kfac_laplace", prior_precision=3.0)
    bl.fit_map(ds.loader(8), {"lr": 1e-2, "max_steps": 6, "progress": False})
    with pytest.warns(UnusedArgumentWarning, match="val_loader: method 'kfac_laplace' does not use"):
        bl.fit(ds.loader(8), val_loader=ds.loader(8))
    assert torch.equal(bl.posterior.prior, torch.full_like(bl.posterior.prior, 3.0))  # respected, not replaced
    engine = bl.posterior.engine
    lam = bl.optimize_prior_precision("marglik")
    torch.testing.assert_close(lam, engine.fit_marglik())  # the evidence's maximiser
    assert engine.log_marglik(lam) >= engine.log_marglik(3.0)
    grid = [1e-2, 1e2, 9]
    lam_val = bl.optimize_prior_precision("val_nll", val_loader=ds.loader(8), grid=grid)
    assert min(abs(float(lam_val[0]) - g) for g in torch.logspace(-2, 2, 9).tolist()) < 1e-6 * float(lam_val[0])
    assert engine.val_curve["prior"] == pytest.approx(torch.logspace(-2, 2, 9, dtype=torch.float64).tolist())
    with pytest.raises(ValueError, match="val_loader: method='val_nll' tunes"):
        bl.optimize_prior_precision("val_nll")
    with pytest.raises(ValueError, match="only method='val_nll' uses them"):
        bl.optimize_prior_precision("marglik", grid=grid)
    with pytest.raises(ValueError, match="has no prior precision to fit"):
        BayesianLoRA(fn.model, fn.readout, "map").optimize_prior_precision()
    assert BayesianLoRA(fn.model, fn.readout, "kfac_laplace").posterior.prior_fit == "marglik"  # no λ: the default
    from bayeslora.posteriors import TunablePrior, make_posterior

    assert isinstance(make_posterior("kfac_laplace"), TunablePrior)  # unfitted: isinstance evaluates no property
    assert not isinstance(make_posterior("map"), TunablePrior)


def test_the_fitted_prior_is_saved(tmp_path):
    fn, _ = tiny_fn("bert", r=2)
    ds = TokenDataset(16, seed=7)
    bl = BayesianLoRA(fn.model, fn.readout, "kfac_laplace", prior_precision=2.0)
    bl.fit(ds.loader(8))
    lam = bl.optimize_prior_precision("marglik")
    bl.save(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "bayeslora.json").read_text())
    assert meta["fitted_prior_precision"] == pytest.approx(lam.tolist()) and meta["prior_precision"] == 2.0


def test_an_adapter_trained_elsewhere_and_the_peft_argument_order(tmp_path):
    from peft import PeftModel

    bl = _bl()
    ds = TokenDataset(24, seed=8)
    bl.fit_map(ds.loader(8), {"lr": 1e-2, "max_steps": 3, "progress": False})
    bl.model.save_pretrained(tmp_path / "adapter")  # any peft adapter directory
    bl.fit(ds.loader(8))
    want = bl.predictions(ds.loader(8)).log_probs
    mine = BayesianLoRA.from_pretrained(load_model("tiny-bert", device="cpu", seed=0)[0], tmp_path / "adapter",
                                        SequenceClassificationLogits(2), "map").fit(ds.loader(8))  # fmt: skip
    assert isinstance(mine.model, PeftModel)
    torch.testing.assert_close(mine.predictions(ds.loader(8)).log_probs, want)
    with pytest.raises(ValueError, match="adapter_dir: .* holds no adapter_config.json"):
        BayesianLoRA.from_pretrained(
            load_model("tiny-bert", device="cpu")[0], tmp_path, SequenceClassificationLogits(2)
        )
    bl.save(tmp_path / "saved")
    with pytest.warns(DeprecationWarning, match=r"load\(path, base_model\) is deprecated"):
        old = BayesianLoRA.load(tmp_path / "saved", load_model("tiny-bert", device="cpu", seed=0)[0])
    torch.testing.assert_close(old.predictions(ds.loader(8)).log_probs, want)
    keyword = BayesianLoRA.load(tmp_path / "saved", base_model=load_model("tiny-bert", device="cpu", seed=0)[0])
    torch.testing.assert_close(keyword.predictions(ds.loader(8)).log_probs, want)  # the old keyword call


def test_printing_a_predictive_shows_shapes_and_summaries_not_tensors():
    from bayeslora.predictive import Predictive

    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[0.0, 2.0], [0.0, 0.0]]])
    text = repr(Predictive(logits))
    assert text.startswith("Predictive(S=2 samples, B=2 examples, C=2 classes") and "tensor(" not in text
    assert "confidence mean 0.500" in text and "mutual information mean" in text  # BMA of two opposite samples
    assert "no epistemic score" in str(Predictive.point(logits[0]))
    assert "closed form" in str(Predictive.point(logits[0], torch.tensor([0.1, 0.2])))
