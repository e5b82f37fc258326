"""The state of a fine-tuned adapter: the tensors training changes, copies of them, and adapter checkpoints.

:func:`trained_values` / :func:`load_trained` snapshot and restore everything :func:`~bayeslora.train.train_map`
trains (the selected adapter tensors and any other tensor peft marked trainable, e.g. a classification head);
the MAP cache and the ensemble members are such snapshots. Checkpoints (``step_XXXXXXX.pt``) hold the selected
adapter values at an optimizer step (written by :class:`~bayeslora.train.Checkpointer`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .io import load_torch, save_torch

if TYPE_CHECKING:  # pragma: no cover
    from .function import AdapterFn


def trainable_parameters(fn: AdapterFn) -> dict[str, torch.nn.Parameter]:
    """The selected adapter tensors plus any other parameter peft marked trainable."""
    params = dict(fn.params.tensors())
    for name, p in fn.model.named_parameters():
        if p.requires_grad and name not in params:
            params[name] = p
    return params


def trained_values(fn: AdapterFn) -> dict[str, torch.Tensor]:
    """Detached copies of every tensor :func:`train_map` trains (a complete fine-tuned adapter)."""
    return {n: p.detach().clone() for n, p in trainable_parameters(fn).items()}


@torch.no_grad()
def load_trained(fn: AdapterFn, values: Mapping[str, torch.Tensor], argument: str = "values") -> None:
    """Copy :func:`trained_values` output back into the model (in place, onto each parameter's device/dtype)."""
    fn.params.check({k: v for k, v in values.items() if k in fn.params.names}, argument=argument)
    named = dict(fn.model.named_parameters())
    unknown = [k for k in values if k not in named]
    if unknown:
        raise ValueError(
            f"{argument}: tensors {unknown[:3]} are not parameters of the model; use values saved from this model."
        )
    for k, v in values.items():
        named[k].copy_(v.to(device=named[k].device, dtype=named[k].dtype))


def save_checkpoint(fn: AdapterFn, directory: str | os.PathLike, step: int) -> Path:
    """Save the selected adapter values (CPU) to ``directory/step_XXXXXXX.pt`` atomically."""
    values = {k: v.cpu() for k, v in fn.params.values().items()}
    return save_torch({"step": step, "values": values}, Path(directory) / f"step_{step:07d}.pt")


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoint files written by :func:`train_map`, oldest step first."""
    return sorted(Path(directory).glob("step_*.pt"))


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The adapter values stored in a checkpoint."""
    return load_torch(path)["values"]
