"""MAP: the point estimate as a (degenerate) posterior, S = 1."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..function import AdapterFn, model_mode
from ..predictive import Predictive
from . import Needs, predictive_of, require_fitted, sample_count

# the methods this module registers (bayeslora.posteriors.discover)
REGISTER = {"map": "MAP"}


class MAP:
    """The fine-tuned adapter itself; ``predict`` returns its logits as one sample ``[1, B, C]``."""

    name = "map"
    needs = Needs()

    def __init__(self):
        self.values: dict[str, torch.Tensor] | None = None

    def fit(self, fn: AdapterFn, loader=None, *, val_loader=None, checkpoints=None) -> MAP:
        """Snapshot the adapter currently in the model (no data needed)."""
        self.values = fn.params.values()
        return self

    @torch.no_grad()
    def predict(self, fn: AdapterFn, batch, *, n_samples: int | None = None, generator=None) -> Predictive:
        values = require_fitted(self, "values")
        sample_count(self.name, n_samples, 1)  # a point estimate: every valid n_samples gives its logits
        with model_mode(fn.model, False):
            return predictive_of(fn, batch, [fn(values, batch)])

    def sample_values(self, fn: AdapterFn, batch, n_samples: int, generator=None) -> list[dict[str, torch.Tensor]]:
        """The MAP values ``n_samples`` times (a point estimate; ``generator`` is unused)."""
        values = require_fitted(self, "values")
        return [values] * n_samples

    def config(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"values": {k: v.cpu() for k, v in require_fitted(self, "values").items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.values = dict(state["values"])
