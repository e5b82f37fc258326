"""TFB: training-free Bayesianization of a trained LoRA adapter (Shi et al., NeurIPS 2025, "Training-free
Bayesianization for low-rank adapters of large language models").

The posterior family is a low-rank isotropic Gaussian with one scale σ: the B factors stay at the MAP, noise goes
on the A factors only. With the thin SVD ``B = U diag(s) Vᵀ`` (rank k), the A noise is ``E = V Z`` with
``Z_ij ~ N(0, σ² / s_i²)``, so the noise of the weight update ``B E = U diag(s) Z`` is isotropic with std σ in the
column space of B (the paper's reparametrisation ``B' = U diag(s)``, ``A' = Vᵀ A``, std σ / s_i on row i of A').

σ is the largest value, found by bisection over log σ in [``sigma_min``, ``sigma_max``] with ``n_search`` halvings,
whose validation ``metric`` stays within ``tolerance`` of the MAP's: accuracy ≥ acc_MAP − tolerance (``"acc"``) or
NLL ≤ NLL_MAP + tolerance nats (``"nll"``), the predictive drawing ``n_search_samples`` samples from a generator
seeded ``seed`` at every σ (common random numbers, so the metric is a smooth function of σ). If ``sigma_max`` itself
passes it is the answer; otherwise the result is the lower end of the final bracket (it passes; the upper end fails),
within a factor ``exp((log sigma_max − log sigma_min) / 2**n_search)`` of the threshold when the metric is monotone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..function import AdapterFn, model_mode
from ..metrics import accuracy
from ..predictive import Predictive, TokenPredictive
from ..validate import positive, positive_int
from . import Needs, predictive_of, require_fitted, sample_count

# the methods this module registers (bayeslora.posteriors.discover)
REGISTER = {"tfb": "TFB"}

METRICS = ("nll", "acc")
logger = logging.getLogger(__name__)


def bisect_log_sigma(passes: Callable[[float], bool], sigma_min: float, sigma_max: float, n_search: int):
    """The largest σ in [sigma_min, sigma_max] that ``passes`` (bisection over log σ); returns ``(σ, bracket)``.

    ``bracket`` is ``(low, high)``: ``low`` passes (or is sigma_min), ``high`` fails; ``(sigma_max, sigma_max)``
    when sigma_max passes.
    """
    if passes(sigma_max):
        return sigma_max, (sigma_max, sigma_max)
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    for _ in range(n_search):
        mid = 0.5 * (lo + hi)
        if passes(math.exp(mid)):
            lo = mid
        else:
            hi = mid
    return math.exp(lo), (math.exp(lo), math.exp(hi))


def a_noise_bases(fn: AdapterFn) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per selected LoRA A tensor: ``(V [r, k], 1 / s [k])`` of its B's thin SVD ``B = U diag(s) Vᵀ``."""
    named = dict(fn.model.named_parameters())
    out = {}
    for name in fn.params.names:
        if ".lora_A." not in name:
            continue
        b = named[name.replace(".lora_A.", ".lora_B.")].detach().double()
        _, s, vh = torch.linalg.svd(b, full_matrices=False)
        keep = s > s.max() * 1e-6 if s.numel() and float(s.max()) > 0 else torch.zeros_like(s, dtype=torch.bool)
        out[name] = (vh[keep].T.contiguous(), 1.0 / s[keep])
    return out


