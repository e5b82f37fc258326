"""Temperature scaling (Guo et al., ICML 2017): the one implementation.

Both the ``temperature`` method (:class:`~bayeslora.posteriors.baselines.TemperatureScaling`) and the
``<method> + TS`` row of every run scale the **log-probabilities of the method's model average** (BMA)::

    p_T(y | x) ∝ exp(log p̄(y | x) / T),      p̄ = (1/S) Σ_s softmax(f_s(x)).

For a point predictor (S = 1) this is the usual ``softmax(f / T)``; for a sampling method it keeps the
method's own argmax, so the ``+ TS`` row has exactly the method's accuracy (scaling the *mean logits*
instead would be another predictor, whose accuracy can differ from the method's).

``T`` minimises the validation NLL, which is convex in ``β = 1 / T``; it is found by golden-section search
on ``log T`` inside :data:`TEMPERATURE_BOUNDS` (float64). A fit that ends at a bound is reported with a
:class:`TemperatureBoundWarning`: the validation NLL wants an even flatter (or sharper) predictive than the
bounds allow, typically a model at chance whose best calibrated predictive is the uniform one.
"""

from __future__ import annotations

import math
import warnings

import torch

from .metrics import Predictions
from .predictive import Predictive

TEMPERATURE_BOUNDS = (1e-2, 1e2)
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


class TemperatureBoundWarning(RuntimeWarning):
    """The fitted temperature sits at a bound of :data:`TEMPERATURE_BOUNDS`."""


def require_categorical(likelihood, where: str) -> None:
    """Temperature scaling rescales class logits; a regression likelihood gets a clear error naming the alternative.

    Args:
        likelihood: a :class:`~bayeslora.likelihoods.Likelihood` or anything with one (an AdapterFn).
        where: names the caller in the error.
    """
    name = getattr(getattr(likelihood, "likelihood", likelihood), "name", None)
    if name != "categorical":
        raise ValueError(
            f"{where}: temperature scaling is defined for class logits (a categorical likelihood); this readout's "
            f"likelihood is {name!r}. For regression, fit the observation noise instead (SequenceRegression("
            "noise='fit'), data.noise=fit: σ by maximum likelihood on the training residuals), and leave "
            "eval.temperature_row off."
        )


def _nll(log_probs: torch.Tensor, labels: torch.Tensor, log_t: float) -> float:
    scaled = torch.log_softmax(log_probs / math.exp(log_t), dim=-1)
    return float(-scaled.gather(1, labels[:, None]).mean())


def fit_temperature(
    log_probs: torch.Tensor,
    labels: torch.Tensor,
    *,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
    iterations: int = 80,
    where: str = "temperature",
) -> float:
    """The temperature T in ``bounds`` minimising the NLL of ``softmax(log_probs / T)``.

    Args:
        log_probs: validation log-probabilities of the method's model average ``[N, C]`` (logits of a point
            predictor work too: softmax is invariant to their offset).
        labels: ``[N]``.
        bounds: ``(T_min, T_max)``; a fit at a bound warns (:class:`TemperatureBoundWarning`).
        iterations: golden-section steps on ``log T`` (80 shrink the interval by 1e-17).
        where: names the caller in warnings and errors.
    """
    if log_probs.ndim != 2 or log_probs.shape[0] == 0:
        raise ValueError(
            f"log_probs: expected a non-empty [N, C] tensor of validation log-probabilities, got "
            f"{tuple(log_probs.shape)}."
        )
    if labels.reshape(-1).shape[0] != log_probs.shape[0]:
        raise ValueError(f"labels: expected {log_probs.shape[0]} labels, got {labels.numel()}.")
    lo_t, hi_t = bounds
    if not 0 < lo_t < 1 < hi_t < math.inf:
        raise ValueError(f"bounds: expected (T_min, T_max) with 0 < T_min < 1 < T_max < inf, got {bounds!r}.")
    x = log_probs.detach().double().cpu()
    if not torch.isfinite(x).all():  # -inf log-probabilities (probability 0) are fine; NaN / +inf are not
        if torch.isnan(x).any() or (x == math.inf).any():
            raise ValueError(f"{where}: the validation log-probabilities hold NaN or +inf; check the predictions.")
        x = x.clamp_min(torch.finfo(torch.float64).min / 4)
    y = labels.reshape(-1).long().cpu()
    lo, hi = math.log(lo_t), math.log(hi_t)
    a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fa, fb = _nll(x, y, a), _nll(x, y, b)
    for _ in range(iterations):  # the NLL is convex in 1/T, hence unimodal in log T
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - _GOLDEN * (hi - lo)
            fa = _nll(x, y, a)
        else:
            lo, a, fa = a, b, fb
            b = lo + _GOLDEN * (hi - lo)
            fb = _nll(x, y, b)
    log_t = 0.5 * (lo + hi)
    t = math.exp(log_t)
    if abs(log_t - math.log(lo_t)) < 1e-3 or abs(log_t - math.log(hi_t)) < 1e-3:
        warnings.warn(
            f"{where}: the fitted temperature T={t:.4g} is at a bound of {bounds}; the validation NLL asks for an even "
            "flatter (or sharper) predictive, e.g. a model at chance. The scaled row is the bound's.",
            TemperatureBoundWarning,
            stacklevel=2,
        )
    return t


def scale(log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(log_probs / T)`` ``[..., C]`` (float64)."""
    return torch.log_softmax(log_probs.double() / temperature, dim=-1)


def temperature_predictive(pred: Predictive, temperature: float) -> Predictive:
    """The temperature-scaled model average of a predictive, as a point predictive ``[1, B, C]``."""
    return Predictive.point(scale(pred.log_probs, temperature))


def temperature_scaled(preds: Predictions, temperature: float) -> Predictions:
    """Temperature-scaled predictions of a method (its model average scaled; point predictions)."""
    return Predictions.from_predictive(Predictive.point(scale(preds.log_probs, temperature)), preds.labels)
