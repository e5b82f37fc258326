"""Tiny, fast building blocks for tests: LoRA'd models and synthetic token data where the label is a
function of the tokens."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from bayeslora.function import AdapterFn
from bayeslora.models import LoraSpec, add_lora, load_model
from bayeslora.params import AdapterParams
from bayeslora.readout import AnswerTokenLogits, SequenceClassificationLogits, SequenceRegression


class TokenDataset(Dataset):
    """Sequences of random tokens; label = (count of 'marker' tokens) mod C, so it is learnable."""

    def __init__(
        self,
        n: int,
        length: int = 12,
        num_classes: int = 2,
        vocab: int = 200,
        seed: int = 0,
        pad_id: int = 0,
        left_pad: bool = False,
        offset: int = 1000,
    ):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            ln = int(torch.randint(length // 2, length + 1, (1,), generator=g))
            ids = torch.randint(offset, offset + vocab, (ln,), generator=g)
            label = int((ids < offset + vocab // 2).sum()) % num_classes
            self.items.append((ids, label))
        self.length, self.pad_id, self.left_pad = length, pad_id, left_pad

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def collate(self, rows):
        n = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, (x, _) in enumerate(rows):
            sl = slice(n - len(x), n) if self.left_pad else slice(0, len(x))
            ids[i, sl], mask[i, sl] = x, 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([r[1] for r in rows])}

    def loader(self, batch_size=8, shuffle=False, seed=0):
        g = torch.Generator().manual_seed(seed)
        return DataLoader(self, batch_size=batch_size, shuffle=shuffle, collate_fn=self.collate, generator=g)


class RegressionTokens(TokenDataset):
    """:class:`TokenDataset` with a real target ``[B, 1]``: the fraction of 'marker' tokens, centred."""

    def __init__(self, n: int, **kwargs):
        super().__init__(n, **kwargs)
        vocab, offset = kwargs.get("vocab", 200), kwargs.get("offset", 1000)
        self.items = [(ids, float((ids < offset + vocab // 2).double().mean()) - 0.5) for ids, _ in self.items]

    def collate(self, rows):
        batch = super().collate([(x, 0) for x, _ in rows])
        batch["labels"] = torch.tensor([[y] for _, y in rows])
        return batch


def tiny_fn(
    kind: str = "bert",
    num_classes: int = 2,
    r: int = 2,
    dropout: float = 0.0,
    seed: int = 0,
    target_modules=None,
    include_head: bool = True,
    layers=None,
    noise_std: float | None = None,
):
    """A tiny LoRA'd model wrapped as an AdapterFn: kind 'bert' (seq_cls) or 'llama' (mc readout); ``layers``: the
    blocks with LoRA (``LoraSpec.layers``); ``noise_std``: a one-output bert regression (SequenceRegression) instead."""
    if noise_std is not None:
        num_classes = 1
    fmt = "seq_cls" if kind == "bert" else "mc"
    model, tok = load_model(f"tiny-{kind}", format=fmt, num_labels=num_classes, device="cpu", seed=seed)
    spec = LoraSpec(r=r, alpha=2 * r, dropout=dropout, target_modules=target_modules, seed=seed, layers=layers)
    peft_model = add_lora(model, spec, format=fmt)
    params = AdapterParams(peft_model, include_head=include_head)
    if noise_std is not None:
        readout = SequenceRegression(noise_std)
    elif fmt == "seq_cls":
        readout = SequenceClassificationLogits(num_classes)
    else:
        readout = AnswerTokenLogits.from_tokenizer(tok, "ABCDEFGH"[:num_classes])
    return AdapterFn(peft_model, params, readout), tok


def randomize_lora_b(fn: AdapterFn, scale: float = 0.1, seed: int = 0) -> None:
    """LoRA B starts at zero; give it values so gradients/Jacobians w.r.t. A are non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in fn.params.tensors().items():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))


