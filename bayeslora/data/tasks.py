"""build_task: raw rows -> normalised records -> train / validation / test -> tokenized splits + the Readout.

The steps, in order: load every source split (local files or hub); normalise (dropping e.g. ARC items
without four options); make the three splits (BoolQ dev-only: a fixed-seed test split; a missing validation
split is carved from train with ``seed``); subsample with ``max_train`` / ``max_eval`` (seeded, after
splitting; the test subsample uses a fixed seed, so the test set is the same for every run seed); check
labels; tokenize.
``TaskData.info`` records where each split came from. The split of every task is listed in
:mod:`bayeslora.data.registry`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets

from ..formats import FORMATS, PADDING_SIDE
from ..readout import AnswerTokenLogits, Readout, SequenceClassificationLogits, SequenceRegression, TokenLogits
from ..validate import is_int
from . import generic as G
from .encode import encode
from .normalize import Record, normalize_rows
from .prompts import letters
from .registry import ALL, TASKS, TaskSpec
from .sources import data_root, load_hub_splits, load_local_splits
from .splits import BOOLQ_TEST_SEED, TEST_SUBSAMPLE_SEED, carve, dev_only_test_size, subsample

ROLES = ("train", "validation", "test")


@dataclass
class TaskData:
    """The tokenized splits of a task and its readout.

    Attributes:
        name: the task name.
        format: ``"seq_cls"`` or ``"mc"``.
        train, validation, test: Datasets with ``input_ids``, ``attention_mask``, (``token_type_ids``) and
            ``labels`` (int in ``[0, C)``); ``info.config_name`` holds the format.
        label_names: the C class names (for ``mc``: the answer letters ``"A"``, ``"B"``, ...).
        readout: ``SequenceClassificationLogits(C)`` (``seq_cls``) or the answer-letter ``AnswerTokenLogits``
            (``mc``): maps the model output to logits ``[B, C]``.
        info: JSON-able provenance: source, files, how each split was made, sizes, license and citation.
    """

    name: str
    format: str
    train: datasets.Dataset
    validation: datasets.Dataset
    test: datasets.Dataset
    label_names: list[str]
    readout: Readout
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """C, the number of classes (1 for a regression task: its one output)."""
        return self.readout.num_classes if self.is_regression else len(self.label_names)

    @property
    def is_regression(self) -> bool:
        """Whether the labels are real targets (a Gaussian likelihood) instead of class indices."""
        return self.readout.likelihood.name == "gaussian"

    @property
    def padding_side(self) -> str:
        """The padding side the format needs (``mc``: left, ``seq_cls``: right)."""
        return PADDING_SIDE[self.format]


def build_task(
    name: str,
    tokenizer: Any,
    *,
    format: str = "seq_cls",
    root: str | os.PathLike | None = None,
    max_length: int = 256,
    max_train: int | None = None,
    max_eval: int | None = None,
    val_size: float | int = 0.1,
    seed: int = 0,
    answers: Sequence[str] | None = None,
    **task_kwargs: Any,
) -> TaskData:
    """Load, split, format and tokenize a task.

    Args:
        name: a key of :data:`TASKS` (see :mod:`bayeslora.data.registry` for the splits of each).
        tokenizer: the model's Hugging Face tokenizer (left unchanged).
        format: ``"seq_cls"`` (encoder + classification head) or ``"mc"`` (causal LM, answer-letter logits).
        root: data root laid out as ``<root>/<task>/<split>.jsonl``, or ``"demo"``; default ``$BAYESLORA_DATA``,
            else the Hugging Face hub (see :func:`~bayeslora.data.data_root`). Not used by ``jsonl`` / ``csv``.
        max_length: truncation length in tokens. ``seq_cls`` pairs truncate the longer text; ``mc`` prompts are
            truncated from the left so the options and ``"Answer:"`` always survive.
        max_train: keep at most this many train rows (seeded subsample after splitting; None: all).
        max_eval: the same for validation and test.
        val_size: the validation split carved from train where a task has none: fraction in (0, 1) or row count.
        seed: seeds the validation carve and the subsampling (not the BoolQ test split, which is fixed).
        answers: ``mc`` only: the C answer strings the readout scores at the answer position, each one token after
            a space (e.g. ``["Apple", "Banana"]`` scores ``" Apple"`` / ``" Banana"``); None: the option letters
            ``A``, ``B``, ... (the Laplace-LoRA protocol). The prompt lists the options lettered either way.
        **task_kwargs: ``subjects=[...]`` for ``mmlu``; ``paths``, ``text_fields``, ``label_field``,
            ``label_names`` and optionally ``choices_field`` for ``jsonl`` / ``csv``.

    Returns:
        The :class:`TaskData`.

    Raises:
        ValueError: unknown task / format / subject, bad sizes, empty splits, labels outside the label set,
            answer letters that are not single tokens (from the readout).
        TypeError: unknown or missing task options.
        FileNotFoundError: missing data files, or no data root and the hub unreachable.
    """
    spec = _spec(name)
    _check_arguments(format, max_length, max_train, max_eval, val_size, seed)
    _check_options(spec, task_kwargs)
    generic_opts = G.parse_options(name, task_kwargs) if spec.generic else None
    regression = bool(generic_opts and generic_opts.regression)
    names = list(generic_opts.label_names) if generic_opts and not regression else None
    num_classes = 1 if regression else len(names) if names else int(spec.num_classes or 0)
    if regression:
        readout = _regression_readout(format, generic_opts, answers)
    else:
        readout = _readout(format, tokenizer, num_classes, answers)  # fails fast on multi-token answers
    info: dict[str, Any] = {"task": name, "format": format, "num_classes": num_classes}
    info["answers"] = list(readout.answers) if format == "mc" else None

    raw, sources = _load(spec, root, generic_opts, task_kwargs.get("subjects"), info)
    normalize = generic_opts.normalizer() if generic_opts else spec.normalize
    records = {role: _normalize(name, role, rows, normalize, info) for role, rows in raw.items()}
    splits, how = _make_splits(records, sources, val_size, seed)
    info["sizes_before_subsampling"] = {role: len(splits[role]) for role in ROLES}
    limits = {"train": ("max_train", max_train), "validation": ("max_eval", max_eval), "test": ("max_eval", max_eval)}
    if regression or (format == "generative" and not num_classes):  # real or free-text targets: no label set
        label_names = []
    elif format == "mc":
        label_names = letters(num_classes)
    else:
        label_names = list(names or spec.label_names or letters(num_classes))
    option_words = _option_words(spec, generic_opts)
    encoded = {}
    for role in ROLES:
        arg, limit = limits[role]
        # the test subsample is the same for every run seed, so seeds are compared on one test set
        sub_seed = TEST_SUBSAMPLE_SEED if role == "test" else seed
        rows = subsample(splits[role], limit, sub_seed, f"subsample-{role}")
        if len(rows) < len(splits[role]):
            how[role] += f"; subsampled to {len(rows)} of {len(splits[role])} rows ({arg}={limit}, seed={sub_seed})"
        _check_split(name, role, rows, None if regression or format == "generative" else num_classes, arg, limit)
        encoded[role] = encode(
            rows,
            tokenizer,
            format=format,
            max_length=max_length,
            template=spec.template,
            option_words=option_words,
            label_names=label_names,
            task=name,
            split=role,
        )
    info.update(
        splits=how,
        sizes={role: len(encoded[role]) for role in ROLES},
        at_max_length={role: sum(len(x) >= max_length for x in encoded[role]["input_ids"]) for role in ROLES},
        max_length=max_length,
        max_train=max_train,
        max_eval=max_eval,
        val_size=val_size,
        seed=seed,
        note=spec.note,
        license=spec.license or "see the user's data",
        citation=spec.citation or "see the user's data",
    )
    return TaskData(name, format, encoded["train"], encoded["validation"], encoded["test"], label_names, readout, info)


def task_from_config(
    tokenizer: Any,
    *,
    name: str,
    task: str,
    format: str,
    seed: int,
    root: str | os.PathLike | None = None,
    max_length: int = 256,
    max_train: int | None = None,
    max_eval: int | None = None,
    val_size: float | int = 0.1,
    options: Mapping[str, Any] | None = None,
    answers: Sequence[str] | None = None,
) -> TaskData:
    """The ``_target_`` of the data config group (``instantiate(cfg.data, tokenizer, format=..., seed=...)``):
    :func:`build_task` of ``task`` with the group's keys (``name`` is the config's name, e.g. ``sst2_demo``)."""
    return build_task(
        task, tokenizer, format=format, root=root, max_length=max_length, max_train=max_train, max_eval=max_eval,
        val_size=val_size, seed=seed, answers=answers, **dict(options or {}),
    )  # fmt: skip


# ----------------------------------------------------------------------------- argument checks
def _spec(name: Any) -> TaskSpec:
    if not isinstance(name, str) or name not in TASKS:
        raise ValueError(f"name: unknown task {name!r}; expected one of {sorted(TASKS)}.")
    return TASKS[name]


def _check_arguments(format: Any, max_length: Any, max_train: Any, max_eval: Any, val_size: Any, seed: Any) -> None:
    if format not in FORMATS:
        raise ValueError(
            f"format: expected one of {list(FORMATS)}, got {format!r}; use 'seq_cls' for an encoder with a "
            "classification head or 'mc' for a causal LM scored on answer letters."
        )
    if not is_int(max_length) or max_length < 1:
        raise ValueError(f"max_length: expected a positive int (tokens), got {max_length!r}.")
    for arg, value in (("max_train", max_train), ("max_eval", max_eval)):
        if value is not None and (not is_int(value) or value < 0):
            raise ValueError(f"{arg}: expected None (all rows) or a non-negative int, got {value!r}.")
    fraction = isinstance(val_size, float) and 0.0 < val_size < 1.0
    if not (fraction or (is_int(val_size) and val_size >= 1)):
        raise ValueError(
            f"val_size: expected a fraction in (0, 1) or a row count >= 1 for the validation split carved from "
            f"train, got {val_size!r}; e.g. val_size=0.1."
        )
    if not is_int(seed):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__} {seed!r}.")


def _check_options(spec: TaskSpec, options: Mapping[str, Any]) -> None:
    unexpected = sorted(set(options) - set(spec.options))
    if unexpected:
        accepted = list(spec.options) if spec.options else "no extra options"
        hint = " (only 'mmlu' takes subjects=[...])" if "subjects" in unexpected else ""
        raise TypeError(
            f"task_kwargs: task {spec.name!r} accepts {accepted}, got unexpected {unexpected}{hint}; remove them."
        )


def _regression_readout(format: str, opts: G.GenericOptions, answers: Sequence[str] | None) -> Readout:
    if format != "seq_cls" or answers is not None:
        raise ValueError(
            f"format: a regression task reads one output of a sequence head (format='seq_cls', no data.answers); got "
            f"format={format!r}, answers={answers!r}."
        )
    return SequenceRegression(opts.noise_std, noise=opts.noise)


def _readout(format: str, tokenizer: Any, num_classes: int, answers: Sequence[str] | None = None) -> Readout:
    if answers is not None:
        if format != "mc":
            raise ValueError(
                f"answers: answer strings are scored by the mc format's next-token readout; format={format!r} has a "
                "classification head. Remove data.answers or use format='mc'."
            )
        if isinstance(answers, str) or not isinstance(answers, Sequence) or len(answers) != num_classes:
            raise ValueError(f"answers: expected {num_classes} answer strings (one per class), got {answers!r}.")
        return AnswerTokenLogits.from_tokenizer(tokenizer, [str(a) for a in answers], prefix=" ")
    if format == "mc":
        return AnswerTokenLogits.from_tokenizer(tokenizer, letters(num_classes), prefix=" ")
    if format == "generative":
        return TokenLogits(len(tokenizer))
    return SequenceClassificationLogits(num_classes)


def _option_words(spec: TaskSpec, opts: G.GenericOptions | None) -> list[str] | None:
    if opts is not None:
        return None if opts.choices_field or opts.label_names is None else list(opts.label_names)
    return list(spec.option_words) if spec.option_words else None


# ----------------------------------------------------------------------------- loading
def _load(
    spec: TaskSpec, root: Any, opts: G.GenericOptions | None, subjects: Any, info: dict
) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Raw rows ``{role: [row]}`` and a description of each role's source ``{role: file or hub split}``."""
    if opts is not None:
        loaded, sources = G.load_generic(spec.name, str(spec.file_kind), opts)
        info.update(source=f"user {spec.file_kind} files", files=sources)
    else:
        path = data_root(root)
        if path is not None:
            loaded, files = load_local_splits(path, spec.name, str(spec.directory), spec.local)
            info.update(source=str(path / str(spec.directory)), files=files)
            sources = {role: f"{spec.directory}/{stem}.jsonl" for role, stem in spec.local.items()}
        elif spec.hub is None:
            raise FileNotFoundError(f"root: task {spec.name!r} has no hub source; pass root= or set BAYESLORA_DATA.")
        else:
            loaded = load_hub_splits(spec.hub, spec.name)
            sources = {role: f"{spec.hub.describe()} split {split!r}" for role, split in spec.hub.splits.items()}
            info.update(source=spec.hub.describe(), files=sources)
    rows = {role: ds.to_list() for role, ds in loaded.items()}
    if "subjects" in spec.options:
        rows = _filter_subjects(rows, subjects)
        info["subjects"] = sorted({r["subject"] for split in rows.values() for r in split})
    return rows, sources


