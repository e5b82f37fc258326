"""SWAG (Maddox et al., NeurIPS 2019, "A simple baseline for Bayesian uncertainty in deep learning"; LoRA: Onal et
al., 2024, "Gaussian stochastic weight averaging for Bayesian low-rank adaptation of large language models").

From the MAP adapter, :func:`~bayeslora.train.train_map` runs a collection phase at a constant (or cyclic) learning
rate with a :class:`~bayeslora.train.TrainCallback` that takes a snapshot θ_i of the selected adapter tensors every
``collect_every`` optimizer steps, ``n_snapshots`` in all. Its moments are the running mean θ̄, the running second
moment θ̄₂ (diagonal: Σ_diag = θ̄₂ − θ̄²) and the deviation matrix D of the last K = ``rank`` deviations
θ_i − θ̄_i (θ̄_i: the mean after i snapshots). A sample is

    θ = θ̄ + √scale · ( (1/√2) Σ_diag^{1/2} z₁ + (1/√(2(K−1))) Dᵀ z₂ ),   z₁ ~ N(0, I_D), z₂ ~ N(0, I_K),

i.e. N(θ̄, scale · (Σ_diag + DᵀD/(K−1)) / 2); ``scale=0.5`` is the paper's choice for sampling. After the collection
the model holds the MAP again (every tensor the collection trained is restored), so other code sees the MAP;
``n_samples=0`` predicts at the SWA mean θ̄. The L2 of the collection is the run's prior precision (as the MAP's).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import torch

from ..adapter_state import load_trained, trained_values
from ..function import AdapterFn, model_mode
from ..predictive import Predictive
from ..train import TrainCallback, TrainConfig, TrainStep, train_map
from ..validate import positive, positive_int
from . import Needs, predictive_of, require_fitted, sample_count

# the methods this module registers (bayeslora.posteriors.discover)
REGISTER = {"swag": "SWAG"}

SCHEDULES = ("constant", "cyclic")
OPTIMIZERS = ("adam", "sgd")


class SnapshotMoments(TrainCallback):
    """Collect SWAG's moments of the selected adapter tensors every ``every`` optimizer steps (float64 running sums)."""

    def __init__(self, every: int, rank: int):
        self.every, self.n = int(every), 0
        self.mean: torch.Tensor | None = None
        self.sq_mean: torch.Tensor | None = None
        self.deviations: deque[torch.Tensor] = deque(maxlen=int(rank))

    def on_step(self, state: TrainStep) -> None:
        if state.step % self.every == 0:
            self.add(state.fn.params.flatten(state.fn.params.values()).detach().double())

    def add(self, theta: torch.Tensor) -> None:
        self.n += 1
        if self.mean is None:
            self.mean, self.sq_mean = theta.clone(), theta.square()
        else:
            self.mean += (theta - self.mean) / self.n
            self.sq_mean += (theta.square() - self.sq_mean) / self.n
        self.deviations.append((theta - self.mean).float())


