"""Variational inference over the LoRA adapter tensors with Pyro (SVI, autoguides, BLoB).

Bayes by backprop (Blundell et al., ICML 2015) on the selected adapter tensors θ, written the Pyro way
so guides and ELBOs can be swapped with Pyro's own tools: the model is a functional Pyro model over θ
(:class:`~bayeslora.posteriors.vi_guides.AdapterModel`; the HF model is not converted to a PyroModule),
trained with :class:`pyro.infer.SVI` and ``ClippedAdam``. Guides:

* ``"meanfield"`` (``vi_meanfield``): ``AutoNormal`` initialised at the current adapter (the MAP);
* ``"lowrank"`` (``vi_lowrank``): ``AutoLowRankMultivariateNormal`` with an explicit small ``rank``
  (Pyro's default rank √D would need a D×√D factor: tens of GB at 7B, so ``rank=None`` is refused);
* ``"blob"`` (``vi_blob``): BLoB (Wang et al., NeurIPS 2024): Gaussian q(A) with σ = G² on every
  ``lora_A`` weight, everything else point-estimated, one sample per step with flipout.

Objective (minimised per step on a batch of B of the N training examples; ``num_particles`` samples)::

    L(φ) = E_q[ (1/B) Σ_b -log p(y_b | f_θ(x_b)) ] + (β_t / N) · KL(q_φ(θ) ‖ N(μ₀, λ⁻¹ I))

the negative ELBO per training example with the KL weighted by β_t = ``kl_weight`` · min(1, (t+1) /
``kl_warmup_steps``) (β = 1: the exact ELBO). The data term is scaled to the full data set by the
plate (N/B) and everything by 1/N. The KL is estimated by Monte Carlo (``elbo="trace"``) or, with
``elbo="meanfield"`` (``TraceMeanField_ELBO``), analytically where the guide allows it (the Gaussian
``lora_A`` sites of the blob guide; Pyro's autoguides sample through auxiliary sites, so their KL stays
Monte Carlo). The prior is the project's one-number prior: σ₀ = ``prior_precision``^{-1/2}, mean 0
(``prior_mean="zero"``, the prior the MAP was trained under) or the initial adapter (``"init"``). BLoB's
own setting (prior std 0.2 on A, KL divided by the number of batches while the NLL is averaged)
corresponds to ``prior_precision=25`` and ``kl_weight`` ≈ batch size.

The likelihood is the network in eval mode (no dropout): all weight noise comes from q. Fitting starts
from the adapter currently in the model (the MAP the runner trains first, or a fresh LoRA init) and
never changes the model's parameters. Pyro's param store is private to each posterior
(:meth:`Variational.param_store`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import ClippedAdam

from ..data.collate import dataset_size
from ..function import AdapterFn, model_mode
from ..likelihoods import LIKELIHOODS, likelihood_from_config
from ..predictive import Predictive
from ..progress import bar as progress_bar
from ..rng import forked, seed_from, seeded
from ..validate import positive
from . import Needs, predictive_of, registered_name, require_fitted, sample_count
from .vi_guides import (
    GUIDES,
    AdapterModel,
    is_spread_param,
    local_param_store,
    make_guide,
    scaled_guide,
)

# the methods this module registers (bayeslora.posteriors.discover)
REGISTER = {
    "vi_meanfield": ("Variational", {"guide": "meanfield"}),
    "vi_lowrank": ("Variational", {"guide": "lowrank"}),
    "vi_blob": ("Variational", {"guide": "blob"}),
}

ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}
FINAL_LR_FRACTION = 0.1  # ClippedAdam's lr decays geometrically to this fraction over a fit
# Initial posterior std per guide (init_scale=None), chosen by validation NLL post hoc from a MiniLM SST-2 MAP
# (paper/tables/minilm_vi_tuning.md) like the epochs / scale_lr defaults.
INIT_SCALE = {"meanfield": 5e-2, "lowrank": 5e-2, "blob": 1e-2}


class Variational:
    """Variational posterior over the selected adapter tensors, fit with Pyro SVI.

    Args:
        guide: ``"meanfield"`` | ``"lowrank"`` | ``"blob"`` (fixed by the registry name).
        steps: SVI steps (None: ``epochs`` passes over the loader).
        epochs: passes over the loader when ``steps`` is None (may be fractional; default 5, chosen post hoc
            from a MAP by validation NLL on MiniLM SST-2).
        lr: ClippedAdam learning rate (decays geometrically to 10% over the fit).
        scale_lr: learning rate of the guide's spread parameters (AutoNormal scales, the low-rank guide's
            scale and covariance factor, BLoB's G), None: ``lr``. Adam moves a parameter by about its
            learning rate per step, so a fit of a few hundred steps at ``lr=1e-3`` leaves σ near
            ``init_scale`` (a post-hoc fit from the MAP then predicts like the MAP); a larger ``scale_lr``
            lets σ reach the ELBO's optimum without shaking the means off the MAP.
        num_particles: samples of θ per step.
        elbo: ``"trace"`` (Trace_ELBO) | ``"meanfield"`` (TraceMeanField_ELBO, analytic KL where possible) |
            None (``"meanfield"`` for the blob guide, ``"trace"`` otherwise).
        kl_weight: β, the weight of the KL term (1: the ELBO).
        kl_warmup_steps: linear warm-up of β over this many steps (0: none).
        rank: rank of the low-rank guide's covariance factor (``"lowrank"`` only; must be given).
        init_scale: initial posterior std of every Gaussian factor (capped at the prior std); None: the guide's
            default (:data:`INIT_SCALE`).
        prior_precision: λ; the prior is N(μ₀, λ⁻¹ I) over the selected tensors.
        prior_mean: ``"zero"`` (μ₀ = 0) or ``"init"`` (μ₀ = the adapter at the start of the fit).
        flipout: BLoB's flipout estimator for the ``lora_A`` noise during training (``"blob"`` only).
        n_samples: default number of posterior samples in :meth:`predict` (0: the posterior-mean predictive).
        likelihood: None (the readout's likelihood, ``fn.likelihood``: categorical for classification), or an
            override: ``"categorical"`` or ``"gaussian"`` (regression on ``labels`` ``[B, C]``,
            for tests and conjugate checks).
        noise_std: observation std of the Gaussian likelihood.
        progress: show a tqdm bar with the ELBO, NLL and KL.
        seed: seeds the guide's sampling and the loader's shuffling during the fit.
    """

    needs = Needs()

    def __init__(
        self,
        guide: str = "meanfield",
        *,
        steps: int | None = None,
        epochs: float = 5.0,
        lr: float = 1e-3,
        scale_lr: float | None = 1e-2,
        num_particles: int = 1,
        elbo: str | None = None,
        kl_weight: float = 1.0,
        kl_warmup_steps: int = 0,
        rank: int | None = 8,
        init_scale: float | None = None,
        prior_precision: float = 1.0,
        prior_mean: str = "zero",
        flipout: bool = True,
        n_samples: int = 16,
        likelihood: str | None = None,
        noise_std: float = 1.0,
        progress: bool = True,
        seed: int = 0,
    ):
        if guide not in GUIDES:
            raise ValueError(f"guide: expected one of {GUIDES}, got {guide!r}; e.g. method=vi_meanfield.")
        if guide == "lowrank":
            if rank is None:
                raise ValueError(
                    "rank: the low-rank guide needs an explicit rank (e.g. rank=8); rank=None would let Pyro use "
                    "√D, a D×√D covariance factor (tens of GB for a 7B model)."
                )
            positive("rank", rank, int)
        elbo = elbo if elbo is not None else ("meanfield" if guide == "blob" else "trace")
        init_scale = INIT_SCALE[guide] if init_scale is None else init_scale
        if elbo not in ELBOS:
            raise ValueError(f"elbo: expected one of {sorted(ELBOS)} or None, got {elbo!r}.")
        if prior_mean not in ("zero", "init"):
            raise ValueError(f"prior_mean: expected 'zero' or 'init', got {prior_mean!r}.")
        if likelihood is not None and likelihood not in LIKELIHOODS:
            raise ValueError(
                f"likelihood: expected None (the readout's) or one of {sorted(LIKELIHOODS)}, got {likelihood!r}."
            )
        if steps is not None:
            positive("steps", steps, int)
        else:
            positive("epochs", epochs)
        positive("num_particles", num_particles, int)
        for name, value in (("lr", lr), ("kl_weight", kl_weight), ("init_scale", init_scale),
                            ("prior_precision", prior_precision), ("noise_std", noise_std)):  # fmt: skip
            positive(name, value)
        if scale_lr is not None:
            positive("scale_lr", scale_lr)
        if not isinstance(kl_warmup_steps, int) or kl_warmup_steps < 0:
            raise ValueError(f"kl_warmup_steps: expected an integer >= 0, got {kl_warmup_steps!r}.")
        if not isinstance(n_samples, int) or n_samples < 0:
            raise ValueError(f"n_samples: expected an integer >= 0 (0: posterior mean), got {n_samples!r}.")
        self.guide_kind = guide
        self.name = registered_name("bayeslora.posteriors.vi:Variational", guide=guide)
        self.steps, self.epochs, self.lr, self.num_particles = steps, float(epochs), float(lr), int(num_particles)
        self.scale_lr = float(scale_lr) if scale_lr is not None else None
        self.elbo, self.kl_weight, self.kl_warmup_steps = elbo, float(kl_weight), int(kl_warmup_steps)
        self.rank = int(rank) if rank is not None else None
        self.init_scale, self.prior_precision, self.prior_mean = float(init_scale), float(prior_precision), prior_mean
        self.flipout, self.n_samples = bool(flipout), int(n_samples)
        self.likelihood, self.noise_std = likelihood, float(noise_std)
        self.progress, self.seed = bool(progress), int(seed)
        self.model: AdapterModel | None = None
        self.guide = None
        self.history: dict[str, list[float]] = {"loss": [], "nll": [], "kl": [], "kl_weight": []}
        self._store: dict = {"params": {}, "constraints": {}}
        self._svi: SVI | None = None
        self._pending: Mapping[str, Any] | None = None
        self._num_steps = 0

    @property
    def prior_std(self) -> float:
        """σ₀ = λ^{-1/2}."""
        return self.prior_precision**-0.5

    # ------------------------------------------------------------------ setup
    def param_store(self):
        """Context manager: Pyro's global param store swapped for this posterior's own (e.g. for pyro tools)."""
        return local_param_store(self._store)

    def bind(self, fn: AdapterFn, num_data: int, total_steps: int | None = None,
             prior_loc: Mapping[str, torch.Tensor] | None = None) -> Variational:  # fmt: skip
        """Build the Pyro model, the guide (initialised at the current adapter) and SVI; clears earlier fits.

        Args:
            fn: the AdapterFn.
            num_data: N, the training-set size (the plate size).
            total_steps: steps the learning rate decays over (None: constant lr).
            prior_loc: μ₀ per parameter name (default: zeros or the current adapter, per ``prior_mean``).
        """
        positive("num_data", num_data, int)
        init = fn.params.values()
        dev = fn.device
        if prior_loc is None:
            prior_loc = {n: (v.float() if self.prior_mean == "init" else torch.zeros_like(v, dtype=torch.float32))
                         for n, v in init.items()}  # fmt: skip
        prior_loc = {n: v.detach().to(dev, torch.float32).clone() for n, v in prior_loc.items()}
        if self.guide_kind == "lowrank" and self.rank > fn.params.numel:
            raise ValueError(
                f"rank: expected at most D={fn.params.numel} (the number of adapter values), got {self.rank}."
            )
        likelihood = None
        if self.likelihood is not None:
            options = {"noise_std": self.noise_std} if self.likelihood == "gaussian" else {}
            likelihood = likelihood_from_config({"name": self.likelihood, **options})
        self.model = AdapterModel(fn, prior_loc, self.prior_std, num_data, likelihood)
        scale = min(self.init_scale, self.prior_std)
        self.guide = make_guide(self.guide_kind, self.model, init, scale, self.rank)
        lrd = FINAL_LR_FRACTION ** (1.0 / total_steps) if total_steps else 1.0
        optim = ClippedAdam(self._optim_args(lrd))
        loss = ELBOS[self.elbo](num_particles=self.num_particles)
        self._svi = SVI(self.model, scaled_guide(self.guide, num_data), optim, loss)
        self._store = {"params": {}, "constraints": {}}
        self._fn, self._pending, self._num_steps = fn, None, 0
        self.history = {"loss": [], "nll": [], "kl": [], "kl_weight": []}
        return self

    def _optim_args(self, lrd: float):
        base = {"lr": self.lr, "lrd": lrd, "clip_norm": 10.0}
        if self.scale_lr is None:
            return base
        spread = {**base, "lr": self.scale_lr}
        return lambda name: spread if is_spread_param(name) else base

    def _beta(self) -> float:
        if not self.kl_warmup_steps:
            return self.kl_weight
        return self.kl_weight * min(1.0, (self._num_steps + 1) / self.kl_warmup_steps)

    def _check_fn(self, fn: AdapterFn) -> None:
        if fn is not getattr(self, "_fn", None):
            raise ValueError(
                "fn: this posterior was bound to a different AdapterFn; call fit(fn, loader) or bind(fn, N)."
            )

    # ------------------------------------------------------------------ training
    def step(self, fn: AdapterFn, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """One SVI step on ``batch`` (the timeable unit); returns ``{"loss", "nll", "kl", "kl_weight"}``.

        ``loss`` is the objective L above, ``nll`` the mean NLL of the batch under the sampled θ and ``kl``
        the (Monte Carlo or analytic) KL estimate. Requires :meth:`bind` (or :meth:`fit`) first.
        """
        if self._svi is None:
            raise RuntimeError("Variational.step: call bind(fn, num_data) (or fit) first.")
        self._check_fn(fn)
        beta = self._beta()
        flipout = self.flipout and self.guide_kind == "blob"
        self.model.nll.clear()
        with self.param_store(), model_mode(fn.model, False):
            loss = self._svi.step(batch, beta, flipout)
        nll = float(torch.stack(self.model.nll[-self.num_particles :]).mean())
        if not math.isfinite(loss):
            raise ValueError(
                f"loss: non-finite ELBO loss {loss} at SVI step {self._num_steps}; lower lr (now {self.lr}) or "
                f"init_scale (now {self.init_scale}), or check the data/labels."
            )
        stats = {"loss": loss, "nll": nll, "kl": (loss - nll) * self.model.num_data / beta, "kl_weight": beta}
        for k, v in stats.items():
            self.history[k].append(v)
        self._num_steps += 1
        return stats

    def fit(self, fn: AdapterFn, loader, *, val_loader=None, checkpoints=None) -> Variational:
        """Fit q by SVI, starting from the adapter currently in ``fn.model`` (the model is not changed)."""
        n = dataset_size(loader)
        total = self.steps if self.steps is not None else max(1, math.ceil(self.epochs * len(loader)))
        self.bind(fn, n, total_steps=total)
        bar = progress_bar(desc=self.name, total=total, enabled=self.progress)
        with seeded(loader, self.seed, fn.device):
            while self._num_steps < total:
                for batch in loader:
                    stats = self.step(fn, batch)
                    bar.update(1)
                    bar.set_postfix(elbo=f"{-stats['loss']:.4f}", nll=f"{stats['nll']:.4f}", kl=f"{stats['kl']:.1f}")
                    if self._num_steps >= total:
                        break
        bar.close()
        return self

    # ------------------------------------------------------------------ prediction
    def _ready(self, fn: AdapterFn, batch) -> None:
        """Make sure the guide exists and holds the fitted (or loaded) parameters."""
        if self._pending is None:
            require_fitted(self, "_svi")
            self._check_fn(fn)
            return
        state, self._pending = self._pending, None
        names = list(state["names"])
        if names != fn.params.names:
            raise ValueError(
                "fn: the adapter tensors differ from the saved posterior's (first saved "
                f"{names[:2]}, model {fn.params.names[:2]}); load it onto the same model and AdapterParams selection."
            )
        self.bind(fn, int(state["num_data"]), prior_loc=state["prior_loc"])
        with forked(fn.device), torch.no_grad(), self.param_store():
            self.guide(batch, 1.0, False)  # autoguides create their parameters lazily on the first call
        params = self._store["params"]
        if set(params) != set(state["guide"]):
            raise ValueError(
                f"state: guide parameters {sorted(state['guide'])[:3]}... do not match {sorted(params)[:3]}..."
            )
        with torch.no_grad():
            for k, v in state["guide"].items():
                if params[k].shape != v.shape:
                    raise ValueError(
                        f"state['guide'][{k!r}]: expected shape {tuple(params[k].shape)}, got {tuple(v.shape)}."
                    )
                params[k].copy_(v)
        self.history = {k: list(v) for k, v in state["history"].items()}
        self._num_steps = int(state["num_steps"])

    def _named(self, site_values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        m = self.model
        return {n: site_values[s].to(m.dtypes[n]) for n, s in m.sites.items()}

    @torch.no_grad()
    def mean(self, fn: AdapterFn, batch) -> dict[str, torch.Tensor]:
        """The posterior mean of the adapter tensors (by parameter name)."""
        self._ready(fn, batch)
        with self.param_store():
            return self._named(self.guide.median(batch, 1.0, False))

    @torch.no_grad()
    def predict(self, fn: AdapterFn, batch, *, n_samples: int | None = None, generator=None) -> Predictive:
        """Logits ``[S, B, C]`` of S guide samples (``n_samples=0``: the posterior-mean predictive ``[1, B, C]``).

        Samples come from running the guide (Pyro samples from the global RNG, so it runs under a forked
        RNG seeded from ``generator``: reproducible, and the caller's RNG is untouched).
        """
        s = sample_count(self.name, n_samples, self.n_samples)
        self._ready(fn, batch)
        with model_mode(fn.model, False):
            if s == 0:
                return predictive_of(fn, batch, [fn(self.mean(fn, batch), batch)], likelihood=self.model.likelihood)
            values = self.sample_values(fn, batch, s, generator)
            return predictive_of(fn, batch, (fn(v, batch) for v in values), likelihood=self.model.likelihood)

    @torch.no_grad()
    def sample_values(self, fn: AdapterFn, batch, n_samples: int, generator=None) -> list[dict[str, torch.Tensor]]:
        """``n_samples`` guide draws of the adapter values (the draws of :meth:`predict`: Pyro samples from the global
        RNG, so the guide runs under a forked RNG seeded from ``generator``)."""
        self._ready(fn, batch)
        with forked(fn.device, seed_from(generator)), self.param_store():
            return [self._named(self.guide(batch, 1.0, False)) for _ in range(n_samples)]

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict[str, Any]:
        keys = ("steps", "epochs", "lr", "scale_lr", "num_particles", "elbo", "kl_weight", "kl_warmup_steps", "rank",
                "init_scale", "prior_precision", "prior_mean", "flipout", "n_samples", "likelihood", "noise_std",
                "progress", "seed")  # fmt: skip
        return {"guide": self.guide_kind, **{k: getattr(self, k) for k in keys}}

    def state_dict(self) -> dict[str, Any]:
        """Guide parameters (unconstrained, by Pyro param name), prior mean, N, names, history."""
        if self._pending is not None:
            return dict(self._pending)
        require_fitted(self, "_svi")
        m = self.model
        return {
            "names": list(m.sites),
            "sites": dict(m.sites),
            "num_data": m.num_data,
            "prior_loc": {n: v.cpu() for n, v in m.prior_loc.items()},
            "guide": {k: v.detach().cpu().clone() for k, v in self._store["params"].items()},
            "history": {k: list(v) for k, v in self.history.items()},
            "num_steps": self._num_steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a fitted posterior; the guide is rebuilt on the next ``predict``/``mean`` (it needs a batch)."""
        missing = [k for k in ("names", "num_data", "prior_loc", "guide", "history", "num_steps") if k not in state]
        if missing:
            raise ValueError(f"state: not a Variational state_dict (missing {missing}); pass Variational.state_dict().")
        self._pending = dict(state)
        self._svi = None
