"""The own K-FAC / diagonal engine against laplace-torch (the oracle) on the same tiny peft model."""

import pytest
import torch
from helpers import randomize_lora_b, tiny_fn
from test_kfac import dense
from torch.utils.data import DataLoader

from bayeslora.io import load_torch, save_torch
from bayeslora.posteriors import make_posterior
from bayeslora.posteriors.kfac import from_matrix
from bayeslora.posteriors.laplace import Laplace
from bayeslora.train import TrainConfig, train_map

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
    # torch.func.jacrev inside laplace-torch's GLM predictive has no vmap rule for CPU attention backward
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
]


def fixed_length_loader(n=16, length=7, batch_size=8, seed=0):
    """No padding: curvlinops' KFAC-reduce averages over every position, the own engine over unmasked ones."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 1200, (n, length), generator=g)
    labels = (ids < 1100).sum(1) % 2  # learnable
    mask = torch.ones(length, dtype=torch.long)
    rows = [{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(n)]
    return DataLoader(rows, batch_size=batch_size)


def pair(structure="kron", include_head=False, **options):
    fn, _ = tiny_fn("bert", r=2, include_head=include_head)
    randomize_lora_b(fn, scale=0.3)
    loader = fixed_length_loader()
    kw = {"structure": structure, "prior_fit": "none", "prior_precision": 2.0, **options}
    own = Laplace(**kw).fit(fn, loader)
    ref = Laplace(backend="laplace-torch", **kw).fit(fn, loader)
    return fn, loader, own, ref


def test_kron_factors_marglik_and_glm_agree_with_laplace_torch():
    fn, loader, own, ref = pair(kfac_approx="reduce")
    la = ref.engine.la
    assert type(la).__name__ == "KronLaplace" and len(la.H_facs.kfacs) == len(own.engine.factors) == 8
    for factor, (g_ref, a_ref) in zip(own.engine.factors, la.H_facs.kfacs):
        g, a = dense(factor)
        torch.testing.assert_close(
            own.engine.num_data * g, g_ref.double(), rtol=1e-5, atol=1e-6 * float(g_ref.abs().max())
        )
        torch.testing.assert_close(a, a_ref.double(), rtol=1e-5, atol=1e-6 * float(a_ref.abs().max()))
    batch = next(iter(loader))
    (m_own, c_own), (m_ref, c_ref) = own.glm_moments(fn, batch), ref.glm_moments(fn, batch)
    torch.testing.assert_close(m_own, m_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c_own, c_ref, rtol=1e-4, atol=1e-6 * float(c_ref.abs().max()))
    torch.testing.assert_close(own.predict(fn, batch).probs, ref.predict(fn, batch).probs, rtol=1e-5, atol=1e-6)
    for lam in (2.0, torch.linspace(0.5, 4.0, 8)):  # scalar and per-layer (laplace-torch keeps the last one set)
        ref_ml = float(la.log_marginal_likelihood(torch.as_tensor(lam, dtype=torch.float32)))
        assert own.log_marglik(lam) == pytest.approx(ref_ml, rel=1e-5)


def test_diag_with_head_agrees_with_laplace_torch():
    fn, loader, own, ref = pair("diag", include_head=True)
    la = ref.engine.la
    order = [n for n, _ in fn.model.named_parameters() if n in set(fn.params.names)]
    diag = {}
    for group, factor in zip(own.engine.match_groups(fn, own.select(fn)), own.engine.factors):
        diag.update(from_matrix(own.engine.num_data * factor.diag, group))
    torch.testing.assert_close(torch.cat([diag[n].reshape(-1) for n in order]), la.H.double(), rtol=1e-4, atol=1e-9)
    assert own.log_marglik(2.0) == pytest.approx(float(la.log_marginal_likelihood(torch.tensor(2.0))), rel=1e-5)
    batch = next(iter(loader))
    torch.testing.assert_close(own.glm_moments(fn, batch)[1], ref.glm_moments(fn, batch)[1], rtol=1e-4, atol=1e-9)


def test_own_marglik_optimum_is_at_least_as_good_as_laplace_torch_adam():
    fn, loader, _, _ = pair()
    own = Laplace(prior_fit="marglik").fit(fn, loader)
    ref = Laplace(prior_fit="marglik", backend="laplace-torch").fit(fn, loader)
    lam_ref = float(ref.engine.la.prior_precision)  # 100 Adam steps on log λ from λ = 1 (laplace-torch's default)
    assert own.log_marglik() >= own.log_marglik(lam_ref) - 1e-6


def test_val_nll_grid_search_picks_the_same_prior_as_laplace_torch():
    fn, _ = tiny_fn("bert", r=2)
    loader, val = fixed_length_loader(n=32), fixed_length_loader(n=16, seed=1)
    train_map(fn, loader, TrainConfig(lr=3e-2, max_steps=60, progress=False))  # overconfident on val
    kw = {"prior_fit": "val_nll", "prior_grid": [1e-3, 1e3, 13]}
    own = Laplace(**kw).fit(fn, loader, val_loader=val)
    ref = Laplace(backend="laplace-torch", **kw).fit(fn, loader, val_loader=val)
    nll = own.engine.val_curve["nll"]
    assert 0 < nll.index(min(nll)) < 12 and max(nll) - min(nll) > 0.01  # an interior, well-separated minimum
    assert float(own.prior[0]) == pytest.approx(float(ref.engine.la.prior_precision), rel=1e-6)


@pytest.mark.parametrize("predictive", ["glm_probit", "glm_mc", "sampling"])
def test_laplace_torch_backend_predicts_and_round_trips(predictive, tmp_path):
    fn, loader, _, ref = pair(include_head=True, predictive=predictive, n_samples=5)
    batch = next(iter(loader))
    gen = torch.Generator().manual_seed(0)
    pred = ref.predict(fn, batch, generator=gen)
    assert pred.logits.shape == ((1 if predictive == "glm_probit" else 5), 8, 2)
    assert torch.isfinite(pred.logits).all() and ref.factor_bytes() > 0
    save_torch(ref.state_dict(), tmp_path / "lt.pt")
    fresh = make_posterior(ref.name, **ref.config())
    fresh.load_state_dict(load_torch(tmp_path / "lt.pt"))
    again = fresh.predict(fn, batch, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.logits, pred.logits)
    assert dict(fn.model.named_parameters())[fn.params.names[0]].requires_grad  # flags restored


def test_laplace_torch_backend_refuses_a_changed_adapter():
    fn, loader, _, ref = pair()
    with torch.no_grad():
        next(iter(fn.params.tensors().values())).add_(1.0)
    with pytest.raises(ValueError, match="live adapter differs"):
        ref.predict(fn, next(iter(loader)))


def padded_loader(n=16, batch_size=8, seed=0):
    """The rows of fixed_length_loader, each cut to a random length and right-padded (pad id 0, mask 0)."""
    base = [row for batch in fixed_length_loader(n, batch_size=n, seed=seed) for row in [batch]][0]
    g = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(2, 8, (n,), generator=g)
    rows = []
    for i in range(n):
        mask = (torch.arange(7) < lengths[i]).long()
        rows.append({"input_ids": base["input_ids"][i] * mask, "attention_mask": mask, "labels": base["labels"][i]})
    return DataLoader(rows, batch_size=batch_size)


def test_padded_batches_enter_laplace_torchs_factors_not_ours():
    """The own engine's factors do not depend on padding (they equal those of the same rows padded to a longer
    length); laplace-torch's A factors take the pad activations in. The size of the difference is asserted."""
    from bayeslora.posteriors.laplace_torch import PaddedBatchWarning, padded_fraction

    fn, _ = tiny_fn("bert", r=2, include_head=False)
    randomize_lora_b(fn, scale=0.3)
    loader = padded_loader()
    assert 0.2 < padded_fraction(loader) < 0.8
    kw = {"structure": "kron", "prior_fit": "none", "prior_precision": 2.0, "kfac_approx": "reduce"}
    own = Laplace(**kw).fit(fn, loader)
    longer = DataLoader(  # the same rows with 5 more pad positions: the own factors must not move
        [{**r, **{k: torch.cat([r[k], torch.zeros(5, dtype=torch.long)]) for k in ("input_ids", "attention_mask")}}
         for b in loader for r in [dict(zip(b, vals)) for vals in zip(*b.values())]],
        batch_size=8,
    )  # fmt: skip
    own_longer = Laplace(**kw).fit(fn, longer)
    with pytest.warns(PaddedBatchWarning, match="padding"):
        ref = Laplace(backend="laplace-torch", **kw).fit(fn, loader)
    rel = []
    for f, f_longer, (_, a_ref) in zip(own.engine.factors, own_longer.engine.factors, ref.engine.la.H_facs.kfacs):
        a, a_longer = dense(f)[1], dense(f_longer)[1]
        torch.testing.assert_close(a, a_longer, rtol=1e-5, atol=1e-6 * float(a.abs().max()))
        rel.append(float((a_ref.double() - a).norm() / a.norm()))
    print("laplace-torch vs own A factors on padded batches, relative Frobenius difference:", [f"{r:.3f}" for r in rel])
    assert max(rel) > 0.05, rel  # pad activations make laplace-torch's A factors differ from ours
