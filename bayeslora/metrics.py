"""Metrics on predictive distributions: pure functions of ``(log_probs [N, C], labels [N])``.

All metrics are computed once over the whole dataset (never a mean of batch means).

* accuracy – top-1.
* ECE – expected calibration error, top-label, 15 equal-width bins, L1 norm (torchmetrics
  ``multiclass_calibration_error(norm="l1", n_bins=15)``, Naeini et al. 2015 / Guo et al. 2017).
* NLL – mean negative log-likelihood of the label (nats).
* Brier – multi-class Brier score ``mean_n sum_c (p_nc - 1[y_n = c])^2`` (Brier 1950), in [0, 2].
* OOD AUROC – from an uncertainty score (predictive entropy or mutual information), OOD = positive.
* Selective prediction – risk–coverage curve ordered by confidence and its area (AURC, Geifman & El-Yaniv 2017).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torchmetrics.functional.classification import binary_auroc, multiclass_calibration_error

from .predictive import Predictive
from .progress import bar as progress_bar

ECE_BINS = 15


def _check(log_probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if log_probs.ndim != 2:
        raise ValueError(f"log_probs: expected [N, C], got shape {tuple(log_probs.shape)}.")
    labels = labels.reshape(-1).long().to(log_probs.device)
    if labels.shape[0] != log_probs.shape[0]:
        raise ValueError(
            f"labels: expected {log_probs.shape[0]} labels (one per row of log_probs), got {labels.shape[0]}."
        )
    if labels.numel() == 0:
        raise ValueError("labels: expected at least one example, got an empty set; check the evaluation split.")
    c = log_probs.shape[1]
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"labels: expected integers in [0, {c}), got range [{labels.min()}, {labels.max()}].")
    return log_probs.double(), labels


def accuracy(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    lp, y = _check(log_probs, labels)
    return (lp.argmax(-1) == y).double().mean().item()


def nll(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    lp, y = _check(log_probs, labels)
    return -lp.gather(1, y[:, None]).mean().item()


def brier(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    lp, y = _check(log_probs, labels)
    onehot = torch.nn.functional.one_hot(y, lp.shape[1]).double()
    return ((lp.exp() - onehot) ** 2).sum(-1).mean().item()


def ece(log_probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE with ``n_bins`` equal-width bins, L1 norm (torchmetrics)."""
    lp, y = _check(log_probs, labels)
    probs = lp.exp().float()
    probs = probs / probs.sum(-1, keepdim=True)
    return multiclass_calibration_error(probs, y, num_classes=lp.shape[1], n_bins=n_bins, norm="l1").item()


