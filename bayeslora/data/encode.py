"""Tokenize normalised records into a :class:`datasets.Dataset` for one of the two formats.

The dataset carries its format in ``dataset.info.config_name`` (``"seq_cls"`` or ``"mc"``) and its task in
``dataset.info.dataset_name``; :func:`~bayeslora.data.make_loader` reads the format to pick the padding side.
Both survive ``select``, ``shuffle``, ``filter`` and ``map``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import datasets

from ..formats import FORMATS
from .normalize import Record
from .prompts import ANSWER_CUE, mc_prompt, seq_cls_texts

_COLUMN_TYPES = {"input_ids": "int32", "attention_mask": "int8", "token_type_ids": "int8"}


@contextmanager
def truncating_left(tokenizer: Any) -> Iterator[Any]:
    """Set ``tokenizer.truncation_side = "left"`` for the duration and restore the previous value."""
    previous = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        yield tokenizer
    finally:
        tokenizer.truncation_side = previous


def _tokenize_seq_cls(records: Sequence[Record], tokenizer: Any, max_length: int) -> Any:
    """Single texts or text pairs; pairs truncate the longer side first (the passage / premise)."""
    texts = [seq_cls_texts(r) for r in records]
    firsts = [t[0] for t in texts]
    if all(t[1] is None for t in texts):
        return tokenizer(firsts, truncation=True, max_length=max_length)
    seconds = [t[1] or "" for t in texts]
    return tokenizer(firsts, seconds, truncation="longest_first", max_length=max_length)


def _tokenize_mc(
    records: Sequence[Record], tokenizer: Any, max_length: int, template: str, option_words: Sequence[str] | None
) -> Any:
    """Prompts ending in ``"Answer:"``, truncated from the left so the options and the cue always survive."""
    prompts = [mc_prompt(r, template, option_words) for r in records]
    with truncating_left(tokenizer):
        return tokenizer(prompts, truncation=True, max_length=max_length)


def encode(
    records: Sequence[Record],
    tokenizer: Any,
    *,
    format: str,
    max_length: int,
    template: str,
    option_words: Sequence[str] | None,
    label_names: Sequence[str],
    task: str,
    split: str,
) -> datasets.Dataset:
    """Tokenize the records of one split.

    Args:
        records: normalised records with labels in ``[0, C)``.
        tokenizer: a Hugging Face tokenizer (its state is left unchanged).
        format: ``"seq_cls"`` or ``"mc"``.
        max_length: truncation length in tokens (special tokens included).
        template: the ``mc`` prompt template.
        option_words: the ``mc`` options of a classification task (None: each record's choices).
        label_names: the C class names, stored as the ``ClassLabel`` of ``labels`` (empty: float regression targets).
        task: task name, stored in ``info.dataset_name``.
        split: split role, stored as the dataset's split.

    Returns:
        A Dataset with ``input_ids``, ``attention_mask``, (``token_type_ids``) and ``labels`` (int).
    """
    if format == "mc":
        enc = _tokenize_mc(records, tokenizer, max_length, template, option_words)
    else:
        enc = _tokenize_seq_cls(records, tokenizer, max_length)
    if label_names:
        labels = ([r["label"] for r in records], datasets.ClassLabel(names=list(label_names)))
    else:  # a regression task: real targets
        labels = ([float(r["label"]) for r in records], datasets.Value("float64"))
    return _dataset(enc, labels, f"bayeslora task {task!r}, format {format!r}, split {split!r}", task, format, split)


def _dataset(enc: Any, labels: tuple[list[int], Any], description: str, name: str, format: str, split: str):
    """A Dataset of the tokenizer output's model columns and ``labels`` (values, feature); its format and name are
    in ``info`` (``config_name`` / ``dataset_name``), which :func:`~bayeslora.data.make_loader` reads."""
    columns = {k: enc[k] for k in _COLUMN_TYPES if k in enc}
    values, feature = labels
    features = datasets.Features(
        {**{k: datasets.Sequence(datasets.Value(_COLUMN_TYPES[k])) for k in columns}, "labels": feature}
    )
    info = datasets.DatasetInfo(description=description, dataset_name=name, config_name=format, features=features)
    return datasets.Dataset.from_dict({**columns, "labels": values}, features=features, info=info, split=split)


UNLABELLED = -1  # the label of every row of an unlabelled set (OOD detection only)


def encode_texts(texts: Sequence[str], tokenizer: Any, *, format: str, max_length: int, name: str) -> datasets.Dataset:
    """Tokenize unlabelled texts (labels :data:`UNLABELLED`): ``seq_cls`` as single texts, ``mc`` as
    ``"<text>\nAnswer:"`` (truncated from the left so the cue survives), so the model's readout applies unchanged."""
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {list(FORMATS)}, got {format!r}.")
    if format == "mc":
        with truncating_left(tokenizer):
            enc = tokenizer([f"{t}\n{ANSWER_CUE}" for t in texts], truncation=True, max_length=max_length)
    else:
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    labels = ([UNLABELLED] * len(texts), datasets.Value("int64"))
    return _dataset(enc, labels, f"bayeslora unlabelled set {name!r}, format {format!r}", name, format, "test")
