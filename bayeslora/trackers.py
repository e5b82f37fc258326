"""Experiment trackers (the Hydra ``logger`` group), the way lightning-hydra-template wires them.

A tracker sees a run's configuration once, the MAP training loss per optimizer step (as a
:class:`~bayeslora.train.TrainCallback`) and the run's final metrics; the run writes them, nothing else changes.

* :class:`TensorBoard`: ``torch.utils.tensorboard`` event files under ``<run_dir>/tensorboard``.
* :class:`WandB`: a Weights & Biases run, offline by default (``wandb sync`` uploads it later).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .train import TrainCallback, TrainStep


def flat_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """``{"<split>/<metric>": value}`` of a run record's splits and OOD sets (numbers only)."""
    out = {}
    for group, entries in (("", record.get("splits") or {}), ("ood/", record.get("ood") or {})):
        for split, metrics in entries.items():
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[f"{group}{split}/{name}"] = float(value)
    return out


class TensorBoard(TrainCallback):
    """TensorBoard event files in ``log_dir`` (``<run_dir>/tensorboard`` from the config)."""

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, sort_keys=True, default=str) + "\n```")

    def on_step(self, state: TrainStep) -> None:
        self.writer.add_scalar("train/loss", state.loss, state.step)
        self.writer.add_scalar("train/lr", state.lr, state.step)

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, 0)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandB(TrainCallback):
    """A Weights & Biases run (``mode="offline"``: written under ``dir``, uploaded later with ``wandb sync``)."""

    def __init__(self, project: str = "bayeslora", mode: str = "offline", dir: str = ".", name: str | None = None):
        import wandb

        Path(dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, mode=mode, dir=str(dir), name=name, reinit="finish_previous")

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(json.loads(json.dumps(config, default=str)), allow_val_change=True)

    def on_step(self, state: TrainStep) -> None:
        self.run.log({"train/loss": state.loss, "train/lr": state.lr, "train/step": state.step})

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        self.run.summary.update(dict(metrics))

    def close(self) -> None:
        self.run.finish()
