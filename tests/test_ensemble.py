import math

import pytest
import torch
from helpers import TokenDataset, tiny_fn

from bayeslora import BayesianLoRA
from bayeslora.adapter_state import trainable_parameters
from bayeslora.posteriors import make_posterior
from bayeslora.posteriors.ensemble import Ensemble, reinitialise
from bayeslora.posteriors.map import MAP
from bayeslora.train import TrainConfig, train_map

TRAIN = {"lr": 1e-2, "max_steps": 4, "progress": False}


# The shared tests' options for the methods this file tests (what each key means: helpers.method_options).
METHOD_OPTIONS = {
    "ensemble": {
        "fast": {"k": 2, "train": {"max_steps": 2, "lr": 1e-2, "progress": False}, "progress": False},
        "non_default": {"k": 3, "train": {"lr": 1e-2}, "seeds": [4, 5, 6], "base_seed": 2, "prior_precision": 3.0,
                        "keep_on_device": False, "include_current": False, "progress": False},
        "posterior_mean": False,
        "fixed_members": True,
    },
}  # fmt: skip


def _flat(fn, values):
    return fn.params.flatten(values)


def _same_base(ref, fn):
    """Copy every parameter of fn's model into ref's (same frozen base; the adapter is re-initialised anyway)."""
    with torch.no_grad():
        for p, q in zip(ref.model.parameters(), fn.model.parameters()):
            p.copy_(q)


def test_members_differ_and_equal_separately_trained_maps():
    ds = TokenDataset(32, seed=1)
    fn, _ = tiny_fn("bert", r=2, dropout=0.1)
    live_before = {n: p.detach().clone() for n, p in fn.model.named_parameters()}
    rng = torch.get_rng_state()
    ens = Ensemble(k=3, train=TRAIN, base_seed=10, prior_precision=1.0, include_current=False, progress=False)
    ens.fit(fn, ds.loader(8, shuffle=True))
    assert torch.equal(rng, torch.get_rng_state())  # the caller's global RNG is untouched
    for n, p in fn.model.named_parameters():  # the whole model (adapter included) is as before fit
        assert torch.equal(p, live_before[n]), n
    flats = [_flat(fn, m) for m in ens.members]
    assert not torch.allclose(flats[0], flats[1]) and not torch.allclose(flats[1], flats[2])
    assert len(ens.histories) == 3 and all(len(h) == 4 for h in ens.histories)
    for seed, member in zip((10, 11, 12), ens.members):
        ref, _ = tiny_fn("bert", r=2, dropout=0.1, seed=7)  # another adapter init: reinitialise must overwrite it all
        _same_base(ref, fn)
        reinitialise(ref, seed)
        train_map(ref, ds.loader(8, shuffle=True), TrainConfig(**TRAIN, seed=seed, prior_precision=1.0))
        assert set(member) == set(trainable_parameters(ref))
        for n, v in member.items():
            torch.testing.assert_close(v, dict(ref.model.named_parameters())[n].detach(), rtol=0, atol=0)


def test_include_current_makes_the_held_adapter_member_zero_and_trains_only_the_others(monkeypatch):
    import bayeslora.posteriors.ensemble as ensemble_module

    ds = TokenDataset(32, seed=1)
    fn, _ = tiny_fn("bert", r=2, dropout=0.1)
    train_map(fn, ds.loader(8, shuffle=True), TrainConfig(**TRAIN, seed=10, prior_precision=1.0))  # "the MAP"
    the_map = {n: p.detach().clone() for n, p in trainable_parameters(fn).items()}
    calls = []
    real = ensemble_module.train_map
    monkeypatch.setattr(ensemble_module, "train_map", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ens = Ensemble(k=3, train=TRAIN, base_seed=10, prior_precision=1.0, include_current=True, progress=False)
    assert ens.needs.map_adapter is True  # bayeslora-run trains / loads the MAP before fit
    ens.fit(fn, ds.loader(8, shuffle=True))
    assert len(calls) == 2
    for n, p in trainable_parameters(fn).items():  # the live adapter is still the MAP
        assert torch.equal(p, the_map[n]), n
    for n, v in ens.members[0].items():
        assert torch.equal(v, the_map[n]), n
    full = Ensemble(k=3, train=TRAIN, base_seed=10, prior_precision=1.0, include_current=False, progress=False)
    assert full.needs.map_adapter is False
    full.fit(fn, ds.loader(8, shuffle=True))
    for mine, theirs in zip(ens.members[1:], full.members[1:]):  # members 1, 2: the same seeds, the same values
        for n in mine:
            torch.testing.assert_close(mine[n], theirs[n], rtol=0, atol=0)
    assert ens.histories[0] == [] and all(len(h) == 4 for h in ens.histories[1:])
    rebuilt = make_posterior("ensemble", **ens.config())
    assert rebuilt.include_current and rebuilt.seeds == [10, 11, 12]


def test_members_hold_the_trainable_tensors_left_out_of_the_selection():
    """A head excluded from AdapterParams is still trained per member, so it belongs to the member."""
    ds = TokenDataset(32, seed=8)
    fn, _ = tiny_fn("bert", r=2, include_head=False)
    head = [n for n in trainable_parameters(fn) if n not in fn.params.names]
    assert head  # the classification head copy
    ens = Ensemble(k=2, train=TRAIN, base_seed=3, include_current=False, progress=False).fit(
        fn, ds.loader(8, shuffle=True)
    )
    assert all(set(head) <= set(m) for m in ens.members)
    assert not torch.equal(ens.members[0][head[0]], ens.members[1][head[0]])
    batch = next(iter(ds.loader(8)))
    pred = ens.predict(fn, batch)
    for k, seed in enumerate((3, 4)):
        ref, _ = tiny_fn("bert", r=2, include_head=False, seed=5)
        _same_base(ref, fn)
        reinitialise(ref, seed)
        train_map(ref, ds.loader(8, shuffle=True), TrainConfig(**TRAIN, seed=seed))
        torch.testing.assert_close(pred.logits[k], MAP().fit(ref).predict(ref, batch).logits[0])


def test_reinitialise_is_seeded_and_like_peft():
    fn, _ = tiny_fn("bert", r=2)
    rng = torch.get_rng_state()
    reinitialise(fn, 3)
    a = fn.params.values()
    reinitialise(fn, 3)
    b = fn.params.values()
    reinitialise(fn, 4)
    c = fn.params.values()
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(a[n], b[n]) for n in a)
    for n in a:  # every tensor is redrawn from the seed, except B and the head bias (zeros)
        if "lora_B" in n or n.endswith("bias"):
            assert float(a[n].abs().sum()) == 0, n
        else:
            assert not torch.equal(a[n], c[n]), n
    for n, v in a.items():
        if "lora_A" in n:  # peft: kaiming_uniform_(a=sqrt(5)) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1 / math.sqrt(v.shape[1])
            assert float(v.abs().max()) <= bound and float(v.abs().max()) > 0.5 * bound
        if "classifier" in n and n.endswith("weight"):  # BERT's head init N(0, initializer_range)
            std = fn.model.config.initializer_range
            assert 0.5 * std < float(v.std()) < 1.5 * std


