"""Results directory -> calibration tables (Markdown, LaTeX, CSV), mean ± std over seeds.

Layout as in the Laplace-LoRA / BLoB tables: rows = methods, columns = datasets, one block per
metric (ACC, ECE, NLL, Brier). ACC and ECE are in percent. The best mean per column is bold
(max for ACC, min for ECE/NLL/Brier). A cell whose accuracy is not above chance (mean accuracy
within two binomial standard errors of the majority-class rate of the evaluated split; 1/C for runs that
did not store their label counts) is marked with a dagger, and the footnote gives the NLL / Brier of the
constant predictor that always predicts the split's class frequencies.

Rows are method labels; runs that share a label and a column but differ in a setting (e.g. a sweep over
``prior_precision``) get one row each, labelled with the distinguishing settings
(:func:`bayeslora.results.label_runs`), so different settings are never averaged as if they were seeds.

The ``ood`` layout (runs with ``eval.ood``, see :mod:`bayeslora.ood`): rows = methods, columns = the
in-distribution test set then the shifted sets, blocks = ACC / ECE / NLL and the OOD-detection AUROCs
(predictive entropy, mutual information; in-distribution column empty).

Console script: ``bayeslora-tables RESULTS_DIR [--out DIR] [--split test] [--ts] [--ece-bins N]
[--layout datasets|ood] [--model M] [--data D] [--figures]``.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .io import atomic_write
from .metrics import ECE_BINS, Predictions
from .results import OOD_PREFIX, TS_KEY, TS_SUFFIX, RunRecord, collect, row_variants, select

METRICS = {  # name -> (header, scale, higher is better)
    "acc": ("ACC (%) ↑", 100.0, True),
    "ece": ("ECE (%) ↓", 100.0, False),
    "nll": ("NLL ↓", 1.0, False),
    "brier": ("Brier ↓", 1.0, False),
    "aurc": ("AURC ↓", 1.0, False),
    "rmse": ("RMSE ↓", 1.0, False),  # regression (metrics.regression_metrics); coverage: nearest nominal is best
    "cov50": ("Coverage 50% (%)", 100.0, None),
    "cov90": ("Coverage 90% (%)", 100.0, None),
    "cov95": ("Coverage 95% (%)", 100.0, None),
    "rce": ("Reg. calibration error ↓", 1.0, False),
    "auroc_entropy": ("OOD AUROC, entropy (%) ↑", 100.0, True),
    "auroc_mi": ("OOD AUROC, MI (%) ↑", 100.0, True),
    # free-form answers (eval.answers; bayeslora.answers.answer_metrics), in the "<split>_answers" split
    "map_acc": ("MAP's answer ACC (%) ↑", 100.0, True),
    "err_auroc_votes": ("Error AUROC, vote entropy (%) ↑", 100.0, True),
    "err_auroc_entropy": ("Error AUROC, predictive entropy (%) ↑", 100.0, True),
    "err_auroc_mi": ("Error AUROC, MI (%) ↑", 100.0, True),
    "err_auroc_map": ("Error AUROC, MAP likelihood (%) ↑", 100.0, True),
    "map_aurc": ("MAP's AURC ↓", 1.0, False),
    "map_ece": ("MAP's ECE (%) ↓", 100.0, False),
}
TS_NOTE = (
    "+ TS: temperature scaling of the method's model-average log-probabilities (T fit on validation NLL), so its "
    "accuracy is the method's."
)
LAYOUTS = {  # layout -> default metric blocks
    "datasets": ("acc", "ece", "nll", "brier"),
    "ood": ("acc", "ece", "nll", "auroc_entropy", "auroc_mi"),
}
REGRESSION_BLOCKS = ("nll", "rmse", "cov50", "cov90", "cov95", "rce")  # "datasets" when every run is a regression


@dataclass
class Cell:
    """All seeds of one (method, dataset) for one metric."""

    values: list[float] = field(default_factory=list)
    chance: bool = False

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def std(self) -> float:
        if len(self.values) < 2:
            return 0.0
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (len(self.values) - 1))


def run_metrics(run: RunRecord, split: str, ece_bins: int | None, ood: bool = False) -> dict[str, float] | None:
    """The metrics of one split (``ood``: one shifted set) of a run, recomputed from ``predictions.pt`` when
    ``ece_bins`` is given (the OOD AUROCs do not depend on the bins and are kept)."""
    stored = run.metrics(split, ood=ood)
    if stored is None or ece_bins is None or ece_bins == ECE_BINS or "acc" not in stored:  # unlabelled: no ECE
        return stored
    preds = run.predictions()
    key = f"{OOD_PREFIX}{split}" if ood else split
    if key not in preds:
        return None
    return {**stored, **Predictions.from_state_dict(preds[key]).metrics(n_bins=ece_bins)}


def chance_rate(counts: Sequence[int] | None, num_classes: int | None) -> float | None:
    """The accuracy of always predicting the most frequent class (``counts``), else 1/C, else None."""
    if counts and sum(counts) > 0:
        return max(counts) / sum(counts)
    return 1.0 / num_classes if num_classes else None


def constant_predictor(counts: Sequence[int]) -> dict[str, float]:
    """NLL and Brier of the constant predictor that predicts the class frequencies of ``counts``."""
    n = sum(counts)
    p = [c / n for c in counts]
    return {"nll": -sum(q * math.log(q) for q in p if q > 0), "brier": 1.0 - sum(q * q for q in p)}


def _above_chance(acc: Cell, rate: float | None, n: int | None) -> bool:
    if rate is None or not n:
        return True
    return acc.mean > rate + 2 * math.sqrt(rate * (1 - rate) / n)


def _entries(runs: Iterable[RunRecord], split: str, ts_rows: bool, ece_bins: int | None, layout: str):
    """Yield ``(row, column, metrics, num_classes, n, label counts)`` for every cell value of a layout."""
    for run in runs:
        c, n = run.num_classes, getattr(run, f"num_{split}", None) or run.num_test
        counts = (run.label_counts or {}).get(split)
        if layout == "ood" and not run.ood:
            continue
        for label, suffix in row_variants(run, ts_rows):
            m = run_metrics(run, split + suffix, ece_bins)
            if m is not None:
                yield label, run.data + (" (ID)" if layout == "ood" else ""), m, c, n, counts
            if layout != "ood":
                continue
            for name in sorted(k for k in run.ood if not k.endswith(TS_KEY)):
                m = run_metrics(run, name + suffix, ece_bins, ood=True)
                if m is not None:
                    yield label, name, m, c, m.get("n"), m.get("label_counts")


def aggregate(
    runs: Iterable[RunRecord],
    split: str = "test",
    ts_rows: bool = False,
    ece_bins: int | None = None,
    layout: str = "datasets",
):
    """Group runs into ``{metric: {method: {column: Cell}}}`` plus the ordered method and column names.

    Columns are the datasets (``layout="datasets"``) or, for ``layout="ood"``, the in-distribution test set
    followed by the shifted sets of the runs' ``eval.ood``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {list(LAYOUTS)}, got {layout!r}.")
    table: dict[str, dict[str, dict[str, Cell]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(Cell)))
    methods: list[str] = []
    datasets: list[str] = []
    info: dict[tuple[str, str], tuple[float | None, int | None]] = {}
    references: dict[str, list[int]] = {}
    for label, data, m, c, n, counts in _entries(runs, split, ts_rows, ece_bins, layout):
        methods.append(label) if label not in methods else None
        datasets.append(data) if data not in datasets else None
        info[(label, data)] = (chance_rate(counts, c), n)
        if counts:
            references.setdefault(data, list(counts))
        for metric in METRICS:
            if metric in m:
                table[metric][label][data].values.append(float(m[metric]))
    table["_references"] = references
    for (label, data), (rate, n) in info.items():
        acc = table["acc"][label][data]
        chance = bool(acc.values) and not _above_chance(acc, rate, n)
        for metric in METRICS:
            if metric in table and data in table[metric][label]:
                table[metric][label][data].chance = chance
    for label in methods:  # OOD detection is meaningless where the model is at chance in distribution
        for data in datasets:
            if data.endswith(" (ID)"):
                for metric in ("auroc_entropy", "auroc_mi"):
                    for cell in table[metric][label].values():
                        cell.chance = table["acc"][label][data].chance
    return table, methods, datasets