def swag_sample(mean, sq_mean, deviations, scale: float, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """SWAG draws ``[S, D]`` from the moments (``deviations`` ``[K, D]``) and standard normals ``z1 [S, D]``,
    ``z2 [S, K]`` (the module docstring's formula)."""
    k = deviations.shape[0]
    diag = (sq_mean - mean.square()).clamp_min(0.0)
    out = diag.sqrt() * z1 / math.sqrt(2.0)
    if k >= 2:
        out = out + (z2 @ deviations.double()) / math.sqrt(2.0 * (k - 1))
    return mean + math.sqrt(scale) * out


def swag_covariance(mean, sq_mean, deviations, scale: float) -> torch.Tensor:
    """The covariance ``[D, D]`` of :func:`swag_sample` (for checks on small models)."""
    k = deviations.shape[0]
    cov = torch.diag((sq_mean - mean.square()).clamp_min(0.0)) / 2.0
    if k >= 2:
        d = deviations.double()
        cov = cov + d.T @ d / (2.0 * (k - 1))
    return scale * cov


class SWAG:
    """SWAG around the MAP adapter: moments of a constant-learning-rate trajectory, Gaussian samples.

    Args:
        n_snapshots: snapshots collected (≥ 2); the collection runs ``n_snapshots · collect_every`` optimizer steps.
        collect_every: optimizer steps between snapshots (the cycle length of ``schedule="cyclic"``).
        rank: K, the number of last deviations kept in D (≥ 2; fewer if fewer snapshots).
        lr: the collection learning rate (constant; with ``"cyclic"``, each cycle decays from it linearly).
        schedule: ``"constant"`` or ``"cyclic"`` (snapshots at each cycle's end, its lowest learning rate).
        optimizer: ``"adam"`` (AdamW, as the MAP training) or ``"sgd"`` (with ``momentum``, as the paper).
        momentum: SGD momentum.
        scale: the sampling scale of the covariance (the paper samples with 0.5).
        prior_precision: λ, the coupled L2 of the collection (the run's one number, as for the MAP).
        grad_accum, clip: as in :class:`~bayeslora.train.TrainConfig`.
        n_samples: default number of samples in :meth:`predict` (0: the SWA mean).
        seed: seeds dropout and the data order of the collection.
        progress: a progress bar for the collection.
    """

    name = "swag"
    needs = Needs()

    def __init__(
        self,
        n_snapshots: int = 20,
        collect_every: int = 5,
        rank: int = 10,
        lr: float = 1e-4,
        schedule: str = "constant",
        optimizer: str = "adam",
        momentum: float = 0.9,
        scale: float = 0.5,
        prior_precision: float = 1.0,
        grad_accum: int = 1,
        clip: float | None = 1.0,
        n_samples: int = 16,
        seed: int = 0,
        progress: bool = True,
    ):
        positive_int("collect_every", collect_every)
        for key, value in (("n_snapshots", n_snapshots), ("rank", rank)):
            positive_int(key, value)
            if value < 2:
                raise ValueError(f"{key}: expected an integer >= 2 (D needs two deviations), got {value!r}.")
        positive("lr", lr)
        positive("scale", scale)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {list(SCHEDULES)}, got {schedule!r}.")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {list(OPTIMIZERS)}, got {optimizer!r}.")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum: expected a number in [0, 1), got {momentum!r}.")
        if isinstance(prior_precision, bool) or not isinstance(prior_precision, (int, float)) or prior_precision < 0:
            raise ValueError(f"prior_precision: expected a number >= 0, got {prior_precision!r}.")
        if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 0:
            raise ValueError(f"n_samples: expected an integer >= 0 (0: the SWA mean), got {n_samples!r}.")
        self.n_snapshots, self.collect_every, self.rank = int(n_snapshots), int(collect_every), int(rank)
        self.lr, self.schedule, self.optimizer, self.momentum = float(lr), schedule, optimizer, float(momentum)
        self.scale, self.prior_precision = float(scale), float(prior_precision)
        self.grad_accum, self.clip = int(grad_accum), clip
        self.n_samples, self.seed, self.progress = int(n_samples), int(seed), bool(progress)
        self.collection_config()  # validate the training options now
        self.mean: torch.Tensor | None = None
        self.sq_mean: torch.Tensor | None = None
        self.deviations: torch.Tensor | None = None
        self.names: list[str] = []
        self.losses: list[float] = []

    def collection_config(self) -> TrainConfig:
        """The :class:`TrainConfig` of the collection phase."""
        cycle = self.collect_every if self.schedule == "cyclic" else None
        return TrainConfig(lr=self.lr, max_steps=self.n_snapshots * self.collect_every, warmup_ratio=0.0,
                           schedule=self.schedule, cycle_steps=cycle,
                           grad_accum=self.grad_accum, clip=self.clip, prior_precision=self.prior_precision,
                           seed=self.seed, progress=self.progress)  # fmt: skip

    def optimizer_factory(self):
        """The collection's optimizer (None: ``train_map``'s AdamW)."""
        if self.optimizer == "adam":
            return None
        return lambda params: torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)

    def fit(self, fn: AdapterFn, loader, *, val_loader=None, checkpoints=None) -> SWAG:
        """Run the collection from the adapter the model holds; the model holds that adapter again afterwards."""
        moments = SnapshotMoments(self.collect_every, self.rank)
        start = trained_values(fn)
        try:
            result = train_map(fn, loader, self.collection_config(), [moments], optimizer=self.optimizer_factory())
        finally:
            load_trained(fn, start)
        self.names, self.losses = list(fn.params.names), list(result.losses)
        self.mean, self.sq_mean = moments.mean, moments.sq_mean
        self.deviations = torch.stack(list(moments.deviations))
        return self

    def sample_flat(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` SWAG draws ``[n, D]`` (float64, on the moments' device), noise from ``generator`` (None: seed 0)."""
        mean = require_fitted(self, "mean")
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        d, k = mean.shape[0], self.deviations.shape[0]
        z = torch.randn(n, d + k, generator=generator, device=generator.device, dtype=torch.float64).to(mean.device)
        return swag_sample(mean, self.sq_mean, self.deviations, self.scale, z[:, :d], z[:, d:])

    @torch.no_grad()
    def predict(self, fn: AdapterFn, batch, *, n_samples: int | None = None, generator=None) -> Predictive:
        mean = require_fitted(self, "mean")
        s = sample_count(self.name, n_samples, self.n_samples)
        self._check(fn)
        flat = mean[None] if s == 0 else self.sample_flat(s, generator)
        with model_mode(fn.model, False):
            return predictive_of(fn, batch, (fn(self._values(fn, theta), batch) for theta in flat))

    def sample_values(self, fn: AdapterFn, batch, n_samples: int, generator=None) -> list[dict[str, torch.Tensor]]:
        """``n_samples`` draws as adapter values (dicts of the selected tensors; the draws of :meth:`predict` under
        ``generator``; ``batch`` is unused)."""
        self._check(fn)
        return [self._values(fn, theta) for theta in self.sample_flat(n_samples, generator)]

    @staticmethod
    def _values(fn: AdapterFn, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        live = fn.params.tensors()
        return {k: v.to(live[k].dtype) for k, v in fn.params.unflatten(theta).items()}

    def _check(self, fn: AdapterFn) -> None:
        if list(fn.params.names) != self.names:
            raise ValueError(
                "fn: the SWAG moments were collected over other adapter tensors; predict with the model and "
                "AdapterParams selection SWAG was fitted with."
            )

    def config(self) -> dict[str, Any]:
        return {
            "n_snapshots": self.n_snapshots,
            "collect_every": self.collect_every,
            "rank": self.rank,
            "lr": self.lr,
            "schedule": self.schedule,
            "optimizer": self.optimizer,
            "momentum": self.momentum,
            "scale": self.scale,
            "prior_precision": self.prior_precision,
            "grad_accum": self.grad_accum,
            "clip": self.clip,
            "n_samples": self.n_samples,
            "seed": self.seed,
            "progress": self.progress,
        }

    def state_dict(self) -> dict[str, Any]:
        mean = require_fitted(self, "mean")
        return {
            "names": list(self.names),
            "mean": mean.cpu(),
            "sq_mean": self.sq_mean.cpu(),
            "deviations": self.deviations.cpu(),
            "losses": list(self.losses),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mean, sq, dev = state["mean"], state["sq_mean"], state["deviations"]
        d = mean.shape[0]
        if mean.ndim != 1 or tuple(sq.shape) != (d,) or dev.ndim != 2 or dev.shape[1] != d:
            raise ValueError(
                f"mean / sq_mean / deviations: expected shapes [D], [D], [K, D]; got {tuple(mean.shape)}, "
                f"{tuple(sq.shape)}, {tuple(dev.shape)}."
            )
        if len(state["names"]) == 0:
            raise ValueError("names: expected the names of the adapter tensors the moments cover, got none.")
        self.names, self.mean, self.sq_mean, self.deviations = list(state["names"]), mean, sq, dev
        self.losses = list(state.get("losses", []))