def _filter_subjects(rows: dict[str, list[dict]], subjects: Any) -> dict[str, list[dict]]:
    """Keep the MMLU rows of ``subjects`` (None: all)."""
    if subjects is None:
        return rows
    wanted = [subjects] if isinstance(subjects, str) else subjects
    if not isinstance(wanted, Sequence) or not wanted or not all(isinstance(s, str) for s in wanted):
        raise TypeError(
            f"subjects: expected a non-empty list of MMLU subject names (or None for all), got {subjects!r}."
        )
    valid = sorted({r.get("subject") for split in rows.values() for r in split if r.get("subject")})
    unknown = [s for s in wanted if s not in valid]
    if unknown:
        raise ValueError(f"subjects: unknown MMLU subject(s) {unknown}; expected names from {valid}.")
    return {role: [r for r in split if r.get("subject") in wanted] for role, split in rows.items()}


def _normalize(task: str, role: str, rows: list[dict], normalize: Any, info: dict) -> list[Record]:
    records, dropped = normalize_rows(task, role, rows, normalize)
    if dropped:
        info.setdefault("dropped", {})[role] = dropped
        info["dropped_reason"] = "items without exactly 4 options (kept only 4-option items, as the papers do)"
    return records


# ----------------------------------------------------------------------------- splitting and checks
def _make_splits(
    records: dict[str, list[Record]], sources: Mapping[str, str], val_size: float | int, seed: int
) -> tuple[dict[str, list[Record]], dict[str, str]]:
    """The three splits and a description of how each was made."""
    splits = {role: recs for role, recs in records.items() if role != ALL}
    how = {role: sources[role] for role in splits}
    if ALL in records:  # BoolQ dev only: a fixed test split shared by every run seed
        rows = records[ALL]
        k = dev_only_test_size(len(rows))
        splits["train"], splits["test"] = carve(rows, k, BOOLQ_TEST_SEED, "boolq-test", "test split")
        how["test"] = f"{k} rows of {sources[ALL]} drawn with the fixed seed {BOOLQ_TEST_SEED} (same for every seed)"
        how["train"] = f"the other {len(rows) - k} rows of {sources[ALL]}"
    if "validation" not in splits:
        n = len(splits["train"])
        splits["train"], splits["validation"] = carve(splits["train"], val_size, seed, "validation", "val_size")
        how["validation"] = (
            f"{len(splits['validation'])} of {n} rows carved from {how['train']} (val_size={val_size}, seed={seed})"
        )
        how["train"] += " minus the validation rows"
    return splits, {role: how[role] for role in ROLES}


def _check_split(
    task: str, role: str, rows: list[Record], num_classes: int | None, arg: str, limit: int | None
) -> None:
    """A split must be non-empty, with labels in ``[0, C)`` and (multiple choice) C options per row."""
    if not rows:
        if limit == 0:
            raise ValueError(f"{arg}: task {task!r} split {role!r} is empty with {arg}=0; use {arg} >= 1 or None.")
        raise ValueError(
            f"data: task {task!r} split {role!r} has no usable rows; expected at least one. Check the data files "
            "(and the subjects / filters)."
        )
    for i, r in enumerate(rows if num_classes is not None else ()):  # None: real or free-text targets
        if not 0 <= r["label"] < num_classes:
            raise ValueError(
                f"labels: task {task!r} split {role!r} row {i} has label {r['label']}; expected one of "
                f"{list(range(num_classes))}. Fix the data or the label set."
            )
        if r["choices"] is not None and len(r["choices"]) != num_classes:
            raise ValueError(
                f"choices: task {task!r} split {role!r} row {i} has {len(r['choices'])} options; expected "
                f"{num_classes} (one per class). Fix the data or label_names."
            )
