"""Predictive: the one output type of every posterior.

A predictive is a stack of class-logit samples ``[S, B, C]`` (S=1 for point estimates and for
closed-form predictives such as the probit approximation, which return adjusted logits). The
Bayesian model average is taken in probability space and in float64:

    log p(y | x) = logsumexp_s log_softmax(f_s(x))_y - log S.

The epistemic score is the mutual information between the label and the weights, ``H[E_s p_s] - E_s H[p_s]``,
from the samples; a closed-form predictive that returns one adjusted-logit sample (the GLM probit) passes the
MI of its own Gaussian over the logits as ``epistemic`` instead. A point estimate without one has no
epistemic score (:attr:`Predictive.has_epistemic` is False; its MI is identically 0).

The samples are the outputs ``f [S, B, O]`` of the readout, read through its likelihood (``likelihood``: None is
the categorical one, the classification case above). For a Gaussian likelihood (regression, ``O >= 1``) the
predictive is the mixture ``(1/S) Σ_s N(f_s, σ² + v)`` of :mod:`bayeslora.likelihoods`, with ``variance`` the
optional closed-form function-space variance ``v [B, O]`` (the GLM Laplace predictive: one sample ``f_MAP`` and
``v = diag(J Σ Jᵀ)``); :meth:`Predictive.mean`, :meth:`~Predictive.predictive_variance`,
:meth:`~Predictive.log_likelihood`, :meth:`~Predictive.cdf` and :meth:`~Predictive.quantile` come from the
likelihood, and its epistemic part is the function-space variance ``Var_s f_s + v``
(:attr:`~Predictive.epistemic_variance`; the mutual information is a classification quantity).

:class:`TokenPredictive` is the token-level counterpart (next-token logits over a vocabulary): the weight samples are
streamed through :meth:`TokenPredictive.from_samples`, which keeps per target token only what the metrics need, so
``[S, B, T, V]`` is never held.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .likelihoods import Categorical, Likelihood, TokenCategorical


@dataclass(frozen=True, repr=False)
class Predictive:
    """Output samples ``[S, B, C]`` (class logits, or regression outputs ``[S, B, O]``) and the quantities derived
    from them.

    Attributes:
        logits: class-logit samples ``[S, B, C]`` (for a Gaussian likelihood: samples of ``f`` ``[S, B, O]``).
        epistemic: optional per-example epistemic score ``[B]`` (mutual information) of a closed-form predictive
            whose uncertainty is not in its samples (the GLM probit's one adjusted-logit sample).
        likelihood: how the samples explain the labels (None: categorical, the samples are class logits).
        variance: a Gaussian likelihood's closed-form function-space variance ``[B, O]`` shared by the mixture
            components (the GLM Laplace predictive), or None.
    """

    logits: torch.Tensor
    epistemic: torch.Tensor | None = None
    likelihood: Likelihood | None = None
    variance: torch.Tensor | None = None

    def __post_init__(self):
        if self.likelihood is None:
            object.__setattr__(self, "likelihood", Categorical())
        if not torch.is_tensor(self.logits) or self.logits.ndim != 3:
            shape = tuple(self.logits.shape) if torch.is_tensor(self.logits) else type(self.logits).__name__
            raise ValueError(f"logits: expected a tensor [S, B, C], got {shape}; use logits.unsqueeze(0) for S=1.")
        least = 2 if self.is_categorical else 1
        if self.logits.shape[0] < 1 or self.logits.shape[-1] < least:
            what = "C >= 2 classes" if self.is_categorical else "O >= 1 outputs"
            raise ValueError(f"logits: expected S >= 1 and {what}, got shape {tuple(self.logits.shape)}.")
        if self.epistemic is not None and tuple(self.epistemic.shape) != (self.logits.shape[1],):
            raise ValueError(
                f"epistemic: expected one score per example [{self.logits.shape[1]}], got "
                f"{tuple(self.epistemic.shape)}."
            )
        if self.variance is not None:
            if self.is_categorical:
                raise ValueError("variance: a closed-form output variance needs a Gaussian likelihood's predictive.")
            if tuple(self.variance.shape) != tuple(self.logits.shape[1:]):
                raise ValueError(
                    f"variance: expected the function-space variance [B, O] = {tuple(self.logits.shape[1:])}, got "
                    f"{tuple(self.variance.shape)}."
                )

    @classmethod
    def point(
        cls, logits: torch.Tensor, epistemic: torch.Tensor | None = None, likelihood: Likelihood | None = None
    ) -> Predictive:
        """A point-estimate predictive from outputs ``[B, C]`` (``epistemic``: its score, if it has one;
        ``likelihood``: the readout's, None for class logits)."""
        return cls(logits.unsqueeze(0), epistemic, likelihood)

    @property
    def is_categorical(self) -> bool:
        """Whether the samples are class logits (else outputs of a regression likelihood)."""
        return self.likelihood.name == "categorical"

    def _require(self, what: str, categorical: bool) -> None:
        if self.is_categorical != categorical:
            kind = "class logits (a categorical likelihood)" if categorical else "a Gaussian (regression) likelihood"
            raise ValueError(
                f"{what} is defined for {kind}; this predictive's likelihood is {self.likelihood.name!r}. Use "
                + ("mean / predictive_variance / log_likelihood / quantile." if categorical else "log_probs / probs.")
            )

    @classmethod
    def cat(cls, parts: Sequence[Predictive]) -> Predictive:
        """Concatenate predictives over the batch dimension (all with the same S)."""
        if not parts:
            raise ValueError("parts: expected at least one Predictive, got an empty sequence.")
        sizes = {p.num_samples for p in parts}
        if len(sizes) != 1:
            raise ValueError(f"parts: all predictives must have the same number of samples S, got {sorted(sizes)}.")
        names = {p.likelihood.name for p in parts}
        if len(names) != 1:
            raise ValueError(f"parts: all predictives must share one likelihood, got {sorted(names)}.")
        scores = [p.epistemic for p in parts]
        epistemic = torch.cat(scores) if all(e is not None for e in scores) else None
        variances = [p.variance for p in parts]
        variance = torch.cat(variances) if all(v is not None for v in variances) else None
        if variance is None and any(v is not None for v in variances):
            raise ValueError("parts: either all or none of the predictives carry a closed-form variance.")
        return cls(torch.cat([p.logits for p in parts], dim=1), epistemic, parts[0].likelihood, variance)

    @property
    def num_samples(self) -> int:
        return self.logits.shape[0]

    # ------------------------------------------------------------------ any likelihood
    def log_likelihood(self, labels: torch.Tensor) -> torch.Tensor:
        """``log p(y | x)`` of the labels under the predictive ``[B]`` (float64)."""
        if self.is_categorical:
            lp = self.log_probs
            return lp.gather(1, labels.reshape(-1, 1).long().to(lp.device))[:, 0]
        return self.likelihood.predictive_log_density(self.logits, self.variance, labels)

    # ------------------------------------------------------------------ regression (a Gaussian likelihood)
    @property
    def mean(self) -> torch.Tensor:
        """The predictive mean ``[B, O]`` (float64)."""
        self._require("mean", categorical=False)
        return self.likelihood.predictive_mean(self.logits, self.variance)

    @property
    def predictive_variance(self) -> torch.Tensor:
        """The predictive variance ``[B, O]``: observation noise plus the function-space variance (float64)."""
        self._require("predictive_variance", categorical=False)
        return self.likelihood.predictive_variance(self.logits, self.variance)

    @property
    def epistemic_variance(self) -> torch.Tensor:
        """The function-space variance ``Var_s f_s + v`` ``[B, O]`` (float64; 0 for a point predictor)."""
        self._require("epistemic_variance", categorical=False)
        return self.likelihood.epistemic_variance(self.logits, self.variance)

    def cdf(self, values: torch.Tensor) -> torch.Tensor:
        """The marginal predictive CDF at ``values [B, O]`` ``[B, O]`` (at the labels: the PIT values)."""
        self._require("cdf", categorical=False)
        return self.likelihood.predictive_cdf(self.logits, self.variance, values)

    def quantile(self, q: float) -> torch.Tensor:
        """The ``q``-quantile of every marginal predictive ``[B, O]``."""
        self._require("quantile", categorical=False)
        return self.likelihood.predictive_quantile(self.logits, self.variance, q)

    def interval(self, level: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The central ``level`` predictive interval ``(lower, upper)``, each ``[B, O]``."""
        if not 0.0 < float(level) < 1.0:
            raise ValueError(f"level: expected a coverage level in (0, 1), got {level!r}.")
        return self.quantile(0.5 - level / 2), self.quantile(0.5 + level / 2)

    # ------------------------------------------------------------------ classification (class logits)
    @property
    def sample_log_probs(self) -> torch.Tensor:
        """Per-sample log-probabilities ``[S, B, C]`` in float64."""
        self._require("log_probs", categorical=True)
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
        """Whether the predictive carries an epistemic score (several samples, or a closed-form ``epistemic`` /
        ``variance``)."""
        return self.epistemic is not None or self.variance is not None or self.num_samples > 1

    @property
    def mutual_information(self) -> torch.Tensor:
        """Epistemic part: entropy - expected entropy ``[B]`` (>= 0 up to rounding; 0 for S=1), or ``epistemic``."""
        if self.epistemic is not None:
            return self.epistemic.double()
        return (self.entropy - self.expected_entropy).clamp_min(0.0)

    def __repr__(self) -> str:
        """Shapes and summary statistics (not a tensor dump): ``print(predictive)``."""
        s, b, c = self.logits.shape
        if not self.is_categorical:
            sd = self.predictive_variance.sqrt()
            return (
                f"Predictive(S={s} samples, B={b} examples, O={c} outputs, {self.likelihood.name} likelihood; "
                f"predictive std mean {float(sd.mean()):.4g} (epistemic std mean "
                f"{float(self.epistemic_variance.sqrt().mean()):.4g}); {self.logits.dtype}, {self.logits.device})"
            )
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
        def move(t):
            return None if t is None else t.to(device)

        return Predictive(self.logits.to(device), move(self.epistemic), self.likelihood, move(self.variance))


@dataclass(frozen=True, repr=False)
class TokenPredictive:
    """A streamed token-level predictive: per target token (the M positions a label scores, in row-major order).

    Attributes:
        sample_log_probs: ``log p_s(y)`` of the target token under each weight sample ``[S, M]`` (float32).
        log_probs: the BMA ``log (1/S) Σ_s p_s(y)`` of the target token ``[M]`` (float32).
        top_tokens: the BMA's top-1 token ``[M]`` (long); top_probs: its BMA probability ``[M]`` (float32).
        entropy: the BMA's entropy ``[M]``; expected_entropy: ``E_s H[p_s]`` ``[M]`` (nats, float32).
        targets: the target tokens ``[M]``; rows: the batch row of each ``[M]``; num_rows: B.
    """

    sample_log_probs: torch.Tensor
    log_probs: torch.Tensor
    top_tokens: torch.Tensor
    top_probs: torch.Tensor
    entropy: torch.Tensor
    expected_entropy: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor
    num_rows: int

    @classmethod
    def from_samples(
        cls, samples: Iterable[torch.Tensor], labels: torch.Tensor, likelihood: TokenCategorical
    ) -> TokenPredictive:
        """Reduce logit samples ``[B, T, V]`` (an iterable, consumed one at a time) against ``labels [B, T]``.

        Only the target positions are kept (``[M, V]`` log-softmaxes, float32); the BMA over the vocabulary is a
        running ``logaddexp`` (one ``[M, V]`` accumulator), and per sample only ``log p_s(y)`` and ``H[p_s]`` are
        kept. Memory: about three ``[M, V]`` float32 tensors and the sample's own logits.
        """
        acc, per_sample, entropies, s = None, [], [], 0
        for logits in samples:
            f, y, mask = likelihood.shift(logits, labels)
            rows, cols = mask.nonzero(as_tuple=True)
            lp = torch.log_softmax(f[rows, cols].float(), dim=-1)  # [M, V]
            targets = y[rows, cols]
            per_sample.append(lp.gather(-1, targets[:, None])[:, 0])
            entropies.append(-(lp.exp() * lp).sum(-1))
            acc = lp if acc is None else torch.logaddexp(acc, lp)
            s += 1
        if s == 0:
            raise ValueError("samples: expected at least one logit sample [B, T, V], got none.")
        bma = acc - math.log(s)
        top_lp, top = bma.max(-1)
        return cls(
            sample_log_probs=torch.stack(per_sample),
            log_probs=bma.gather(-1, targets[:, None])[:, 0],
            top_tokens=top,
            top_probs=top_lp.exp(),
            entropy=-(bma.exp() * bma).sum(-1),
            expected_entropy=torch.stack(entropies).mean(0),
            targets=targets,
            rows=rows,
            num_rows=int(labels.shape[0]),
        )

    @property
    def num_samples(self) -> int:
        return self.sample_log_probs.shape[0]

    @property
    def has_epistemic(self) -> bool:
        return self.num_samples > 1

    @property
    def mutual_information(self) -> torch.Tensor:
        """``H[E_s p_s] − E_s H[p_s]`` per target token ``[M]`` (0 for S = 1)."""
        return (self.entropy - self.expected_entropy).clamp_min(0.0)

    def __repr__(self) -> str:
        return (
            f"TokenPredictive(S={self.num_samples} samples, B={self.num_rows} examples, M={self.targets.numel()} "
            f"target tokens; mean target log-prob {float(self.log_probs.mean()) if self.targets.numel() else 0:.3f})"
        )