class LinearToy(torch.nn.Module):
    """Frozen mean-pooled token embeddings -> ``head`` (an nn.Linear): with LoRA on ``head`` and only its B matrix
    random, the logits are affine in the random tensor, so Gaussian-likelihood posteriors are known in closed form.
    ``offset`` gives the embeddings a shared component, so the posterior is clearly correlated (mean-field != full)."""

    def __init__(self, vocab: int = 64, dim: int = 6, num_classes: int = 2, seed: int = 0, offset: float = 3.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, num_classes)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(vocab, dim, generator=g) + offset)  # shared part: correlated posterior
            self.head.weight.copy_(0.3 * torch.randn(num_classes, dim, generator=g))
        self.embed.requires_grad_(False)

    def forward(self, input_ids, attention_mask=None, **_):
        from transformers.modeling_outputs import SequenceClassifierOutput

        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        w = mask.to(self.embed.weight.dtype)[..., None]
        pooled = (self.embed(input_ids) * w).sum(1) / w.sum(1).clamp_min(1.0)
        return SequenceClassifierOutput(logits=self.head(pooled))


def linear_toy_fn(num_classes: int = 2, r: int = 2, seed: int = 0, lora_tensors=("B",), readout=None):
    """A LoRA'd :class:`LinearToy` as an AdapterFn (LoRA A random-initialised and fixed unless selected; ``readout``:
    default class logits of ``num_classes``)."""
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(
            LinearToy(num_classes=num_classes, seed=seed),
            LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=["head"]),
        )
    readout = SequenceClassificationLogits(num_classes) if readout is None else readout
    return AdapterFn(model, AdapterParams(model, lora_tensors=lora_tensors), readout)


def token_batch(n: int, seed: int = 0, vocab: int = 64, length: int = 5) -> dict[str, torch.Tensor]:
    """A full batch of ``n`` random token sequences (ids < vocab) with labels ``n mod 2``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(n) % 2}


def affine_posterior(fn, batch, noise: float, lam: float):
    """Mean [D] and precision [D, D] of the exact Gaussian posterior over vec(B) of a toy whose outputs are affine in
    its one random tensor (observation std ``noise``, prior precision ``lam``), from the exact Jacobian."""
    (name,) = fn.params.names
    b = torch.zeros_like(fn.params.values()[name]).requires_grad_(True)
    f = fn({name: b}, batch)
    jac = torch.stack(
        [torch.autograd.grad(f.reshape(-1)[i], b, retain_graph=True)[0].reshape(-1) for i in range(f.numel())]
    ).double()
    resid = (batch["labels"].double() - f.detach().double()).reshape(-1)
    precision = jac.T @ jac / noise**2 + lam * torch.eye(jac.shape[1], dtype=torch.float64)
    return torch.linalg.solve(precision, jac.T @ resid / noise**2), precision


# ----------------------------------------------------------------------------- per-method test options

METHOD_OPTION_KEYS = {"fast", "non_default", "posterior_mean", "fixed_members"}


def method_options() -> dict[str, dict]:
    """Every registered method's test options, from the ``METHOD_OPTIONS`` dict of the test module that tests it.

    A method is its module, its config and its test: the shared tests (protocol, config round trip, regression)
    take what they need of a method from its own test file, so adding a method edits no shared test. Keys:

    * ``fast`` (required): options that fit on the tiny model in about a second (protocol and regression tests);
    * ``non_default`` (required): every option changed from its default, so a ``config()`` that drops one shows;
    * ``posterior_mean`` (default True): whether ``n_samples=0`` is a point predictive;
    * ``fixed_members`` (default False): whether the samples are a fixed set of members (ensembles).
    """
    found: dict[str, dict] = {}
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        if "\nMETHOD_OPTIONS = " not in path.read_text(encoding="utf-8"):
            continue
        module = importlib.import_module(path.stem)
        for name, options in module.METHOD_OPTIONS.items():
            if name in found:
                raise ValueError(f"METHOD_OPTIONS[{name!r}] is declared twice ({found[name]['_file']}, {path.name}).")
            unknown = set(options) - METHOD_OPTION_KEYS
            if unknown or not {"fast", "non_default"} <= set(options):
                raise ValueError(f"{path.name}: METHOD_OPTIONS[{name!r}] needs 'fast' and 'non_default' and takes "
                                 f"only {sorted(METHOD_OPTION_KEYS)}; got {sorted(options)}.")  # fmt: skip
            found[name] = {"posterior_mean": True, "fixed_members": False, **options, "_file": path.name}
    return found


def options_of(method: str) -> dict:
    """One method's test options (:func:`method_options`), with a clear error when its test file declares none."""
    found = method_options()
    if method not in found:
        raise LookupError(
            f"method {method!r} has no test options: add METHOD_OPTIONS[{method!r}] = "
            "{'fast': {...}, 'non_default': {...}} to its test file (tests/test_<module>.py)."
        )
    return found[method]
