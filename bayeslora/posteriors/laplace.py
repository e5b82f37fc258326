"""Laplace approximation over the LoRA adapter tensors (K-FAC, diagonal or last-layer).

The posterior ``N(θ*, P⁻¹)`` around the MAP, with a K-FAC or diagonal GGN / Fisher precision per layer and a
Gaussian prior (Ritter et al. 2018; Daxberger et al. 2021; Yang et al., ICLR 2024): the formulas of the
precision, the evidence, the prior fit and the weight samples are in :mod:`.laplace_own`, the curvature
conventions in :mod:`.kfac`, the predictive in :mod:`.glm`.

The numerics live in an engine, one strategy object per ``backend``: the own engine
(:class:`~bayeslora.posteriors.laplace_own.OwnLaplace`) or laplace-torch
(:class:`~bayeslora.posteriors.laplace_torch.LaplaceTorch`), both behind the same small interface.

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
from ..likelihoods import FISHERS, is_token_level
from ..params import ParamGroup
from ..predictive import Predictive
from ..validate import choice, positive_int
from . import Needs, predictive_of, registered_name, require_fitted, sample_count
from .kfac import KFAC_APPROX
from .laplace_own import LaplaceSettings, OwnLaplace

# the methods this module registers (bayeslora.posteriors.discover)
REGISTER = {
    "kfac_laplace": ("Laplace", {"structure": "kron"}),
    "diag_laplace": ("Laplace", {"structure": "diag"}),
    "last_layer_laplace": ("Laplace", {"structure": "last_layer"}),
}

STRUCTURES = ("kron", "diag", "last_layer")
PREDICTIVES = ("glm_probit", "glm_mc", "sampling")
PRIOR_FITS = ("none", "marglik", "val_nll")
BACKENDS = ("own", "laplace-torch")


def head_groups(groups: Sequence[ParamGroup]) -> list[ParamGroup]:
    """The output layer: the trainable head copy, else LoRA layers of an ``lm_head``."""
    heads = [g for g in groups if g.kind == "head"] or [g for g in groups if "lm_head" in g.module_name]
    if not heads:
        raise ValueError(
            "structure: 'last_layer' needs a head among the selected adapter tensors (a SEQ_CLS head with "
            "params.include_head=true, or LoRA on lm_head); none was found. Use structure='kron' instead."
        )
    return heads


def make_engine(backend: str, settings: LaplaceSettings):
    """The engine of a backend (laplace-torch is imported only when used)."""
    if backend == "laplace-torch":
        from .laplace_torch import LaplaceTorch

        return LaplaceTorch(settings)
    return OwnLaplace(settings)


class Laplace:
    """Laplace posterior over the selected LoRA tensors.

    Args:
        structure: ``"kron"`` (K-FAC, default), ``"diag"`` (exact diagonal GGN) or ``"last_layer"``
            (K-FAC over the head only; the other adapter tensors stay at the MAP).
        backend: ``"own"`` (this engine) or ``"laplace-torch"`` (laplace-torch's public API).
        fisher: ``"ggn"`` (exact GGN, C−1 backward passes), ``"mc"`` (sampled labels), ``"empirical"``, or
            ``"mc_sequence"`` (a token-level likelihood: one sampled target sequence per backward pass instead of one
            per target token; unbiased for the same Fisher, T times cheaper; otherwise ``"mc"``).
        mc_samples: labels per example for ``fisher="mc"``.
        kfac_approx: ``"reduce"`` (sequence-level loss, default) or ``"expand"`` (laplace-torch's default).
        rank: eigenpairs kept for a low-rank Kronecker side (None: always full).
        lowrank_threshold: Kronecker sides with at least this many rows are low-rank.
        predictive: ``"glm_probit"`` (default), ``"glm_mc"`` (MC in logit space) or ``"sampling"`` (weights). For a
            Gaussian (regression) readout both GLM options give the exact ``N(f_MAP, J Σ Jᵀ + σ²)``.
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
        self.engine = None  # the fitted backend engine (OwnLaplace or LaplaceTorch)

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

    def settings(self) -> LaplaceSettings:
        """The options an engine needs."""
        options = {k: v for k, v in self.config().items() if k != "backend"}
        return LaplaceSettings(**{**options, "prior_grid": tuple(options["prior_grid"])})

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
        if is_token_level(fn.likelihood):
            self._check_token_level()
        engine = make_engine(self.backend, self.settings())
        engine.fit(fn, loader, self.select(fn), val_loader, dataset_size(loader))
        self.engine = engine
        return self

    def _check_token_level(self) -> None:
        """The options a token-level likelihood (logits over a vocabulary) supports, else a clear error."""
        if self.predictive != "sampling":
            raise ValueError(
                f"predictive: {self.predictive!r} is a GLM predictive, which over a vocabulary needs a [V, V] logit "
                "covariance per token; use predictive='sampling' (weight samples) with a token-level likelihood."
            )
        if self.fisher == "ggn":
            raise ValueError(
                "fisher: 'ggn' over a vocabulary needs a backward pass per vocabulary entry per target token; use "
                "fisher='mc' (sampled tokens), fisher='mc_sequence' (a sampled sequence per backward pass, the "
                "cheapest) or fisher='empirical' (the target tokens) with a token-level likelihood."
            )
        if self.backend != "own":
            raise ValueError(
                f"backend: {self.backend!r} has no token-level likelihood here; use backend='own' for token logits."
            )

    def optimize_prior_precision(
        self, fn: AdapterFn, method: str = "marglik", *, val_loader=None, grid: Sequence[float] | None = None
    ) -> torch.Tensor:
        """Fit the prior precision λ of the fitted posterior (laplace-torch's verb); returns λ per layer ``[L]``.

        Args:
            fn: the AdapterFn the posterior was fit on.
            method: ``"marglik"`` (the Laplace evidence), ``"val_nll"`` (the GLM predictive's NLL on
                ``val_loader`` over a log-spaced ``grid``) or ``"none"`` (back to ``prior_precision``).
            val_loader: the validation split, required for ``"val_nll"``.
            grid: ``[low, high, points]`` for ``"val_nll"`` (default: ``prior_grid``).
        """
        engine = require_fitted(self, "engine")
        choice("method", method, PRIOR_FITS)
        if method == "val_nll" and val_loader is None:
            raise ValueError("val_loader: method='val_nll' tunes λ on a validation split; pass val_loader=.")
        if method != "val_nll" and (val_loader is not None or grid is not None):
            raise ValueError(f"val_loader / grid: only method='val_nll' uses them; method={method!r} does not.")
        if grid is not None:
            grid = list(grid)
            if len(grid) != 3 or not 0 < grid[0] < grid[1] or int(grid[2]) < 2:
                raise ValueError(f"grid: expected [low, high, points] with 0 < low < high, points >= 2, got {grid}.")
        return engine.optimize_prior(fn, self.select(fn), method, val_loader, grid)

    @property
    def prior(self) -> torch.Tensor:
        """The fitted prior precision per layer ``[L]``."""
        return require_fitted(self, "engine").prior

    def log_marglik(self, prior: torch.Tensor | float | None = None) -> float:
        """The Laplace log marginal likelihood at ``prior`` (own engine; default: the fitted λ)."""
        return self._own("log_marglik").log_marglik(prior)

    def _own(self, what: str) -> OwnLaplace:
        engine = require_fitted(self, "engine")
        if not isinstance(engine, OwnLaplace):
            raise ValueError(
                f"backend: {what} comes from the own engine; this posterior uses backend={self.backend!r}."
            )
        return engine

    # ------------------------------------------------------------------ prediction
    def _samples(self, n_samples: int | None) -> int:
        return sample_count(self.name, n_samples, self.settings().samples())

    def glm_moments(self, fn: AdapterFn, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """GLM predictive ``(f_μ [B, C] float32, f_Σ [B, C, C] float64)`` for one batch."""
        return require_fitted(self, "engine").glm_moments(fn, self.select(fn), batch)

    def predict(self, fn: AdapterFn, batch, *, n_samples: int | None = None, generator=None) -> Predictive:
        """Predictive for one batch: probit logits ``[1, B, C]`` or logit samples ``[S, B, C]``; ``n_samples=0``
        predicts at the posterior mean (the MAP)."""
        engine = require_fitted(self, "engine")
        s = self._samples(n_samples)
        if s == 0:
            with torch.no_grad(), model_mode(fn.model, False):
                return predictive_of(fn, batch, [fn(engine.mean_values(), batch)])
        return engine.predict(fn, self.select(fn), batch, s, generator)

    def sample(self, fn: AdapterFn, n_samples: int, generator=None) -> list[dict[str, torch.Tensor]]:
        """Weight samples ``θ* + P^{-1/2} ε`` (own engine; non-random tensors at the MAP)."""
        return self._own("weight sampling").sample(fn, self.select(fn), n_samples, generator)

    @torch.no_grad()
    def sample_values(self, fn: AdapterFn, batch, n_samples: int, generator=None) -> list[dict[str, torch.Tensor]]:
        """The weight draws of the sampling predictive (:meth:`sample`; ``batch`` is unused)."""
        return self.sample(fn, n_samples, generator)

    def factor_bytes(self) -> int:
        """Persistent memory of the fitted curvature, in bytes."""
        return require_fitted(self, "engine").factor_bytes()

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, **require_fitted(self, "engine").state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("backend") != self.backend:
            raise ValueError(f"state: saved with backend={state.get('backend')!r}; this one uses {self.backend!r}.")
        engine = make_engine(self.backend, self.settings())
        engine.load_state_dict({k: v for k, v in state.items() if k != "backend"})
        self.engine = engine
