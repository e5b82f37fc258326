"""Metrics on predictive distributions: pure functions of ``(log_probs [N, C], labels [N])``.

All metrics are computed once over the whole dataset (never a mean of batch means).

* accuracy – top-1.
* ECE – expected calibration error, top-label, 15 equal-width bins, L1 norm (torchmetrics
  ``multiclass_calibration_error(norm="l1", n_bins=15)``, Naeini et al. 2015 / Guo et al. 2017).
* NLL – mean negative log-likelihood of the label (nats).
* Brier – multi-class Brier score ``mean_n sum_c (p_nc - 1[y_n = c])^2`` (Brier 1950), in [0, 2].
* OOD AUROC – from an uncertainty score (predictive entropy or mutual information), OOD = positive.
* Selective prediction – risk–coverage curve ordered by confidence and its area (AURC, Geifman & El-Yaniv 2017).

Token-level (free-text targets, :class:`TokenPredictions`): over the M target tokens of a split, per-token NLL
(``token_nll``), top-1 token accuracy and ECE (the same 15 equal-width bins on the BMA's top-1 probability), the mean
negative sequence log-likelihood (``seq_nll``: the sum over an example's target tokens, averaged over examples) and
the perplexity ``exp(token_nll)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torchmetrics.functional.classification import binary_auroc, multiclass_calibration_error

from .predictive import Predictive, TokenPredictive
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


def _check_tokens(*tensors: torch.Tensor) -> None:
    sizes = {t.numel() for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"token metrics: expected one value per target token in every argument, got sizes {sizes}.")
    if 0 in sizes:
        raise ValueError("token metrics: expected at least one target token, got none; check the labels' ignore index.")


def token_nll(log_probs: torch.Tensor) -> float:
    """Mean NLL per target token (nats) from the target tokens' log-probabilities ``[M]``."""
    _check_tokens(log_probs)
    return -log_probs.double().mean().item()


def perplexity(log_probs: torch.Tensor) -> float:
    """``exp`` of the per-token NLL."""
    return float(torch.tensor(token_nll(log_probs), dtype=torch.float64).exp())


def sequence_log_likelihood(log_probs: torch.Tensor, example: torch.Tensor, num_examples: int) -> torch.Tensor:
    """Per-example log-likelihood of the target text ``[N]``: the sum of its target tokens' log-probabilities."""
    _check_tokens(log_probs, example)
    out = torch.zeros(num_examples, dtype=torch.float64)
    return out.index_add_(0, example.long().cpu(), log_probs.double().cpu())


