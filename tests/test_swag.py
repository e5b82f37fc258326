"""SWAG against naive references: the moments equal those of stored copies of the same snapshots (taken by an
independent, identically seeded collection), the sampling covariance equals the formula's, the model holds the MAP
again; MultiSWAG is the ensemble's members each followed by its own SWAG, its draws split over them."""

import pytest
import torch
from helpers import TokenDataset, tiny_fn

from bayeslora.adapter_state import load_trained, trained_values
from bayeslora.posteriors import make_posterior
from bayeslora.posteriors.ensemble import Ensemble
from bayeslora.posteriors.multiswag import MultiSWAG
from bayeslora.posteriors.swag import SWAG, swag_covariance
from bayeslora.train import TrainCallback, TrainConfig, train_map

MAP_TRAIN = {"lr": 1e-2, "max_steps": 6, "progress": False}


# The shared tests' options for the methods this file tests (what each key means: helpers.method_options).
METHOD_OPTIONS = {
    "swag": {
        "fast": {"n_snapshots": 3, "collect_every": 1, "rank": 2, "n_samples": 3, "progress": False},
        "non_default": {"n_snapshots": 4, "collect_every": 2, "rank": 3, "lr": 1e-3, "schedule": "cyclic",
                        "optimizer": "sgd", "momentum": 0.5, "scale": 1.0, "prior_precision": 2.0, "grad_accum": 2,
                        "clip": None, "n_samples": 5, "seed": 3, "progress": False},
    },
    "multiswag": {
        "fast": {"k": 2, "train": {"max_steps": 2, "lr": 1e-2, "progress": False}, "n_samples": 3, "progress": False,
                 "swag": {"n_snapshots": 2, "collect_every": 1, "rank": 2}},
        "non_default": {"k": 2, "train": {"lr": 1e-2}, "seeds": [3, 4], "base_seed": 2, "prior_precision": 3.0,
                        "include_current": False, "swag": {"rank": 3}, "n_samples": 4, "progress": False},
        "posterior_mean": False,
    },
}  # fmt: skip


class Copies(TrainCallback):
    """The naive collection: a full copy of the selected tensors every ``every`` steps."""

    def __init__(self, every):
        self.every, self.snaps = every, []

    def on_step(self, state):
        if state.step % self.every == 0:
            self.snaps.append(state.fn.params.flatten(state.fn.params.values()).double())


def _map(seed=0):
    fn, _ = tiny_fn("bert", r=2, dropout=0.1)
    loader = TokenDataset(24, seed=3).loader(8, shuffle=True)
    train_map(fn, loader, TrainConfig(**MAP_TRAIN, prior_precision=1.0, seed=seed))
    return fn, loader


