"""Batches: pad tokenized rows into tensors ``{input_ids, attention_mask, [token_type_ids], labels}``."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..formats import FORMATS, PADDING_SIDE

_PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0}
IGNORE_INDEX = -100  # the label of unscored positions of token labels (prompt, padding)
SIDES = ("left", "right")


class PadCollator:
    """Pads a list of tokenized rows to the longest row of the batch.

    Args:
        pad_token_id: the id that fills ``input_ids`` (``attention_mask`` and ``token_type_ids`` fill with 0).
        padding_side: ``"left"`` (causal LMs: the answer position is the last column) or ``"right"``.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        if padding_side not in SIDES:
            raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}.")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Rows ``{input_ids, attention_mask, [token_type_ids], labels}`` -> tensors ``[B, L]`` and ``labels [B]``
        (long class indices), or ``[B, 1]`` float32 for real (regression) targets."""
        length = max(len(r["input_ids"]) for r in rows)
        batch = {"input_ids": self._pad([r["input_ids"] for r in rows], length, self.pad_token_id)}
        for key, fill in _PAD_VALUES.items():
            if key in rows[0]:
                batch[key] = self._pad([r[key] for r in rows], length, fill)
        labels = [r["labels"] for r in rows]
        if any(isinstance(y, float) for y in labels):  # regression targets: [B, 1], shaped like the one output
            batch["labels"] = torch.tensor([[float(y)] for y in labels], dtype=torch.float32)
        elif isinstance(labels[0], numbers.Integral):
            batch["labels"] = torch.tensor([int(y) for y in labels], dtype=torch.long)
        else:  # token labels [L] (format 'generative'): padded with the ignore index
            batch["labels"] = self._pad(labels, length, IGNORE_INDEX)
        return batch

    def _pad(self, seqs: Sequence[Any], length: int, fill: int) -> torch.Tensor:
        out = torch.full((len(seqs), length), fill, dtype=torch.long)
        for i, seq in enumerate(seqs):
            values = torch.as_tensor(seq, dtype=torch.long)
            if self.padding_side == "left":
                out[i, length - len(values) :] = values
            else:
                out[i, : len(values)] = values
        return out


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, or its EOS id where it has no pad token (the tokenizer is not modified).

    Raises:
        ValueError: the tokenizer has neither.
    """
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, list):  # some tokenizers list several EOS ids
            value = value[0] if value else None
        if value is not None:
            return int(value)
    raise ValueError(
        f"tokenizer: {type(tokenizer).__name__} has neither a pad token nor an EOS token; expected one to pad with. "
        "Set tokenizer.pad_token (e.g. tokenizer.pad_token = tokenizer.unk_token) before make_loader."
    )


def default_padding_side(dataset: Any, tokenizer: Any) -> str:
    """The padding side for a dataset: from its format (``mc`` -> left, ``seq_cls`` -> right), stored in
    ``dataset.info.config_name`` by :func:`~bayeslora.data.build_task`, else the tokenizer's ``padding_side``."""
    info = getattr(dataset, "info", None)
    fmt = getattr(info, "config_name", None)
    if fmt in FORMATS:
        return PADDING_SIDE[fmt]
    return getattr(tokenizer, "padding_side", None) or "right"


def make_loader(
    dataset: Any,
    tokenizer: Any,
    *,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    padding_side: str | None = None,
    group_by_length: bool = False,
) -> DataLoader:
    """A DataLoader over a tokenized split.

    Args:
        dataset: a split of :class:`~bayeslora.data.TaskData` (or any sized dataset of rows with
            ``input_ids``, ``attention_mask`` and ``labels``).
        tokenizer: gives the pad id (its EOS id where it has no pad token).
        batch_size: rows per batch.
        shuffle: reshuffle every epoch with a ``torch.Generator`` seeded by ``seed``, so two loaders with one seed
            yield the same batches. The global torch RNG is never used (not even for the per-epoch base seed).
        seed: seed of the shuffling generator.
        padding_side: ``"left"`` or ``"right"``; default from the dataset's format (``mc`` -> left, so the answer
            position is the last column; ``seq_cls`` -> right), else the tokenizer's ``padding_side``.
        group_by_length: with ``shuffle``, batches of rows of similar length (transformers' ``LengthGroupedSampler``:
            a seeded permutation, sorted by length within mega-batches of 50 batches), so less compute goes to
            padding; the batches are still reshuffled every epoch.

    Returns:
        A DataLoader yielding ``{input_ids [B, L], attention_mask [B, L], (token_type_ids [B, L]), labels [B]}``
        (long tensors).

    Raises:
        ValueError: bad ``batch_size`` / ``padding_side``, an empty dataset, or a tokenizer without pad/EOS.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}.")
    if len(dataset) == 0:
        raise ValueError("dataset: expected a non-empty split, got 0 rows; check the task split or max_train/max_eval.")
    side = padding_side if padding_side is not None else default_padding_side(dataset, tokenizer)
    collate = PadCollator(pad_token_id(tokenizer), side)
    # always a private generator: DataLoader draws a base seed per epoch, from the global RNG if given none
    generator = torch.Generator().manual_seed(int(seed))
    if group_by_length:
        if not shuffle:
            raise ValueError(
                "group_by_length: groups the rows of a shuffled (training) loader; pass shuffle=True, or drop "
                "group_by_length for an evaluation loader (its order is the split's)."
            )
        from transformers.trainer_pt_utils import LengthGroupedSampler

        sampler = LengthGroupedSampler(int(batch_size), lengths=row_lengths(dataset), generator=generator)
        return DataLoader(dataset, batch_size=int(batch_size), sampler=sampler, generator=generator, collate_fn=collate)
    return DataLoader(
        dataset, batch_size=int(batch_size), shuffle=bool(shuffle), generator=generator, collate_fn=collate
    )


def row_lengths(dataset: Any) -> list[int]:
    """The token count of every row (``input_ids``)."""
    column = dataset["input_ids"] if hasattr(dataset, "column_names") else None
    if column is not None:
        return [len(ids) for ids in column]
    return [len(dataset[i]["input_ids"]) for i in range(len(dataset))]


def padding_fraction(loader: DataLoader, epochs: int = 1) -> float:
    """The fraction of the positions of a loader's batches that are padding (over ``epochs`` passes)."""
    pad = total = 0
    for _ in range(epochs):
        for batch in loader:
            mask = batch["attention_mask"]
            pad += int((mask == 0).sum())
            total += mask.numel()
    return pad / max(total, 1)


def dataset_size(loader: DataLoader) -> int:
    """N, the number of training examples behind a loader."""
    try:
        n = len(loader.dataset)
    except (AttributeError, TypeError) as err:
        raise TypeError(
            "loader: expected a torch DataLoader over a sized dataset (N is needed for the prior term); "
            f"got {type(loader).__name__}."
        ) from err
    if n == 0:
        raise ValueError("loader: the training dataset is empty; check the task split or max_train.")
    return n
