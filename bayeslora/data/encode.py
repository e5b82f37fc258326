"""Tokenize normalised records into a :class:`datasets.Dataset` for one of the two formats.

The dataset carries its format in ``dataset.info.config_name`` (``"seq_cls"`` or ``"mc"``) and its task in
``dataset.info.dataset_name``; :func:`~bayeslora.data.make_loader` reads the format to pick the padding side.
Both survive ``select``, ``shuffle``, ``filter`` and ``map``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import datasets

from ..formats import FORMATS
from .normalize import Record
from .prompts import ANSWER_CUE, TEMPLATES, mc_prompt, seq_cls_texts

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
    if format == "generative":
        return encode_generative(records, tokenizer, max_length=max_length, template=template, task=task, split=split)
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


IGNORE_INDEX = -100  # the token label of the prompt and padding (bayeslora.data.collate pads labels with it)


def generative_target(record: Record) -> str:
    """The target text of a record: its ``target`` (a user's target field), else the gold option's text."""
    target = record.get("target")  # type: ignore[misc]
    if target is not None:
        return str(target)
    if record["choices"] is not None:
        return record["choices"][record["label"]]
    raise ValueError(
        "format: 'generative' needs a target text per example: a multiple-choice task (the gold option is the "
        "target) or a user's file with data.options.target_field; this record has neither."
    )


def generative_prompt(record: Record, template: str) -> str:
    """The prompt of a record: a user's prompt field as given; for a QA task the question (no options) and the
    answer cue."""
    if record.get("target") is not None:  # type: ignore[misc]
        return record["text"]
    if template not in TEMPLATES:
        raise ValueError(f"template: expected one of {sorted(TEMPLATES)}, got {template!r}.")
    return f"{TEMPLATES[template](record)}\n{ANSWER_CUE}"


def prompt_target_ids(tokenizer: Any, prompt: str, target: str, max_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of prompt + target: the prompt through the tokenizer's chat template when it has one
    (a user turn and the generation prompt), else as plain text with the tokenizer's special tokens; the target
    (``" " + target`` without a chat template) and EOS after it. Labels are the ids on the target and
    :data:`IGNORE_INDEX` on the prompt. Over ``max_length`` the prompt is cut from the left (the target stays)."""
    if getattr(tokenizer, "chat_template", None):
        prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                   tokenize=True)  # fmt: skip
        # a BatchEncoding (transformers >= 5 returns one) is a Mapping but not a dict
        prompt_ids = list(prompt_ids["input_ids"] if isinstance(prompt_ids, Mapping) else prompt_ids)
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(prompt)["input_ids"]
        target_ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        target_ids = [*target_ids, int(tokenizer.eos_token_id)]
    target_ids = target_ids[: max_length - 1]
    prompt_ids = prompt_ids[len(prompt_ids) - (max_length - len(target_ids)) :] if (
        len(prompt_ids) + len(target_ids) > max_length) else prompt_ids  # fmt: skip
    return [*prompt_ids, *target_ids], [IGNORE_INDEX] * len(prompt_ids) + list(target_ids)


def encode_generative(
    records: Sequence[Record], tokenizer: Any, *, max_length: int, template: str, task: str, split: str
) -> datasets.Dataset:
    """Tokenize records as prompt + target text (:func:`prompt_target_ids`); ``labels`` are token labels ``[L]``."""
    ids, labels = zip(*(prompt_target_ids(tokenizer, generative_prompt(r, template), generative_target(r), max_length)
                        for r in records))  # fmt: skip
    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "attention_mask": datasets.Sequence(datasets.Value("int8")),
        "labels": datasets.Sequence(datasets.Value("int32")),
    })  # fmt: skip
    info = datasets.DatasetInfo(description=f"bayeslora task {task!r}, format 'generative', split {split!r}",
                                dataset_name=task, config_name="generative", features=features)  # fmt: skip
    columns = {"input_ids": list(ids), "attention_mask": [[1] * len(x) for x in ids], "labels": list(labels)}
    return datasets.Dataset.from_dict(columns, features=features, info=info, split=split)


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
