"""Token-level likelihoods, predictives, metrics and generation under the posterior, on a tiny causal LM (vocabulary
of 24 tokens), each checked against a naive reference."""

from __future__ import annotations

import pytest
import torch
from lm_helpers import IGNORE, collate, copy_rows, loader, randomize_lora_b, tiny_lm
from torchmetrics.functional.classification import multiclass_calibration_error

from bayeslora import BayesianLoRA
from bayeslora.likelihoods import TokenCategorical, likelihood_from_config
from bayeslora.metrics import binned_ece, sequence_log_likelihood, token_metrics
from bayeslora.posteriors import make_posterior
from bayeslora.posteriors.kfac import fit_curvature
from bayeslora.readout import TokenLogits, readout_from_config
from bayeslora.train import TrainConfig, train_map


@pytest.fixture(scope="module")
def trained():
    """A tiny LM with LoRA on q/v and lm_head (dropout 0.1), trained a little on the copy task."""
    fn = tiny_lm(dropout=0.1, target_modules=["q_proj", "v_proj", "lm_head"])
    randomize_lora_b(fn)
    train_map(fn, loader(16), TrainConfig(epochs=3, lr=2e-2, prior_precision=0.0))
    fn.model.eval()
    return fn


def _batch(n=4, seed=3):
    return collate(copy_rows(n, seed))


# ----------------------------------------------------------------------------- likelihood and readout
def test_token_nll_matches_hf_causal_lm_loss(trained):
    """HF's own shifted causal-LM loss (mean over target tokens) is the reference for the shift and the masking."""
    batch = _batch()
    with torch.no_grad():
        logits = trained(None, batch)
        hf = trained.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    n_targets = int((batch["labels"][:, 1:] != IGNORE).sum())
    ours = trained.likelihood.nll(logits, batch["labels"], reduction="sum") / n_targets
    assert torch.allclose(ours, hf.loss, atol=1e-5)
    per_example = trained.likelihood.nll(logits, batch["labels"], reduction="mean")
    assert torch.allclose(per_example * batch["labels"].shape[0] / n_targets, hf.loss, atol=1e-5)


def test_observation_is_the_likelihood(trained):
    batch = _batch()
    with torch.no_grad():
        logits = trained(None, batch)
    lik = trained.likelihood
    lp = lik.observation(logits).log_prob(batch["labels"])
    assert lp.shape == (batch["labels"].shape[0],)
    assert torch.allclose(-lp.sum(), lik.nll(logits, batch["labels"], reduction="sum"))


def test_configs_round_trip():
    readout = TokenLogits(24, ignore_index=-7)
    again = readout_from_config(readout.config())
    assert again.config() == readout.config() and again.likelihood.ignore_index == -7
    assert likelihood_from_config(readout.likelihood.config()).config() == readout.likelihood.config()


