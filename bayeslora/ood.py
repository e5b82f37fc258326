"""Distribution shift: evaluate a fitted posterior on extra test sets and score OOD detection.

The protocol of the Laplace-LoRA (Yang et al., 2024) and BLoB (Wang et al., 2024) papers: fine-tune on
OpenBookQA, then evaluate the same posterior on ARC-Challenge and ARC-Easy (smaller shift) and on MMLU
college_chemistry / college_physics (larger shift). Every shifted set must share the answer format of the
training task (the same number of classes C; for ``mc`` the same answer letters).

Per shifted set the run records (``metrics.json`` ``"ood"``):

* acc, ece, nll, brier, aurc on the shifted set (the papers' ACC/ECE/NLL under shift; AURC: selective
  prediction, Geifman & El-Yaniv 2017);
* ``auroc_entropy`` / ``auroc_mi``: AUROC of telling the shifted set (positive) from the in-distribution
  test set by predictive entropy / mutual information (MI is 0 for point predictions, so 0.5 for MAP);
* ``n``: the number of shifted examples.

The entries of ``eval.ood`` (a mapping name -> options) take ``task`` (default: the name), ``root``,
``max_length``, ``max_eval`` (default: those of the training data config) and ``options`` (e.g.
``{subjects: [college_chemistry]}`` for MMLU). Only the test split of each task is used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .calibration import temperature_scaled
from .data import build_task, make_loader
from .metrics import ECE_BINS, Predictions, ood_auroc

ENTRY_KEYS = ("task", "root", "max_length", "max_eval", "options")


def ood_metrics(in_dist: Predictions, shifted: Predictions, n_bins: int = ECE_BINS) -> dict[str, float]:
    """Metrics on a shifted set plus OOD-detection AUROC against the in-distribution test predictions.

    Args:
        in_dist: predictions on the in-distribution test set ``[N_in, C]``.
        shifted: predictions of the same method on the shifted set ``[N_out, C]``.
        n_bins: ECE bins.

    Returns:
        ``acc, ece, nll, brier, aurc`` of ``shifted``, ``auroc_entropy``, ``auroc_mi`` and ``n``.
    """
    if in_dist.log_probs.shape[-1] != shifted.log_probs.shape[-1]:
        raise ValueError(
            f"shifted: expected {in_dist.log_probs.shape[-1]} classes like the in-distribution predictions, got "
            f"{shifted.log_probs.shape[-1]}; OOD sets must share the answer format of the training task."
        )
    return {
        **shifted.metrics(n_bins=n_bins),
        "auroc_entropy": ood_auroc(in_dist.entropy, shifted.entropy),
        "auroc_mi": ood_auroc(in_dist.mutual_information, shifted.mutual_information),
        "n": int(shifted.labels.numel()),
        "label_counts": shifted.labels.bincount(minlength=shifted.log_probs.shape[-1]).tolist(),
    }


def _entry(name: str, entry: Any, data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    entry = dict(entry or {})
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise TypeError(f"eval.ood.{name}: unexpected key(s) {unknown}; expected a subset of {list(ENTRY_KEYS)}.")
    return {
        "task": entry.get("task") or name,
        "root": entry.get("root", data_cfg.get("root")),
        "max_length": entry.get("max_length") or data_cfg["max_length"],
        "max_eval": entry.get("max_eval", data_cfg.get("max_eval")),
        "options": dict(entry.get("options") or {}),
    }


def predict_ood(
    bl,
    tokenizer,
    sets: Mapping[str, Any],
    *,
    data_cfg: Mapping[str, Any],
    format: str,
    num_classes: int,
    batch_size: int,
    n_samples: int | None = None,
    seed: int = 0,
) -> tuple[dict[str, Predictions], dict[str, dict]]:
    """Predict every shifted test set with a fitted :class:`~bayeslora.wrapper.BayesianLoRA`.

    Args:
        bl: the fitted BayesianLoRA (its readout is reused, so the answer format must match).
        tokenizer: the model's tokenizer.
        sets: ``{name: {task, root, max_length, max_eval, options}}`` (the ``eval.ood`` config).
        data_cfg: the training data config (defaults for root / max_length / max_eval).
        format: ``"seq_cls"`` or ``"mc"``.
        num_classes: C of the training task; every shifted task must have the same C.
        batch_size: evaluation batch size.
        n_samples: predictive samples (None: the method's default).
        seed: seeds the posterior's sampling.

    Returns:
        ``({name: Predictions}, {name: provenance})``.
    """
    if not isinstance(sets, Mapping):
        raise TypeError(
            f"eval.ood: expected a mapping name -> options, e.g. {{arc_easy: {{}}}}, got {type(sets).__name__}."
        )
    preds, info = {}, {}
    for name, raw in sets.items():
        e = _entry(name, raw, data_cfg)
        task = build_task(
            e["task"],
            tokenizer,
            format=format,
            root=e["root"],
            max_length=e["max_length"],
            max_train=1,  # only the test split is used
            max_eval=e["max_eval"],
            val_size=1,
            seed=seed,
            **e["options"],
        )
        if task.num_classes != num_classes:
            raise ValueError(
                f"eval.ood.{name}: task {e['task']!r} has {task.num_classes} classes but the training task has "
                f"{num_classes}; OOD sets must share the answer format (e.g. 4-choice tasks for OpenBookQA)."
            )
        preds[name] = bl.predictions(make_loader(task.test, tokenizer, batch_size=batch_size), n_samples, seed)
        info[name] = {
            "task": e["task"],
            "options": e["options"],
            "num_test": len(task.test),
            "source": task.info.get("splits", {}).get("test"),
            "subjects": task.info.get("subjects"),
        }
    return preds, info


def ood_report(
    in_dist: Mapping[str, Predictions], shifted: Mapping[str, Predictions], split: str, temperature: float | None
) -> tuple[dict[str, dict], dict[str, Predictions]]:
    """Metrics of every shifted set (and, given a temperature, of its temperature-scaled variant).

    Args:
        in_dist: the run's predictions by split; ``in_dist[split]`` (and ``in_dist[split + "_ts"]``) are the
            in-distribution references for the AUROCs.
        shifted: ``{name: Predictions}`` from :func:`predict_ood`.
        split: the in-distribution split (``"test"``).
        temperature: the run's fitted temperature, or None for no ``<name>_ts`` entries.

    Returns:
        ``({name: metrics, name + "_ts": metrics}, {"ood/" + name: Predictions, "ood/" + name + "_ts": ...})``.
    """
    metrics, saved = {}, {}
    for name, p in shifted.items():
        metrics[name] = ood_metrics(in_dist[split], p)
        saved[f"ood/{name}"] = p
        if temperature is not None and f"{split}_ts" in in_dist:
            scaled = temperature_scaled(p, temperature)
            metrics[f"{name}_ts"] = ood_metrics(in_dist[f"{split}_ts"], scaled)
            saved[f"ood/{name}_ts"] = scaled
    return metrics, saved
