"""The generic user-data tasks ``jsonl`` and ``csv``: options, validation and loading.

Example::

    build_task("csv", tok, paths={"train": "train.csv", "test": "test.csv"}, text_fields=["premise", "hypothesis"],
               label_field="label", label_names=["entailment", "neutral", "contradiction"])

Labels are names in ``label_names`` or int indices into it. With ``choices_field`` each row holds its C answer
options (C = ``len(label_names)``, e.g. ``label_names=["A", "B", "C", "D"]``) and the label is an option position.
Paths are used as given (``~`` expanded; ``demo/<file>`` is a packaged demo file); the data root does not apply to
them. With ``target_field`` (the ``generative`` format) a row is a prompt (the one text field) and a free-text
target; ``label_field`` and ``label_names`` are not used.

``task_type="regression"`` reads real-valued labels (numbers or numeric strings) and needs no ``label_names``; the
task's readout is :class:`~bayeslora.readout.SequenceRegression` (one output, Gaussian likelihood with ``noise_std``
and ``noise="fixed"`` or ``"fit"``), on the ``seq_cls`` format (an encoder head loaded with ``num_labels=1``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from . import normalize as N
from .sources import DEMO, DEMO_ROOT, load_file

ROLES = ("train", "validation", "test")
TASK_TYPES = ("classification", "regression")
_EXAMPLE = (
    "e.g. paths={'train': 'train.jsonl', 'test': 'test.jsonl'}, text_fields=['text'], label_field='label', "
    "label_names=['negative', 'positive']"
)


@dataclass(frozen=True)
class GenericOptions:
    """Validated options of a generic task."""

    paths: dict[str, Path]
    text_fields: tuple[str, ...]
    label_field: str
    label_names: tuple[str, ...] | None  # None: regression
    choices_field: str | None = None
    task_type: str = "classification"
    noise_std: float = 1.0
    noise: str = "fixed"
    target_field: str | None = None

    @property
    def regression(self) -> bool:
        return self.task_type == "regression"

    def normalizer(self) -> N.Normalizer:
        """The row normaliser these options describe (``target_field``: prompt + free-text target)."""
        if self.target_field is not None:
            return N.generic_target(self.text_fields[0], self.target_field)
        return N.generic(self.text_fields, self.label_field, self.label_names, self.choices_field)


def parse_options(task: str, options: Mapping[str, Any]) -> GenericOptions:
    """Validate the keyword arguments of a generic task.

    Raises:
        TypeError: a required option is missing or has the wrong type.
        ValueError: a bad value (paths without train/test, unknown split names, too few or repeated label names).
    """
    task_type = options.get("task_type") or "classification"
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type: expected one of {list(TASK_TYPES)}, got {task_type!r}.")
    regression = task_type == "regression"
    if options.get("target_field") is not None:  # the generative format: prompt field + target field
        wrong = [k for k in ("noise_std", "noise") if options.get(k) is not None]
        if regression or wrong:
            raise ValueError(
                f"target_field: a generative task has free-text targets, not regression ones; remove target_field "
                f"or set task_type=classification (the default) and remove {wrong or ['task_type']}."
            )
        if options.get("paths") is None or options.get("text_fields") is None:
            raise TypeError(
                f"task_kwargs: task {task!r} with target_field needs paths and text_fields (the prompt field); got "
                f"{sorted(options)}; e.g. text_fields=['prompt'], target_field='answer'."
            )
        fields = _text_fields(options["text_fields"])
        if len(fields) != 1:
            raise ValueError(f"text_fields: a generative task takes one prompt field, got {list(fields)}.")
        return GenericOptions(paths=_paths(options["paths"]), text_fields=fields, label_field="", label_names=(),
                              target_field=_field_name("target_field", options["target_field"]))  # fmt: skip
    required = ("paths", "text_fields", "label_field") + (() if regression else ("label_names",))
    missing = [k for k in required if options.get(k) is None]
    if missing:
        raise TypeError(f"task_kwargs: task {task!r} needs {missing}; got {sorted(options)}; {_EXAMPLE}.")
    if regression:
        wrong = [k for k in ("label_names", "choices_field") if options.get(k) is not None]
        if wrong:
            raise ValueError(
                f"task_type: a regression task has real-valued labels and no classes or options; remove {wrong} "
                "(set them to null)."
            )
    else:
        wrong = [k for k in ("noise_std", "noise") if options.get(k) is not None]
        if wrong:
            raise ValueError(f"{wrong}: the observation noise belongs to task_type='regression'; remove them.")
    return GenericOptions(
        paths=_paths(options["paths"]),
        text_fields=_text_fields(options["text_fields"]),
        label_field=_field_name("label_field", options["label_field"]),
        label_names=None if regression else _label_names(options["label_names"]),
        choices_field=None
        if options.get("choices_field") is None
        else _field_name("choices_field", options["choices_field"]),
        task_type=task_type,
        noise_std=1.0 if options.get("noise_std") is None else options["noise_std"],
        noise=options.get("noise") or "fixed",
    )


def _paths(paths: Any) -> dict[str, Path]:
    if not isinstance(paths, Mapping):
        raise TypeError(f"paths: expected a mapping {{split: file}}, got {type(paths).__name__}; {_EXAMPLE}.")
    paths = {role: value for role, value in paths.items() if value is not None}  # None: the split is absent
    unknown = sorted(set(paths) - set(ROLES))
    if unknown:
        raise ValueError(f"paths: expected keys among {list(ROLES)}, got unknown {unknown}; rename them.")
    required = [r for r in ("train", "test") if r not in paths]
    if required:
        raise ValueError(
            f"paths: expected 'train' and 'test' files ('validation' is optional and carved from train when "
            f"missing), got {sorted(paths)}; add {required}."
        )
    for role, value in paths.items():
        if not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"paths[{role!r}]: expected a file path, got {type(value).__name__} {value!r}.")
    return {role: _path(paths[role]) for role in ROLES if role in paths}


def _path(value: str | os.PathLike) -> Path:
    """A user's file; ``demo/<file>`` names a file packaged under ``bayeslora/data/demo``."""
    text = str(value)
    if text.startswith(f"{DEMO}/"):
        return DEMO_ROOT / text[len(DEMO) + 1 :]
    return Path(text).expanduser()


def _field_name(arg: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{arg}: expected a field name (non-empty str), got {value!r}.")
    return value


def _text_fields(value: Any) -> tuple[str, ...]:
    fields = [value] if isinstance(value, str) else value
    if not isinstance(fields, Sequence) or not 1 <= len(fields) <= 2:
        raise ValueError(f"text_fields: expected one or two field names (text[, text_pair]), got {value!r}.")
    return tuple(_field_name("text_fields", f) for f in fields)


def _label_names(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"label_names: expected a list of class names, got {type(value).__name__} {value!r}.")
    names = tuple(str(v) for v in value)
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"label_names: expected at least two distinct class names, got {list(value)}.")
    return names


def load_generic(task: str, kind: str, opts: GenericOptions) -> tuple[dict[str, datasets.Dataset], dict[str, str]]:
    """Load the user's files; returns ``({role: Dataset}, {role: path})``."""
    loaded = {role: load_file(path, task=task, split=role, kind=kind) for role, path in opts.paths.items()}
    return loaded, {role: str(path.resolve()) for role, path in opts.paths.items()}
