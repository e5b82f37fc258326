"""Laplace approximation over the LoRA adapter tensors (K-FAC, diagonal or last-layer).

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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..data.collate import dataset_size
from ..function import AdapterFn, model_mode
from ..likelihoods import FISHERS
from ..params import ParamGroup
from ..predictive import Predictive
from ..validate import choice, positive_int
from . import Needs, registered_name, require_fitted, sample_count
from .glm import coordinates, functional_covariance, mc_logits, probit
from .kfac import KFAC_APPROX, Factor, as_matrix, factor_from_state, fit_curvature, from_matrix

STRUCTURES = ("kron", "diag", "last_layer")
PREDICTIVES = ("glm_probit", "glm_mc", "sampling")
PRIOR_FITS = ("none", "marglik", "val_nll")
BACKENDS = ("own", "laplace-torch")
DEFAULT_SAMPLES = {"glm_probit": 1, "glm_mc": 1000, "sampling": 32}
EPISTEMIC_SAMPLES = 512  # logit samples of the GLM Gaussian for the probit predictive's mutual information
PRIOR_BOUNDS = (1e-8, 1e8)


def head_groups(groups: Sequence[ParamGroup]) -> list[ParamGroup]:
    """The output layer: the trainable head copy, else LoRA layers of an ``lm_head``."""
    heads = [g for g in groups if g.kind == "head"] or [g for g in groups if "lm_head" in g.module_name]
    if not heads:
        raise ValueError(
            "structure: 'last_layer' needs a head among the selected adapter tensors (a SEQ_CLS head with "
            "params.include_head=true, or LoRA on lm_head); none was found. Use structure='kron' instead."
        )
    return heads


class Laplace:
    """Laplace posterior over the selected LoRA tensors.

    Args:
        structure: ``"kron"`` (K-FAC, default), ``"diag"`` (exact diagonal GGN) or ``"last_layer"``
            (K-FAC over the head only; the other adapter tensors stay at the MAP).
        backend: ``"own"`` (this engine) or ``"laplace-torch"`` (laplace-torch's public API).
        fisher: ``"ggn"`` (exact GGN, C−1 backward passes), ``"mc"`` (sampled labels) or ``"empirical"``.
        mc_samples: labels per example for ``fisher="mc"``.
        kfac_approx: ``"reduce"`` (sequence-level loss, default) or ``"expand"`` (laplace-torch's default).
        rank: eigenpairs kept for a low-rank Kronecker side (None: always full).
        lowrank_threshold: Kronecker sides with at least this many rows are low-rank.
        predictive: ``"glm_probit"`` (default), ``"glm_mc"`` (MC in logit space) or ``"sampling"`` (weights).
        n_samples: default samples (None: 1000 for glm_mc, 32 for sampling).
        prior_precision: λ, the fixed prior precision or the starting point of its fit.
        prior_fit: ``"none"``, ``"marglik"`` or ``"val_nll"`` (needs ``val_loader``).
        prior_per_layer: one λ per layer instead of one scalar.
        prior_grid: ``[low, high, points]`` of the log-spaced λ grid for ``val_nll``.
        chunk_size: examples per forward in the GLM predictive (None: the whole batch).
        seed: seeds the MC-Fisher labels and the prior tuning samples.
    """

    def __init__(
        self,
        structure: str = "kron",
        *,
        backend: str = "own",
        fisher: str = "ggn",
        mc_samples: int = 1,
        kfac_approx: str = "reduce",
        rank: int | None = 32,
        lowrank_threshold: int = 1024,
        predictive: str = "glm_probit",
        n_samples: int | None = None,
        prior_precision: float = 1.0,
        prior_fit: str = "marglik",
        prior_per_layer: bool = False,
        prior_grid: Sequence[float] = (1e-4, 1e6, 101),
        chunk_size: int | None = None,
        seed: int = 0,
    ):
        self.structure = choice("structure", structure, STRUCTURES)
        self.backend = choice("backend", backend, BACKENDS)
        self.fisher = choice("fisher", fisher, FISHERS)
        self.mc_samples = positive_int("mc_samples", mc_samples)
        self.kfac_approx = choice("kfac_approx", kfac_approx, KFAC_APPROX)
        self.rank = positive_int("rank", rank, allow_none=True)
        self.lowrank_threshold = positive_int("lowrank_threshold", lowrank_threshold)
        self.predictive = choice("predictive", predictive, PREDICTIVES)
        self.n_samples = positive_int("n_samples", n_samples, allow_none=True)
        if not (isinstance(prior_precision, (int, float)) and 0 < prior_precision < math.inf):
            raise ValueError(f"prior_precision: expected a finite number > 0, got {prior_precision!r}.")
        self.prior_precision = float(prior_precision)
        self.prior_fit = choice("prior_fit", prior_fit, PRIOR_FITS)
        self.prior_per_layer = bool(prior_per_layer)
        grid = list(prior_grid)
        if len(grid) != 3 or not 0 < grid[0] < grid[1] or int(grid[2]) < 2:
            raise ValueError(f"prior_grid: expected [low, high, points] with 0 < low < high, points >= 2, got {grid}.")
        self.prior_grid = [float(grid[0]), float(grid[1]), int(grid[2])]
        self.chunk_size = positive_int("chunk_size", chunk_size, allow_none=True)
        self.seed = int(seed)
        self.factors: list[Factor] | None = None
        self.lt = None  # the laplace-torch backend object

    @property
    def name(self) -> str:
        return registered_name("bayeslora.posteriors.laplace:Laplace", structure=self.structure)

    @property
    def needs(self) -> Needs:
        return Needs(validation=self.prior_fit == "val_nll")

    def config(self) -> dict[str, Any]:
        keys = ("structure", "backend", "fisher", "mc_samples", "kfac_approx", "rank", "lowrank_threshold",
                "predictive", "n_samples", "prior_precision", "prior_fit", "prior_per_layer", "prior_grid",
                "chunk_size", "seed")  # fmt: skip
        return {k: getattr(self, k) for k in keys}

    # ------------------------------------------------------------------ fitting
    def select(self, fn: AdapterFn) -> list[ParamGroup]:
        """The layers this posterior treats as random (all selected LoRA layers, or the head)."""
        groups = list(fn.params.groups)
        bad = [g.module_name for g in groups if not isinstance(g.module, torch.nn.Linear)]
        if bad:
            raise ValueError(
                f"params: Laplace supports LoRA Linear layers and Linear heads; {bad[:3]} are not (LoRA embeddings?). "
                "Exclude them with params.exclude."
            )
        return head_groups(groups) if self.structure == "last_layer" else groups

    def fit(self, fn: AdapterFn, loader, *, val_loader=None, checkpoints=None) -> Laplace:
        """Fit the curvature at the adapter in ``fn.model`` (the MAP), then the prior precision."""
        if self.prior_fit == "val_nll" and val_loader is None:
            raise ValueError(
                "val_loader: prior_fit='val_nll' tunes λ on a validation split; pass val_loader= or use "
                "prior_fit='marglik'."
            )
        groups = self.select(fn)
        num_data = dataset_size(loader)
        if self.backend == "laplace-torch":
            from .laplace_torch import LaplaceTorch

            self.lt = LaplaceTorch(self)
            self.lt.fit(fn, loader, val_loader)
            self.factors = []
            return self
        self.values = fn.params.values()
        self.names = [list(g.names) for g in groups]
        generator = torch.Generator(device=fn.device).manual_seed(self.seed)
        with model_mode(fn.model, False):
            curv = fit_curvature(
                fn, loader, groups, self.values, structure="diag" if self.structure == "diag" else "kron",
                fisher=self.fisher, mc_samples=self.mc_samples, kfac_approx=self.kfac_approx, rank=self.rank,
                lowrank_threshold=self.lowrank_threshold, generator=generator,
            )  # fmt: skip
        self.factors, self.loss, self.num_data = curv.factors, curv.loss, num_data
        self.prior = torch.full((len(groups),), self.prior_precision, dtype=torch.float64)
        if self.prior_fit == "marglik":
            self.prior = self.fit_marglik()
        elif self.prior_fit == "val_nll":
            self.prior = self.fit_val_nll(fn, val_loader)
        return self

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
        if not self.prior_per_layer:
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
        return lam if self.prior_per_layer else lam.expand(len(self.factors)).clone()

    def fit_val_nll(self, fn: AdapterFn, val_loader) -> torch.Tensor:
        """The λ (``[L]``) on the grid minimising the validation NLL of the GLM predictive."""
        low, high, points = self.prior_grid
        grid = torch.logspace(math.log10(low), math.log10(high), points, dtype=torch.float64)
        base = torch.ones(len(self.factors), dtype=torch.float64)
        if self.prior_per_layer:
            base = self.fit_marglik()
            base = base / base.log().mean().exp()
        candidates = grid[:, None] * base[None, :]  # [K, L]
        nll = torch.zeros(points, dtype=torch.float64)
        generator = torch.Generator(device=fn.device)
        groups = self.match_groups(fn)
        n = 0
        with model_mode(fn.model, False):
            for batch in val_loader:
                coords = coordinates(fn, self.values, groups, self._on(fn.device), batch, self.chunk_size)
                cov = functional_covariance(coords, self.factors, self.num_data, candidates.to(fn.device))
                labels = fn.labels(batch)
                for k in range(points):
                    if self.predictive == "glm_mc":
                        generator.manual_seed(self.seed)
                        logits = mc_logits(coords.mean, cov[k], self._samples(None), generator)
                    else:
                        logits = probit(coords.mean, cov[k])[None]
                    nll[k] -= float(Predictive(logits).log_probs.gather(1, labels[:, None].to(logits.device)).sum())
                n += labels.shape[0]
        if n == 0:
            raise ValueError("val_loader: yielded no batches; prior_fit='val_nll' needs a non-empty validation split.")
        self.val_curve = {"prior": grid.tolist(), "nll": (nll / n).tolist()}
        return candidates[int(torch.argmin(nll))].clone()

    def _prior_vector(self, prior) -> torch.Tensor:
        lam = torch.as_tensor(prior, dtype=torch.float64).reshape(-1).cpu()
        if lam.numel() == 1:
            lam = lam.expand(len(self.factors))
        if lam.numel() != len(self.factors) or not (lam > 0).all():
            raise ValueError(f"prior: expected a positive scalar or {len(self.factors)} values, got {lam.tolist()}.")
        return lam

    # ------------------------------------------------------------------ prediction
    def match_groups(self, fn: AdapterFn) -> list[ParamGroup]:
        """The groups of ``fn`` that match the fitted ones (names and shapes), else a clear error."""
        require_fitted(self, "factors")
        groups = {g.names: g for g in self.select(fn)}
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

    def _samples(self, n_samples: int | None) -> int:
        return sample_count(self.name, n_samples, self.n_samples or DEFAULT_SAMPLES[self.predictive])

    def glm_moments(self, fn: AdapterFn, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """GLM predictive ``(f_μ [B, C] float32, f_Σ [B, C, C] float64)`` for one batch."""
        if self.lt is not None:
            return self.lt.glm_moments(fn, batch)
        groups = self.match_groups(fn)
        with model_mode(fn.model, False):
            coords = coordinates(fn, self.values, groups, self._on(fn.device), batch, self.chunk_size)
        return coords.mean, functional_covariance(coords, self.factors, self.num_data, self.prior.to(fn.device))

    def predict(self, fn: AdapterFn, batch, *, n_samples: int | None = None, generator=None) -> Predictive:
        """Predictive for one batch: probit logits ``[1, B, C]`` or logit samples ``[S, B, C]``."""
        require_fitted(self, "factors")
        if self._samples(n_samples) == 0:  # the posterior mean: the MAP
            return self._predict_mean(fn, batch)
        if self.lt is not None:
            pred = self.lt.predict(fn, batch, self._samples(n_samples), generator)
            if self.predictive != "glm_probit":
                return pred
            return Predictive(pred.logits, self._epistemic(*self.glm_moments(fn, batch), generator))
        if self.predictive == "sampling":
            return self._predict_sampling(fn, batch, self._samples(n_samples), generator)
        mean, cov = self.glm_moments(fn, batch)
        if self.predictive == "glm_probit":
            return Predictive.point(probit(mean, cov), self._epistemic(mean, cov, generator))
        return Predictive(mc_logits(mean, cov, self._samples(n_samples), generator))

    @torch.no_grad()
    def _predict_mean(self, fn: AdapterFn, batch) -> Predictive:
        values = self.values if self.lt is None else self.lt.values
        if self.lt is None:
            self.match_groups(fn)
        with model_mode(fn.model, False):
            return Predictive.point(fn(values or None, batch))

    def _epistemic(self, mean: torch.Tensor, cov: torch.Tensor, generator) -> torch.Tensor:
        """The mutual information of the GLM Gaussian over the logits (:data:`EPISTEMIC_SAMPLES` MC samples)."""
        if generator is None:
            generator = torch.Generator(device=mean.device).manual_seed(self.seed)
        return Predictive(mc_logits(mean, cov, EPISTEMIC_SAMPLES, generator)).mutual_information

    def sample(self, fn: AdapterFn, n_samples: int, generator=None) -> list[dict[str, torch.Tensor]]:
        """Weight samples ``θ* + P^{-1/2} ε`` (all adapter tensors; non-random ones at the MAP)."""
        if self.lt is not None:
            raise ValueError("backend: weight samples come from the own engine; use predictive='sampling' to predict.")
        groups, factors = self.match_groups(fn), self._on(fn.device)
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

    @torch.no_grad()
    def _predict_sampling(self, fn, batch, n_samples, generator) -> Predictive:
        with model_mode(fn.model, False):
            return Predictive(torch.stack([fn(v, batch) for v in self.sample(fn, n_samples, generator)]))

    def factor_bytes(self) -> int:
        """Persistent memory of the fitted curvature (eigenbases and eigenvalues), in bytes."""
        if self.lt is not None:
            return self.lt.factor_bytes()
        tensors = [v for f in require_fitted(self, "factors") for v in f.state().values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        require_fitted(self, "factors")
        if self.lt is not None:
            return {"backend": "laplace-torch", **self.lt.state_dict()}
        return {
            "backend": "own",
            "structure": self.structure,
            "names": self.names,
            "values": {k: v.detach().cpu() for k, v in self.values.items()},
            "factors": [{k: v.cpu() if torch.is_tensor(v) else v for k, v in f.state().items()} for f in self.factors],
            "prior": self.prior.cpu(),
            "num_data": self.num_data,
            "loss": self.loss,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("backend") != self.backend:
            raise ValueError(f"state: saved with backend={state.get('backend')!r}; this one uses {self.backend!r}.")
        if self.backend == "laplace-torch":
            from .laplace_torch import LaplaceTorch

            self.lt = LaplaceTorch(self)
            self.lt.load_state_dict({k: v for k, v in state.items() if k != "backend"})
            self.factors = []
            return
        if state["structure"] != self.structure:
            raise ValueError(f"state: saved with structure={state['structure']!r}; this one is {self.structure!r}.")
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