def _best(table, metric: str, methods: Sequence[str], data: str) -> str | None:
    higher = METRICS[metric][2]
    if higher is None:  # coverage: no ordering (the nominal level is the target)
        return None
    cands = [(table[metric][m][data].mean, m) for m in methods if table[metric][m][data].values]
    if not cands:
        return None
    return (max if higher else min)(cands)[1]


def _fmt(cell: Cell, scale: float, digits: int, max_n: int = 1) -> str:
    """``mean ± std``; a cell with fewer seeds than the fullest cell of the table says how many it has."""
    if not cell.values:
        return "–"
    s = f"{cell.mean * scale:.{digits}f}"
    if len(cell.values) > 1:
        s += f" ± {cell.std * scale:.{digits}f}"
    if len(cell.values) < max_n:
        s += f" (n={len(cell.values)})"
    return s


def _cells(table) -> Iterable[Cell]:
    return (c for k, mt in table.items() if k != "_references" for row in mt.values() for c in row.values())


MI_NOTE = (
    "OOD AUROC, MI: the epistemic score, the mutual information between label and weights, from each method's "
    "predictive samples (the GLM probit predictive: from its Gaussian over the logits); – for a point predictor "
    "(MAP, temperature scaling, + TS rows), which has none."
)


def footnotes(table, methods: Sequence[str], datasets: Sequence[str], metrics: Sequence[str] = ()) -> list[str]:
    """The notes under a table: chance marker, constant-predictor references, seed counts, TS rows, MI."""
    notes, max_n = [], _max_n(table)
    if any(c.chance for c in _cells(table)):
        notes.append(
            "† accuracy not above chance: within 2 binomial s.e. of the majority-class rate of the evaluated split "
            "(1/C where a run stored no label counts)."
        )
    refs = table.get("_references") or {}
    shown = [f"{d} {constant_predictor(refs[d])['nll']:.3f} / {constant_predictor(refs[d])['brier']:.3f}"
             for d in datasets if d in refs]  # fmt: skip
    if shown:
        notes.append("Constant predictor (the split's class frequencies), NLL / Brier: " + "; ".join(shown) + ".")
    if any(0 < len(c.values) < max_n for c in _cells(table)):
        notes.append(f"(n=k): mean over k seeds only (the other cells: {max_n}).")
    if any(m.endswith(TS_SUFFIX) for m in methods):
        notes.append(TS_NOTE)
    if "auroc_mi" in metrics:
        notes.append(MI_NOTE)
    return notes