@pytest.mark.parametrize("schedule", ["constant", "cyclic"])
def test_moments_equal_a_naive_collection_of_the_same_snapshots(schedule):
    fn, loader = _map()
    the_map = trained_values(fn)
    swag = SWAG(n_snapshots=6, collect_every=2, rank=4, lr=5e-3, schedule=schedule, prior_precision=1.0,
                progress=False).fit(fn, loader)  # fmt: skip
    for n, v in trained_values(fn).items():  # the model holds the MAP again
        assert torch.equal(v, the_map[n]), n
    copies = Copies(2)
    train_map(fn, loader, swag.collection_config(), [copies], optimizer=swag.optimizer_factory())
    load_trained(fn, the_map)
    snaps = torch.stack(copies.snaps)
    assert snaps.shape[0] == 6 and len(swag.losses) == 12
    torch.testing.assert_close(swag.mean, snaps.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(swag.sq_mean, snaps.square().mean(0), rtol=1e-10, atol=1e-12)
    running = [snaps[: i + 1].mean(0) for i in range(6)]
    naive_dev = torch.stack([snaps[i] - running[i] for i in range(2, 6)])  # the last K = 4
    torch.testing.assert_close(swag.deviations.double(), naive_dev, rtol=1e-5, atol=1e-9)
    assert float((snaps.var(0)).max()) > 0  # the trajectory moved


def test_sampling_covariance_is_the_formulas():
    fn, loader = _map()
    swag = SWAG(n_snapshots=6, collect_every=1, rank=5, lr=1e-2, scale=0.5, progress=False).fit(fn, loader)
    d = swag.mean.shape[0]
    # the formula, written out: scale * (diag(θ̄₂ - θ̄²) / 2 + DᵀD / (2 (K - 1)))
    diag = swag.sq_mean - swag.mean.square()
    dev = swag.deviations.double()
    want = 0.5 * (torch.diag(diag) / 2 + dev.T @ dev / (2 * (5 - 1)))
    torch.testing.assert_close(swag_covariance(swag.mean, swag.sq_mean, swag.deviations, 0.5), want)
    draws = swag.sample_flat(40000, torch.Generator().manual_seed(0))
    assert draws.shape == (40000, d)
    centred = draws - swag.mean
    torch.testing.assert_close(centred.mean(0), torch.zeros(d, dtype=torch.float64), rtol=0,
                               atol=float(5 * (want.diagonal().max() / 40000) ** 0.5))  # fmt: skip
    g = torch.Generator().manual_seed(1)
    dirs = torch.cat([torch.eye(d, dtype=torch.float64)[:: max(1, d // 20)],
                      torch.randn(20, d, generator=g, dtype=torch.float64)])  # fmt: skip
    emp = (centred @ dirs.T).var(0)
    ref = torch.einsum("kd,de,ke->k", dirs, want, dirs)
    torch.testing.assert_close(emp, ref, rtol=0.04, atol=0)  # MC error of a variance: ~1.4% at 40000 draws
    low = 0.5 * (dirs @ dev.T).square().sum(1) / (2 * (5 - 1))  # each part's share: a wrong factor of either shows
    share = low / ref
    assert float(share.max()) > 0.5 and float(share.min()) < 0.5


def test_swag_predicts_at_the_mean_and_with_samples():
    fn, loader = _map()
    swag = SWAG(n_snapshots=3, collect_every=1, rank=2, n_samples=4, progress=False).fit(fn, loader)
    batch = next(iter(TokenDataset(8, seed=5).loader(8)))
    pred = swag.predict(fn, batch, generator=torch.Generator().manual_seed(0))
    assert pred.logits.shape == (4, 8, 2) and not torch.equal(pred.logits[0], pred.logits[1])
    mean = swag.predict(fn, batch, n_samples=0)
    with torch.no_grad():
        fn.model.eval()
        want = fn({k: v.float() for k, v in fn.params.unflatten(swag.mean).items()}, batch)
    torch.testing.assert_close(mean.logits[0], want)


def test_multiswag_is_the_ensemble_members_each_followed_by_swag():
    ds = TokenDataset(24, seed=3)
    fn, _ = tiny_fn("bert", r=2, dropout=0.1)
    train = {"lr": 1e-2, "max_steps": 3, "progress": False}
    swag_opts = {"n_snapshots": 3, "collect_every": 1, "rank": 2, "lr": 5e-3}
    live = trained_values(fn)
    ms = MultiSWAG(k=2, train=train, base_seed=4, prior_precision=1.0, include_current=False, swag=swag_opts,
                   n_samples=5, progress=False).fit(fn, ds.loader(8, shuffle=True))  # fmt: skip
    for n, v in trained_values(fn).items():
        assert torch.equal(v, live[n]), n
    ens = Ensemble(k=2, train=train, base_seed=4, prior_precision=1.0, include_current=False, progress=False)
    ens.fit(fn, ds.loader(8, shuffle=True))
    for i, (mine, theirs) in enumerate(zip(ms.ensemble.members, ens.members)):
        assert all(torch.equal(mine[n], theirs[n]) for n in mine)
        load_trained(fn, theirs)
        ref = SWAG(**swag_opts, prior_precision=1.0, seed=4 + i, progress=False).fit(fn, ds.loader(8, shuffle=True))
        torch.testing.assert_close(ms.members[i].mean, ref.mean, rtol=0, atol=0)
        torch.testing.assert_close(ms.members[i].deviations, ref.deviations, rtol=0, atol=0)
    load_trained(fn, live)
    assert ms.split(5) == [3, 2] and ms.split(1) == [1, 0]
    batch = next(iter(ds.loader(8)))
    pred = ms.predict(fn, batch, generator=torch.Generator().manual_seed(0))
    assert pred.logits.shape == (5, 8, 2)
    g = torch.Generator().manual_seed(0)  # member 0's three draws, then member 1's two, from one generator
    want = []
    for values, swag, count in zip(ms.ensemble.members, ms.members, (3, 2)):
        fn.model.eval()
        with torch.no_grad():
            want += [fn({**values, **draw}, batch) for draw in swag.sample_values(fn, batch, count, g)]
    torch.testing.assert_close(pred.logits, torch.stack(want))


def test_bad_arguments():
    for kwargs, match in (({"n_snapshots": 1}, "n_snapshots: expected an integer >= 2"),
                          ({"rank": 1}, "rank: expected an integer >= 2"),
                          ({"collect_every": 0}, "collect_every: expected a positive integer"),
                          ({"schedule": "linear"}, "schedule: expected one of"),
                          ({"optimizer": "lbfgs"}, "optimizer: expected one of"),
                          ({"scale": 0}, "scale: expected a positive"),
                          ({"n_samples": -1}, "n_samples: expected")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            SWAG(**kwargs)
    with pytest.raises(ValueError, match="swag: 'seed' cannot be set per member"):
        MultiSWAG(swag={"seed": 1})
    with pytest.raises(TypeError, match="unexpected keyword"):
        MultiSWAG(swag={"ranks": 3})
    with pytest.raises(RuntimeError, match="not fitted"):
        SWAG().predict(tiny_fn("bert")[0], next(iter(TokenDataset(4).loader(4))))
    p = make_posterior("swag", rank=3)
    with pytest.raises(ValueError, match="expected shapes"):
        p.load_state_dict({"names": ["a"], "mean": torch.zeros(3), "sq_mean": torch.zeros(2), "deviations":
                           torch.zeros(2, 3)})  # fmt: skip
