"""The Pyro pieces of the variational posterior: the model over the adapter tensors, the guides, flipout.

* :class:`AdapterModel` – a functional Pyro model over the selected LoRA tensors θ (the HF model is
  *not* converted with ``to_pyro_module_``): one ``pyro.sample`` site per tensor with a Gaussian prior
  N(μ₀, λ⁻¹ I) (μ₀ = 0 or the initial/MAP value), then a data plate of size N subsampled to the batch
  with ``Categorical(logits=fn(θ, batch))`` observed on the labels (a Gaussian likelihood is available
  for regression/conjugate checks).
* Guides: ``"meanfield"`` – :class:`~pyro.infer.autoguide.AutoNormal`; ``"lowrank"`` –
  :class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal` with an explicit rank; ``"blob"`` –
  :class:`BlobGuide`, BLoB's guide (Wang et al., "BLoB: Bayesian Low-Rank Adaptation by Backpropagation
  for Large Language Models", NeurIPS 2024): a Gaussian on every ``lora_A`` weight with σ = G² and every
  other tensor (``lora_B``, biases, the head) point-estimated (a Delta guide, i.e. MAP under the prior).
* :func:`flipout` – BLoB's flipout estimator (Wen et al., ICLR 2018) for the ``lora_A`` noise: the layer
  runs with the mean M and adds ``((x ∘ s) ΔAᵀ) ∘ r`` with per-example random signs s, r, so every
  example sees its own weight sample M + ΔA ∘ (r sᵀ) at the cost of one sample per step.
* :func:`local_param_store` – every guide/SVI call runs against a param store private to one posterior.

Site names are the ``named_parameters`` names with ``"."`` replaced by ``"__"`` (autoguides read dots
as nesting); :func:`site_names` keeps the mapping and refuses collisions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoNormal, init_to_value

from ..function import AdapterFn
from ..likelihoods import Likelihood

GUIDES = ("meanfield", "lowrank", "blob")
GAUSSIAN_KINDS = ("lora_A", "lora_embedding_A")  # the tensors BLoB treats as random


def site_names(names: list[str]) -> dict[str, str]:
    """Map parameter names to Pyro site names (``"."`` → ``"__"``); refuses names that would collide."""
    sites = {n: n.replace(".", "__") for n in names}
    if len(set(sites.values())) != len(sites):
        raise ValueError(
            "params: two adapter tensor names map to the same Pyro site name after replacing '.' by '__'; "
            "rename the modules or narrow AdapterParams(include=/exclude=)."
        )
    return sites


@contextlib.contextmanager
def local_param_store(state: dict) -> Iterator[dict]:
    """Swap Pyro's global param store for ``state`` (``{"params", "constraints"}``) for the duration.

    New params are written back into ``state`` on exit; the global store's previous contents are restored.
    """
    with pyro.get_param_store().scope(state) as s:
        yield s


class AdapterModel:
    """The Pyro model ``model(batch, beta=1.0, flipout=False)`` over the adapter tensors.

    The log joint it defines for a batch of B of the N training examples is scaled by 1/N::

        (1/B) Σ_b log p(y_b | f_θ(x_b)) + (β/N) log N(θ; μ₀, σ₀² I)

    so the ELBO Pyro optimises is the per-example ELBO (with the KL multiplied by β); the guide is
    scaled by β/N to match (:meth:`scaled_guide`).

    Args:
        fn: the AdapterFn (logits ``[B, C]`` for adapter values).
        prior_loc: μ₀ per parameter name (float32, on ``fn.device``).
        prior_std: σ₀ = λ^{-1/2}.
        num_data: N, the size of the training set (the plate size).
        likelihood: the :class:`~bayeslora.likelihoods.Likelihood` of the labels (None: the readout's,
            ``fn.likelihood``).
    """

    def __init__(self, fn: AdapterFn, prior_loc: Mapping[str, torch.Tensor], prior_std: float, num_data: int,
                 likelihood: Likelihood | None = None):  # fmt: skip
        self.fn = fn
        self.sites = site_names(fn.params.names)
        self.prior_loc = dict(prior_loc)
        self.prior_std = float(prior_std)
        self.num_data = int(num_data)
        self.likelihood = fn.likelihood if likelihood is None else likelihood
        self.dtypes = {n: p.dtype for n, p in fn.params.tensors().items()}
        self.guide = None  # set to a BlobGuide for flipout
        self.nll: list[torch.Tensor] = []  # mean NLL of each model call (detached), for progress reports

    def prior(self, name: str) -> dist.Distribution:
        loc = self.prior_loc[name]
        return dist.Normal(loc, torch.full_like(loc, self.prior_std)).to_event(loc.dim())

    def __call__(self, batch: Mapping[str, torch.Tensor], beta: float = 1.0, flipout: bool = False) -> torch.Tensor:
        values = {}
        with poutine.scale(scale=beta / self.num_data):
            for name, site in self.sites.items():
                values[name] = pyro.sample(site, self.prior(name))
        labels = self.fn.labels(batch)
        idx = torch.arange(labels.shape[0], device=labels.device)
        with poutine.scale(scale=1.0 / self.num_data), pyro.plate("data", self.num_data, subsample=idx):
            deltas = {}
            if flipout and self.guide is not None:
                for name in self.guide.gaussian:
                    mean = self.guide.loc(self.sites[name])
                    deltas[name], values[name] = values[name] - mean, mean
            with flipout_hooks(self.fn, deltas):
                out = self.fn({n: v.to(self.dtypes[n]) for n, v in values.items()}, batch)
            d = self.observation(out)
            self.nll.append(-d.log_prob(labels).detach().mean())
            pyro.sample("y", d, obs=labels)
        return out

    def observation(self, out: torch.Tensor) -> dist.Distribution:
        """The distribution of the labels given the outputs: the likelihood's (:mod:`bayeslora.likelihoods`)."""
        return self.likelihood.observation(out)