def test_mc_columns_average_to_the_softmax_hessian():
    """E[s sᵀ] over sampled tokens is diag(p) − p pᵀ at every target position (and 0 where nothing is scored)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([[IGNORE, IGNORE, 2]])  # one target: logits at position 1 predict it
    lik = TokenCategorical()
    cols = lik.loss_sqrt(logits, labels, "mc", mc_samples=40000, generator=g)  # [1, 3, 5, K]
    assert cols[0, 0].abs().max() == 0 and cols[0, 2].abs().max() == 0
    s = cols[0, 1]
    p = torch.softmax(logits[0, 1], -1)
    assert torch.allclose(s @ s.T, torch.diag(p) - torch.outer(p, p), atol=5e-3)


def test_ggn_and_glm_are_refused_with_the_alternatives(trained):
    with pytest.raises(ValueError, match="fisher='mc'.*fisher='empirical'"):
        make_posterior("kfac_laplace", fisher="ggn", predictive="sampling").fit(trained, loader(4))
    with pytest.raises(ValueError, match="predictive='sampling'"):
        make_posterior("kfac_laplace", fisher="mc").fit(trained, loader(4))
    with pytest.raises(ValueError, match="fisher='mc'"):
        list(TokenCategorical().loss_sqrt_columns(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), "ggn"))
    with pytest.raises(ValueError, match="temperature scaling is not defined"):
        make_posterior("temperature").fit(trained, loader(4), val_loader=loader(4))


# ----------------------------------------------------------------------------- K-FAC against a naive loop
def _naive_fisher(fn, rows):
    """Per target token: the gradient of its NLL at every selected layer's output (retain_grad) and parameters."""
    groups = fn.params.groups
    values = fn.params.values()
    g_sum = {gr.module_name: 0.0 for gr in groups}
    a_sum = {gr.module_name: 0.0 for gr in groups}
    diag = {gr.module_name: 0.0 for gr in groups}
    for row in rows:
        batch = collate([row])  # one example alone: no padding
        store = {}

        def hook(module, inputs, output, name=None, store=store):
            output.retain_grad()
            store[name] = (inputs[0].detach(), output)

        handles = [gr.module.register_forward_hook(lambda m, i, o, n=gr.module_name: hook(m, i, o, n)) for gr in groups]
        n_prompt = len(row[0])
        for tau in range(n_prompt, n_prompt + len(row[1])):  # target token positions
            live = {k: v.detach().clone().requires_grad_(True) for k, v in values.items()}
            store.clear()
            logits = fn(live, batch)
            loss = -torch.log_softmax(logits[0, tau - 1], -1)[batch["input_ids"][0, tau]]
            loss.backward()
            for gr in groups:
                x, out = store[gr.module_name]
                gbar = out.grad.reshape(-1, out.shape[-1]).sum(0).double()
                g_sum[gr.module_name] = g_sum[gr.module_name] + torch.outer(gbar, gbar)
                diag[gr.module_name] = diag[gr.module_name] + live[gr.weight].grad.double() ** 2
        for gr in groups:
            x, _ = store[gr.module_name]
            abar = x.reshape(-1, x.shape[-1]).mean(0).double()
            a_sum[gr.module_name] = a_sum[gr.module_name] + torch.outer(abar, abar)
        for h in handles:
            h.remove()
    n = len(rows)
    return ({k: v / n for k, v in g_sum.items()}, {k: v / n for k, v in a_sum.items()},
            {k: v / n for k, v in diag.items()})  # fmt: skip


def test_token_kfac_empirical_factors_equal_a_naive_per_token_loop(trained):
    rows = copy_rows(5, seed=11)
    batches = [collate(rows[:3]), collate(rows[3:])]  # right padded, rows of different lengths
    groups = trained.params.groups
    values = trained.params.values()
    kron = fit_curvature(trained, batches, groups, values, structure="kron", fisher="empirical", rank=None)
    diag = fit_curvature(trained, batches, groups, values, structure="diag", fisher="empirical")
    g_ref, a_ref, d_ref = _naive_fisher(trained, rows)
    for gr, kf, df in zip(groups, kron.factors, diag.factors):
        g = (kf.g_vecs.double() * kf.g_vals) @ kf.g_vecs.double().T
        a = (kf.a_vecs.double() * kf.a_vals) @ kf.a_vecs.double().T
        ref_g, ref_a = g_ref[gr.module_name], a_ref[gr.module_name]
        assert torch.allclose(g, ref_g, atol=1e-6 + 1e-4 * float(ref_g.abs().max())), gr.module_name
        assert torch.allclose(a, ref_a, atol=1e-6 + 1e-4 * float(ref_a.abs().max())), gr.module_name
        ref_d = d_ref[gr.module_name]
        assert torch.allclose(df.diag, ref_d, atol=1e-9 + 1e-4 * float(ref_d.abs().max())), gr.module_name
    n_targets = sum(len(t) for _, t in rows)
    with torch.no_grad():
        nll = sum(float(trained.likelihood.nll(trained(None, b), b["labels"], reduction="sum")) for b in batches)
    assert kron.n_seen == 5 and kron.loss == pytest.approx(nll, rel=1e-5) and n_targets > 5


