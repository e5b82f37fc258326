"""Results directory -> figures: reliability diagrams of every method on one figure, risk–coverage curves.

For each (training dataset, model) of a results directory, from the saved ``predictions.pt`` of one seed
(the lowest seed that every method has, so the panels compare the same test examples):

* ``<prefix>_reliability_<data>.png`` – one reliability panel per method (accuracy per confidence bin
  against the diagonal, 15 equal-width bins, ECE in the panel title; Guo et al., 2017), side by side;
* ``<prefix>_risk_coverage_<data>.png`` – selective prediction: the risk–coverage curve of every method on
  one axis, AURC in the legend (Geifman & El-Yaniv, 2017).

With ``layout="ood"`` the same two figures are drawn for every shifted set (``split`` ``ood/<name>``).
Written by ``bayeslora-tables RESULTS_DIR --out DIR --figures``.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from .metrics import ECE_BINS, Predictions, ece
from .plots import _pyplot, _save, reliability_bins, risk_coverage_plot
from .results import OOD_PREFIX, TS_KEY, RunRecord, collect, row_label, row_variants, select


def reliability_grid(
    predictions: Mapping[str, Predictions], path: str | os.PathLike, n_bins: int = ECE_BINS, title: str | None = None
) -> Path:
    """Reliability diagrams of several methods on one figure, one panel per method (bars = bin accuracy)."""
    if not predictions:
        raise ValueError("predictions: expected at least one method's predictions, got none.")
    plt = _pyplot()
    k = len(predictions)
    cols = min(k, 4)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.7 * rows), squeeze=False, sharex=True, sharey=True)
    for ax, (name, p) in zip(axes.flat, predictions.items()):
        conf, acc, count, edges = reliability_bins(p.log_probs, p.labels, n_bins)
        left, width = edges[:-1].numpy(), (edges[1:] - edges[:-1]).numpy()
        keep = (count > 0).numpy()
        ax.bar(left[keep], acc[keep].numpy(), width=width[keep], align="edge", edgecolor="k", lw=0.4, label="accuracy")
        ax.bar(
            left[keep],
            (conf - acc)[keep].numpy(),
            bottom=acc[keep].numpy(),
            width=width[keep],
            align="edge",
            color="tab:red",
            alpha=0.3,
            label="gap",
        )
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        ax.set_title(f"{name}\nECE {100 * ece(p.log_probs, p.labels, n_bins=n_bins):.1f}%", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[k:]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("confidence")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, plt)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _seed_predictions(runs: list[RunRecord], key: str, ts_rows: bool) -> tuple[dict[str, Predictions], int | None]:
    """``{method label: Predictions}`` of split ``key`` for the lowest seed common to all methods."""
    by_label: dict[str, dict[int, RunRecord]] = defaultdict(dict)
    for run in runs:
        by_label[row_label(run)][int(run.seed)] = run
    common = set.intersection(*(set(seeds) for seeds in by_label.values())) if by_label else set()
    if not common:
        return {}, None
    seed = min(common)
    out: dict[str, Predictions] = {}
    for seeds in by_label.values():
        run = seeds[seed]
        preds = run.predictions()
        for name, suffix in row_variants(run, ts_rows):
            if key + suffix in preds:
                out[name] = Predictions.from_state_dict(preds[key + suffix])
    return out, seed


def make_figures(
    results_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str = "test",
    model: str | None = None,
    data: str | None = None,
    ts_rows: bool = False,
    layout: str = "datasets",
    prefix: str = "table",
    columns: Sequence[str] | None = None,
) -> list[Path]:
    """Write the reliability and risk–coverage figures of a results directory; returns the written paths
    (classification runs only: a regression run has no class confidences).

    ``columns``: only the figures of these table columns (datasets, or OOD sets in the ``ood`` layout)."""
    runs = select(collect(results_dir), model=model, data=data, where=str(results_dir))
    groups: dict[str, list[RunRecord]] = defaultdict(list)
    for run in runs:
        if run.rmse is None:  # reliability and risk–coverage are figures of class predictives, not of a regression
            groups[run.data].append(run)
    written = []
    for name, group in groups.items():
        keys = [(split, name)] if layout == "ood" or columns is None or name in columns else []
        if layout == "ood":
            shifted = sorted({k for r in group for k in (r.ood or {}) if not k.endswith(TS_KEY)})
            keys += [(f"{OOD_PREFIX}{s}", f"{name}_to_{s}") for s in shifted if columns is None or s in columns]
        for key, tag in keys:
            preds, seed = _seed_predictions(group, key, ts_rows)
            if not preds:
                continue
            title = f"{tag} · {group[0].model} · {key} (seed {seed})"
            out = Path(out_dir)
            written.append(reliability_grid(preds, out / f"{prefix}_reliability_{_slug(tag)}.png", title=title))
            written.append(risk_coverage_plot(preds, out / f"{prefix}_risk_coverage_{_slug(tag)}.png", title=title))
    if not written:
        raise ValueError(
            f"split: no classification run's predictions.pt holds split {split!r} under {str(results_dir)!r} "
            "(regression runs have no reliability figures)."
        )
    return written
