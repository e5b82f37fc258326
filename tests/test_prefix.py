"""The frozen-prefix cache computes the same function as the full model (logits, gradients, K-FAC factors,
training), for a causal LM (left padding, answer-token readout) and an encoder (right padding, classification
head); the cache is keyed so it cannot be stale, and misuse is a clear error.

Tolerances: float32 storage agrees to float32 rounding (1e-5 absolute on logits and factors); float16 storage to
its precision (logits within 1e-3)."""

from __future__ import annotations

import datasets
import pytest
import torch

from bayeslora.data import make_loader
from bayeslora.function import model_mode
from bayeslora.models import resolve_layers
from bayeslora.posteriors.kfac import fit_curvature
from bayeslora.prefix import PREFIX_KEY, FrozenPrefix, cache_key, cache_loader
from bayeslora.train import TrainConfig, train_map
from tests.helpers import tiny_fn

KINDS = {"llama": ("left", 3), "bert": ("right", 2)}


def _split(n=20, seed=0, num_classes=2):
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for i in range(n):
        length = int(torch.randint(4, 15, (1,), generator=g))
        rows["input_ids"].append(torch.randint(5, 200, (length,), generator=g).tolist())
        rows["attention_mask"].append([1] * length)
        rows["labels"].append(i % num_classes)
    return datasets.Dataset.from_dict(rows)


def _setup(kind, layers=(1,), batch_size=6, shuffle=False, seed=0):
    side, c = KINDS[kind]
    fn, tok = tiny_fn(kind, num_classes=c, layers=list(layers), seed=seed)
    with torch.no_grad():  # LoRA B starts at zero: give the adapters an effect (and the A side curvature)
        g = torch.Generator().manual_seed(1)
        for name, p in fn.params.tensors().items():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    loader = make_loader(_split(num_classes=c), tok, batch_size=batch_size, padding_side=side, shuffle=shuffle)
    return fn, loader


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_cached_logits_and_gradients_equal_the_full_model(kind):
    fn, loader = _setup(kind)
    assert fn.prefix is not None and fn.prefix.start == 1
    cached = cache_loader(fn, loader, dtype="float32")
    half = cache_loader(fn, loader, dtype="float16")
    names = list(fn.params.tensors())
    for batch, cbatch, hbatch in zip(loader, cached, half, strict=True):
        assert PREFIX_KEY in cbatch and PREFIX_KEY not in batch
        assert torch.equal(batch["input_ids"], cbatch["input_ids"])
        with model_mode(fn.model, False):
            grads = []
            for b in (batch, cbatch):
                logits = fn(None, b)
                loss = torch.nn.functional.cross_entropy(logits, fn.labels(b))
                grads.append(torch.autograd.grad(loss, [fn.params.tensors()[n] for n in names]))
                grads[-1] = (logits.detach(), grads[-1])
            with torch.no_grad():
                half_logits = fn(None, hbatch)
        (full, g_full), (cach, g_cach) = grads
        torch.testing.assert_close(cach, full, atol=1e-5, rtol=0)
        assert (full - cach).abs().max() <= (full - half_logits).abs().max() + 1e-7
        torch.testing.assert_close(half_logits, full, atol=1e-3, rtol=0)
        assert any(g.abs().max() > 0 for g in g_full)
        for n, a, b in zip(names, g_full, g_cach, strict=True):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_cached_kfac_factors_equal_the_full_model(kind):
    fn, loader = _setup(kind)
    cached = cache_loader(fn, loader, dtype="float32")
    groups, values = fn.params.groups, fn.params.values()
    with model_mode(fn.model, False):
        full = fit_curvature(fn, loader, groups, values, structure="kron", fisher="ggn")
        cach = fit_curvature(fn, cached, groups, values, structure="kron", fisher="ggn")
    assert len(full.factors) == len(cach.factors) == len(groups) and full.n_seen == cach.n_seen
    assert full.loss == pytest.approx(cach.loss, abs=1e-5)
    for i, (fa, fb) in enumerate(zip(full.factors, cach.factors, strict=True)):
        a, b = fa.state(), fb.state()
        assert a.keys() == b.keys()
        for key in a:
            if torch.is_tensor(a[key]):
                torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=f"factor {i}: {key}")