# ----------------------------------------------------------------------------- predictives
def _naive_token_ggn_g(fn, rows):
    """The exact expected MC Fisher's G factors ("reduce"): per target token, E_ŷ[ḡ ḡᵀ] = Σ_c p_c ḡ_c ḡ_cᵀ − m mᵀ
    (m = Σ_c p_c ḡ_c), ḡ_c the backward pass of logit c summed over a layer's output positions; the mean over rows."""
    groups = fn.params.groups
    values = fn.params.values()
    total = {gr.module_name: 0.0 for gr in groups}
    for row in rows:
        batch = collate([row])
        store = {}

        def hook(module, inputs, output, name=None, store=store):
            output.retain_grad()
            store[name] = output

        handles = [gr.module.register_forward_hook(lambda m, i, o, n=gr.module_name: hook(m, i, o, n)) for gr in groups]
        n_prompt = len(row[0])
        for tau in range(n_prompt, n_prompt + len(row[1])):
            live = {k: v.detach().clone().requires_grad_(True) for k, v in values.items()}
            logits = fn(live, batch)
            p = torch.softmax(logits[0, tau - 1].detach().double(), -1)
            per_class = {gr.module_name: [] for gr in groups}
            for c in range(logits.shape[-1]):
                for out in store.values():
                    out.grad = None
                logits[0, tau - 1, c].backward(retain_graph=True)
                for gr in groups:
                    out = store[gr.module_name]
                    per_class[gr.module_name].append(out.grad.reshape(-1, out.shape[-1]).sum(0).double())
            for gr in groups:
                g = torch.stack(per_class[gr.module_name])  # [V, out]
                m = p @ g
                total[gr.module_name] = total[gr.module_name] + (g.T * p) @ g - torch.outer(m, m)
        for h in handles:
            h.remove()
    return {k: v / len(rows) for k, v in total.items()}


@pytest.mark.parametrize("fisher", ["mc", "mc_sequence"])
def test_token_kfac_mc_fishers_estimate_the_exact_per_token_ggn(trained, fisher):
    """Both MC Fishers are unbiased for the per-token GGN sum: per token ("mc", T backward passes per sample) and per
    sequence ("mc_sequence", one backward pass per sample: the cross terms between tokens have mean zero)."""
    rows = copy_rows(3, seed=13)
    batches = [collate(rows)]
    groups = [g for g in trained.params.groups if "lm_head" not in g.module_name][:2]
    ref = _naive_token_ggn_g(trained, rows)
    kron = fit_curvature(trained, batches, groups, trained.params.values(), structure="kron", fisher=fisher,
                         mc_samples=4000, rank=None, generator=torch.Generator().manual_seed(0))  # fmt: skip
    for gr, kf in zip(groups, kron.factors):
        g = (kf.g_vecs.double() * kf.g_vals) @ kf.g_vecs.double().T
        err = float((g - ref[gr.module_name]).norm() / ref[gr.module_name].norm())
        assert err < 0.05, (gr.module_name, fisher, err)  # 4000 samples: about 1% here
    if fisher == "mc_sequence":  # a wrong estimator is far off: the empirical Fisher at these targets
        emp = fit_curvature(trained, batches, groups, trained.params.values(), structure="kron", fisher="empirical",
                            rank=None)  # fmt: skip
        kf, gr = emp.factors[0], groups[0]
        g = (kf.g_vecs.double() * kf.g_vals) @ kf.g_vecs.double().T
        assert float((g - ref[gr.module_name]).norm() / ref[gr.module_name].norm()) > 0.2


def _naive_bma(fn, batch, values_list):
    """Full [S, B, T, V] softmaxes averaged in probability space, read at the target tokens."""
    with torch.no_grad():
        probs = torch.stack([torch.softmax(fn(v, batch).double(), -1) for v in values_list]).mean(0)[:, :-1]
    y = batch["labels"][:, 1:]
    mask = y != IGNORE
    p = probs[mask]
    return p.gather(-1, y[mask][:, None])[:, 0].log(), p.max(-1)