def _max_n(table) -> int:
    return max((len(c.values) for c in _cells(table)), default=1)


def markdown(table, methods, datasets, metrics: Sequence[str]) -> str:
    """Markdown tables, one block per metric."""
    out, max_n = [], _max_n(table)
    for metric in metrics:
        header, scale, _ = METRICS[metric]
        digits = 1 if scale == 100.0 else 3
        out.append(f"**{header}**\n")
        out.append("| method | " + " | ".join(datasets) + " |")
        out.append("|---|" + "---|" * len(datasets))
        best = {d: _best(table, metric, methods, d) for d in datasets}
        for m in methods:
            cells = []
            for d in datasets:
                cell = table[metric][m][d]
                s = _fmt(cell, scale, digits, max_n)
                if cell.values and best[d] == m:
                    s = f"**{s}**"
                if cell.chance:
                    s += " †"
                cells.append(s)
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    out.extend(footnotes(table, methods, datasets, metrics))
    return "\n".join(out) + "\n"


def _tex(s: str) -> str:
    return s.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def latex(table, methods, datasets, metrics: Sequence[str]) -> str:
    """A booktabs LaTeX table with one block of rows per metric."""
    cols = "l" + "c" * len(datasets)
    max_n = _max_n(table)
    lines = [r"\begin{tabular}{" + cols + "}", r"\toprule", "Method & " + " & ".join(map(_tex, datasets)) + r" \\"]
    for metric in metrics:
        header, scale, _ = METRICS[metric]
        digits = 1 if scale == 100.0 else 3
        header = header.replace("↑", r"$\uparrow$").replace("↓", r"$\downarrow$").replace("%", r"\%")
        lines += [r"\midrule", rf"\multicolumn{{{len(datasets) + 1}}}{{l}}{{\textit{{{header}}}}} \\"]
        best = {d: _best(table, metric, methods, d) for d in datasets}
        for m in methods:
            cells = []
            for d in datasets:
                cell = table[metric][m][d]
                s = _fmt(cell, scale, digits, max_n).replace("±", r"$\pm$").replace("–", "--")
                if cell.values and best[d] == m:
                    s = rf"\textbf{{{s}}}"
                if cell.chance:
                    s += r"$^\dagger$"
                cells.append(s)
            lines.append(_tex(m) + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def csv_text(table, methods, datasets, metrics: Sequence[str]) -> str:
    """Long-format CSV: method, dataset, metric, mean, std, n, chance."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "dataset", "metric", "mean", "std", "n_seeds", "chance"])
    for metric in metrics:
        for m in methods:
            for d in datasets:
                cell = table[metric][m][d]
                if cell.values:
                    w.writerow(
                        [m, d, metric, f"{cell.mean:.6g}", f"{cell.std:.6g}", len(cell.values), int(cell.chance)]
                    )
    return buf.getvalue()


def make_tables(
    results_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    split: str = "test",
    metrics: Sequence[str] | None = None,
    ts_rows: bool = False,
    ece_bins: int | None = None,
    model: str | None = None,
    name: str = "table",
    layout: str = "datasets",
    data: str | None = None,
    rows: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
) -> dict[str, str]:
    """Build the tables of a results directory and write ``<name>.md``, ``.tex`` and ``.csv`` into ``out_dir``.

    ``metrics`` defaults to the layout's blocks (:data:`LAYOUTS`; :data:`REGRESSION_BLOCKS` when every run is a
    regression); ``model`` / ``data`` keep only the runs of
    one model / training dataset (a table mixes no models: with several, ``model`` is required). ``rows`` /
    ``columns`` keep only those method labels (each with its ``+ TS`` row) / column names, in that order (a
    listed one without runs is left out; None: all, as found).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {list(LAYOUTS)}, got {layout!r}.")
    unknown = [m for m in metrics or () if m not in METRICS]
    if unknown:
        raise ValueError(f"metrics: unknown {unknown}; expected a subset of {list(METRICS)}.")
    runs = select(collect(results_dir), model=model, data=data, where=str(results_dir))
    if metrics is None:  # the output type chooses the metric set: a regression has no accuracy or ECE
        regression = layout == "datasets" and bool(runs) and all(r.rmse is not None for r in runs)
        metrics = REGRESSION_BLOCKS if regression else LAYOUTS[layout]
    if layout == "ood":
        trained_on = sorted({r.data for r in runs if r.ood})
        if len(trained_on) > 1:
            raise ValueError(f"data: OOD runs trained on several datasets {trained_on}; pass data= (--data).")
    table, methods, datasets = aggregate(runs, split=split, ts_rows=ts_rows, ece_bins=ece_bins, layout=layout)
    if not methods:
        what = "OOD metrics (eval.ood)" if layout == "ood" else f"metrics for split {split!r}"
        raise ValueError(f"split: no run has {what}; expected e.g. split='test', or runs made with eval.ood.")
    methods = _chosen(methods, rows, "rows", base=lambda m: m.removesuffix(TS_SUFFIX), prefix=" (")
    datasets = _chosen(datasets, columns, "columns")
    texts = {
        "md": markdown(table, methods, datasets, metrics),
        "tex": latex(table, methods, datasets, metrics),
        "csv": csv_text(table, methods, datasets, metrics),
    }
    if out_dir is not None:
        for ext, text in texts.items():
            atomic_write(Path(out_dir) / f"{name}.{ext}", lambda p, t=text: p.write_text(t))
    return texts


