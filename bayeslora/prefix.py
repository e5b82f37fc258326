"""Frozen-prefix caching: compute the blocks below the lowest adapter once, run only the blocks above.

When every adapter tensor (LoRA, a trained head) sits in transformer blocks ``>= start`` (e.g. LoRA on the top k
blocks, ``LoraSpec(layers=k)``), the hidden states entering block ``start`` are a fixed function of the input. They
are computed once per example (:func:`cache_loader`, no grad, stored in float16 / bfloat16 / float32), and every later
call of the model (each training epoch, the curvature fit, the prior search, VI steps, ensemble members, every
predictive sample) runs only the embedding lookup (its output replaced) and blocks ``>= start``:

* :class:`FrozenPrefix` finds the block list and the module whose output enters block 0 (``embed_tokens`` of a
  Llama / Gemma, ``embeddings`` of a BERT) and the first block holding an adapter tensor;
* :meth:`FrozenPrefix.replay` (used by :class:`~bayeslora.function.AdapterFn` when a batch carries
  ``prefix_hidden``) replaces that module's output with the cached states and runs the model with the blocks
  ``[start:]`` only. The model's own forward still builds the attention mask, the position ids and rotary
  embeddings from the batch, so left padding and the readout's position ids are handled as in the full model.

Exactness: the cached path computes the same function as the full one (``tests/test_prefix.py``: logits, gradients
and K-FAC factors agree to float32 rounding with float32 storage, and to the storage precision with float16). Two
things differ by design: the prefix is computed in eval mode, so base-model dropout *below* ``start`` is off during
training (LoRA dropout above it is unchanged; Llama-family models have no base dropout), and padded positions hold
zeros instead of the pad token's states (they are masked out of attention, so no real position sees them).

Each example's states are stored for its real (attention-mask) positions only and re-padded per batch, so the cache
does not depend on the batch composition; a stored cache is keyed by the base-model fingerprint, ``start``, the
storage dtype, the readout's input convention and a digest of every token of the split, so it cannot be stale.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler

from .fingerprint import base_fingerprint
from .io import load_torch, save_torch
from .progress import bar as progress_bar
from .sweep import file_lock

logger = logging.getLogger(__name__)

PREFIX_KEY = "prefix_hidden"  # the batch entry of the cached hidden states [B, L, H]
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
CACHE_FORMAT = 1
_ADAPTER_MARKERS = ("lora_", "modules_to_save")


class _Stop(Exception):
    """Raised by the capture hook: the states entering ``start`` are taken, the rest is not computed."""


def _base(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _num_layers(model: nn.Module) -> int | None:
    config = getattr(_base(model), "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    return int(n) if n is not None else None


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: ``(qualified name, ModuleList)`` of the shallowest ModuleList of
    ``config.num_hidden_layers`` modules.

    Raises:
        ValueError: the model has no such list (not a transformers model with a block stack).
    """
    n = _num_layers(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and n is not None and len(module) == n:
            return name, module
    raise ValueError(
        f"model: no list of {n} transformer blocks found in {type(_base(model)).__name__} (config.num_hidden_layers); "
        "frozen-prefix caching needs a transformers model with a block stack; set prefix_cache.enabled=false."
    )


def adapter_start(model: nn.Module) -> int:
    """The index of the lowest block holding an adapter tensor (LoRA or a ``modules_to_save`` copy, or any
    trainable parameter); ``0`` if one sits in or below the embeddings, ``len(blocks)`` if none is in a block."""
    name, blocks = block_list(model)
    prefix = f"{name}."
    lowest = len(blocks)
    for pname, p in model.named_parameters():
        if not (p.requires_grad or any(m in pname for m in _ADAPTER_MARKERS)):
            continue
        if pname.startswith(prefix):
            lowest = min(lowest, int(pname[len(prefix) :].split(".", 1)[0]))
        elif _below_blocks(model, name, pname):
            return 0
    return lowest


def _below_blocks(model: nn.Module, blocks_name: str, pname: str) -> bool:
    """Whether a parameter lives in a module registered before the block list on the path to it (embeddings)."""
    return any(pname.startswith(f"{m}.") or pname == m for m in _modules_before(model, blocks_name))


def _modules_before(model: nn.Module, blocks_name: str) -> list[str]:
    """Qualified names of the siblings registered before the block list, and of its ancestors' earlier siblings,
    nearest level first."""
    parts = blocks_name.split(".")
    out: list[str] = []
    for depth in range(len(parts), 0, -1):
        parent_name, child = ".".join(parts[: depth - 1]), parts[depth - 1]
        parent = model.get_submodule(parent_name) if parent_name else model
        earlier = []
        for key in parent._modules:
            if key == child:
                break
            earlier.append(f"{parent_name}.{key}" if parent_name else key)
        out.extend(reversed(earlier))
    return out


class FrozenPrefix:
    """Blocks ``[0, start)`` of a model, frozen (no adapter tensor in them), and how to skip them.

    Args:
        model: the (peft) model.
        start: the first block that is run; default :func:`adapter_start`.

    Raises:
        ValueError: ``start`` is outside ``[1, number of blocks]`` or an adapter tensor sits below it.
    """

    def __init__(self, model: nn.Module, start: int | None = None):
        self.model = model
        self.blocks_name, self.blocks = block_list(model)
        lowest = adapter_start(model)
        start = lowest if start is None else int(start)
        if not 1 <= start <= len(self.blocks):
            raise ValueError(
                f"start: expected a block index in [1, {len(self.blocks)}], got {start}; an adapter tensor sits in "
                "the embeddings or block 0, so there is no frozen prefix to cache (restrict LoRA to the upper "
                "blocks, e.g. lora.layers=4)."
            )
        if start > lowest:
            raise ValueError(
                f"start: block {lowest} holds an adapter tensor, so the prefix ends at {lowest}, not {start}."
            )
        self.start = start
        owner_name, _, self.attr = self.blocks_name.rpartition(".")
        self.owner = model.get_submodule(owner_name) if owner_name else model
        entries = _modules_before(model, self.blocks_name)
        if not entries:
            raise ValueError(
                f"model: no module before {self.blocks_name} (the embeddings) in {type(_base(model)).__name__}; "
                "set prefix_cache.enabled=false."
            )
        self.entry_name = entries[0]
        self.entry = model.get_submodule(self.entry_name)

    @classmethod
    def of(cls, model: nn.Module) -> FrozenPrefix | None:
        """The frozen prefix of ``model``, or None when an adapter tensor sits in block 0 or the embeddings."""
        try:
            _, blocks = block_list(model)
        except ValueError:
            return None
        start = adapter_start(model)
        return cls(model, start) if 1 <= start <= len(blocks) else None

    def __repr__(self) -> str:
        return f"FrozenPrefix(blocks {self.blocks_name}[:{self.start}] of {len(self.blocks)}, entry {self.entry_name})"

    def key(self) -> dict[str, Any]:
        """What the cached states depend on, besides the tokens."""
        return {"fingerprint": base_fingerprint(self.model), "start": self.start, "blocks": len(self.blocks)}

    # ------------------------------------------------------------------ capture
    @contextlib.contextmanager
    def capturing(self) -> Iterator[dict[str, torch.Tensor]]:
        """Within the context a model call stops at block ``start`` (raising :class:`_Stop`) and leaves the states
        entering it in the yielded dict under ``"hidden"``; checks that the entry module's output is block 0's input."""
        got: dict[str, torch.Tensor] = {}

        def entry_hook(module, args, output):
            got["entry"] = output

        def first_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if hidden is not got.get("entry"):
                raise ValueError(
                    f"model: the output of {self.entry_name} is not the input of block 0 of {self.blocks_name} "
                    f"({type(_base(self.model)).__name__} transforms the embeddings in between), so the cache cannot "
                    "replay it; set prefix_cache.enabled=false."
                )

        def stop_before(module, args, kwargs):
            got["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach()
            raise _Stop

        def stop_after(module, args, output):  # no adapter in a block (a head only): the last block's output
            got["hidden"] = (output[0] if isinstance(output, tuple) else output).detach()
            raise _Stop

        handles = [
            self.entry.register_forward_hook(entry_hook),
            self.blocks[0].register_forward_pre_hook(first_hook, with_kwargs=True),
            self.blocks[self.start].register_forward_pre_hook(stop_before, with_kwargs=True)
            if self.start < len(self.blocks)
            else self.blocks[-1].register_forward_hook(stop_after),
        ]
        try:
            yield got
        finally:
            for h in handles:
                h.remove()

    # ------------------------------------------------------------------ replay
    @contextlib.contextmanager
    def replay(self, hidden: torch.Tensor) -> Iterator[None]:
        """Within the context a model call takes ``hidden [B, L, H]`` as the states entering block ``start`` and runs
        only the blocks from there (the entry module's output is replaced; the block list is cut for the call)."""
        blocks, owner, attr = self.blocks, self.owner, self.attr

        def entry_hook(module, args, output):
            if tuple(output.shape) != tuple(hidden.shape):
                raise ValueError(
                    f"batch: '{PREFIX_KEY}' has shape {tuple(hidden.shape)}, the model's embeddings "
                    f"{tuple(output.shape)}; "
                    "build the loader with bayeslora.prefix.cache_loader on this model."
                )
            return hidden.to(device=output.device, dtype=output.dtype)

        def cut(module, args):
            module._modules[attr] = blocks[self.start :]

        def restore(module, args, output):
            module._modules[attr] = blocks

        handles = [
            self.entry.register_forward_hook(entry_hook),
            owner.register_forward_pre_hook(cut),
            owner.register_forward_hook(restore, always_call=True),
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            owner._modules[attr] = blocks


# ----------------------------------------------------------------------------- the cached split
class CachedDataset(Dataset):
    """A split whose rows carry their cached states (``prefix_hidden [length, H]``, the real positions only)."""

    def __init__(self, dataset: Any, states: torch.Tensor, offsets: torch.Tensor):
        if len(offsets) != len(dataset) + 1:
            raise ValueError(
                f"offsets: expected {len(dataset) + 1} entries for {len(dataset)} rows, got {len(offsets)}."
            )
        self.dataset, self.states, self.offsets = dataset, states, offsets

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = dict(self.dataset[i])
        row[PREFIX_KEY] = self.states[self.offsets[i] : self.offsets[i + 1]]
        return row

    @property
    def info(self):  # the task format (make_loader reads the padding side from it)
        return getattr(self.dataset, "info", None)


class PrefixCollator:
    """Collates rows with the inner collator and places each row's cached states at its attention-mask positions
    (zeros elsewhere), so any padding side works."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        states = [r[PREFIX_KEY] for r in rows]
        batch = self.inner([{k: v for k, v in r.items() if k != PREFIX_KEY} for r in rows])
        mask = batch["attention_mask"].bool()
        out = states[0].new_zeros((*mask.shape, states[0].shape[-1]))
        for b, h in enumerate(states):
            if int(mask[b].sum()) != len(h):
                raise ValueError(
                    f"batch: row {b} has {int(mask[b].sum())} real positions but {len(h)} cached states; the collator "
                    "changed the tokens after caching (truncation?); rebuild the cache."
                )
            out[b, mask[b]] = h
        batch[PREFIX_KEY] = out
        return batch


def _token_digest(dataset: Any) -> str:
    h = hashlib.sha256()
    for i in range(len(dataset)):
        row = dataset[i]
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if key in row:
                h.update(key.encode())
                h.update(torch.as_tensor(row[key], dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def cache_key(prefix: FrozenPrefix, dataset: Any, dtype: torch.dtype, readout_config: Mapping[str, Any]) -> str:
    """The digest naming a stored cache: the prefix (base fingerprint, start), dtype, readout inputs, every token."""
    parts = {
        "format": CACHE_FORMAT,
        **prefix.key(),
        "dtype": str(dtype),
        "readout": readout_config.get("type"),
        "tokens": _token_digest(dataset),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def compute_states(fn, dataset: Any, collate, *, batch_size: int, dtype: torch.dtype, progress: bool = False):
    """The states entering block ``fn.prefix.start`` of every row, ``(states [sum of lengths, H], offsets [N + 1])``,
    in batches of rows of similar length (least padding)."""
    prefix: FrozenPrefix = fn.prefix
    lengths = [int(sum(dataset[i]["attention_mask"])) for i in range(len(dataset))]
    order = sorted(range(len(dataset)), key=lambda i: -lengths[i])
    per_row: list[torch.Tensor | None] = [None] * len(dataset)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    from .function import model_mode

    with torch.no_grad(), model_mode(fn.model, False), prefix.capturing() as got:
        for idx in progress_bar(batches, desc=f"prefix cache (blocks < {prefix.start})", enabled=progress):
            batch = fn.to_device(collate([dataset[i] for i in idx]))
            try:
                fn(None, batch)
            except _Stop:
                pass
            else:
                raise RuntimeError("the model call ended without reaching the cached block; this is a bug.")
            mask = batch["attention_mask"].bool()
            for b, i in enumerate(idx):
                per_row[i] = got["hidden"][b][mask[b]].to("cpu", dtype)
    offsets = torch.zeros(len(dataset) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor([len(h) for h in per_row]), 0)
    return torch.cat(per_row, 0), offsets


def cache_loader(
    fn,
    loader: DataLoader,
    *,
    dtype: str | torch.dtype = "float16",
    store: str | Path | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> DataLoader:
    """A loader over the same rows, in the same order and batches, whose batches carry ``prefix_hidden``.

    Args:
        fn: the :class:`~bayeslora.function.AdapterFn` (``fn.prefix`` set: its adapters leave a frozen prefix).
        loader: a DataLoader over a tokenized split (e.g. :func:`~bayeslora.data.make_loader`).
        dtype: storage dtype of the states (``"float16"``, ``"bfloat16"`` or ``"float32"``).
        store: a directory to keep the states in (``<key>.pt``); reused whenever the key matches.
        batch_size: rows per batch while computing (default: the loader's).
        progress: show a progress bar.

    Raises:
        ValueError: ``fn`` has no frozen prefix, or a bad ``dtype``.
    """
    if getattr(fn, "prefix", None) is None:
        raise ValueError(
            "fn: the adapters sit in block 0 or the embeddings, so there is no frozen prefix to cache; restrict LoRA "
            "to the upper blocks (LoraSpec(layers=k) / lora.layers=k) or use the loader as it is."
        )
    if isinstance(dtype, str):
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(STORAGE_DTYPES)}, got {dtype!r}.")
        dtype = STORAGE_DTYPES[dtype]
    dataset = loader.dataset
    if isinstance(dataset, CachedDataset):
        return loader
    if len(dataset) == 0 or not isinstance(dataset[0], Mapping) or "attention_mask" not in dataset[0]:
        raise ValueError(
            "loader: expected a dataset of rows {input_ids, attention_mask, ...} (a tokenized split, as "
            "bayeslora.data.make_loader takes), got rows of type "
            f"{type(dataset[0]).__name__ if len(dataset) else 'none (empty)'}."
        )
    compute = functools.partial(compute_states, fn, dataset, loader.collate_fn, dtype=dtype, progress=progress,
                                batch_size=batch_size or loader.batch_size or 1)  # fmt: skip
    if store is None:
        states, offsets = compute()
    else:
        path = Path(store) / f"{cache_key(fn.prefix, dataset, dtype, fn.readout.config())}.pt"
        with file_lock(path.with_suffix(".lock")):  # concurrent runs of one sweep compute a split once
            if path.is_file():
                saved = load_torch(path)
                states, offsets = saved["states"], saved["offsets"]
                logger.info("prefix cache: %d rows read from %s", len(dataset), path)
            else:
                states, offsets = compute()
                save_torch({"states": states, "offsets": offsets}, path)
                logger.info("prefix cache: %d rows (%.1f MB) written to %s", len(dataset), states.nbytes / 2**20, path)
    cached = CachedDataset(dataset, states, offsets)
    generator, sampler = _same_order(loader, cached)
    return DataLoader(
        cached,
        batch_size=loader.batch_size,
        sampler=sampler,
        collate_fn=PrefixCollator(loader.collate_fn),
        drop_last=loader.drop_last,
        generator=generator,
    )


def _same_order(loader: DataLoader, dataset: Dataset):
    """A generator and sampler that yield the order ``loader`` would yield from here on (its own copies, so
    iterating either loader leaves the other's order unchanged); another sampler type is shared as it is."""
    generator = None
    if loader.generator is not None:
        generator = torch.Generator().set_state(loader.generator.get_state())
    sampler = loader.sampler
    if isinstance(sampler, SequentialSampler):
        sampler = SequentialSampler(dataset)
    elif isinstance(sampler, RandomSampler):
        own = sampler.generator is loader.generator
        g = generator if own else (None if sampler.generator is None else
                                   torch.Generator().set_state(sampler.generator.get_state()))  # fmt: skip
        sampler = RandomSampler(dataset, replacement=sampler.replacement, num_samples=sampler._num_samples, generator=g)
    return generator, sampler