def test_sampling_predictive_is_the_naive_monte_carlo_over_its_weight_samples(trained):
    post = make_posterior("kfac_laplace", fisher="mc", predictive="sampling", prior_fit="none", prior_precision=50.0)
    post.fit(trained, loader(8))
    batch = _batch()
    pred = post.predict(trained, batch, n_samples=64, generator=torch.Generator().manual_seed(4))
    draws = post.sample_values(trained, batch, 64, torch.Generator().manual_seed(4))
    lp, (top_p, top) = _naive_bma(trained, batch, draws)
    assert torch.allclose(pred.log_probs.double(), lp, atol=1e-5)
    assert torch.equal(pred.top_tokens, top) and torch.allclose(pred.top_probs.double(), top_p, atol=1e-5)
    # the Monte Carlo converges: two independent sets of 256 draws agree far better than single draws do
    a = post.predict(trained, batch, n_samples=256, generator=torch.Generator().manual_seed(1)).log_probs
    b = post.predict(trained, batch, n_samples=256, generator=torch.Generator().manual_seed(2)).log_probs
    spread = pred.sample_log_probs.std(0).mean()
    assert spread > 0.01 and (a - b).abs().mean() < spread / 4
    assert pred.mutual_information.mean() > 0


METHODS = [
    ("kfac_laplace", dict(fisher="mc", predictive="sampling", prior_fit="none", prior_precision=1e12)),
    ("diag_laplace", dict(fisher="empirical", predictive="sampling", prior_fit="none", prior_precision=1e12)),
    ("last_layer_laplace", dict(fisher="mc", predictive="sampling", prior_fit="none", prior_precision=1e12)),
    ("vi_meanfield", dict(steps=1, lr=1e-12, init_scale=1e-7, prior_precision=1e10, n_samples=4)),
    ("mc_dropout", dict(p=0.0, n_samples=3)),
    ("swag", dict(n_snapshots=2, collect_every=1, rank=2, lr=1e-12, n_samples=3, progress=False)),
    ("tfb", dict(sigma_min=1e-10, sigma_max=1e-9, n_search=2, n_search_samples=2, n_samples=3)),
]


