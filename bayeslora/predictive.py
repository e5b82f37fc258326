"""Predictive: the one output type of every posterior.

A predictive is a stack of class-logit samples ``[S, B, C]`` (S=1 for point estimates and for
closed-form predictives such as the probit approximation, which return adjusted logits). The
Bayesian model average is taken in probability space and in float64:

    log p(y | x) = logsumexp_s log_softmax(f_s(x))_y - log S.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Predictive:
    """Logit samples ``[S, B, C]`` and the quantities derived from them.

    Attributes:
        logits: class-logit samples ``[S, B, C]``.
    """

    logits: torch.Tensor

    def __post_init__(self):
        if not torch.is_tensor(self.logits) or self.logits.ndim != 3:
            shape = tuple(self.logits.shape) if torch.is_tensor(self.logits) else type(self.logits).__name__
            raise ValueError(f"logits: expected a tensor [S, B, C], got {shape}; use logits.unsqueeze(0) for S=1.")
        if self.logits.shape[0] < 1 or self.logits.shape[-1] < 2:
            raise ValueError(f"logits: expected S >= 1 and C >= 2, got shape {tuple(self.logits.shape)}.")

    @classmethod
    def point(cls, logits: torch.Tensor) -> Predictive:
        """A point-estimate predictive from logits ``[B, C]``."""
        return cls(logits.unsqueeze(0))

    @classmethod
    def cat(cls, parts: Sequence[Predictive]) -> Predictive:
        """Concatenate predictives over the batch dimension (all with the same S)."""
        if not parts:
            raise ValueError("parts: expected at least one Predictive, got an empty sequence.")
        sizes = {p.num_samples for p in parts}
        if len(sizes) != 1:
            raise ValueError(f"parts: all predictives must have the same number of samples S, got {sorted(sizes)}.")
        return cls(torch.cat([p.logits for p in parts], dim=1))

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
    def mutual_information(self) -> torch.Tensor:
        """Epistemic part: entropy - expected entropy ``[B]`` (>= 0 up to rounding; 0 for S=1)."""
        return (self.entropy - self.expected_entropy).clamp_min(0.0)

    def to(self, device) -> Predictive:
        return Predictive(self.logits.to(device))
