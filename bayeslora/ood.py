"""Distribution shift: evaluate a fitted posterior on extra test sets and score OOD detection.

The protocol of the Laplace-LoRA (Yang et al., 2024) and BLoB (Wang et al., 2024) papers: fine-tune on
OpenBookQA, then evaluate the same posterior on ARC-Challenge and ARC-Easy (smaller shift) and on MMLU
college_chemistry / college_physics (larger shift). Every shifted set must share the answer format of the
training task (the same number of classes C; for ``mc`` the same answer letters).

Per shifted set the run records (``metrics.json`` ``"ood"``):

* acc, ece, nll, brier, aurc on the shifted set (the papers' ACC/ECE/NLL under shift; AURC: selective
  prediction, Geifman & El-Yaniv 2017);
* ``auroc_entropy`` / ``auroc_mi``: AUROC of telling the shifted set (positive) from the in-distribution
  test set by predictive entropy / by the method's epistemic score, the mutual information between label and
  weights (from the predictive samples; for the GLM probit predictive from its Gaussian over the logits). A
  point predictor (MAP, temperature scaling) has no epistemic score, and a constant score cannot rank: then
  ``auroc_mi`` is absent (a "–" in the table), never a constant 0.5;
* ``n``: the number of shifted examples.

An unlabelled set (``path``: a ``.txt`` file with one example per line, or a ``.jsonl`` / ``.csv`` file with a
``text_field``, default ``"text"``) gives the detection metrics only. Every entry is loaded and checked before
training starts (:func:`prepare_ood`); an error names ``eval.ood.<name>``.

The entries of ``eval.ood`` (a mapping name -> options) take ``task`` (default: the name), ``root``,
``max_length``, ``max_eval`` (default: those of the training data config) and ``options`` (e.g.
``{subjects: [college_chemistry]}`` for MMLU). Only the test split of each task is used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .calibration import temperature_scaled
from .data import build_task, make_loader
from .metrics import ECE_BINS, Predictions, ood_auroc
from .progress import bar as progress_bar

ENTRY_KEYS = ("task", "root", "max_length", "max_eval", "options", "path", "text_field")


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
    out: dict[str, Any] = {"auroc_entropy": ood_auroc(in_dist.entropy, shifted.entropy)}
    out["n"] = int(shifted.labels.numel())
    mi = torch.cat([in_dist.mutual_information, shifted.mutual_information])
    if in_dist.has_epistemic and shifted.has_epistemic and bool((mi != mi[0]).any()):
        out["auroc_mi"] = ood_auroc(in_dist.mutual_information, shifted.mutual_information)
    if labelled(shifted):
        out.update(shifted.metrics(n_bins=n_bins))
        out["label_counts"] = shifted.labels.bincount(minlength=shifted.log_probs.shape[-1]).tolist()
    return out


def labelled(preds: Predictions) -> bool:
    """Whether a set has labels (an unlabelled OOD set stores -1)."""
    return bool((preds.labels >= 0).all())


def _entry(name: str, entry: Any, data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    entry = dict(entry or {})
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise TypeError(f"eval.ood.{name}: unexpected key(s) {unknown}; expected a subset of {list(ENTRY_KEYS)}.")
    if entry.get("path") is not None:
        clash = sorted(k for k in ("task", "root", "options") if entry.get(k))
        if clash:
            raise TypeError(
                f"eval.ood.{name}: 'path' (an unlabelled text file) cannot be combined with {clash}; give either a "
                "task or a path."
            )
    elif entry.get("text_field") is not None:
        raise TypeError(f"eval.ood.{name}: 'text_field' needs 'path' (the jsonl file it names a field of).")
    return {
        "task": entry.get("task") or name,
        "root": entry.get("root", data_cfg.get("root")),
        "max_length": entry.get("max_length") or data_cfg["max_length"],
        "max_eval": entry.get("max_eval", data_cfg.get("max_eval")),
        "options": dict(entry.get("options") or {}),
        "path": entry.get("path"),
        "text_field": entry.get("text_field") or "text",
    }


def _unlabelled(name: str, e: Mapping[str, Any], tokenizer, format: str) -> tuple[Any, dict[str, Any]]:
    """An unlabelled set from a text file (one example per line) or a jsonl / csv file with a text field."""
    from pathlib import Path

    from .data.encode import encode_texts
    from .data.sources import load_file

    path = Path(str(e["path"])).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"eval.ood.{name}.path: no file at {str(path)!r}; expected a .txt, .jsonl or .csv file."
        )
    kind = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv"}.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"eval.ood.{name}.path: expected a .txt, .jsonl or .csv file, got {path.name!r}.")
    rows = load_file(path, task=f"eval.ood.{name}", split="test", kind=kind)  # empty / unparsable files: an error
    field = "text" if kind == "text" else e["text_field"]
    if field not in rows.column_names:
        raise ValueError(
            f"eval.ood.{name}.text_field: {path.name} has no field {field!r}; its fields are {rows.column_names}. "
            "Set eval.ood.<name>.text_field."
        )
    texts = [t for t in rows[field] if isinstance(t, str) and t.strip()]
    if e["max_eval"] is not None:
        texts = texts[: int(e["max_eval"])]
    if not texts:
        raise ValueError(f"eval.ood.{name}.path: {path.name} holds no non-empty text in field {field!r}.")
    dataset = encode_texts(texts, tokenizer, format=format, max_length=e["max_length"], name=name)
    return dataset, {"path": str(path), "field": field, "num_test": len(texts), "labelled": False}


def prepare_ood(
    tokenizer, sets: Mapping[str, Any], *, data_cfg: Mapping[str, Any], format: str, num_classes: int, seed: int = 0
) -> dict[str, tuple[Any, dict[str, Any]]]:
    """Load and tokenize every shifted set of ``eval.ood`` (before any training, so a bad entry fails at once).

    Args:
        tokenizer: the model's tokenizer.
        sets: ``{name: {task, root, max_length, max_eval, options}}`` for a labelled task (its test split), or
            ``{name: {path, text_field, max_length, max_eval}}`` for an unlabelled file (detection metrics only).
        data_cfg: the training data config (defaults for root / max_length / max_eval).
        format: ``"seq_cls"`` or ``"mc"``.
        num_classes: C of the training task; every labelled shifted task must have the same C.
        seed: seeds the subsampling of the shifted tasks.

    Returns:
        ``{name: (test dataset, provenance)}``.

    Raises:
        TypeError / ValueError / FileNotFoundError naming ``eval.ood.<name>``.
    """
    if not isinstance(sets, Mapping):
        raise TypeError(
            f"eval.ood: expected a mapping name -> options, e.g. {{arc_easy: {{}}}}, got {type(sets).__name__}."
        )
    out = {}
    for name, raw in sets.items():
        e = _entry(name, raw, data_cfg)
        if e["path"] is not None:
            out[name] = _unlabelled(name, e, tokenizer, format)
            continue
        try:
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
        except (ValueError, TypeError, FileNotFoundError) as err:
            raise type(err)(f"eval.ood.{name}: {err}") from err
        if task.num_classes != num_classes:
            raise ValueError(
                f"eval.ood.{name}: task {e['task']!r} has {task.num_classes} classes but the training task has "
                f"{num_classes}; OOD sets must share the answer format (e.g. 4-choice tasks for OpenBookQA), or give "
                "an unlabelled file (eval.ood.<name>.path) for detection metrics only."
            )
        out[name] = (
            task.test,
            {
                "task": e["task"],
                "options": e["options"],
                "num_test": len(task.test),
                "source": task.info.get("splits", {}).get("test"),
                "subjects": task.info.get("subjects"),
                "labelled": True,
            },
        )
    return out


def predict_ood(
    bl,
    tokenizer,
    prepared: Mapping[str, tuple[Any, dict]],
    *,
    batch_size: int,
    n_samples: int | None = None,
    seed=0,
    prepare_loader=None,
) -> tuple[dict[str, Predictions], dict[str, dict]]:
    """Predict every prepared shifted set (:func:`prepare_ood`) with a fitted BayesianLoRA (``prepare_loader``:
    applied to each set's loader first, e.g. the frozen-prefix cache).

    Returns:
        ``({name: Predictions}, {name: provenance})``.
    """
    preds = {}
    for name, (dataset, _) in progress_bar(prepared.items(), desc="OOD sets", total=len(prepared)):
        loader = make_loader(dataset, tokenizer, batch_size=batch_size)
        preds[name] = bl.predictions(prepare_loader(loader) if prepare_loader else loader, n_samples, seed)
    return preds, {name: info for name, (_, info) in prepared.items()}


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