@pytest.mark.parametrize("method,options", METHODS, ids=[m for m, _ in METHODS])
def test_near_zero_variance_reproduces_the_map(trained, method, options):
    batch = _batch()
    prompts = collate([(p, []) for p, _ in copy_rows(3, seed=5)], side="left")
    map_bl = BayesianLoRA(trained.model, trained.readout, "map").fit(loader(8))
    ref = map_bl.predict(batch)
    ref_gen = map_bl.generate(prompts["input_ids"], prompts["attention_mask"], max_new_tokens=4, do_sample=False)
    bl = BayesianLoRA(trained.model, trained.readout, method, **options)
    bl.fit(loader(8), val_loader=loader(8) if bl.posterior.needs.validation else None)
    pred = bl.predict(batch, generator=torch.Generator().manual_seed(0))
    assert pred.num_samples > 1
    assert torch.allclose(pred.log_probs, ref.log_probs, atol=1e-4)
    assert torch.equal(pred.top_tokens, ref.top_tokens)
    gen = bl.generate(prompts["input_ids"], prompts["attention_mask"], n_samples=2, max_new_tokens=4, do_sample=False,
                      generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.equal(gen, ref_gen.expand_as(gen))


WEIGHT_SAMPLERS = [  # methods that train their own adapter (ivon, multiswag) or search σ (tfb): their draws are
    # checked against their own predictive, not against the MAP
    ("ivon", dict(max_steps=2, n_samples=3, progress=False)),
    ("swag", dict(n_snapshots=2, collect_every=1, rank=2, n_samples=3, progress=False)),
    (
        "multiswag",
        dict(
            k=2,
            train={"max_steps": 2, "lr": 1e-2, "progress": False},
            n_samples=3,
            progress=False,
            swag={"n_snapshots": 2, "collect_every": 1, "rank": 2},
        ),
    ),
    ("tfb", dict(metric="nll", tolerance=0.5, n_search=2, n_search_samples=2, n_samples=3)),
]


@pytest.mark.parametrize("method,options", WEIGHT_SAMPLERS, ids=[m for m, _ in WEIGHT_SAMPLERS])
def test_weight_sample_methods_predict_and_generate_with_their_draws(trained, method, options):
    batch = _batch()
    bl = BayesianLoRA(trained.model, trained.readout, method, **options)
    bl.fit(loader(8), val_loader=loader(8) if bl.posterior.needs.validation else None)
    pred = bl.predict(batch, n_samples=3, generator=torch.Generator().manual_seed(4))
    draws = bl.posterior.sample_values(bl.fn, batch, 3, torch.Generator().manual_seed(4))
    assert len(draws) == 3
    lp, (top_p, top) = _naive_bma(bl.fn, batch, draws)
    assert torch.allclose(pred.log_probs.double(), lp, atol=1e-5) and torch.equal(pred.top_tokens, top)
    prompts = collate([(p, []) for p, _ in copy_rows(3, seed=5)], side="left")
    before = {k: v.clone() for k, v in bl.params.values().items()}

    def run(seed):
        return bl.generate(prompts["input_ids"], prompts["attention_mask"], n_samples=2, max_new_tokens=4,
                           do_sample=False, generator=torch.Generator().manual_seed(seed))  # fmt: skip

    out = run(0)
    assert out.shape[:2] == (2, 3) and torch.equal(out, run(0))
    assert all(torch.equal(v, before[k]) for k, v in bl.params.values().items())  # the adapter is restored


def test_an_ensemble_of_identical_members_is_one_member(trained):
    batch = _batch()
    member = trained.params.values()
    ens = make_posterior("ensemble", k=3)
    ens.load_state_dict({"members": [member] * 3})
    ref = make_posterior("map").fit(trained).predict(trained, batch)
    pred = ens.predict(trained, batch)
    assert pred.num_samples == 3
    assert torch.allclose(pred.log_probs, ref.log_probs, atol=1e-6) and torch.equal(pred.top_tokens, ref.top_tokens)
    assert pred.mutual_information.abs().max() < 1e-5


# ----------------------------------------------------------------------------- generation
def test_generation_is_seeded_draws_differ_and_the_adapter_is_restored(trained):
    bl = BayesianLoRA(trained.model, trained.readout, "kfac_laplace", fisher="mc", predictive="sampling",
                      prior_fit="none", prior_precision=0.5).fit(loader(8))  # fmt: skip
    prompts = collate([(p, []) for p, _ in copy_rows(3, seed=5)], side="left")
    before = {k: v.clone() for k, v in bl.params.values().items()}
    rng = torch.random.get_rng_state()

    def run(seed):
        return bl.generate(prompts["input_ids"], prompts["attention_mask"], n_samples=4, max_new_tokens=6,
                           do_sample=False, generator=torch.Generator().manual_seed(seed))  # fmt: skip

    out = run(0)
    assert out.shape[:2] == (4, 3) and torch.equal(out, run(0))
    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    sampled = [bl.generate(ids, mask, n_samples=2, max_new_tokens=6, do_sample=True,
                           generator=torch.Generator().manual_seed(seed)) for seed in (0, 0, 1)]  # fmt: skip
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], sampled[2])
    assert not all(torch.equal(out[0], out[i]) for i in range(1, 4))  # the draws differ (greedy: only the weights do)
    assert all(torch.equal(before[k], v) for k, v in bl.params.values().items())
    assert torch.equal(rng, torch.random.get_rng_state())
    with pytest.raises(ValueError, match="padded on the left"):
        right = collate([(p, []) for p, _ in copy_rows(3, seed=5)], side="right")
        bl.generate(right["input_ids"], right["attention_mask"], max_new_tokens=2)


