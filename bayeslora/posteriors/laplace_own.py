"""The own Laplace engine: K-FAC / diagonal curvature, the evidence, the prior fit and the GLM predictive.

Around the MAP ``θ*`` the posterior is ``N(θ*, P⁻¹)`` with, per layer ``ℓ`` (a LoRA ``A`` or ``B``
matrix, or the head ``[W | b]``), ``P_ℓ = N · K_ℓ + λ_ℓ I`` where ``K_ℓ`` is the per-example GGN
(or Fisher) block — Kronecker-factored ``G ⊗ A`` (Ritter, Botev & Barber, ICLR 2018) or its exact
diagonal — and ``λ`` is the precision of the prior ``N(0, λ⁻¹ I)`` (MacKay 1992; Daxberger et al.,
NeurIPS 2021; for LoRA: Yang, Robeyns, Wang & Aitchison, "Bayesian low-rank adaptation for large
language models", ICLR 2024). See :mod:`.kfac` for the curvature conventions and :mod:`.glm` for
the predictive.

Everything is computed in the eigenbasis of the curvature: with eigenvalues ``k_p`` of ``K_ℓ``
(``g_i a_j`` for K-FAC; a low-rank side keeps the top ones, the rest count as 0),

* ``log det P_ℓ − D_ℓ log λ_ℓ = Σ_p log(1 + N k_p / λ_ℓ)``;
* log marginal likelihood (Laplace evidence; the ``2π`` terms cancel)::

      log Z(λ) = log p(D | θ*) − ½ Σ_ℓ [ Σ_p log(1 + N k_p / λ_ℓ) + λ_ℓ ||θ*_ℓ||² ],

  maximised exactly by its stationarity condition ``λ ||θ*||² = Σ_p N k_p / (N k_p + λ)`` (MacKay's
  effective number of parameters), a monotone 1-D root found by bisection on ``log λ`` — per layer
  when ``prior_per_layer``, else pooled;
* validation NLL: the GLM predictive's NLL on the validation split over a log-spaced grid of ``λ``
  (the "train_val" protocol of Yang et al. 2024) — MC in logit space for ``predictive="glm_mc"``
  (common random numbers across the grid), probit otherwise (also for ``"sampling"``). The
  Jacobians are computed once per batch; the grid costs only the eigen-reweighting. With
  ``prior_per_layer`` the grid scales the per-layer marglik solution (normalised to geometric mean 1);
* samples ``θ* + P^{-1/2} ε`` per layer in the eigenbasis (low-rank aware).

``prior_precision`` is the run's one number ``λ`` (the MAP's coupled L2); it is the prior when
``prior_fit="none"`` and the starting point otherwise.

The engine is one strategy behind :class:`~bayeslora.posteriors.laplace.Laplace` (laplace-torch is the other,
:mod:`.laplace_torch`); both take the posterior's :class:`LaplaceSettings` and the selected layer groups and offer
``fit``, ``glm_moments``, ``predict``, ``prior``, ``mean_values``, ``factor_bytes`` and a state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..function import AdapterFn, model_mode
from ..likelihoods import is_token_level
from ..params import ParamGroup
from ..predictive import Predictive
from ..progress import bar as progress_bar
from . import predictive_of, require_fitted
from .glm import coordinates, functional_covariance, glm_predictive
from .kfac import Factor, as_matrix, factor_from_state, fit_curvature, from_matrix

DEFAULT_SAMPLES = {"glm_probit": 1, "glm_mc": 1000, "sampling": 32}
PRIOR_BOUNDS = (1e-8, 1e8)


@dataclass(frozen=True)
class LaplaceSettings:
    """What an engine needs to know of the posterior's options (validated by :class:`Laplace`)."""

    structure: str = "kron"
    fisher: str = "ggn"
    mc_samples: int = 1
    kfac_approx: str = "reduce"
    rank: int | None = 32
    lowrank_threshold: int = 1024
    predictive: str = "glm_probit"
    n_samples: int | None = None
    prior_precision: float = 1.0
    prior_fit: str = "marglik"
    prior_per_layer: bool = False
    prior_grid: tuple[float, float, int] = (1e-4, 1e6, 101)
    chunk_size: int | None = None
    seed: int = 0

    def samples(self) -> int:
        """The default number of predictive samples of the configured predictive."""
        return self.n_samples or DEFAULT_SAMPLES[self.predictive]