class TFB:
    """Training-free Bayesianization: the largest isotropic low-rank σ on the A factors the validation data allow.

    The default metric, accuracy within one point, was chosen on the demo's validation split (MiniLM, 400 SST-2 rows):
    82.5% / ECE 7.4 / NLL 0.408 there, against 79.5% / 11.0 / 0.477 for NLL within 0.01 nats (the NLL of a predictive
    that grows less confident can stay flat while its accuracy falls).

    Args:
        metric: ``"acc"`` or ``"nll"``, the validation metric the search keeps near the MAP's.
        tolerance: how far the metric may move (nats of NLL, or accuracy as a fraction, e.g. 0.01 = one point).
        sigma_min, sigma_max: the search interval of σ.
        n_search: bisection steps over log σ.
        n_search_samples: predictive samples per σ during the search.
        n_samples: default number of samples in :meth:`predict` (0: the MAP).
        seed: seeds the search's samples (the same draws at every σ).
    """

    name = "tfb"
    needs = Needs(map_adapter=True, validation=True)

    def __init__(
        self,
        metric: str = "acc",
        tolerance: float = 0.01,
        sigma_min: float = 1e-4,
        sigma_max: float = 1.0,
        n_search: int = 8,
        n_search_samples: int = 8,
        n_samples: int = 16,
        seed: int = 0,
    ):
        if metric not in METRICS:
            raise ValueError(f"metric: expected one of {list(METRICS)}, got {metric!r}.")
        positive("tolerance", tolerance)
        positive("sigma_min", sigma_min)
        positive("sigma_max", sigma_max)
        if not sigma_min < sigma_max:
            raise ValueError(f"sigma_min, sigma_max: expected sigma_min < sigma_max, got {sigma_min} and {sigma_max}.")
        positive_int("n_search", n_search)
        positive_int("n_search_samples", n_search_samples)
        if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 0:
            raise ValueError(f"n_samples: expected an integer >= 0 (0: the MAP), got {n_samples!r}.")
        self.metric, self.tolerance = metric, float(tolerance)
        self.sigma_min, self.sigma_max, self.n_search = float(sigma_min), float(sigma_max), int(n_search)
        self.n_search_samples, self.n_samples, self.seed = int(n_search_samples), int(n_samples), int(seed)
        self.values: dict[str, torch.Tensor] | None = None
        self.bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sigma: float | None = None
        self.history: list[tuple[float, float]] = []

    def fit(self, fn: AdapterFn, loader=None, *, val_loader=None, checkpoints=None) -> TFB:
        """Search σ on ``val_loader`` around the adapter the model holds (the MAP)."""
        if val_loader is None:
            raise ValueError("val_loader: TFB searches σ on a validation split; pass val_loader= (data.val_size).")
        if self.metric == "acc" and fn.likelihood.name == "gaussian":
            raise ValueError(
                "metric: 'acc' needs class or token predictions; search σ on the validation NLL (metric='nll') for "
                "a regression."
            )
        self.values, self.bases, self.history = fn.params.values(), a_noise_bases(fn), []
        if not self.bases:
            raise ValueError(
                "params: TFB puts its noise on the LoRA A factors, but none is selected; select them "
                "(AdapterParams lora_tensors=['A', 'B'] or ['A'])."
            )
        batches = list(val_loader)
        reference = self.validation_metric(fn, batches, 0.0)
        better = 1.0 if self.metric == "acc" else -1.0  # acc: higher is better; nll: lower

        def passes(sigma: float) -> bool:
            value = self.validation_metric(fn, batches, sigma)
            self.history.append((sigma, value))
            return better * (value - reference) >= -self.tolerance

        self.sigma = bisect_log_sigma(passes, self.sigma_min, self.sigma_max, self.n_search)[0]
        logger.info("TFB: sigma %.4g (validation %s %.4f at the MAP, %d evaluations)", self.sigma, self.metric,
                    reference, len(self.history))  # fmt: skip
        return self

    def validation_metric(self, fn: AdapterFn, batches, sigma: float) -> float:
        """The metric on ``batches`` of the predictive at σ (σ = 0: the MAP), samples seeded ``seed`` (per example;
        per target token for a token-level predictive; a regression: the NLL of its Gaussian mixture)."""
        log_probs, labels, other = [], [], []
        generator = torch.Generator().manual_seed(self.seed)
        for batch in batches:
            s = 0 if sigma == 0 else self.n_search_samples
            pred = self._predict(fn, batch, s, generator, sigma)
            if isinstance(pred, TokenPredictive):  # (target-token log-probability, top-1 hit) per target token
                other.append((pred.log_probs.double().cpu(), (pred.top_tokens == pred.targets).cpu()))
            elif not pred.is_categorical:
                other.append((pred.log_likelihood(batch["labels"]).cpu(), None))
            else:
                log_probs.append(pred.log_probs.cpu())
                labels.append(batch["labels"].cpu())
        if other:
            if self.metric == "acc":
                return float(torch.cat([hit for _, hit in other]).double().mean())
            return float(-torch.cat([lp for lp, _ in other]).mean())
        lp, y = torch.cat(log_probs), torch.cat(labels)
        if self.metric == "acc":
            return float(accuracy(lp, y))
        return float(-lp.gather(1, y.long()[:, None]).mean())

    def sample(self, n: int, generator: torch.Generator | None, sigma: float) -> list[dict[str, torch.Tensor]]:
        """``n`` draws of the selected tensors: the MAP with A + V Z, Z_ij ~ N(0, σ² / s_i²)."""
        values = require_fitted(self, "values")
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        out = []
        for _ in range(n):
            draw = dict(values)
            for name, (v, inv_s) in self.bases.items():
                a = values[name]
                z = torch.randn(inv_s.shape[0], a.shape[1], generator=generator, device=generator.device,
                                dtype=torch.float64).to(a.device)  # fmt: skip
                noise = v.to(a.device) @ (sigma * inv_s.to(a.device)[:, None] * z)
                draw[name] = a + noise.to(a.dtype)
            out.append(draw)
        return out

    @torch.no_grad()
    def _predict(self, fn: AdapterFn, batch, s: int, generator, sigma: float) -> Predictive:
        with model_mode(fn.model, False):
            if s == 0:
                return predictive_of(fn, batch, [fn(self.values, batch)])
            return predictive_of(fn, batch, (fn(v, batch) for v in self.sample(s, generator, sigma)))

    def predict(self, fn: AdapterFn, batch, *, n_samples: int | None = None, generator=None) -> Predictive:
        sigma = require_fitted(self, "sigma")
        return self._predict(fn, batch, sample_count(self.name, n_samples, self.n_samples), generator, sigma)

    def sample_values(self, fn: AdapterFn, batch, n_samples: int, generator=None) -> list[dict[str, torch.Tensor]]:
        """``n_samples`` draws of the adapter values at the fitted σ (the draws of :meth:`predict` under
        ``generator``)."""
        return self.sample(n_samples, generator, require_fitted(self, "sigma"))

    def config(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "tolerance": self.tolerance,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "n_search": self.n_search,
            "n_search_samples": self.n_search_samples,
            "n_samples": self.n_samples,
            "seed": self.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        sigma = require_fitted(self, "sigma")
        return {
            "values": {k: v.cpu() for k, v in self.values.items()},
            "sigma": sigma,
            "bases": {k: {"v": v.cpu(), "inv_s": s.cpu()} for k, (v, s) in self.bases.items()},
            "history": [list(h) for h in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        sigma = float(state["sigma"])
        if not sigma > 0 or not math.isfinite(sigma):
            raise ValueError(f"sigma: expected a finite σ > 0, got {sigma!r}.")
        self.values, self.sigma = dict(state["values"]), sigma
        self.bases = {k: (b["v"], b["inv_s"]) for k, b in state["bases"].items()}
        self.history = [tuple(h) for h in state.get("history", [])]