# ----------------------------------------------------------------------------- metrics
def test_binned_ece_is_torchmetrics_top_label_ece():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(500, 7, generator=g), -1)
    labels = torch.randint(0, 7, (500,), generator=g)
    conf, pred = probs.max(-1)
    ref = multiclass_calibration_error(probs, labels, num_classes=7, n_bins=15, norm="l1").item()
    assert binned_ece(conf, pred == labels) == pytest.approx(ref, abs=1e-6)


def test_binned_ece_bins_on_the_edges_as_torchmetrics():
    """Confidences on the bin edges (exact in binary) go to the bin above (bins [l, u); 1.0 in the last), as in
    torchmetrics."""
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.75, 0.25, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [1.0, 0, 0, 0]])
    probs = probs.repeat(3, 1)
    labels = torch.tensor([0, 1, 2, 0, 1, 0, 3, 0, 0, 1, 0, 1])
    conf, pred = probs.max(-1)
    for n_bins in (2, 4):
        ref = multiclass_calibration_error(probs, labels, num_classes=4, n_bins=n_bins, norm="l1").item()
        assert binned_ece(conf, pred == labels, n_bins) == pytest.approx(ref, abs=1e-6)


def test_token_metrics_against_hand_computation():
    lp = torch.log(torch.tensor([0.5, 0.25, 0.8, 0.1], dtype=torch.float64))
    example = torch.tensor([0, 0, 1, 2])
    seq = sequence_log_likelihood(lp, example, 3)
    assert torch.allclose(seq, torch.log(torch.tensor([0.125, 0.8, 0.1], dtype=torch.float64)))
    m = token_metrics(lp, torch.tensor([0.5, 0.6, 0.8, 0.7]), torch.tensor([True, False, True, False]), example, 3)
    assert m["token_nll"] == pytest.approx(-lp.mean().item())
    assert m["perplexity"] == pytest.approx(float(torch.exp(-lp.mean())))
    assert m["seq_nll"] == pytest.approx(-seq.mean().item()) and m["token_acc"] == 0.5


def test_predictions_over_a_loader_count_every_target_token(trained):
    bl = BayesianLoRA(trained.model, trained.readout, "map").fit(loader(8))
    dl = loader(10, batch_size=3, seed=7)
    preds = bl.predictions(dl)
    n_targets = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in dl)
    assert preds.log_probs.numel() == n_targets and preds.num_examples == 10
    assert preds.example.unique().tolist() == list(range(10))
    with torch.no_grad():
        nll = sum(float(trained.likelihood.nll(trained(None, b), b["labels"], reduction="sum")) for b in dl)
    assert preds.metrics()["seq_nll"] == pytest.approx(nll / 10, rel=1e-5)


# ----------------------------------------------------------------------------- data and app
def test_prompt_target_encoding_masks_the_prompt_and_pads_labels_right():
    from bayeslora.data.collate import PadCollator
    from bayeslora.data.encode import IGNORE_INDEX, prompt_target_ids
    from bayeslora.models import load_tokenizer, locate

    tok = load_tokenizer(locate("tiny-llama"), "generative")
    ids, labels = prompt_target_ids(tok, "Repeat the words: red cat", "red cat", max_length=64)
    eos = [] if tok.eos_token_id is None else [tok.eos_token_id]
    target = tok(" red cat", add_special_tokens=False)["input_ids"] + eos
    assert ids[-len(target) :] == target and labels[-len(target) :] == target
    assert labels[: -len(target)] == [IGNORE_INDEX] * (len(ids) - len(target))
    short_ids, short_labels = prompt_target_ids(tok, "Repeat the words: red cat", "red cat", max_length=len(target) + 2)
    assert len(short_ids) == len(target) + 2 and short_labels[-len(target) :] == target  # the prompt is cut
    rows = [
        {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels},
        {"input_ids": ids[:3], "attention_mask": [1] * 3, "labels": [IGNORE_INDEX] * 3},
    ]
    batch = PadCollator(tok.pad_token_id, "right")(rows)
    assert batch["labels"].shape == batch["input_ids"].shape and (batch["labels"][1] == IGNORE_INDEX).all()