def test_predict_runs_each_member_once_and_changes_nothing():
    ds = TokenDataset(16, seed=2)
    fn, _ = tiny_fn("bert", r=2, dropout=0.2)
    ens = Ensemble(k=3, train=TRAIN, progress=False).fit(fn, ds.loader(8))
    batch = next(iter(ds.loader(8)))
    live = {n: p.detach().clone() for n, p in fn.model.named_parameters()}
    fn.model.train()
    modes = [m.training for m in fn.model.modules()]
    calls = []
    handle = fn.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        pred = ens.predict(fn, batch)
        again = ens.predict(fn, batch)
    finally:
        handle.remove()
    assert len(calls) == 6 and pred.logits.shape == (3, 8, 2)
    torch.testing.assert_close(pred.logits, again.logits, rtol=0, atol=0)  # eval mode: dropout off
    assert [m.training for m in fn.model.modules()] == modes
    for n, p in fn.model.named_parameters():
        assert torch.equal(p, live[n]), n
    for k, member in enumerate(ens.members):  # member k == the MAP predictive of its values
        m = MAP()
        m.values = {n: member[n] for n in fn.params.names}
        torch.testing.assert_close(pred.logits[k], m.predict(fn, batch).logits[0])


def test_save_load_all_members(tmp_path):
    from bayeslora.models import load_model

    ds = TokenDataset(16, seed=3)
    fn, _ = tiny_fn("bert", r=2)
    bl = BayesianLoRA(fn.model, fn.readout, "ensemble", k=2, train=TRAIN, progress=False, prior_precision=0.5)
    assert bl.posterior.prior_precision == 0.5  # the one number reaches every member
    assert bl.posterior.member_config(9).prior_precision == 0.5 and bl.posterior.member_config(9).seed == 9
    bl.fit(ds.loader(8))
    before = bl.predictions(ds.loader(8)).log_probs
    bl.save(tmp_path / "ens")
    base, _ = load_model("tiny-bert", device="cpu")
    loaded = BayesianLoRA.load(base, tmp_path / "ens")
    torch.testing.assert_close(loaded.predictions(ds.loader(8)).log_probs, before)
    assert loaded.posterior.k == 2 and loaded.posterior.train == TRAIN
    assert loaded.posterior.histories == bl.posterior.histories
    rebuilt = make_posterior("ensemble", **bl.posterior.config())
    assert rebuilt.config() == bl.posterior.config() and rebuilt.seeds == [0, 1]
    with pytest.raises(ValueError, match="expected 3 ensemble members, got 2"):
        Ensemble(k=3).load_state_dict(bl.posterior.state_dict())


def test_bad_arguments():
    for k in (0, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="k: expected a positive integer"):
            Ensemble(k=k)
    with pytest.raises(ValueError, match="seeds: expected k=3 seeds"):
        Ensemble(k=3, seeds=[1, 2])
    with pytest.raises(ValueError, match="seeds: expected 2 distinct seeds"):
        Ensemble(k=2, seeds=[1, 1])
    with pytest.raises(TypeError, match="unexpected keyword"):
        Ensemble(k=2, train={"learning_rate": 1e-3})
    with pytest.raises(TypeError, match="train: expected a dict"):
        Ensemble(k=2, train=[("lr", 1e-3)])
    with pytest.raises(ValueError, match="lr: expected a positive number"):
        Ensemble(k=2, train={"lr": -1})
    for key, value in (("seed", 3), ("checkpoint_every", 2)):
        with pytest.raises(ValueError, match=f"train: \\['{key}'\\] cannot be set for ensemble members"):
            Ensemble(k=2, train={key: value})
    fn, _ = tiny_fn("bert")
    batch = next(iter(TokenDataset(4).loader(4)))
    with pytest.raises(RuntimeError, match="not fitted"):
        Ensemble(k=2).predict(fn, batch)
    ens = Ensemble(k=1)
    ens.members = [{"other.weight": torch.zeros(1)}]
    with pytest.raises(ValueError, match="fn: the ensemble members hold no values for"):
        ens.predict(fn, batch)