def _chosen(
    found: list[str], wanted: Sequence[str] | None, what: str, base=lambda x: x, prefix: str | None = None
) -> list[str]:
    """The ``found`` entries whose ``base`` is in ``wanted``, in the order of ``wanted`` (None: all of them).

    With ``prefix``, ``w`` also selects the entries whose base starts with ``w + prefix`` (a method label selects
    its rows of every setting, ``"kfac_laplace"`` -> ``"kfac_laplace (prior_precision=0.01)"``).
    """
    if wanted is None:
        return found

    def matches(x: str, w: str) -> bool:
        return base(x) == w or (prefix is not None and base(x).startswith(w + prefix))

    chosen = list(dict.fromkeys(x for w in wanted for x in found if matches(x, w)))
    if not chosen:
        raise ValueError(f"{what}: none of {list(wanted)} has runs here; expected some of {found}.")
    return chosen


def main(argv: Sequence[str] | None = None, *, args=None) -> None:
    """Console script ``bayeslora-tables`` (the parser: :func:`bayeslora.cli.tables_parser`)."""
    from .cli import tables_parser

    ap = tables_parser()
    args = args if args is not None else ap.parse_args(argv)
    if args.figures and args.out is None:
        ap.error("--figures needs --out DIR (the directory the figures are written to)")
    texts = make_tables(
        args.results_dir,
        args.out,
        split=args.split,
        metrics=args.metrics,
        ts_rows=args.ts,
        ece_bins=args.ece_bins,
        model=args.model,
        name=args.name,
        layout=args.layout,
        data=args.data,
        rows=args.rows,
        columns=args.columns,
    )
    print(texts["md"])
    if args.figures:
        from .figures import make_figures

        for path in make_figures(
            args.results_dir,
            args.out,
            split=args.split,
            model=args.model,
            data=args.data,
            ts_rows=args.ts,
            layout=args.layout,
            prefix=args.name,
            columns=args.columns,
        ):
            print(f"figure: {path}")


if __name__ == "__main__":
    main()
