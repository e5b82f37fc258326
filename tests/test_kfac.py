"""K-FAC engine against naive references: per-example Jacobian loops, exact GGN blocks, dense eigensolvers."""

from types import SimpleNamespace

import pytest
import torch
from helpers import TokenDataset, randomize_lora_b, tiny_fn
from torch import nn

from bayeslora.function import AdapterFn
from bayeslora.likelihoods import Categorical, Gaussian
from bayeslora.params import AdapterParams
from bayeslora.posteriors.kfac import (
    KronFactor,
    as_matrix,
    fit_curvature,
    from_matrix,
    layer_jacobian,
    record_layers,
)
from bayeslora.posteriors.lowrank import FrequentDirections, eig_psd
from bayeslora.readout import SequenceClassificationLogits


# ----------------------------------------------------------------------------- tiny models and references
class MLP(nn.Module):
    """x [B, 6] -> 3 logits; no sequence dimension, so K-FAC of one example is the exact GGN block."""

    def __init__(self, twice: bool = False):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.twice = twice

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.fc1(input_ids))
        h = torch.tanh(self.fc2(h) + (self.fc1(input_ids) if self.twice else 0))
        return SimpleNamespace(logits=self.head(h))


def mlp_fn(seed=0, twice=False):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(
        MLP(twice), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], modules_to_save=["head"])
    )
    fn = AdapterFn(model, AdapterParams(model), SequenceClassificationLogits(3))
    randomize_lora_b(fn, scale=0.5, seed=seed)
    return fn