def risk_coverage(log_probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective-prediction curve: (coverage [N], risk [N]) keeping the most confident first."""
    lp, y = _check(log_probs, labels)
    conf, pred = lp.max(-1)
    order = torch.argsort(conf, descending=True, stable=True)
    errors = (pred[order] != y[order]).double()
    k = torch.arange(1, len(errors) + 1, dtype=torch.float64)
    return k / len(errors), errors.cumsum(0) / k


def aurc(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the risk–coverage curve (lower is better)."""
    _, risk = risk_coverage(log_probs, labels)
    return risk.mean().item()


def ood_auroc(score_in: torch.Tensor, score_out: torch.Tensor) -> float:
    """AUROC of separating OOD (positive) from in-distribution by an uncertainty score."""
    if score_in.numel() == 0 or score_out.numel() == 0:
        raise ValueError("score_in/score_out: expected non-empty score vectors for both sets.")
    scores = torch.cat([score_in.reshape(-1), score_out.reshape(-1)]).double()  # float32 would create ties
    target = torch.cat([torch.zeros(score_in.numel()), torch.ones(score_out.numel())]).long()
    return binary_auroc(scores, target).item()


def classification_metrics(log_probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> dict[str, float]:
    """acc, ece, nll, brier and aurc in one dict."""
    return {
        "acc": accuracy(log_probs, labels),
        "ece": ece(log_probs, labels, n_bins=n_bins),
        "nll": nll(log_probs, labels),
        "brier": brier(log_probs, labels),
        "aurc": aurc(log_probs, labels),
    }


@dataclass
class Predictions:
    """Per-example predictions of one method on one split (saved so tables can be recomputed).

    Attributes:
        log_probs: BMA log-probabilities ``[N, C]`` (float64).
        labels: ``[N]``.
        mean_logits: mean logit samples ``[N, C]``.
        entropy: predictive entropy ``[N]``.
        mutual_information: the epistemic score ``[N]`` (identically 0 for a point predictor).
        has_epistemic: whether the method has an epistemic score (False for point predictors: MAP, temperature
            scaling), so OOD detection by MI is reported only where it is defined.
    """

    log_probs: torch.Tensor
    labels: torch.Tensor
    mean_logits: torch.Tensor
    entropy: torch.Tensor
    mutual_information: torch.Tensor
    has_epistemic: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_predictive(cls, pred: Predictive, labels: torch.Tensor) -> Predictions:
        return cls(
            log_probs=pred.log_probs.cpu(),
            labels=labels.reshape(-1).long().cpu(),
            mean_logits=pred.mean_logits.float().cpu(),
            entropy=pred.entropy.cpu(),
            mutual_information=pred.mutual_information.cpu(),
            has_epistemic=pred.has_epistemic,
        )

    @classmethod
    def cat(cls, parts: Iterable[Predictions]) -> Predictions:
        parts = list(parts)
        if not parts:
            raise ValueError("parts: expected at least one batch of predictions; the evaluation loader was empty.")
        tensors = {k: torch.cat([getattr(p, k) for p in parts]) for k in _TENSOR_FIELDS}
        return cls(**tensors, has_epistemic=all(p.has_epistemic for p in parts))

    def metrics(self, n_bins: int = ECE_BINS) -> dict[str, float]:
        return classification_metrics(self.log_probs, self.labels, n_bins=n_bins)

    def state_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in _TENSOR_FIELDS}, "has_epistemic": self.has_epistemic}

    @classmethod
    def from_state_dict(cls, state: Mapping) -> Predictions:
        return cls(**{k: state[k] for k in _TENSOR_FIELDS}, has_epistemic=bool(state.get("has_epistemic", True)))


_TENSOR_FIELDS = ("log_probs", "labels", "mean_logits", "entropy", "mutual_information")


def predict_loader(posterior, fn, loader, *, n_samples: int | None = None, seed: int = 0) -> Predictions:
    """Run ``posterior.predict`` over a loader and collect per-example :class:`Predictions`.

    Args:
        posterior: any :class:`~bayeslora.posteriors.Posterior`.
        fn: the AdapterFn.
        loader: evaluation batches with ``labels``.
        n_samples: samples per batch (None: the posterior's default).
        seed: seeds a dedicated ``torch.Generator`` for the posterior's sampling.

    Grad mode is left to the posterior (a GLM predictive needs autograd for its Jacobians).
    """
    generator = torch.Generator(device=fn.device).manual_seed(seed)
    parts = []
    for batch in progress_bar(loader, desc=f"predict ({getattr(posterior, 'name', 'posterior')})"):
        pred = posterior.predict(fn, batch, n_samples=n_samples, generator=generator)
        parts.append(Predictions.from_predictive(pred, batch["labels"]))
    return Predictions.cat(parts)


def evaluate(posterior, fn, loader, *, n_samples: int | None = None, seed: int = 0, n_bins: int = ECE_BINS):
    """Metrics (acc, ece, nll, brier, aurc) of a posterior over a whole loader, and its predictions."""
    preds = predict_loader(posterior, fn, loader, n_samples=n_samples, seed=seed)
    return preds.metrics(n_bins=n_bins), preds