def binned_ece(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE from the top-1 confidences and correctness ``[M]``: ``n_bins`` equal-width bins ``[l, u)`` on
    [0, 1], L1 (the binning of :func:`ece`)."""
    _check_tokens(confidence, correct)
    conf, hit = confidence.double().reshape(-1), correct.double().reshape(-1)
    bins = torch.bucketize(conf, torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)[1:-1], right=True)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, torch.ones_like(conf))
    gap = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, conf - hit)
    return float(gap.abs().sum() / count.sum())


def token_metrics(
    log_probs: torch.Tensor, top_probs: torch.Tensor, correct: torch.Tensor, example: torch.Tensor, num_examples: int,
    n_bins: int = ECE_BINS,
) -> dict[str, float]:  # fmt: skip
    """token_nll, token_acc, token_ece, seq_nll and perplexity in one dict."""
    _check_tokens(log_probs, top_probs, correct, example)
    return {
        "token_nll": token_nll(log_probs),
        "token_acc": correct.double().mean().item(),
        "token_ece": binned_ece(top_probs, correct, n_bins),
        "seq_nll": -sequence_log_likelihood(log_probs, example, num_examples).mean().item(),
        "perplexity": perplexity(log_probs),
    }


@dataclass
class TokenPredictions:
    """Per-target-token predictions of one method on one split (saved so tables can be recomputed).

    Attributes:
        log_probs: BMA log-probability of each target token ``[M]`` (float64).
        top_probs: BMA probability of the top-1 token ``[M]``; correct: whether it is the target ``[M]`` (bool).
        entropy, mutual_information: per target token ``[M]`` (nats).
        example: the index of each token's example in the split ``[M]``; num_examples: N.
        has_epistemic: whether the method has an epistemic score (S > 1 samples).
    """

    log_probs: torch.Tensor
    top_probs: torch.Tensor
    correct: torch.Tensor
    entropy: torch.Tensor
    mutual_information: torch.Tensor
    example: torch.Tensor
    num_examples: int
    has_epistemic: bool = True

    @classmethod
    def from_predictive(cls, pred: TokenPredictive, offset: int = 0) -> TokenPredictions:
        """The records of one batch whose first example is example ``offset`` of the split."""
        return cls(
            log_probs=pred.log_probs.double().cpu(),
            top_probs=pred.top_probs.float().cpu(),
            correct=(pred.top_tokens == pred.targets).cpu(),
            entropy=pred.entropy.float().cpu(),
            mutual_information=pred.mutual_information.float().cpu(),
            example=(pred.rows + offset).long().cpu(),
            num_examples=pred.num_rows,
            has_epistemic=pred.has_epistemic,
        )

    @classmethod
    def cat(cls, parts: Iterable[TokenPredictions]) -> TokenPredictions:
        """Concatenate consecutive batches (their ``example`` indices already offset)."""
        parts = list(parts)
        if not parts:
            raise ValueError("parts: expected at least one batch of predictions; the evaluation loader was empty.")
        tensors = {k: torch.cat([getattr(p, k) for p in parts]) for k in _TOKEN_FIELDS}
        return cls(**tensors, num_examples=sum(p.num_examples for p in parts),
                   has_epistemic=all(p.has_epistemic for p in parts))  # fmt: skip

    def metrics(self, n_bins: int = ECE_BINS) -> dict[str, float]:
        return token_metrics(self.log_probs, self.top_probs, self.correct, self.example, self.num_examples, n_bins)

    def state_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in _TOKEN_FIELDS}, "num_examples": self.num_examples,
                "has_epistemic": self.has_epistemic, "kind": "token"}  # fmt: skip

    @classmethod
    def from_state_dict(cls, state: Mapping) -> TokenPredictions:
        return cls(**{k: state[k] for k in _TOKEN_FIELDS}, num_examples=int(state["num_examples"]),
                   has_epistemic=bool(state.get("has_epistemic", True)))  # fmt: skip


_TOKEN_FIELDS = ("log_probs", "top_probs", "correct", "entropy", "mutual_information", "example")


def records_of(state: Mapping) -> Predictions | TokenPredictions:
    """Rebuild per-example records from a ``state_dict`` of either kind."""
    return (
        TokenPredictions.from_state_dict(state) if state.get("kind") == "token" else Predictions.from_state_dict(state)
    )


def predict_loader(
    posterior, fn, loader, *, n_samples: int | None = None, seed: int = 0
) -> Predictions | TokenPredictions:
    """Run ``posterior.predict`` over a loader and collect per-example :class:`Predictions`.

    Args:
        posterior: any :class:`~bayeslora.posteriors.Posterior`.
        fn: the AdapterFn.
        loader: evaluation batches with ``labels``.
        n_samples: samples per batch (None: the posterior's default).
        seed: seeds a dedicated ``torch.Generator`` for the posterior's sampling.

    A token-level readout gives :class:`TokenPredictions` (one record per target token). Grad mode is left to the
    posterior (a GLM predictive needs autograd for its Jacobians).
    """
    generator = torch.Generator(device=fn.device).manual_seed(seed)
    parts, seen = [], 0
    for batch in progress_bar(loader, desc=f"predict ({getattr(posterior, 'name', 'posterior')})"):
        pred = posterior.predict(fn, batch, n_samples=n_samples, generator=generator)
        if isinstance(pred, TokenPredictive):
            parts.append(TokenPredictions.from_predictive(pred, offset=seen))
        else:
            parts.append(Predictions.from_predictive(pred, batch["labels"]))
        seen += int(batch["labels"].shape[0])
    kind = TokenPredictions if parts and isinstance(parts[0], TokenPredictions) else Predictions
    return kind.cat(parts)


def evaluate(posterior, fn, loader, *, n_samples: int | None = None, seed: int = 0, n_bins: int = ECE_BINS):
    """Metrics (acc, ece, nll, brier, aurc) of a posterior over a whole loader, and its predictions."""
    preds = predict_loader(posterior, fn, loader, n_samples=n_samples, seed=seed)
    return preds.metrics(n_bins=n_bins), preds
