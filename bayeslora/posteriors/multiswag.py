"""MultiSWAG (Wilson & Izmailov, NeurIPS 2020): a deep ensemble whose every member is a SWAG posterior.

The members are trained by :class:`~bayeslora.posteriors.ensemble.Ensemble` (the same seeds, options and
``include_current``); each is then the start of its own :class:`~bayeslora.posteriors.swag.SWAG` collection. The
mixture predicts with ``n_samples`` draws split over the K members (member i gets ``n // K`` draws, one more for the
first ``n mod K``); a member's tensors outside the selection (e.g. a head left out) stay at the member's values.
The live model is unchanged by ``fit`` (as for the ensemble). A mixture has no single posterior mean:
``n_samples=0`` is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..adapter_state import load_trained, trained_values
from ..function import AdapterFn, model_mode
from ..predictive import Predictive
from . import Needs, predictive_of, require_fitted, sample_count
from .ensemble import Ensemble
from .swag import SWAG

# the methods this module registers (bayeslora.posteriors.discover)
REGISTER = {"multiswag": "MultiSWAG"}


class MultiSWAG:
    """K SWAG posteriors around K independently trained adapters.

    Args:
        k, train, seeds, base_seed, include_current, progress: the members, as in
            :class:`~bayeslora.posteriors.ensemble.Ensemble`.
        prior_precision: λ of the members' training and of each SWAG collection (the run's one number).
        swag: options of each member's :class:`~bayeslora.posteriors.swag.SWAG` (its defaults otherwise; member i
            collects with seed ``seeds[i]``).
        n_samples: the default number of draws of the mixture in :meth:`predict`.
    """

    name = "multiswag"

    def __init__(
        self,
        k: int = 3,
        train: Mapping[str, Any] | None = None,
        seeds: Sequence[int] | None = None,
        base_seed: int = 0,
        prior_precision: float | None = None,
        include_current: bool = True,
        swag: Mapping[str, Any] | None = None,
        n_samples: int = 15,
        progress: bool = True,
    ):
        self.ensemble = Ensemble(k=k, train=train, seeds=seeds, base_seed=base_seed, prior_precision=prior_precision,
                                 include_current=include_current, progress=progress)  # fmt: skip
        if not isinstance(swag, (Mapping, type(None))):
            raise TypeError(f"swag: expected a dict of SWAG options or None, got {type(swag).__name__}.")
        self.swag, self.progress = dict(swag or {}), bool(progress)
        for key in ("seed", "prior_precision"):
            if key in self.swag:
                raise ValueError(
                    f"swag: {key!r} cannot be set per member (member i collects with seeds[i]; λ is prior_precision)."
                )
        self.member_swag(0)  # validate the SWAG options now
        if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
            raise ValueError(f"n_samples: expected an integer >= 1 (draws of the mixture), got {n_samples!r}.")
        self.n_samples = n_samples
        self.members: list[SWAG] | None = None

    @property
    def needs(self) -> Needs:
        return self.ensemble.needs

    def member_swag(self, i: int) -> SWAG:
        """The (unfitted) SWAG of member ``i``."""
        extra = {} if self.ensemble.prior_precision is None else {"prior_precision": self.ensemble.prior_precision}
        return SWAG(**{"progress": self.progress, **self.swag, **extra, "seed": self.ensemble.seeds[i]})

    def fit(self, fn: AdapterFn, loader, *, val_loader=None, checkpoints=None) -> MultiSWAG:
        """Train the ensemble's members, then one SWAG collection from each; the live adapter is restored."""
        self.ensemble.fit(fn, loader)
        original = trained_values(fn)
        members = []
        try:
            for i, values in enumerate(self.ensemble.members):
                load_trained(fn, values)
                members.append(self.member_swag(i).fit(fn, loader))
        finally:
            load_trained(fn, original)
        self.members = members
        return self

    def split(self, n: int) -> list[int]:
        """Draws per member for ``n`` draws of the mixture."""
        k = self.ensemble.k
        return [n // k + (i < n % k) for i in range(k)]

    @torch.no_grad()
    def predict(self, fn: AdapterFn, batch, *, n_samples: int | None = None, generator=None) -> Predictive:
        s = sample_count(self.name, n_samples, self.n_samples, mean=False)
        with model_mode(fn.model, False):
            return predictive_of(fn, batch, (fn(v, batch) for v in self.sample_values(fn, batch, s, generator)))

    def sample_values(self, fn: AdapterFn, batch, n_samples: int, generator=None) -> list[dict[str, torch.Tensor]]:
        """``n_samples`` draws of the mixture as adapter values: member 0's share of SWAG draws, then member 1's, ...
        (:meth:`split`), each over that member's trained tensors, all from ``generator``."""
        members = require_fitted(self, "members")
        out = []
        for values, swag, count in zip(self.ensemble.members, members, self.split(n_samples)):
            out += [{**values, **draw} for draw in (swag.sample_values(fn, batch, count, generator) if count else [])]
        return out

    def config(self) -> dict[str, Any]:
        ens = self.ensemble.config()
        return {
            "k": ens["k"],
            "train": ens["train"],
            "seeds": ens["seeds"],
            "base_seed": ens["base_seed"],
            "prior_precision": ens["prior_precision"],
            "include_current": ens["include_current"],
            "swag": self.swag,
            "n_samples": self.n_samples,
            "progress": self.progress,
        }

    def state_dict(self) -> dict[str, Any]:
        members = require_fitted(self, "members")
        return {"ensemble": self.ensemble.state_dict(), "swag": [m.state_dict() for m in members]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ensemble.load_state_dict(state["ensemble"])
        swags = list(state["swag"])
        if len(swags) != self.ensemble.k:
            raise ValueError(f"swag: expected {self.ensemble.k} member SWAG states, got {len(swags)}.")
        members = []
        for i, s in enumerate(swags):
            member = self.member_swag(i)
            member.load_state_dict(s)
            members.append(member)
        self.members = members
