"""The timed operations of ``python -m bayeslora.bench``: baseline, train, laplace, vi, ensemble, peers.

Every suite takes a :class:`~bayeslora.benchmarks.common.Setup` and an options namespace and returns
a JSON-able dict of :func:`~bayeslora.benchmarks.common.measure` entries (seconds per batch, or per
optimizer step, per ensemble member...). A method whose module is not importable is reported as
``{"available": false, "reason": ...}`` instead of failing the run.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from functools import partial
from typing import Any

import torch

from ..function import model_mode
from ..posteriors import make_posterior
from ..train import TrainConfig, train_map
from .common import Setup, measure, tensor_bytes

LAPLACE_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "kfac_ggn": ("kfac_laplace", {"fisher": "ggn"}),
    "kfac_mc": ("kfac_laplace", {"fisher": "mc"}),
    "diag": ("diag_laplace", {}),
}
STEP_OPTIONS = ("max_steps", "steps", "num_steps", "n_steps")
MEMBER_OPTIONS = ("members", "n_members", "num_members", "size", "k")


def unavailable(err: BaseException) -> dict[str, Any]:
    return {"available": False, "reason": f"{type(err).__name__}: {err}"}


def _missing(module: str) -> dict[str, Any] | None:
    """``{"available": false, "reason"}`` if ``module`` (or one of its dependencies) cannot be imported."""
    try:
        importlib.import_module(module)
    except ImportError as err:
        return unavailable(err)
    return None


def timed(setup: Setup, opts, op, per: int = 1) -> dict[str, Any]:
    return measure(op, setup.device, warmup=opts.warmup, repeats=opts.repeats, per=per, profile=opts.profile)


def _train_config(opts, steps: int) -> TrainConfig:
    return TrainConfig(lr=opts.lr, max_steps=steps, warmup_ratio=0.0, prior_precision=opts.prior_precision,
                       progress=False)  # fmt: skip


# ----------------------------------------------------------------------------- baseline and train
def baseline(setup: Setup, opts) -> dict[str, Any]:
    """Forward passes (live and functional) and a ``train_map`` step: the units of every ratio."""
    fn, batch = setup.fn, setup.batch()
    values = fn.params.values()
    loader = setup.loader(opts.steps)

    def forward(vals=None):
        with torch.no_grad(), model_mode(fn.model, False):
            return fn(vals, batch)

    return {
        "forward": timed(setup, opts, forward),
        "forward_functional": timed(setup, opts, lambda: forward(values)),
        "train_map_step": timed(
            setup, opts, lambda: train_map(fn, loader, _train_config(opts, opts.steps)), per=opts.steps
        ),
    }


def plain_loop(setup: Setup, loader, steps: int, lr: float) -> None:
    """The textbook peft loop: AdamW on the ``requires_grad`` parameters, CE on the readout logits."""
    fn = setup.fn
    model, readout = fn.model, fn.readout
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    autocast = (
        torch.autocast("cuda", dtype=fn.autocast_dtype)
        if fn.autocast_dtype is not None and setup.device.type == "cuda"
        else contextlib.nullcontext()
    )
    batches = iter(loader)
    with model_mode(model, True):
        for _ in range(steps):
            batch = {k: v.to(setup.device, non_blocking=True) for k, v in next(batches).items()}
            with autocast:
                logits = readout(model(**readout.model_inputs(batch)), batch)
            loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)


def train(setup: Setup, opts) -> dict[str, Any]:
    """The plain peft loop (the baseline of ``train_map``'s overhead)."""
    loader = setup.loader(opts.steps)
    return {"plain_step": timed(setup, opts, lambda: plain_loop(setup, loader, opts.steps, opts.lr), per=opts.steps)}


# ----------------------------------------------------------------------------- laplace
def laplace(setup: Setup, opts) -> dict[str, Any]:
    """K-FAC (exact GGN and MC Fisher) and diagonal Laplace: fit per batch, predictives per batch, memory."""
    if (missing := _missing("bayeslora.posteriors.laplace")) is not None:
        return missing
    return {key: _laplace_variant(setup, opts, method, extra, all_predictives=key == "kfac_ggn")
            for key, (method, extra) in LAPLACE_VARIANTS.items()}  # fmt: skip


def _laplace_variant(setup: Setup, opts, method: str, extra: dict, all_predictives: bool) -> dict[str, Any]:
    fn, batch, loader = setup.fn, setup.batch(), setup.loader(opts.fit_batches)
    fitted = {}

    def fit():
        fitted["p"] = make_posterior(method, prior_fit="marglik", **extra).fit(fn, loader)

    entry: dict[str, Any] = {"method": method, "options": extra, "fit": timed(setup, opts, fit, opts.fit_batches)}
    post = fitted.get("p")
    if post is None:
        return entry
    entry["persistent_bytes"] = tensor_bytes(post.state_dict())
    entry["glm_probit"] = timed(setup, opts, lambda: post.predict(fn, batch))
    if all_predictives:
        gen = torch.Generator(device=setup.device)
        for predictive, n_samples in (("glm_mc", opts.glm_samples), ("sampling", opts.samples)):
            other = make_posterior(method, predictive=predictive, **extra)
            other.load_state_dict(post.state_dict())
            op = partial(other.predict, fn, batch, n_samples=n_samples, generator=gen)
            entry[predictive] = timed(setup, opts, op)
            entry[predictive]["n_samples"] = n_samples
    return entry


# ----------------------------------------------------------------------------- vi and ensembles
def _option(method: str, candidates) -> str | None:
    from ..posteriors import accepts

    return next((c for c in candidates if accepts(method, c)), None)


def vi(setup: Setup, opts) -> dict[str, Any]:
    """Variational (Pyro SVI) fit per SVI step and the sampling predictive (S forwards)."""
    if (missing := _missing("bayeslora.posteriors.vi")) is not None:
        return missing
    return {method: _vi_method(setup, opts, method) for method in ("vi_meanfield", "vi_lowrank", "vi_blob")}


def _vi_method(setup: Setup, opts, method: str) -> dict[str, Any]:
    fn, batch, loader = setup.fn, setup.batch(), setup.loader(opts.steps)
    step_kw = _option(method, STEP_OPTIONS)
    kwargs = {step_kw: opts.steps} if step_kw else {}
    fitted = {}

    def fit():
        fitted["p"] = make_posterior(method, progress=False, **kwargs).fit(fn, loader)

    entry: dict[str, Any] = {"options": kwargs, "fit_step": timed(setup, opts, fit, per=opts.steps)}
    entry["fit_step"]["unit"] = f"{step_kw}={opts.steps}" if step_kw else f"one fit over {opts.steps} batches"
    post = fitted.get("p")
    if post is not None:
        gen = torch.Generator(device=setup.device)
        entry["persistent_bytes"] = tensor_bytes(post.state_dict())
        entry["sampling"] = timed(setup, opts, partial(post.predict, fn, batch, n_samples=opts.samples, generator=gen))
        entry["sampling"]["n_samples"] = opts.samples
    return entry


def ensemble(setup: Setup, opts) -> dict[str, Any]:
    """Deep ensemble: fit time per member (``opts.steps`` MAP steps each) and the K-member predictive."""
    if (missing := _missing("bayeslora.posteriors.ensemble")) is not None:
        return missing
    fn, batch = setup.fn, setup.batch()
    kwargs: dict[str, Any] = {}
    members_kw, step_kw = _option("ensemble", MEMBER_OPTIONS), _option("ensemble", STEP_OPTIONS)
    if members_kw:
        kwargs[members_kw] = opts.members
    if step_kw:
        kwargs[step_kw] = opts.steps
    loader = setup.loader(opts.steps)
    fitted = {}

    def fit():
        fitted["p"] = make_posterior("ensemble", **kwargs).fit(fn, loader)

    entry: dict[str, Any] = {"options": kwargs, "fit_member": timed(setup, opts, fit, per=opts.members)}
    post = fitted.get("p")
    if post is not None:
        entry["persistent_bytes"] = tensor_bytes(post.state_dict())
        entry["predict"] = timed(setup, opts, lambda: post.predict(fn, batch))
    return entry


# ----------------------------------------------------------------------------- peers
def laplace_torch_peer(setup: Setup, opts) -> dict[str, Any]:
    """laplace-torch (KronLaplace through curvlinops, exact GGN, GLM probit predictive) on the same model."""
    try:
        import laplace  # noqa: F401

        from ..posteriors import laplace_torch  # noqa: F401
    except ImportError as err:
        return unavailable(err)
    fn, batch, loader = setup.fn, setup.batch(), setup.loader(opts.fit_batches)
    fitted = {}

    def fit():
        post = make_posterior("kfac_laplace", backend="laplace-torch", prior_fit="none", fisher="ggn")
        fitted["p"] = post.fit(fn, loader)

    out: dict[str, Any] = {"fit": timed(setup, opts, fit, opts.fit_batches)}
    post = fitted.get("p")
    if post is not None:
        out["persistent_bytes"] = post.factor_bytes()
        out["glm_probit"] = timed(setup, opts, lambda: post.predict(fn, batch))
    return out


def bayesian_lora_peer(setup: Setup, opts) -> dict[str, Any]:
    """bayesian-lora (PyPI; Yang et al. ICLR 2024): ``calculate_kronecker_factors`` (MC Fisher, 1 label)."""
    try:
        from bayesian_lora import calculate_kronecker_factors
    except Exception as err:  # ImportError, or an incompatibility raised at import time
        return unavailable(err)
    fn, loader = setup.fn, setup.loader(opts.fit_batches)
    params = list(fn.params.tensors().values())
    rank, threshold = _laplace_defaults()

    def fit():
        with model_mode(fn.model, False):  # it calls model.train(); restore the modes afterwards
            calculate_kronecker_factors(fn.model, lambda model, b: fn(None, b), loader, n_kfac=rank,
                                        lr_threshold=threshold, target_module_keywords=["lora"])  # fmt: skip
        for p in params:
            p.grad = None

    return {"fit": timed(setup, opts, fit, opts.fit_batches), "options": {"n_kfac": rank, "lr_threshold": threshold}}


def _laplace_defaults() -> tuple[int | None, int]:
    sig = inspect.signature(make_posterior("kfac_laplace").__class__)
    return sig.parameters["rank"].default, sig.parameters["lowrank_threshold"].default


def peers(setup: Setup, opts) -> dict[str, Any]:
    return {"laplace-torch": laplace_torch_peer(setup, opts), "bayesian-lora": bayesian_lora_peer(setup, opts)}
