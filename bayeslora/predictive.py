"""Predictive: the one output type of every posterior.

A predictive is a stack of class-logit samples ``[S, B, C]`` (S=1 for point estimates and for
closed-form predictives such as the probit approximation, which return adjusted logits). The
Bayesian model average is taken in probability space and in float64:

    log p(y | x) = logsumexp_s log_softmax(f_s(x))_y - log S.

The epistemic score is the mutual information between the label and the weights, ``H[E_s p_s] - E_s H[p_s]``,
from the samples; a closed-form predictive that returns one adjusted-logit sample (the GLM probit) passes the
MI of its own Gaussian over the logits as ``epistemic`` instead. A point estimate without one has no
epistemic score (:attr:`Predictive.has_epistemic` is False; its MI is identically 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, repr=False)
class Predictive:
    """Logit samples ``[S, B, C]`` and the quantities derived from them.

    Attributes:
        logits: class-logit samples ``[S, B, C]``.
        epistemic: optional per-example epistemic score ``[B]`` (mutual information) of a closed-form predictive
            whose uncertainty is not in its samples (the GLM probit's one adjusted-logit sample).
    """

    logits: torch.Tensor
    epistemic: torch.Tensor | None = None

    def __post_init__(self):
        if not torch.is_tensor(self.logits) or self.logits.ndim != 3:
            shape = tuple(self.logits.shape) if torch.is_tensor(self.logits) else type(self.logits).__name__
            raise ValueError(f"logits: expected a tensor [S, B, C], got {shape}; use logits.unsqueeze(0) for S=1.")
        if self.logits.shape[0] < 1 or self.logits.shape[-1] < 2:
            raise ValueError(f"logits: expected S >= 1 and C >= 2, got shape {tuple(self.logits.shape)}.")
        if self.epistemic is not None and tuple(self.epistemic.shape) != (self.logits.shape[1],):
            raise ValueError(
                f"epistemic: expected one score per example [{self.logits.shape[1]}], got "
                f"{tuple(self.epistemic.shape)}."
            )

    @classmethod
    def point(cls, logits: torch.Tensor, epistemic: torch.Tensor | None = None) -> Predictive:
        """A point-estimate predictive from logits ``[B, C]`` (``epistemic``: its score, if it has one)."""
        return cls(logits.unsqueeze(0), epistemic)

    @classmethod
    def cat(cls, parts: Sequence[Predictive]) -> Predictive:
        """Concatenate predictives over the batch dimension (all with the same S)."""
        if not parts:
            raise ValueError("parts: expected at least one Predictive, got an empty sequence.")
        sizes = {p.num_samples for p in parts}
        if len(sizes) != 1:
            raise ValueError(f"parts: all predictives must have the same number of samples S, got {sorted(sizes)}.")
        scores = [p.epistemic for p in parts]
        epistemic = torch.cat(scores) if all(e is not None for e in scores) else None
        return cls(torch.cat([p.logits for p in parts], dim=1), epistemic)

    @property
    def num_samples(self) -> int:
        return self.logits.shape[0]

    @property
    def sample_log_probs(self) -> torch.Tensor:
        """Per-sample log-probabilities ``[S, B, C]`` in float64."""
        return torch.log_softmax(self.logits.double(), dim=-1)

    @property
    def log_probs(self) -> torch.Tensor:
        """Log of the Bayesian model average ``[B, C]`` in float64."""
        return torch.logsumexp(self.sample_log_probs, dim=0) - math.log(self.num_samples)

    @property
    def probs(self) -> torch.Tensor:
        """BMA probabilities ``[B, C]`` (float64)."""
        return self.log_probs.exp()

    @property
    def mean_logits(self) -> torch.Tensor:
        """Mean of the logit samples ``[B, C]`` (e.g. for temperature scaling on top of a method)."""
        return self.logits.mean(0)

    @property
    def entropy(self) -> torch.Tensor:
        """Total predictive entropy H[E_s p_s] ``[B]`` (nats)."""
        lp = self.log_probs
        return -(lp.exp() * lp).sum(-1)

    @property
    def expected_entropy(self) -> torch.Tensor:
        """Aleatoric part E_s H[p_s] ``[B]`` (nats)."""
        lp = self.sample_log_probs
        return -(lp.exp() * lp).sum(-1).mean(0)

    @property
    def has_epistemic(self) -> bool:
        """Whether the predictive carries an epistemic score (several samples, or a closed-form ``epistemic``)."""
        return self.epistemic is not None or self.num_samples > 1

    @property
    def mutual_information(self) -> torch.Tensor:
        """Epistemic part: entropy - expected entropy ``[B]`` (>= 0 up to rounding; 0 for S=1), or ``epistemic``."""
        if self.epistemic is not None:
            return self.epistemic.double()
        return (self.entropy - self.expected_entropy).clamp_min(0.0)

    def __repr__(self) -> str:
        """Shapes and summary statistics (not a tensor dump): ``print(predictive)``."""
        s, b, c = self.logits.shape
        conf = self.probs.max(-1).values
        parts = [
            f"S={s} samples, B={b} examples, C={c} classes",
            f"confidence mean {float(conf.mean()):.3f} (min {float(conf.min()):.3f}, max {float(conf.max()):.3f})",
            f"entropy mean {float(self.entropy.mean()):.3f} nats",
        ]
        if self.has_epistemic:
            source = "closed form" if self.epistemic is not None else "samples"
            parts.append(f"mutual information mean {float(self.mutual_information.mean()):.4f} nats ({source})")
        else:
            parts.append("no epistemic score (a point predictor)")
        return f"Predictive({'; '.join(parts)}; {self.logits.dtype}, {self.logits.device})"

    def to(self, device) -> Predictive:
        return Predictive(self.logits.to(device), None if self.epistemic is None else self.epistemic.to(device))