def mlp_batches(n=12, batch_size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [{"input_ids": x[i : i + batch_size], "labels": y[i : i + batch_size]} for i in range(0, n, batch_size)]


def examples(batches):
    """Every example alone, padding removed (the naive references never see padding)."""
    out = []
    for b in batches:
        for i in range(b["labels"].shape[0]):
            ex = {k: v[i : i + 1] for k, v in b.items()}
            if "attention_mask" in ex:
                keep = ex["attention_mask"][0].bool()
                ex = {k: v[:, keep] if k in ("input_ids", "attention_mask") else v for k, v in ex.items()}
            out.append(ex)
    return out


def hessian(logits):
    p = torch.softmax(logits.double(), -1)
    return torch.diag(p) - torch.outer(p, p)


def naive_factors(fn, batches, group):
    """Reference K-FAC-reduce factors: A = mean ā āᵀ, G = mean Jδᵀ H Jδ, with Jδ the Jacobian of the logits
    w.r.t. a shift δ added to the layer output at every position (= Σ_t g_t), one example at a time."""
    values = fn.params.values()
    out_dim = group.module.weight.shape[0]
    a_sum, g_sum, n = 0, 0, 0
    for ex in examples(batches):
        delta = torch.zeros(out_dim, dtype=torch.float64, requires_grad=True)
        seen = {}

        def hook(module, inputs, output, seen=seen, delta=delta):
            seen["x"] = inputs[0]
            return output + delta.to(output.dtype)

        h = group.module.register_forward_hook(hook)
        try:
            logits = fn(values, ex)[0]
        finally:
            h.remove()
        jd = torch.stack([torch.autograd.grad(logits[c], delta, retain_graph=True)[0] for c in range(len(logits))])
        x = seen["x"].double().reshape(-1, seen["x"].shape[-1])
        if group.bias is not None:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
        a = x.mean(0)
        a_sum = a_sum + torch.outer(a, a)
        g_sum = g_sum + jd.T @ hessian(logits.detach()) @ jd
        n += 1
    return a_sum / n, g_sum / n


def naive_ggn_block(fn, ex, group):
    """Exact GGN block Σ_cc' H[c,c'] vec(J_c) vec(J_c')ᵀ of one example (row-major [W | b])."""
    values = {k: v.clone().requires_grad_(k in group.names) for k, v in fn.params.values().items()}
    logits = fn(values, ex)[0]
    rows = []
    for c in range(len(logits)):
        grads = torch.autograd.grad(logits[c], [values[n] for n in group.names], retain_graph=True)
        rows.append(as_matrix(dict(zip(group.names, grads)), group).reshape(-1).double())
    jac = torch.stack(rows)
    return jac.T @ hessian(logits.detach()) @ jac


def dense(factor: KronFactor):
    g = factor.g_vecs.double() @ torch.diag(factor.g_vals) @ factor.g_vecs.double().T
    a = factor.a_vecs.double() @ torch.diag(factor.a_vals) @ factor.a_vecs.double().T
    return g, a


# ----------------------------------------------------------------------------- loss Hessian square roots
loss_sqrt = Categorical().loss_sqrt


@pytest.mark.parametrize("c", [2, 3, 5])
def test_ggn_square_root_reproduces_softmax_hessian_with_c_minus_1_columns(c):
    logits = torch.randn(6, c, dtype=torch.float64) * 3
    s = loss_sqrt(logits, torch.zeros(6, dtype=torch.long), "ggn")
    assert s.shape == (6, c, c - 1)
    for i in range(6):
        torch.testing.assert_close(s[i] @ s[i].T, hessian(logits[i]))


def test_mc_and_empirical_fisher_vectors():
    logits = torch.tensor([[1.0, -0.5, 0.2]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    s = loss_sqrt(logits.expand(4000, 3), torch.zeros(4000, dtype=torch.long), "mc", mc_samples=5, generator=gen)
    mc = torch.einsum("bck,bdk->cd", s, s) / 4000
    torch.testing.assert_close(mc, hessian(logits[0]), atol=0.01, rtol=0)
    e = loss_sqrt(logits, torch.tensor([2]), "empirical")[0, :, 0]
    torch.testing.assert_close(e, torch.softmax(logits[0], -1) - torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="fisher: expected one of"):
        loss_sqrt(logits, torch.tensor([0]), "hessian")


def test_gaussian_likelihood_nll_and_square_roots():
    g = torch.Generator().manual_seed(0)
    f, y, sigma = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g), 0.7
    lik = Gaussian(sigma)
    ref = -torch.distributions.Normal(f, sigma).log_prob(y.double()).sum(-1)
    torch.testing.assert_close(lik.nll(f, y, "sum"), ref.sum())
    s = lik.loss_sqrt(f, y, "ggn")  # the Hessian of the NLL in f is I / σ²
    torch.testing.assert_close(s @ s.transpose(1, 2), torch.eye(3, dtype=f.dtype).expand(5, 3, 3) / sigma**2)
    s = lik.loss_sqrt(f[:1].expand(20000, 3), y[:1].expand(20000, 3), "mc", mc_samples=2, generator=g)
    torch.testing.assert_close(torch.einsum("bck,bdk->cd", s, s) / 20000, torch.eye(3, dtype=f.dtype) / sigma**2,
                               atol=0.05, rtol=0)  # fmt: skip
    f_req = f.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(lik.nll(f_req, y, "sum"), f_req)
    torch.testing.assert_close(lik.loss_sqrt(f, y, "empirical")[:, :, 0], grad)  # the per-example NLL gradient
    with pytest.raises(ValueError, match="labels: a Gaussian likelihood needs targets shaped like the outputs"):
        lik.nll(f, torch.zeros(5))


def test_the_readouts_likelihood_reaches_the_curvature():
    """A Gaussian readout on the linear toy: the diagonal GGN is exactly diag(JᵀJ) / σ² (the conjugate precision)."""
    from helpers import linear_toy_fn, token_batch

    sigma = 0.5
    fn = linear_toy_fn()
    fn.readout.likelihood = Gaussian(sigma)
    batch = token_batch(24)
    batch["labels"] = torch.randn(24, 2, generator=torch.Generator().manual_seed(1))
    groups = list(fn.params.groups)
    curv = fit_curvature(fn, [batch], groups, fn.params.values(), structure="diag", fisher="ggn")
    (name,) = fn.params.names
    b = fn.params.values()[name].clone().requires_grad_(True)
    out = fn({name: b}, batch)
    jac = torch.stack([torch.autograd.grad(out.reshape(-1)[i], b, retain_graph=True)[0].reshape(-1)
                       for i in range(out.numel())]).double()  # fmt: skip
    want = (jac.square().sum(0) / sigma**2) / 24  # per-example normalised, as the factors are
    torch.testing.assert_close(curv.factors[0].eigenvalues().reshape(-1).double(), want, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- K-FAC vs exact references
def test_kfac_of_one_example_is_the_exact_ggn_block_on_a_lora_mlp():
    fn = mlp_fn()
    batch = mlp_batches(n=1, batch_size=1)
    curv = fit_curvature(fn, batch, fn.params.groups, fn.params.values(), fisher="ggn")
    assert [g.kind for g in fn.params.groups] == ["lora_A", "lora_B", "lora_A", "lora_B", "head"]
    for group, factor in zip(fn.params.groups, curv.factors):
        g, a = dense(factor)
        torch.testing.assert_close(torch.kron(g, a), naive_ggn_block(fn, batch[0], group), rtol=1e-4, atol=1e-6)
    logits = fn(None, batch[0]).detach().double()
    expected = torch.nn.functional.cross_entropy(logits, batch[0]["labels"], reduction="sum")
    assert curv.loss == pytest.approx(float(expected)) and curv.n_seen == 1


def test_kfac_factors_match_naive_definitions_on_a_padded_transformer():
    fn, _ = tiny_fn("bert", r=2)
    randomize_lora_b(fn, scale=0.3)
    batches = list(TokenDataset(10, length=9, seed=3).loader(4))
    assert any((b["attention_mask"] == 0).any() for b in batches)  # padding present: the mask must be respected
    curv = fit_curvature(fn, batches, fn.params.groups, fn.params.values(), fisher="ggn")
    assert curv.n_seen == 10
    for group, factor in zip(fn.params.groups, curv.factors):
        a_ref, g_ref = naive_factors(fn, batches, group)
        g, a = dense(factor)
        torch.testing.assert_close(a, a_ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-7)


def test_exact_diagonal_ggn_matches_per_example_jacobian_loop():
    fn, _ = tiny_fn("bert", r=2)
    randomize_lora_b(fn, scale=0.3)
    batches = list(TokenDataset(6, length=8, seed=4).loader(3))
    curv = fit_curvature(fn, batches, fn.params.groups, fn.params.values(), structure="diag")
    for group, factor in zip(fn.params.groups, curv.factors):
        ref = sum(torch.diagonal(naive_ggn_block(fn, ex, group)) for ex in examples(batches)) / 6
        torch.testing.assert_close(factor.diag.reshape(-1), ref, rtol=1e-4, atol=1e-8)


def test_fisher_types_agree_in_expectation_and_empirical_uses_labels():
    fn = mlp_fn(seed=1)
    batches = mlp_batches(n=8, batch_size=8)
    groups, values = fn.params.groups[-1:], fn.params.values()
    ggn = dense(fit_curvature(fn, batches, groups, values, fisher="ggn").factors[0])[0]
    gen = torch.Generator().manual_seed(0)
    mc = dense(fit_curvature(fn, batches, groups, values, fisher="mc", mc_samples=4000, generator=gen).factors[0])[0]
    torch.testing.assert_close(mc, ggn, atol=0.02 * float(ggn.abs().max()), rtol=0)
    gen = torch.Generator().manual_seed(0)  # one output per example: the sequence MC Fisher is the MC Fisher
    seq = fit_curvature(fn, batches, groups, values, fisher="mc_sequence", mc_samples=4000, generator=gen)
    torch.testing.assert_close(dense(seq.factors[0])[0], mc, rtol=0, atol=0)
    emp = dense(fit_curvature(fn, batches, groups, values, fisher="empirical").factors[0])[0]
    logits = fn(None, batches[0]).double()
    r = torch.softmax(logits, -1) - torch.nn.functional.one_hot(batches[0]["labels"], 3)
    torch.testing.assert_close(emp, r.T @ r / 8, rtol=1e-4, atol=1e-7)  # head: output grads are the residuals


def test_expand_treats_positions_as_examples():
    fn, _ = tiny_fn("bert", r=2)
    randomize_lora_b(fn, scale=0.3)
    batch = {"input_ids": torch.randint(1000, 1200, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long),
             "labels": torch.tensor([0, 1])}  # fmt: skip
    group = fn.params.groups[0]
    factor = fit_curvature(fn, [batch], [group], fn.params.values(), kfac_approx="expand").factors[0]
    with record_layers([group]) as rec:
        fn(None, batch)
    x = rec[0].input.double()
    torch.testing.assert_close(dense(factor)[1], torch.einsum("bti,btj->ij", x, x) / 10, rtol=1e-4, atol=1e-7)


def test_bf16_activations_are_accumulated_in_fp32():
    fn, _ = tiny_fn("bert", r=2)
    randomize_lora_b(fn, scale=0.3)
    batches = list(TokenDataset(4, seed=5).loader(4))
    ref = fit_curvature(fn, batches, fn.params.groups, fn.params.values()).factors
    fn.model.to(torch.bfloat16)
    low = fit_curvature(fn, batches, fn.params.groups, fn.params.values()).factors
    for f32, b16 in zip(ref, low):
        assert b16.a_vecs.dtype == torch.float32 and torch.isfinite(b16.eigenvalues()).all()
        torch.testing.assert_close(dense(b16)[1], dense(f32)[1], rtol=0.1, atol=0.05 * float(f32.a_vals[0]))


# ----------------------------------------------------------------------------- helpers and errors
def test_layer_jacobian_and_matrix_layout():
    g, x = torch.randn(2, 4, 3), torch.randn(2, 4, 5)
    jac = layer_jacobian(g, x, bias=True)
    torch.testing.assert_close(jac[..., :5], torch.einsum("bto,bti->boi", g, x))
    torch.testing.assert_close(jac[..., 5], g.sum(1))
    fn = mlp_fn()
    head = fn.params.groups[-1]
    values = fn.params.values()
    m = as_matrix(values, head)
    assert m.shape == (3, 9)
    back = from_matrix(m, head)
    assert torch.equal(back[head.weight], values[head.weight]) and torch.equal(back[head.bias], values[head.bias])


def test_layer_called_twice_is_a_clear_error():
    fn = mlp_fn(twice=True)
    with pytest.raises(ValueError, match="ran twice in one forward"):
        fit_curvature(fn, mlp_batches(4), fn.params.groups, fn.params.values())


def test_empty_loader_is_a_clear_error():
    fn = mlp_fn()
    with pytest.raises(ValueError, match="yielded no batches"):
        fit_curvature(fn, [], fn.params.groups, fn.params.values())


# ----------------------------------------------------------------------------- low rank
def test_eig_psd_rejects_indefinite_and_non_finite_factors():
    vals, vecs = eig_psd(torch.tensor([[2.0, 1.0], [1.0, 2.0]]), "A")
    torch.testing.assert_close(vals, torch.tensor([3.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="not positive semi-definite"):
        eig_psd(torch.tensor([[1.0, 2.0], [2.0, 1.0]]), "A factor")
    with pytest.raises(ValueError, match="NaN/inf"):
        eig_psd(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]), "A factor")


def test_frequent_directions_is_exact_when_the_sketch_covers_the_rank():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 300, generator=g, dtype=torch.float64)
    fd = FrequentDirections(40, sketch_size=6)
    for i in range(0, 300, 7):
        fd.add(x[:, i : i + 7])
    vals, vecs, err = fd.eig(5)
    torch.testing.assert_close(vecs @ torch.diag(vals) @ vecs.T, x @ x.T, rtol=1e-8, atol=1e-6)
    assert err < 1e-8 * float(vals[0])


def test_frequent_directions_error_is_one_sided_and_bounded():
    g = torch.Generator().manual_seed(1)
    scales = torch.linspace(3, 0.1, 30, dtype=torch.float64)[:, None]
    x = torch.randn(30, 200, generator=g, dtype=torch.float64) * scales
    fd = FrequentDirections(30, sketch_size=8)
    for i in range(0, 200, 5):
        fd.add(x[:, i : i + 5])
    vals, vecs, bound = fd.eig(8)
    diff = x @ x.T - vecs @ torch.diag(vals) @ vecs.T
    eig = torch.linalg.eigvalsh(diff)
    assert float(eig.min()) > -1e-8 * float(vals[0])  # never over-estimates the curvature
    assert float(eig.max()) <= bound + 1e-9
    s = torch.linalg.svdvals(x).square()
    k = 4
    assert fd.shrinkage <= float(s[k:].sum()) / (8 - k) + 1e-9  # Ghashami et al. 2016


def test_lowrank_factors_equal_full_factors_when_the_rank_covers_the_spectrum():
    fn, _ = tiny_fn("bert", r=2)
    randomize_lora_b(fn, scale=0.3)
    batches = list(TokenDataset(12, seed=6).loader(4))
    values = fn.params.values()
    full = fit_curvature(fn, batches, fn.params.groups, values).factors
    low = fit_curvature(fn, batches, fn.params.groups, values, rank=12, lowrank_threshold=16).factors
    for f, l, group in zip(full, low, fn.params.groups):
        kept = l.g_vecs.shape[1] if group.kind == "lora_B" else l.a_vecs.shape[1]
        assert not l.full and kept == 12 and l.a_error < 1e-6 and l.g_error < 1e-6
        for a, b in zip(dense(l), dense(f)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))
