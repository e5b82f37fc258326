"""Figures: reliability diagrams and risk–coverage curves (matplotlib, Agg backend, atomic PNG writes)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .io import atomic_write
from .metrics import ECE_BINS, Predictions, ece, risk_coverage


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def reliability_bins(log_probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS):
    """Per-bin (confidence, accuracy, count) of top-label confidence, equal-width bins on [0, 1]."""
    conf, pred = log_probs.exp().max(-1)
    correct = (pred == labels.to(pred.device)).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype)
    idx = torch.bucketize(conf, edges[1:-1], right=True)
    count = torch.bincount(idx, minlength=n_bins).double()
    conf_sum = torch.bincount(idx, weights=conf.double(), minlength=n_bins)
    acc_sum = torch.bincount(idx, weights=correct, minlength=n_bins)
    safe = count.clamp_min(1)
    return conf_sum / safe, acc_sum / safe, count, edges


def reliability_diagram(
    predictions: Mapping[str, Predictions], path: str | os.PathLike, n_bins: int = ECE_BINS, title: str | None = None
) -> Path:
    """One reliability diagram with a line per method (accuracy vs confidence, bins with data only)."""
    plt = _pyplot()
    fig, (ax, axh) = plt.subplots(2, 1, figsize=(4.8, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for name, p in predictions.items():
        conf, acc, count, edges = reliability_bins(p.log_probs, p.labels, n_bins)
        keep = count > 0
        e = ece(p.log_probs, p.labels, n_bins=n_bins)
        ax.plot(conf[keep].numpy(), acc[keep].numpy(), marker="o", ms=3, label=f"{name} (ECE {100 * e:.1f}%)")
        centers = ((edges[:-1] + edges[1:]) / 2).numpy()
        axh.plot(centers, (count / count.sum()).numpy(), marker=".", ms=3)
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    if title:
        ax.set_title(title, fontsize=9)
    axh.set_xlabel("confidence (top label)")
    axh.set_ylabel("fraction")
    fig.tight_layout()
    return _save(fig, path, plt)


def risk_coverage_plot(
    predictions: Mapping[str, Predictions], path: str | os.PathLike, title: str | None = None
) -> Path:
    """Selective risk vs coverage, one line per method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    for name, p in predictions.items():
        cov, risk = risk_coverage(p.log_probs, p.labels)
        ax.plot(cov.numpy(), risk.numpy(), label=f"{name} (AURC {risk.mean().item():.3f})")
    ax.set_xlabel("coverage")
    ax.set_ylabel("selective risk (error)")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, plt)


def _save(fig, path, plt) -> Path:
    try:
        return atomic_write(path, lambda p: fig.savefig(p, dpi=130, format="png"))
    finally:
        plt.close(fig)