class BlobGuide:
    """BLoB's guide: q(A) = N(M, diag(G²)²) per ``lora_A`` weight, Delta(μ) for every other tensor.

    Parameters live in the (local) Pyro param store as ``blob.loc.<site>`` and ``blob.g.<site>``; σ = G²
    as in BLoB (initialised to ``init_scale``, i.e. G = √init_scale).

    Args:
        sites: parameter name → site name.
        init: initial values (the MAP / current adapter) per parameter name.
        gaussian: parameter names with a Gaussian factor (the ``lora_A`` weights).
        init_scale: initial σ of the Gaussian factors.
    """

    def __init__(self, sites: Mapping[str, str], init: Mapping[str, torch.Tensor], gaussian: list[str],
                 init_scale: float):  # fmt: skip
        self.sites = dict(sites)
        self.names = {s: n for n, s in self.sites.items()}
        self.init = {n: v.detach().clone() for n, v in init.items()}
        self.gaussian = list(gaussian)
        self.init_scale = float(init_scale)

    def loc(self, site: str) -> torch.Tensor:
        return pyro.param(f"blob.loc.{site}", lambda: self.init[self.names[site]].clone())

    def g(self, site: str) -> torch.Tensor:
        init = self.init[self.names[site]]
        return pyro.param(f"blob.g.{site}", lambda: torch.full_like(init, self.init_scale**0.5))

    def __call__(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        out = {}
        for name, site in self.sites.items():
            loc = self.loc(site)
            if name in self.gaussian:
                out[site] = pyro.sample(site, dist.Normal(loc, self.g(site) ** 2).to_event(loc.dim()))
            else:
                out[site] = pyro.sample(site, dist.Delta(loc, event_dim=loc.dim()))
        return out

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return {site: self.loc(site).detach() for site in self.sites.values()}


def is_spread_param(name: str) -> bool:
    """True for a guide parameter that sets the posterior's spread, not its location: AutoNormal's
    ``scales``, the low-rank guide's ``scale`` and ``cov_factor``, BLoB's ``g`` (σ = G²)."""
    parts = name.split(".")  # "<Guide>.<param>[.<site>]", e.g. "AutoNormal.scales.<site>"
    return (len(parts) > 1 and parts[1] in {"scales", "scale", "cov_factor"}) or name.startswith("blob.g.")


def make_guide(kind: str, model: AdapterModel, init: Mapping[str, torch.Tensor], init_scale: float, rank: int):
    """Build the guide ``kind`` for ``model``, initialised at ``init`` (values by parameter name)."""
    init_sites = {model.sites[n]: v.detach().clone().float() for n, v in init.items()}
    if kind == "meanfield":
        return AutoNormal(model, init_loc_fn=init_to_value(values=init_sites, fallback=None), init_scale=init_scale)
    if kind == "lowrank":
        return AutoLowRankMultivariateNormal(
            model, init_loc_fn=init_to_value(values=init_sites, fallback=None), init_scale=init_scale, rank=rank
        )
    if kind == "blob":
        gaussian = [g.weight for g in model.fn.params.groups if g.kind in GAUSSIAN_KINDS]
        guide = BlobGuide(model.sites, {n: v.float() for n, v in init.items()}, gaussian, init_scale)
        model.guide = guide
        return guide
    raise ValueError(f"guide: expected one of {GUIDES}, got {kind!r}.")


def scaled_guide(guide, num_data: int):
    """The guide with every site scaled by β/N, matching :class:`AdapterModel`'s prior scaling."""

    def run(batch, beta: float = 1.0, flipout: bool = False):
        with poutine.scale(scale=beta / num_data):
            return guide(batch, beta, flipout)

    return run


@contextlib.contextmanager
def flipout_hooks(fn: AdapterFn, deltas: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Add flipout noise ``((x ∘ s) ΔAᵀ) ∘ r`` to the output of each ``lora_A`` Linear named in ``deltas``.

    The layer itself runs with the mean weight; s ``[B, …, in]`` and r ``[B, …, r]`` are random signs drawn
    once per example (shared over its tokens), so example b uses the weight M + ΔA ∘ (r_b s_bᵀ), which has
    the distribution of M + ΔA. Hooks are removed on exit.
    """
    handles = []
    try:
        for group in fn.params.groups:
            if group.weight in deltas and group.kind == "lora_A" and isinstance(group.module, torch.nn.Linear):
                handles.append(group.module.register_forward_hook(_flipout_hook(deltas[group.weight])))
        yield
    finally:
        for h in handles:
            h.remove()


def _flipout_hook(delta: torch.Tensor):
    def hook(module, inputs, output):
        x = inputs[0]
        shape = (x.shape[0],) + (1,) * (x.dim() - 2)
        s = _signs((*shape, x.shape[-1]), x)
        r = _signs((*shape, delta.shape[0]), x)
        return output + ((x * s) @ delta.to(x.dtype).t()) * r

    return hook


def _signs(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, device=like.device, dtype=like.dtype).bernoulli_(0.5).mul_(2).sub_(1)


__all__ = ["GUIDES", "AdapterModel", "BlobGuide", "flipout_hooks", "local_param_store", "make_guide", "site_names",
           "scaled_guide"]  # fmt: skip
