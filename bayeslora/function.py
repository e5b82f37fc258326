"""AdapterFn: the function ``(values | None, batch) -> class logits [B, C]`` every method uses.

It binds a peft model, the :class:`~bayeslora.params.AdapterParams` selection and a
:class:`~bayeslora.readout.Readout`. With ``values=None`` the model's own (live) parameters are
used, so gradients flow into them (training); with a dict of values the call goes through
:func:`torch.func.functional_call`, which leaves the model untouched (sampling, vjps, ensembles).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .params import AdapterParams
from .prefix import PREFIX_KEY, FrozenPrefix
from .readout import Readout


class AdapterFn:
    """Class logits of a LoRA model as a function of its adapter values.

    Args:
        model: the peft model.
        params: the selected adapter tensors.
        readout: maps the HF output to ``[B, C]`` logits.
        autocast_dtype: optional dtype for ``torch.autocast`` on CUDA (``torch.bfloat16`` for bf16 runs);
            ignored on CPU.

    A batch carrying cached prefix states (``prefix_hidden``, from :func:`bayeslora.prefix.cache_loader`) runs only
    the blocks above the frozen prefix (:attr:`prefix`, found from where the adapters sit; None when an adapter is
    in block 0 or the embeddings).
    """

    def __init__(
        self,
        model: nn.Module,
        params: AdapterParams,
        readout: Readout,
        autocast_dtype: torch.dtype | None = None,
    ):
        if params.model is not model:
            raise ValueError("params: the AdapterParams were selected from a different model; build them from `model`.")
        self.model = model
        self.params = params
        self.readout = readout
        self.autocast_dtype = autocast_dtype
        self.prefix: FrozenPrefix | None = FrozenPrefix.of(model)

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.tensors().values())).device

    @property
    def num_classes(self) -> int:
        return self.readout.num_classes

    @property
    def likelihood(self):
        """How the outputs explain the labels (:mod:`bayeslora.likelihoods`), from the readout."""
        return self.readout.likelihood

    def to_device(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Move the tensors of a batch to the model's device."""
        dev = self.device
        return {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _autocast(self):
        if self.autocast_dtype is not None and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=self.autocast_dtype)
        return contextlib.nullcontext()

    def __call__(self, values: Mapping[str, torch.Tensor] | None, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Class logits ``[B, C]`` (float32) for ``batch`` under adapter ``values``."""
        batch = self.to_device(batch)
        inputs = self.readout.model_inputs(batch)
        with self._autocast(), self._replay(batch):
            if values is None:
                output = self.model(**inputs)
            else:
                dev = self.device
                values = {k: v.to(dev, non_blocking=True) for k, v in values.items()}
                output = torch.func.functional_call(self.model, values, args=(), kwargs=inputs, strict=False)
            return self.readout(output, batch)

    def _replay(self, batch: Mapping[str, torch.Tensor]):
        hidden = batch.get(PREFIX_KEY)
        if hidden is None:
            return contextlib.nullcontext()
        if self.prefix is None:
            raise ValueError(
                f"batch: carries '{PREFIX_KEY}' (cached prefix states) but this model's adapters start in block 0 or "
                "the embeddings; use the uncached loader."
            )
        return self.prefix.replay(hidden)

    def labels(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The integer labels of a batch on the model's device."""
        if "labels" not in batch:
            raise ValueError(f"batch: expected a 'labels' entry, got keys {sorted(batch)}.")
        return batch["labels"].to(self.device)


@contextlib.contextmanager
def model_mode(model: nn.Module, train: bool) -> Iterator[nn.Module]:
    """Temporarily set ``model.train(train)``; restores every submodule's previous mode."""
    previous = {m: m.training for m in model.modules()}
    model.train(train)
    try:
        yield model
    finally:
        for m, mode in previous.items():
            m.training = mode


@contextlib.contextmanager
def lora_dropout_only(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode except for the LoRA dropout modules (used by MC dropout)."""
    with model_mode(model, False):
        for name, m in model.named_modules():
            if ".lora_dropout." in f".{name}." or name.endswith("lora_dropout"):
                m.train(True)
        yield model