class OwnLaplace:
    """The own engine (module docstring)."""

    def __init__(self, settings: LaplaceSettings):
        self.s = settings
        self.factors: list[Factor] | None = None

    def fit(self, fn: AdapterFn, loader, groups: Sequence[ParamGroup], val_loader, num_data: int) -> None:
        self.groups = list(groups)
        self.values = fn.params.values()
        self.names = [list(g.names) for g in groups]
        generator = torch.Generator(device=fn.device).manual_seed(self.s.seed)
        with model_mode(fn.model, False):
            curv = fit_curvature(
                fn, loader, groups, self.values, structure="diag" if self.s.structure == "diag" else "kron",
                fisher=self.s.fisher, mc_samples=self.s.mc_samples, kfac_approx=self.s.kfac_approx, rank=self.s.rank,
                lowrank_threshold=self.s.lowrank_threshold, generator=generator,
            )  # fmt: skip
        self.factors, self.loss, self.num_data = curv.factors, curv.loss, num_data
        self.optimize_prior(fn, groups, self.s.prior_fit, val_loader, self.s.prior_grid)

    def optimize_prior(self, fn: AdapterFn, groups, method: str, val_loader=None, grid=None) -> torch.Tensor:
        """Set λ: ``"none"`` (``prior_precision``), ``"marglik"`` or ``"val_nll"`` (on ``grid``); returns it."""
        self.groups = list(groups)
        if method == "marglik":
            self.prior = self.fit_marglik()
        elif method == "val_nll":
            self.prior = self.fit_val_nll(fn, val_loader, grid)
        else:
            self.prior = torch.full((len(self.names),), self.s.prior_precision, dtype=torch.float64)
        return self.prior

    def _sq_norms(self) -> torch.Tensor:
        return torch.tensor([sum(float(self.values[n].double().square().sum()) for n in names) for names in self.names])

    def log_marglik(self, prior: torch.Tensor | float | None = None) -> float:
        """Laplace log marginal likelihood (module docstring) at ``prior`` (default: the fitted λ)."""
        require_fitted(self, "factors")
        lam = self._prior_vector(self.prior if prior is None else prior)
        total = -self.loss
        for factor, sq, lam_i in zip(self.factors, self._sq_norms().tolist(), lam.tolist()):
            total -= 0.5 * (float(torch.log1p(self.num_data * factor.eigenvalues().cpu() / lam_i).sum()) + lam_i * sq)
        return total

    def fit_marglik(self) -> torch.Tensor:
        """The λ (``[L]``) maximising :meth:`log_marglik`, scalar or per layer (bisection on log λ)."""
        eig = [self.num_data * f.eigenvalues().reshape(-1).double().cpu() for f in self.factors]
        sq = self._sq_norms()
        if not self.s.prior_per_layer:
            eig, sq = [torch.cat(eig)], sq.sum()[None]
        lo = torch.full((len(eig),), math.log(PRIOR_BOUNDS[0]), dtype=torch.float64)
        hi = torch.full_like(lo, math.log(PRIOR_BOUNDS[1]))
        for _ in range(100):  # λ·||θ||² − γ(λ) is increasing in λ
            mid = 0.5 * (lo + hi)
            lam = mid.exp()
            gamma = torch.stack([(e / (e + l)).sum() for e, l in zip(eig, lam)])
            up = lam * sq - gamma > 0
            hi, lo = torch.where(up, mid, hi), torch.where(up, lo, mid)
        lam = (0.5 * (lo + hi)).exp()
        return lam if self.s.prior_per_layer else lam.expand(len(self.factors)).clone()

    def fit_val_nll(self, fn: AdapterFn, val_loader, grid=None) -> torch.Tensor:
        """The λ (``[L]``) on the grid (``[low, high, points]``; default the settings') minimising the validation
        NLL of the GLM predictive (of the sampling predictive for a token-level likelihood)."""
        if is_token_level(fn.likelihood):
            return self.fit_val_nll_sampling(fn, val_loader, grid)
        low, high, points = grid or self.s.prior_grid
        points = int(points)
        grid = torch.logspace(math.log10(low), math.log10(high), points, dtype=torch.float64)
        base = torch.ones(len(self.factors), dtype=torch.float64)
        if self.s.prior_per_layer:
            base = self.fit_marglik()
            base = base / base.log().mean().exp()
        candidates = grid[:, None] * base[None, :]  # [K, L]
        nll = torch.zeros(points, dtype=torch.float64)
        generator = torch.Generator(device=fn.device)
        link = "glm_mc" if self.s.predictive == "glm_mc" else "glm_probit"  # "sampling" tunes λ with the probit
        groups = self.match_groups(fn, self.groups)
        n = 0
        with model_mode(fn.model, False):
            for batch in progress_bar(val_loader, desc="prior precision (val NLL grid)"):
                coords = coordinates(fn, self.values, groups, self._on(fn.device), batch, self.s.chunk_size)
                cov = functional_covariance(coords, self.factors, self.num_data, candidates.to(fn.device))
                labels = fn.labels(batch)
                for k in range(points):
                    generator.manual_seed(self.s.seed)
                    pred = glm_predictive(fn.likelihood, coords.mean, cov[k], link, self.s.samples(), generator)
                    nll[k] -= float(pred.log_likelihood(labels).sum())
                n += labels.shape[0]
        if n == 0:
            raise ValueError("val_loader: yielded no batches; prior_fit='val_nll' needs a non-empty validation split.")
        self.val_curve = {"prior": grid.tolist(), "nll": (nll / n).tolist()}
        return candidates[int(torch.argmin(nll))].clone()

    def fit_val_nll_sampling(self, fn: AdapterFn, val_loader, grid=None) -> torch.Tensor:
        """The λ (one scalar for all layers) on the grid minimising the validation NLL per target token of the
        sampling predictive (``samples()`` weight draws per batch, the same normal draws for every λ)."""
        low, high, points = grid or self.s.prior_grid
        grid = torch.logspace(math.log10(low), math.log10(high), int(points), dtype=torch.float64)
        groups, fitted = self.match_groups(fn, self.groups), getattr(self, "prior", None)
        nll, count = torch.zeros(len(grid), dtype=torch.float64), 0
        generator = torch.Generator(device=fn.device)
        try:
            with torch.no_grad(), model_mode(fn.model, False):
                for batch in progress_bar(val_loader, desc="prior precision (val NLL grid, sampling)"):
                    for k, lam in enumerate(grid.tolist()):
                        self.prior = torch.full((len(self.factors),), lam, dtype=torch.float64)
                        generator.manual_seed(self.s.seed)
                        values = self.sample(fn, groups, self.s.samples(), generator)
                        pred = predictive_of(fn, batch, (fn(v, batch) for v in values))
                        nll[k] -= float(pred.log_probs.double().sum())
                    count += int(pred.targets.numel())
        finally:
            self.prior = fitted
        if count == 0:
            raise ValueError(
                "val_loader: holds no target tokens; prior_fit='val_nll' needs a non-empty validation split."
            )
        self.val_curve = {"prior": grid.tolist(), "nll": (nll / count).tolist()}
        return torch.full((len(self.factors),), float(grid[int(torch.argmin(nll))]), dtype=torch.float64)

    def _prior_vector(self, prior) -> torch.Tensor:
        lam = torch.as_tensor(prior, dtype=torch.float64).reshape(-1).cpu()
        if lam.numel() == 1:
            lam = lam.expand(len(self.factors))
        if lam.numel() != len(self.factors) or not (lam > 0).all():
            raise ValueError(f"prior: expected a positive scalar or {len(self.factors)} values, got {lam.tolist()}.")
        return lam

    def match_groups(self, fn: AdapterFn, selected: Sequence[ParamGroup]) -> list[ParamGroup]:
        """The groups of ``fn`` (``selected`` by the posterior) matching the fitted ones, else a clear error."""
        require_fitted(self, "factors")
        groups = {g.names: g for g in selected}
        missing = [names for names in self.names if tuple(names) not in groups]
        if missing or len(groups) != len(self.names):
            raise ValueError(
                f"fn: the model's adapter tensors do not match the fitted posterior (missing {missing[:2]}, "
                f"{len(groups)} layers selected vs {len(self.names)} fitted); load it into the same model, adapter "
                "name and params include/exclude."
            )
        fn.params.check(self.values, argument="posterior values")
        return [groups[tuple(names)] for names in self.names]

    def _on(self, device) -> list[Factor]:
        """The factors (and MAP values) on ``device`` (moved once, e.g. after loading)."""
        if self.factors and self.factors[0].eigenvalues().device != torch.device(device):
            moved = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in f.state().items()} for f in self.factors]
            self.factors = [factor_from_state(m, f"factor {i}") for i, m in enumerate(moved)]
            self.values = {k: v.to(device) for k, v in self.values.items()}
        return self.factors

    def mean_values(self) -> dict[str, torch.Tensor]:
        return require_fitted(self, "values")

    def glm_moments(
        self, fn: AdapterFn, selected: Sequence[ParamGroup], batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """GLM predictive ``(f_μ [B, C] float32, f_Σ [B, C, C] float64)`` for one batch."""
        groups = self.match_groups(fn, selected)
        with model_mode(fn.model, False):
            coords = coordinates(fn, self.values, groups, self._on(fn.device), batch, self.s.chunk_size)
        return coords.mean, functional_covariance(coords, self.factors, self.num_data, self.prior.to(fn.device))

    def predict(self, fn: AdapterFn, selected, batch, n_samples: int, generator) -> Predictive:
        """Probit logits ``[1, B, C]`` (with the MI of the logit Gaussian), or ``n_samples`` samples ``[S, B, C]``;
        for a Gaussian likelihood the exact GLM predictive ``N(f_μ, f_Σ + σ²)`` (:func:`.glm.glm_predictive`)."""
        if self.s.predictive == "sampling":
            with torch.no_grad(), model_mode(fn.model, False):
                values = self.sample(fn, selected, n_samples, generator)
                return predictive_of(fn, batch, (fn(v, batch) for v in values))
        mean, cov = self.glm_moments(fn, selected, batch)
        return glm_predictive(fn.likelihood, mean, cov, self.s.predictive, n_samples, generator, with_epistemic=True,
                              seed=self.s.seed)  # fmt: skip

    def sample(
        self, fn: AdapterFn, selected: Sequence[ParamGroup], n_samples: int, generator=None
    ) -> list[dict[str, torch.Tensor]]:
        """Weight samples ``θ* + P^{-1/2} ε`` (all adapter tensors; non-random ones at the MAP)."""
        groups, factors = self.match_groups(fn, selected), self._on(fn.device)
        out = []
        for _ in range(n_samples):
            values = dict(self.values)
            for group, factor, lam in zip(groups, factors, self.prior.tolist()):
                mean = as_matrix(self.values, group).to(fn.device)
                eps = torch.randn(mean.shape, generator=generator, device=fn.device, dtype=torch.float64)
                z = factor.project(eps)
                w = (self.num_data * factor.eigenvalues().to(z.device) + lam).rsqrt()
                delta = factor.unproject(z * w)
                if not factor.full:
                    delta = delta + (eps - factor.unproject(z)) / math.sqrt(lam)
                theta = (mean.double() + delta).to(mean.dtype)
                values.update(from_matrix(theta, group))
            out.append(values)
        return out

    def factor_bytes(self) -> int:
        """Persistent memory of the fitted curvature (eigenbases and eigenvalues), in bytes."""
        tensors = [v for f in require_fitted(self, "factors") for v in f.state().values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def state_dict(self) -> dict[str, Any]:
        require_fitted(self, "factors")
        return {
            "structure": self.s.structure,
            "names": self.names,
            "values": {k: v.detach().cpu() for k, v in self.values.items()},
            "factors": [{k: v.cpu() if torch.is_tensor(v) else v for k, v in f.state().items()} for f in self.factors],
            "prior": self.prior.cpu(),
            "num_data": self.num_data,
            "loss": self.loss,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["structure"] != self.s.structure:
            raise ValueError(f"state: saved with structure={state['structure']!r}; this one is {self.s.structure!r}.")
        missing = [k for k in ("names", "values", "factors", "prior", "num_data", "loss") if k not in state]
        if missing:
            raise ValueError(f"state: fields {missing} are missing; pass a Laplace.state_dict().")
        num_data = state["num_data"]
        if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1:
            raise ValueError(f"state['num_data']: expected the training-set size N >= 1, got {num_data!r}.")
        if len(state["factors"]) != len(state["names"]):
            raise ValueError(
                f"state['factors']: {len(state['factors'])} factors for {len(state['names'])} layers; expected one "
                "each."
            )
        self.names = [list(n) for n in state["names"]]
        self.values = dict(state["values"])
        self.factors = [factor_from_state(f, f"state['factors'][{i}]") for i, f in enumerate(state["factors"])]
        self.prior = self._prior_vector(state["prior"])
        self.num_data, self.loss = int(num_data), float(state["loss"])
