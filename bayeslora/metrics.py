"""Metrics on predictive distributions: pure functions of ``(log_probs [N, C], labels [N])``.

All metrics are computed once over the whole dataset (never a mean of batch means).

* accuracy – top-1.
* ECE – expected calibration error, top-label, 15 equal-width bins, L1 norm (torchmetrics
  ``multiclass_calibration_error(norm="l1", n_bins=15)``, Naeini et al. 2015 / Guo et al. 2017).
* NLL – mean negative log-likelihood of the label (nats).
* Brier – multi-class Brier score ``mean_n sum_c (p_nc - 1[y_n = c])^2`` (Brier 1950), in [0, 2].
* OOD AUROC – from an uncertainty score (predictive entropy or mutual information), OOD = positive.
* Selective prediction – risk–coverage curve ordered by confidence and its area (AURC, Geifman & El-Yaniv 2017).

Regression (a Gaussian likelihood; :func:`regression_metrics`) is scored from per-example quantities of the
predictive distribution (:class:`RegressionPredictions`): its log-density at the label, its mean and its CDF at the
label (the probability integral transform, PIT ``u = F(y)``):

* NLL – ``−mean_n log p(y_n | x_n)`` (nats; the mixture density of the predictive, not the one of its mean);
* RMSE – ``√(mean_n ||y_n − E[y | x_n]||² / O)``;
* coverage at level ``p`` – the fraction of labels inside the central ``p`` interval ``[F⁻¹(½ − p/2), F⁻¹(½ + p/2)]``,
  i.e. with ``|u − ½| ≤ p/2`` (reported at 50 / 90 / 95 %: ``cov50``, ``cov90``, ``cov95``);
* regression calibration error (``rce``) – ``mean_p |coverage(p) − p|`` over the central levels
  ``p = 0.05, 0.10, …, 0.95`` (:data:`CALIBRATION_LEVELS`): the L1 form of the calibration error of Kuleshov, Fenner
  & Ermon (ICML 2018) over central intervals; 0 for a calibrated predictive, up to ½.

Outputs ``O > 1`` count each output as an example in the coverage and calibration error.

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
COVERAGE_LEVELS = (0.5, 0.9, 0.95)
CLASSIFICATION_KEYS = ("acc", "ece", "nll", "brier", "aurc")  # what classification_metrics returns
REGRESSION_KEYS = ("nll", "rmse", "cov50", "cov90", "cov95", "rce")  # what regression_metrics returns
TOKEN_KEYS = ("token_nll", "token_acc", "token_ece", "seq_nll", "perplexity")  # what token_metrics returns
CALIBRATION_LEVELS = tuple(round(0.05 * k, 2) for k in range(1, 20))


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


def selective_risk(confidence: torch.Tensor, errors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective-prediction curve of per-example ``confidence`` and ``errors`` (bool): (coverage [N], risk [N])
    keeping the most confident first."""
    order = torch.argsort(confidence, descending=True, stable=True)
    wrong = errors[order].double()
    k = torch.arange(1, len(wrong) + 1, dtype=torch.float64)
    return k / len(wrong), wrong.cumsum(0) / k


