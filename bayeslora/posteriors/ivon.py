"""IVON: variational learning of the adapter with the Improved Variational Online Newton optimizer
(Shen et al., ICML 2024, "Variational learning is effective for large deep networks"; LoRA: Cong et al., 2024,
"Variational low-rank adaptation using IVON"), through the authors' ``ivon-opt`` package.

IVON replaces AdamW during fine-tuning (:func:`~bayeslora.train.train_map` with IVON as its optimizer: each step's
gradient is taken at a weight sample, ``train_map``'s sampling-optimizer seam). It learns a diagonal Gaussian
``q(θ) = N(m, diag(σ²))`` over the trained tensors with

    σ² = 1 / (ess · (h + δ)),

``m`` the weights the model holds after training, ``h`` IVON's running Hessian estimate (its ``hess`` state) and
``δ`` its weight decay. The objective is ``ess · (mean NLL + δ/2 ‖θ‖²)``; with ``ess = N`` (the default, the
training-set size) and ``δ = λ / N`` it is the negative log-posterior under the project's one prior N(0, λ⁻¹ I), so
``weight_decay=None`` ties δ to ``prior_precision`` λ. Prediction samples θ from q over the selected adapter tensors
(``n_samples=0``: the mean ``m``); any other trained tensor (e.g. a head left out of the selection) stays at its mean.

The method trains its own adapter (``needs.map_adapter`` is False); after :meth:`IVONPosterior.fit` the model holds
the IVON mean, which is what the saved adapter holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..adapter_state import trainable_parameters
from ..data.collate import dataset_size
from ..function import AdapterFn, model_mode
from ..predictive import Predictive
from ..train import TrainConfig, train_map
from ..validate import positive
from . import Needs, predictive_of, require_fitted, sample_count

# the methods this module registers (bayeslora.posteriors.discover)
REGISTER = {"ivon": "IVONPosterior"}


def gaussian(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``like`` (on its device, float32 or wider) drawn from ``generator`` on the
    generator's own device, so a CPU generator drives a model on any device."""
    z = torch.randn(like.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return z.to(device=like.device, dtype=torch.promote_types(like.dtype, torch.float32))


class IVONPosterior:
    """The diagonal Gaussian IVON learns while it fine-tunes the adapter.

    The defaults of ``lr`` and ``hess_init`` were chosen on the validation split of the demo (MiniLM, 400 SST-2 rows,
    8 epochs): lr=1, h₀=5 (σ₀ ≈ 0.02 at N=400) against lr=0.1, h₀=0.5 (σ₀ ≈ 0.07, which did not learn: 62.5% accuracy).
    IVON's step is not normalised like Adam's (about lr · the gradient while the Hessian estimate stays near h₀, as it
    does with ``beta2=0.99999`` over a short fine-tune), hence a learning rate far above AdamW's.

    Args:
        lr: IVON's learning rate (scaled by ``train_map``'s warm-up and linear decay).
        epochs: passes over the loader (ignored with ``max_steps``).
        max_steps: optimizer steps (None: ``epochs``).
        ess: IVON's effective sample size (None: N, the training-set size).
        hess_init: IVON's initial Hessian estimate h₀ (the initial σ² is 1 / (ess · (h₀ + δ))).
        beta1, beta2: IVON's gradient and Hessian averaging.
        weight_decay: δ (None: ``prior_precision / ess``, the prior N(0, λ⁻¹ I)).
        prior_precision: λ (the run's one number) when ``weight_decay`` is None.
        clip_radius: IVON's per-coordinate update clip.
        warmup_ratio, grad_accum, clip: as in :class:`~bayeslora.train.TrainConfig` (``clip`` clips the gradient
            sample IVON reads; one weight sample per optimizer step).
        n_samples: default number of posterior samples in :meth:`predict` (0: the mean).
        seed: seeds IVON's weight samples, dropout and the data order of the fit.
        progress: a progress bar for the fit.
    """

    name = "ivon"
    needs = Needs(map_adapter=False)

    def __init__(
        self,
        lr: float = 1.0,
        epochs: float = 1.0,
        max_steps: int | None = None,
        ess: float | None = None,
        hess_init: float = 5.0,
        beta1: float = 0.9,
        beta2: float = 0.99999,
        weight_decay: float | None = None,
        prior_precision: float = 1.0,
        clip_radius: float | None = None,
        warmup_ratio: float = 0.0,
        grad_accum: int = 1,
        clip: float | None = None,
        n_samples: int = 16,
        seed: int = 0,
        progress: bool = True,
    ):
        for key, value in (("lr", lr), ("hess_init", hess_init)):
            positive(key, value)
        for key, value in (("ess", ess), ("clip_radius", clip_radius)):
            if value is not None:
                positive(key, value)
        for key, value in (("beta1", beta1), ("beta2", beta2)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{key}: expected a number in [0, 1), got {value!r}.")
        for key, value in (("weight_decay", weight_decay), ("prior_precision", prior_precision)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"{key}: expected a number >= 0, got {value!r}.")
        if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 0:
            raise ValueError(f"n_samples: expected an integer >= 0 (0: posterior mean), got {n_samples!r}.")
        self.lr, self.epochs, self.max_steps = float(lr), float(epochs), max_steps
        self.ess = None if ess is None else float(ess)
        self.hess_init, self.beta1, self.beta2 = float(hess_init), float(beta1), float(beta2)
        self.weight_decay = None if weight_decay is None else float(weight_decay)
        self.prior_precision = float(prior_precision)
        self.clip_radius = None if clip_radius is None else float(clip_radius)
        self.warmup_ratio, self.grad_accum, self.clip = float(warmup_ratio), int(grad_accum), clip
        self.n_samples, self.seed, self.progress = int(n_samples), int(seed), bool(progress)
        self.train_config()  # validate the training options now
        self.mean: dict[str, torch.Tensor] | None = None
        self.std: dict[str, torch.Tensor] | None = None
        self.losses: list[float] = []

    def train_config(self) -> TrainConfig:
        """The :class:`TrainConfig` of the fit (the prior is IVON's weight decay, not a loss term)."""
        return TrainConfig(lr=self.lr, epochs=self.epochs, max_steps=self.max_steps, grad_accum=self.grad_accum,
                           warmup_ratio=self.warmup_ratio, clip=self.clip, prior_precision=0.0, seed=self.seed,
                           progress=self.progress)  # fmt: skip

    def optimizer_options(self, num_data: int) -> dict[str, float]:
        """IVON's ``ess`` and ``weight_decay`` for a training set of ``num_data`` examples."""
        ess = float(num_data) if self.ess is None else self.ess
        wd = self.prior_precision / ess if self.weight_decay is None else self.weight_decay
        return {"ess": ess, "weight_decay": wd}

    def fit(self, fn: AdapterFn, loader, *, val_loader=None, checkpoints=None) -> IVONPosterior:
        """Train the adapter in place with IVON; keep the mean and σ of the selected tensors."""
        import ivon

        options = self.optimizer_options(dataset_size(loader))
        made: list[ivon.IVON] = []

        def factory(params):
            made.append(ivon.IVON(params, lr=self.lr, hess_init=self.hess_init, beta1=self.beta1, beta2=self.beta2,
                                  mc_samples=1, clip_radius=math.inf if self.clip_radius is None else self.clip_radius,
                                  **options))  # fmt: skip
            return made[-1]

        result = train_map(fn, loader, self.train_config(), optimizer=factory)
        self.losses = list(result.losses)
        self.mean, self.std = fn.params.values(), self._std(fn, made[0], options)
        return self

    @staticmethod
    def _std(fn: AdapterFn, optimizer, options: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """σ = (ess · (hess + weight_decay))^{-1/2} of each selected tensor, from IVON's flat per-group ``hess``."""
        by_id = {id(p): n for n, p in trainable_parameters(fn).items()}
        wanted, out = set(fn.params.names), {}
        for group in optimizer.param_groups:
            offset = 0
            for p in group["params"]:
                name = by_id[id(p)]
                if name in wanted:
                    hess = group["hess"][offset : offset + p.numel()].reshape(p.shape)
                    out[name] = (options["ess"] * (hess + options["weight_decay"])).rsqrt().detach().clone()
                offset += p.numel()
        return {n: out[n] for n in fn.params.names}

    def sample(self, n: int, generator: torch.Generator | None = None) -> list[dict[str, torch.Tensor]]:
        """``n`` draws of the selected tensors from q, the noise from ``generator`` (None: a fixed seed)."""
        mean, std = require_fitted(self, "mean"), require_fitted(self, "std")
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        return [{k: m + std[k] * gaussian(m, generator) for k, m in mean.items()} for _ in range(n)]

    @torch.no_grad()
    def predict(self, fn: AdapterFn, batch, *, n_samples: int | None = None, generator=None) -> Predictive:
        mean = require_fitted(self, "mean")
        s = sample_count(self.name, n_samples, self.n_samples)
        with model_mode(fn.model, False):
            if s == 0:
                return predictive_of(fn, batch, [fn(mean, batch)])
            return predictive_of(fn, batch, (fn(values, batch) for values in self.sample(s, generator)))

    def sample_values(self, fn: AdapterFn, batch, n_samples: int, generator=None) -> list[dict[str, torch.Tensor]]:
        """``n_samples`` draws of the adapter values from q (the draws of :meth:`predict` under ``generator``)."""
        return self.sample(n_samples, generator)

    def config(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "epochs": self.epochs,
            "max_steps": self.max_steps,
            "ess": self.ess,
            "hess_init": self.hess_init,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "weight_decay": self.weight_decay,
            "prior_precision": self.prior_precision,
            "clip_radius": self.clip_radius,
            "warmup_ratio": self.warmup_ratio,
            "grad_accum": self.grad_accum,
            "clip": self.clip,
            "n_samples": self.n_samples,
            "seed": self.seed,
            "progress": self.progress,
        }

    def state_dict(self) -> dict[str, Any]:
        mean, std = require_fitted(self, "mean"), require_fitted(self, "std")
        return {
            "values": {k: v.cpu() for k, v in mean.items()},
            "std": {k: v.cpu() for k, v in std.items()},
            "losses": list(self.losses),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mean, std = dict(state["values"]), dict(state["std"])
        if set(mean) != set(std):
            raise ValueError("std: expected one σ tensor per mean tensor ('values'); the state is inconsistent.")
        for k, v in std.items():
            if tuple(v.shape) != tuple(mean[k].shape) or not bool(torch.isfinite(v).all() and (v > 0).all()):
                raise ValueError(f"std[{k!r}]: expected finite positive σ shaped like its mean {tuple(mean[k].shape)}.")
        self.mean, self.std = mean, std
        self.losses = list(state.get("losses", []))