def test_a_chat_template_prompt_is_the_user_turn_and_the_generation_prompt():
    """SmolLM2-Instruct's tokenizer (a chat template; transformers returns a BatchEncoding from apply_chat_template):
    the prompt is the templated user turn up to the assistant's opening, the labels are the target and EOS."""
    from bayeslora.data.encode import IGNORE_INDEX, prompt_target_ids
    from bayeslora.models import load_tokenizer, locate

    tok = load_tokenizer(locate("smollm2-135m"), "generative")
    assert tok.chat_template
    ids, labels = prompt_target_ids(tok, "Which gas do plants take in?", "carbon dioxide", max_length=96)
    start = labels.index(next(y for y in labels if y != IGNORE_INDEX))
    expected = tok.apply_chat_template([{"role": "user", "content": "Which gas do plants take in?"}],
                                       add_generation_prompt=True, tokenize=False)  # fmt: skip
    assert tok.decode(ids[:start]) == expected and all(isinstance(i, int) for i in ids)
    assert tok.decode(labels[start:], skip_special_tokens=True) == "carbon dioxide"
    assert labels[-1] == tok.eos_token_id and labels[:start] == [IGNORE_INDEX] * start


def test_smoke_generative_through_the_app(tmp_path):
    import json

    from hydra import compose, initialize_config_dir

    from bayeslora.io import load_torch
    from bayeslora.metrics import TOKEN_KEYS, records_of
    from bayeslora.run import run

    configs = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "configs")
    with initialize_config_dir(config_dir=configs, version_base=None):
        cfg = compose("config", overrides=["experiment=smoke_generative", f"results_dir={tmp_path}"])
    result = run(cfg)
    stored = json.loads((__import__("pathlib").Path(result["run_dir"]) / "metrics.json").read_text())
    assert all(k in stored["splits"]["test"] for k in TOKEN_KEYS)
    preds = load_torch(__import__("pathlib").Path(result["run_dir"]) / "predictions.pt")
    again = records_of(preds["test"]).metrics()
    assert again == pytest.approx(stored["splits"]["test"]) and stored["perplexity"] > 1
    # eval.answers: the answers' metrics recompute from the stored records and gold texts
    from bayeslora.answers import AnswerRecord, answer_metrics

    saved = preds["answers/test"]
    assert len(saved["records"]) == len(saved["gold"]) == 8
    records = [AnswerRecord.from_state_dict(r) for r in saved["records"]]
    recomputed = {k: v for k, v in answer_metrics(records, saved["gold"]).items() if v is not None and k != "n"}
    assert recomputed == pytest.approx(stored["splits"]["test_answers"])
    assert all(r.probs.shape == (3, len(r.candidates)) for r in records)


def test_an_added_config_key_at_its_old_value_leaves_stored_identities_unchanged():
    from bayeslora.results import ADDED_KEYS, run_identity
    from bayeslora.run import compose

    assert ADDED_KEYS["eval.answers"] is None
    plain = compose(["experiment=smoke"])
    assert "answers" not in run_identity(plain)["eval"]  # the runs stored before eval.answers keep their ids
    on = compose(["experiment=smoke_generative"])
    assert run_identity(on)["eval"]["answers"] == {"n_samples": 3, "max_new_tokens": 6, "max_eval": 8}
    with pytest.raises(ValueError, match="eval.answers: answer-level uncertainty needs free-form answers"):
        from omegaconf import OmegaConf

        from bayeslora.config_check import check_run_config

        check_run_config(OmegaConf.to_container(compose(["experiment=smoke", "eval.answers={n_samples: 2}"]),
                                                resolve=True))  # fmt: skip
