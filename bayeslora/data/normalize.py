"""Normalise the raw rows of each dataset into one record type.

A :class:`Record` is ``{text, text_pair, choices, label}``:

* ``text`` – the sentence, question or premise;
* ``text_pair`` – the second text of a pair task (RTE hypothesis, BoolQ passage) or ``None``;
* ``choices`` – the answer options of a multiple-choice task or ``None``;
* ``label`` – an int in ``[0, C)``.

Each normaliser accepts both the schema of the project's offline copies and the Hugging Face hub schema of
its dataset (e.g. ARC local ``question{stem, choices[{text,label}]}`` and hub ``question: str,
choices{text: [...], label: [...]}``; RTE local labels ``"entailment"/"not_entailment"`` and GLUE hub labels
``0/1``). A normaliser returns ``None`` for a row the task drops on purpose (ARC items without exactly four
options, as in the Laplace-LoRA and BLoB papers) and raises :class:`LabelError` for a label outside the task's
label set; :func:`normalize_rows` turns that into a ``ValueError`` naming the task and the split.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypedDict


class Record(TypedDict):
    """One normalised example."""

    text: str
    text_pair: str | None
    choices: list[str] | None
    label: int | float  # a class index; a float target for a regression task


Row = Mapping[str, Any]
Normalizer = Callable[[Row], "Record | None"]


class LabelError(ValueError):
    """A raw label outside the task's label set.

    Args:
        value: the offending raw value.
        valid: the accepted raw values.
    """

    def __init__(self, value: Any, valid: Sequence[Any]):
        super().__init__(f"label {value!r} is not one of {list(valid)}")
        self.value = value
        self.valid = list(valid)


def normalize_rows(task: str, split: str, rows: Iterable[Row], normalize: Normalizer) -> tuple[list[Record], int]:
    """Normalise the rows of one split.

    Args:
        task: task name, for error messages.
        split: split role, for error messages.
        rows: raw rows (dicts).
        normalize: the task's normaliser.

    Returns:
        ``(records, n_dropped)``; dropped rows are those the task leaves out on purpose.

    Raises:
        ValueError: a label outside the label set, or a row without a field the task needs.
    """
    records: list[Record] = []
    dropped = 0
    for i, row in enumerate(rows):
        try:
            record = normalize(row)
        except LabelError as err:
            raise ValueError(
                f"labels: task {task!r} split {split!r} row {i} has label {err.value!r}; expected one of "
                f"{err.valid}. Fix the data file (unlabeled rows, e.g. GLUE test, cannot be used) or the label set."
            ) from err
        except KeyError as err:
            raise ValueError(
                f"data: task {task!r} split {split!r} row {i} lacks the field {err.args[0]!r}; it has fields "
                f"{sorted(row)}. Check that the file belongs to task {task!r} (or set the field names)."
            ) from err
        except ValueError as err:  # e.g. an ambiguous generic label or a malformed choices field
            raise ValueError(f"data: task {task!r} split {split!r} row {i}: {err}") from err
        if record is None:
            dropped += 1
        else:
            records.append(record)
    return records, dropped


def _record(text: Any, label: int | float, text_pair: Any = None, choices: Sequence[Any] | None = None) -> Record:
    return {
        "text": str(text).strip(),
        "text_pair": None if text_pair is None else str(text_pair).strip(),
        "choices": None if choices is None else [str(c).strip() for c in choices],
        "label": float(label) if isinstance(label, float) else int(label),
    }


def float_label(value: Any) -> float:
    """A regression target: a finite number (or a numeric string, as CSV cells are)."""
    try:
        out = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        out = math.nan
    if isinstance(value, bool) or not math.isfinite(out):
        raise ValueError(f"labels: a regression target must be a finite number, got {value!r}; fix the data.")
    return out


def generic_target(text_field: str, target_field: str) -> Normalizer:
    """Normaliser for user files of the ``generative`` format: the prompt in ``text_field``, the free-text target in
    ``target_field`` (kept as the record's ``target``; ``label`` is 0)."""

    def normalize(row: Row) -> Record:
        record = _record(row[text_field], 0)
        record["target"] = str(row[target_field]).strip()  # type: ignore[typeddict-unknown-key]
        return record

    return normalize


def _int_label(value: Any, n: int) -> int:
    """A label given as an int index in ``[0, n)`` (bools are not ints here)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n:
        return value
    raise LabelError(value, list(range(n)))


def sst2(row: Row) -> Record:
    """GLUE SST-2 ``{sentence, label: 0|1}`` (local and ``nyu-mll/glue``); 0 = negative, 1 = positive."""
    return _record(row["sentence"], _int_label(row["label"], 2))


RTE_LABELS = ("entailment", "not_entailment")


def rte(row: Row) -> Record:
    """GLUE RTE ``{sentence1, sentence2, label}``; label ``"entailment"/"not_entailment"`` (local) or 0/1 (hub)."""
    value = row["label"]
    if isinstance(value, str):
        if value not in RTE_LABELS:
            raise LabelError(value, [*RTE_LABELS, 0, 1])
        label = RTE_LABELS.index(value)
    else:
        try:
            label = _int_label(value, 2)
        except LabelError:
            raise LabelError(value, [*RTE_LABELS, 0, 1]) from None
    return _record(row["sentence1"], label, text_pair=row["sentence2"])


def boolq(row: Row) -> Record:
    """BoolQ ``{question, passage, answer: bool}`` (local and ``google/boolq``; SuperGLUE ``label`` 0/1 too).

    The label is 0 = false ("no"), 1 = true ("yes"); ``text`` is the question, ``text_pair`` the passage.
    """
    value = row["answer"] if "answer" in row else row["label"]
    if isinstance(value, bool):
        label = int(value)
    else:
        try:
            label = _int_label(value, 2)
        except LabelError:
            raise LabelError(value, [False, True, 0, 1]) from None
    return _record(row["question"], label, text_pair=row["passage"])


def _stem_and_options(row: Row) -> tuple[str, list[str], list[str]]:
    """ARC / OpenBookQA: ``(stem, option texts, option keys)`` from the local or the hub schema."""
    question = row["question"] if "question" in row else row["question_stem"]  # OpenBookQA hub: question_stem
    if isinstance(question, Mapping):  # AI2 jsonl: question{stem, choices[{text, label}]}
        options = question["choices"]
        return question["stem"], [o["text"] for o in options], [str(o["label"]) for o in options]
    choices = row["choices"]  # hub: choices{text: [...], label: [...]}
    return question, list(choices["text"]), [str(k) for k in choices["label"]]


def four_choice(row: Row) -> Record | None:
    """ARC / OpenBookQA item; the label is the position of ``answerKey`` among the option keys.

    Keys ``"A"``-``"D"`` and ``"1"``-``"4"`` both map to positions 0-3 (letters A-D in the prompt). Items
    without exactly four options are dropped (``None``), as in the papers; their answer key is still checked.
    """
    stem, texts, keys = _stem_and_options(row)
    answer = str(row["answerKey"]).strip()
    if answer not in keys:
        raise LabelError(answer, keys)
    if len(texts) != 4:
        return None
    return _record(stem, keys.index(answer), choices=texts)


def winogrande(row: Row) -> Record:
    """WinoGrande ``{sentence, option1, option2, answer: "1"|"2"}`` (local and ``allenai/winogrande``)."""
    answer = str(row["answer"]).strip()
    if answer not in ("1", "2"):
        raise LabelError(row["answer"], ["1", "2"])
    return _record(row["sentence"], int(answer) - 1, choices=[row["option1"], row["option2"]])


def mmlu(row: Row) -> Record:
    """MMLU ``{question, subject, choices[4], answer}`` (``cais/mmlu``); answer an int 0-3 or a letter A-D."""
    choices = list(row["choices"])
    value = row["answer"]
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    if isinstance(value, str) and value in letters:
        label = letters.index(value)
    else:
        try:
            label = _int_label(value, len(choices))
        except LabelError:
            raise LabelError(value, [*range(len(choices)), *letters]) from None
    return _record(row["question"], label, choices=choices)


def label_index(value: Any, names: Sequence[str]) -> int:
    """Map a user label to its index: a name in ``names`` or an int index in ``[0, C)``.

    Strings are matched as names first, then as digit strings (CSV cells); bools count as 0/1. An int that is
    also the name of a *different* class (e.g. labels ``1, 2`` with ``label_names=["1", "2"]``, as a CSV reader
    types them) is ambiguous and rejected rather than silently mapped.

    Raises:
        LabelError: the value is not a valid name or index.
        ValueError: an ambiguous int label.
    """
    if isinstance(value, str):
        if value in names:
            return list(names).index(value)
        stripped = value.strip()
        if not (stripped.lstrip("-").isdigit()):
            raise LabelError(value, [*names, *range(len(names))])
        value = int(stripped)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or not 0 <= int(value) < len(names):
        raise LabelError(value, [*names, *range(len(names))])
    index = int(value)
    if str(index) in names and list(names).index(str(index)) != index:
        raise ValueError(
            f"labels: the int label {index} is both an index and the name of class {list(names).index(str(index))} "
            f"in label_names={list(names)}; give label_names that are not integers, or write the labels as "
            f"indices 0..{len(names) - 1} with label_names in that order."
        )
    return index


def generic(
    text_fields: Sequence[str],
    label_field: str,
    label_names: Sequence[str] | None,
    choices_field: str | None = None,
) -> Normalizer:
    """Normaliser for user files (the ``jsonl`` / ``csv`` tasks).

    Args:
        text_fields: one field (``text``) or two (``text``, ``text_pair``).
        label_field: the label field; values are names in ``label_names`` or int indices.
        label_names: the C class names (for multiple choice: the names of the option positions); None: the labels
            are real regression targets (:func:`float_label`).
        choices_field: optional field holding the C answer options of each row.
    """
    names = None if label_names is None else [str(n) for n in label_names]

    def normalize(row: Row) -> Record:
        pair = row[text_fields[1]] if len(text_fields) == 2 else None
        choices = None
        if choices_field is not None:
            choices = row[choices_field]
            if isinstance(choices, str) or not isinstance(choices, Sequence):
                raise ValueError(
                    f"choices_field: expected field {choices_field!r} to hold a list of options, got "
                    f"{type(choices).__name__} {choices!r}."
                )
        label = float_label(row[label_field]) if names is None else label_index(row[label_field], names)
        return _record(row[text_fields[0]], label, text_pair=pair, choices=choices)

    return normalize