def test_training_on_the_cached_loader_follows_the_full_trajectory():
    losses = {}
    for tag in ("full", "cached"):
        fn, loader = _setup("llama", shuffle=True)
        if tag == "cached":
            loader = cache_loader(fn, loader, dtype="float32")
        result = train_map(fn, loader, TrainConfig(lr=1e-2, epochs=2, warmup_ratio=0.0, progress=False))
        losses[tag] = (result.losses, fn.params.values())
    torch.testing.assert_close(torch.tensor(losses["cached"][0]), torch.tensor(losses["full"][0]), atol=1e-5, rtol=0)
    for name, v in losses["full"][1].items():
        torch.testing.assert_close(losses["cached"][1][name], v, atol=1e-5, rtol=1e-4)


def test_the_cached_loader_keeps_the_order_and_shuffle_of_the_original():
    fn, loader = _setup("bert", shuffle=True)
    cached = cache_loader(fn, loader, dtype="float16")
    epochs = [[b["input_ids"] for b in loader] for _ in range(2)]
    assert not all(torch.equal(a, b) for a, b in zip(*epochs))  # it does reshuffle
    for epoch in epochs:  # the cached loader yields the batches the original did, epoch by epoch
        for a, b in zip(epoch, cached, strict=True):
            assert torch.equal(a, b["input_ids"])


def test_an_adapter_in_block_zero_leaves_no_prefix_and_cached_batches_are_refused():
    fn, loader = _setup("llama", layers=(0, 1))
    assert fn.prefix is None
    with pytest.raises(ValueError, match="no frozen prefix"):
        cache_loader(fn, loader)
    upper, upper_loader = _setup("llama")
    batch = next(iter(cache_loader(upper, upper_loader, dtype="float32")))
    with pytest.raises(ValueError, match="prefix_hidden"):
        fn(None, batch)
    with pytest.raises(ValueError, match="start"):
        FrozenPrefix(upper.model, start=2)  # block 1 holds an adapter: the prefix cannot reach past it


def test_the_store_is_reused_only_for_the_same_tokens_prefix_and_dtype(tmp_path):
    fn, loader = _setup("llama")
    first = cache_loader(fn, loader, dtype="float16", store=tmp_path)
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1
    again = cache_loader(fn, loader, dtype="float16", store=tmp_path)
    assert torch.equal(again.dataset.states, first.dataset.states) and list(tmp_path.glob("*.pt")) == files
    readout = fn.readout.config()
    key = cache_key(fn.prefix, loader.dataset, torch.float16, readout)
    other_tokens = _split(seed=1, num_classes=3)
    assert cache_key(fn.prefix, other_tokens, torch.float16, readout) != key
    assert cache_key(fn.prefix, loader.dataset, torch.float32, readout) != key
    assert cache_key(fn.prefix, loader.dataset.select(range(19)), torch.float16, readout) != key
    other_model, _ = _setup("llama", seed=3)  # other base weights: another fingerprint
    assert cache_key(other_model.prefix, loader.dataset, torch.float16, readout) != key


def test_lora_layers_option_selects_the_top_blocks():
    fn, _ = tiny_fn("llama", layers=1)
    lora = {n.split(".layers.")[1].split(".")[0] for n in fn.params.tensors() if ".layers." in n}
    assert lora == {"1"}
    model = fn.model.get_base_model()
    assert resolve_layers(None, model) is None
    assert resolve_layers(2, model) == [0, 1] and resolve_layers([-1], model) == [1]
    for bad in (0, 3, [2], [], "top", True):
        with pytest.raises(ValueError, match="layers"):
            resolve_layers(bad, model)