def risk_coverage(log_probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective-prediction curve: (coverage [N], risk [N]) keeping the most confident first."""
    lp, y = _check(log_probs, labels)
    conf, pred = lp.max(-1)
    return selective_risk(conf, pred != y)


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


def _check_regression(values: torch.Tensor, labels: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    y = labels.double().to(values.device)
    if y.ndim == 1 and values.ndim == 2 and values.shape[1] == 1:
        y = y[:, None]
    if y.shape != values.shape or values.ndim != 2:
        raise ValueError(f"labels: expected targets shaped like the {what} [N, O] = {tuple(values.shape)}, got "
                         f"{tuple(labels.shape)}.")  # fmt: skip
    if y.shape[0] == 0:
        raise ValueError("labels: expected at least one example, got an empty set; check the evaluation split.")
    return values.double(), y


def _check_pit(pit: torch.Tensor) -> torch.Tensor:
    u = pit.double().reshape(-1)
    if u.numel() == 0 or not bool(((u >= 0) & (u <= 1)).all()):
        raise ValueError("pit: expected a non-empty tensor of predictive CDF values at the labels, in [0, 1].")
    return u


def regression_nll(log_density: torch.Tensor) -> float:
    """``−mean log p(y | x)`` from the per-example predictive log-densities ``[N]``."""
    if log_density.numel() == 0:
        raise ValueError("log_density: expected one log-density per example, got an empty tensor.")
    return -log_density.double().mean().item()


def rmse(mean: torch.Tensor, labels: torch.Tensor) -> float:
    """Root mean squared error of the predictive mean ``[N, O]`` against the targets ``[N, O]`` (or ``[N]``)."""
    m, y = _check_regression(mean, labels, "predictive means")
    return (m - y).square().mean().sqrt().item()


def interval_coverage(pit: torch.Tensor, level: float) -> float:
    """Fraction of labels inside the central ``level`` predictive interval, from their PIT values ``F(y)``."""
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level: expected a coverage level in (0, 1), got {level!r}.")
    u = _check_pit(pit)
    return ((u - 0.5).abs() <= level / 2).double().mean().item()


def regression_calibration_error(pit: torch.Tensor, levels=CALIBRATION_LEVELS) -> float:
    """``mean_p |coverage(p) − p|`` over central interval levels ``p`` (module docstring)."""
    return sum(abs(interval_coverage(pit, p) - p) for p in levels) / len(levels)


def regression_metrics(log_density: torch.Tensor, mean: torch.Tensor, pit: torch.Tensor, labels: torch.Tensor):
    """nll, rmse, cov50 / cov90 / cov95 and rce (module docstring) in one dict."""
    out = {"nll": regression_nll(log_density), "rmse": rmse(mean, labels)}
    out.update({f"cov{round(100 * p)}": interval_coverage(pit, p) for p in COVERAGE_LEVELS})
    out["rce"] = regression_calibration_error(pit)
    return out


class _Record:
    """What the per-example records share: concatenation over batches and the saved state (their tensor fields
    ``TENSOR_FIELDS``, ``has_epistemic`` and, but for the classification record, their ``kind``)."""

    KIND: str | None = None
    TENSOR_FIELDS: tuple[str, ...] = ()

    @classmethod
    def cat(cls, parts: Iterable, **extra):
        parts = list(parts)
        if not parts:
            raise ValueError("parts: expected at least one batch of predictions; the evaluation loader was empty.")
        tensors = {k: torch.cat([getattr(p, k) for p in parts]) for k in cls.TENSOR_FIELDS}
        return cls(**tensors, **extra, has_epistemic=all(p.has_epistemic for p in parts))

    def state_dict(self) -> dict:
        state = {**{k: getattr(self, k) for k in self.TENSOR_FIELDS}, "has_epistemic": self.has_epistemic}
        return state if self.KIND is None else {**state, "kind": self.KIND}

    @classmethod
    def _from_state(cls, state: Mapping, **extra):
        return cls(
            **{k: state[k] for k in cls.TENSOR_FIELDS}, **extra, has_epistemic=bool(state.get("has_epistemic", True))
        )


@dataclass
class Predictions(_Record):
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

    def metrics(self, n_bins: int = ECE_BINS) -> dict[str, float]:
        return classification_metrics(self.log_probs, self.labels, n_bins=n_bins)

    @classmethod
    def from_state_dict(cls, state: Mapping) -> Predictions | RegressionPredictions | TokenPredictions:
        """Rebuild saved predictions of any kind (a state's ``kind`` names its record; none: classification)."""
        for record in (RegressionPredictions, TokenPredictions):
            if state.get("kind") == record.KIND:
                return record.from_state_dict(state)
        return cls._from_state(state)


_TENSOR_FIELDS = ("log_probs", "labels", "mean_logits", "entropy", "mutual_information")
Predictions.TENSOR_FIELDS = _TENSOR_FIELDS


@dataclass
class RegressionPredictions(_Record):
    """Per-example predictions of a regression posterior (a Gaussian likelihood) on one split.

    Attributes:
        log_density: ``log p(y | x)`` of the label ``[N]`` (float64).
        mean: the predictive mean ``[N, O]``.
        variance: the predictive variance ``[N, O]`` (observation noise + function-space variance).
        pit: the predictive CDF at the label ``[N, O]`` (coverage and calibration are functions of it).
        labels: the targets ``[N, O]``.
        epistemic_variance: the function-space variance ``[N, O]`` (0 for a point predictor).
        has_epistemic: whether the method has an epistemic score.
    """

    KIND = "regression"
    TENSOR_FIELDS = ("log_density", "mean", "variance", "pit", "labels", "epistemic_variance")

    log_density: torch.Tensor
    mean: torch.Tensor
    variance: torch.Tensor
    pit: torch.Tensor
    labels: torch.Tensor
    epistemic_variance: torch.Tensor
    has_epistemic: bool = True

    @classmethod
    def from_predictive(cls, pred: Predictive, labels: torch.Tensor) -> RegressionPredictions:
        y = labels.to(pred.logits.device).double().reshape(pred.logits.shape[1:])
        return cls(
            log_density=pred.log_likelihood(y).cpu(),
            mean=pred.mean.cpu(),
            variance=pred.predictive_variance.cpu(),
            pit=pred.cdf(y).cpu(),
            labels=y.cpu(),
            epistemic_variance=pred.epistemic_variance.cpu(),
            has_epistemic=pred.has_epistemic,
        )

    def metrics(self, n_bins: int = ECE_BINS) -> dict[str, float]:
        """:func:`regression_metrics` (``n_bins`` is the classification metrics' and unused here)."""
        return regression_metrics(self.log_density, self.mean, self.pit, self.labels)

    @classmethod
    def from_state_dict(cls, state: Mapping) -> RegressionPredictions:
        return cls._from_state(state)


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
class TokenPredictions(_Record):
    """Per-target-token predictions of one method on one split (saved so tables can be recomputed).

    Attributes:
        log_probs: BMA log-probability of each target token ``[M]`` (float64).
        top_probs: BMA probability of the top-1 token ``[M]``; correct: whether it is the target ``[M]`` (bool).
        entropy, mutual_information: per target token ``[M]`` (nats).
        example: the index of each token's example in the split ``[M]``; num_examples: N.
        has_epistemic: whether the method has an epistemic score (S > 1 samples).
    """

    KIND = "token"
    TENSOR_FIELDS = ("log_probs", "top_probs", "correct", "entropy", "mutual_information", "example")

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
        return super().cat(parts, num_examples=sum(p.num_examples for p in parts))

    def metrics(self, n_bins: int = ECE_BINS) -> dict[str, float]:
        return token_metrics(self.log_probs, self.top_probs, self.correct, self.example, self.num_examples, n_bins)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "num_examples": self.num_examples}

    @classmethod
    def from_state_dict(cls, state: Mapping) -> TokenPredictions:
        return cls._from_state(state, num_examples=int(state["num_examples"]))


def predictions_from_predictive(
    pred: Predictive | TokenPredictive, labels: torch.Tensor, offset: int = 0
) -> Predictions | RegressionPredictions | TokenPredictions:
    """The per-example record of a predictive: :class:`Predictions` for class logits, :class:`RegressionPredictions`
    for a Gaussian likelihood, :class:`TokenPredictions` for a token-level one (``offset``: the index of the batch's
    first example in the split)."""
    if isinstance(pred, TokenPredictive):
        return TokenPredictions.from_predictive(pred, offset=offset)
    record = Predictions if pred.is_categorical else RegressionPredictions
    return record.from_predictive(pred, labels)


def records_of(state: Mapping) -> Predictions | RegressionPredictions | TokenPredictions:
    """Rebuild per-example records from a ``state_dict`` of any kind (:meth:`Predictions.from_state_dict`)."""
    return Predictions.from_state_dict(state)


def predict_loader(
    posterior, fn, loader, *, n_samples: int | None = None, seed: int = 0
) -> Predictions | RegressionPredictions | TokenPredictions:
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
        parts.append(predictions_from_predictive(pred, batch["labels"], offset=seen))
        seen += int(batch["labels"].shape[0])
    return type(parts[0]).cat(parts) if parts else Predictions.cat(parts)


def evaluate(posterior, fn, loader, *, n_samples: int | None = None, seed: int = 0, n_bins: int = ECE_BINS):
    """Metrics of a posterior over a whole loader (acc, ece, nll, brier, aurc; for regression nll, rmse, cov50,
    cov90, cov95, rce), and its predictions."""
    preds = predict_loader(posterior, fn, loader, n_samples=n_samples, seed=seed)
    return preds.metrics(n_bins=n_bins), preds
