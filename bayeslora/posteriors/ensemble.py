"""Deep ensembles of LoRA adapters on one frozen base (Lakshminarayanan et al., NeurIPS 2017;
LoRA ensembles: Wang et al., 2023, "LoRA ensembles for large language model fine-tuning").

K value-sets of the *same* adapter slot are trained one after another with :func:`train_map`, each
re-initialised from its own seed; the base model is never copied, so memory grows by K × the adapter
size only. Prediction evaluates each member once through ``functional_call`` and stacks the logits
into ``Predictive [K, B, C]``.

A member holds every tensor ``train_map`` trains: the selected :class:`~bayeslora.params.AdapterParams`
and any other adapter tensor peft marks trainable (LoRA layers left out by ``include``/``exclude``, a
head kept out with ``include_head=False``), so each member is a complete fine-tuned adapter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..adapter_state import load_trained, trained_values
from ..function import AdapterFn, model_mode
from ..predictive import Predictive
from ..progress import bar as progress_bar
from ..rng import forked
from ..train import TrainConfig, train_map
from ..validate import positive_int
from . import Needs, predictive_of, require_fitted, sample_count

# the methods this module registers (bayeslora.posteriors.discover)
REGISTER = {"ensemble": "Ensemble"}

_NOT_PER_MEMBER = ("seed", "checkpoint_every", "checkpoint_dir")


def reinitialise(fn: AdapterFn, seed: int) -> None:
    """Re-initialise the adapter slot as peft does, deterministically from ``seed``.

    Every peft ``LoraLayer`` of the adapter goes through peft's own ``reset_lora_parameters`` (A:
    Kaiming-uniform, B: zeros; ``init_lora_weights="gaussian"`` is honoured, data-dependent inits such
    as PiSSA or LoftQ cannot be redrawn from a seed and fall back to the default). Every trainable head
    copy (``modules_to_save[adapter]``) is re-drawn with the transformers model's own weight init
    (``_init_weights``, e.g. N(0, 0.02) weights and zero bias for BERT/Llama heads), as when the head was
    first created; modules without it use ``reset_parameters``. The caller's global RNG is left untouched.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    adapter = fn.params.adapter_name
    peft_config = getattr(fn.model, "peft_config", {}).get(adapter)
    init = getattr(peft_config, "init_lora_weights", True)
    if init is False or (isinstance(init, str) and init.lower() != "gaussian"):
        init = True
    base = fn.model.get_base_model() if hasattr(fn.model, "get_base_model") else None
    init_module = getattr(base, "_init_weights", None)
    with forked(fn.device, seed), torch.no_grad():
        for module in fn.model.modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                module.reset_lora_parameters(adapter, init)
            elif isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
                for sub in module.modules_to_save[adapter].modules():
                    if init_module is not None:
                        init_module(sub)
                    elif hasattr(sub, "reset_parameters"):
                        sub.reset_parameters()


class Ensemble:
    """K LoRA adapters trained from different seeds on one frozen base; predicts with all K.

    ``fit`` re-initialises the adapter slot from each member's seed (:func:`reinitialise`), trains it
    with :func:`~bayeslora.train.train_map` (``TrainConfig(**train, seed=member_seed)``), stores the
    member's values and finally restores the adapter the model held before ``fit``: the live model is
    unchanged by ``fit`` and ``predict``; the members live only in this object (and its state_dict).

    With ``include_current=True`` the adapter the model holds when ``fit`` is called (a MAP you trained
    with the first member's seed and the same ``train`` options, e.g. by ``BayesianLoRA.fit_map``) *is* the
    first member, and only the other K-1 are trained: the ensemble then contains the MAP it is compared
    against, and a sweep that already has the MAP pays for K-1 trainings (``bayeslora-run`` loads the MAP,
    from its cache, before ``fit``).

    Args:
        k: number of members K.
        train: keyword arguments of :class:`~bayeslora.train.TrainConfig` shared by the members (``seed``
            is each member's own; members are not checkpointed).
        seeds: member seeds (default ``base_seed + i``, i = 0..K-1).
        base_seed: first seed when ``seeds`` is None.
        prior_precision: λ, the coupled L2 of every member (the run's one number; None: ``train``'s).
        keep_on_device: keep the member values on the model's device (else on CPU, moved per call).
        include_current: the adapter held at ``fit`` time is member 0 (seed ``seeds[0]``, not re-trained).
        progress: progress bars (over members, and each member's ``train_map`` unless ``train`` says).
    """

    name = "ensemble"

    def __init__(
        self,
        k: int = 5,
        train: Mapping[str, Any] | None = None,
        seeds: Sequence[int] | None = None,
        base_seed: int = 0,
        prior_precision: float | None = None,
        keep_on_device: bool = True,
        include_current: bool = True,
        progress: bool = True,
    ):
        positive_int("k", k)
        if seeds is not None and len(seeds) != k:
            raise ValueError(f"seeds: expected k={k} seeds, got {len(seeds)}; pass one seed per member or None.")
        if seeds is not None and len(set(seeds)) != k:
            raise ValueError(f"seeds: expected {k} distinct seeds, got {list(seeds)}; equal seeds give equal members.")
        if not isinstance(train, (Mapping, type(None))):
            raise TypeError(f"train: expected a dict of TrainConfig options or None, got {type(train).__name__}.")
        self.train = dict(train or {})
        bad = [key for key in _NOT_PER_MEMBER if self.train.get(key) is not None]
        if bad:
            raise ValueError(
                f"train: {bad} cannot be set for ensemble members (each member uses its own seed from `seeds`/"
                "`base_seed` and is not checkpointed); remove them."
            )
        TrainConfig(**{**self.train, "progress": False})  # validate the options now, not after K trainings
        self.k = k
        self.seeds = [int(s) for s in seeds] if seeds is not None else [int(base_seed) + i for i in range(k)]
        self.base_seed = int(base_seed)
        self.prior_precision = prior_precision
        self.keep_on_device = bool(keep_on_device)
        self.include_current = bool(include_current)
        self.progress = bool(progress)
        self.members: list[dict[str, torch.Tensor]] | None = None
        self.histories: list[list[float]] = []

    @property
    def needs(self) -> Needs:
        """With ``include_current`` the trained adapter is member 0 (the MAP first); else every member is trained."""
        return Needs(map_adapter=self.include_current)

    def member_config(self, seed: int) -> TrainConfig:
        """The :class:`TrainConfig` of the member with ``seed``."""
        cfg = TrainConfig(**{"progress": self.progress, **self.train})
        cfg = dataclasses.replace(cfg, seed=int(seed))
        if self.prior_precision is not None:
            cfg = dataclasses.replace(cfg, prior_precision=float(self.prior_precision))
        return cfg

    def fit(self, fn: AdapterFn, loader, *, val_loader=None, checkpoints=None) -> Ensemble:
        """Train the K members one after another (``val_loader`` is not used); the live adapter is restored."""
        original = trained_values(fn)
        members, histories = [], []
        if self.include_current:
            members.append(self._kept(original))
            histories.append([])
        try:
            for seed in progress_bar(self.seeds[len(members) :], desc="ensemble members", enabled=self.progress):
                reinitialise(fn, seed)
                result = train_map(fn, loader, self.member_config(seed))
                members.append(self._kept(trained_values(fn)))
                histories.append(result.losses)
        finally:
            load_trained(fn, original)
        self.members, self.histories = members, histories
        return self

    def _kept(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A member's values where they are kept: the model's device or (``keep_on_device=False``) the CPU."""
        return values if self.keep_on_device else {n: v.cpu() for n, v in values.items()}

    @torch.no_grad()
    def predict(self, fn: AdapterFn, batch, *, n_samples: int | None = None, generator=None) -> Predictive:
        """Each member once: ``Predictive [K, B, C]`` (``n_samples``: None or K; ``generator`` is unused)."""
        members = require_fitted(self, "members")
        sample_count(self.name, n_samples, len(members), mean=False, fixed=len(members))
        missing = [n for n in fn.params.names if n not in members[0]]
        if missing:
            raise ValueError(
                f"fn: the ensemble members hold no values for {missing[:3]}; predict with the model and "
                "AdapterParams selection the ensemble was fitted with."
            )
        with model_mode(fn.model, False):
            return predictive_of(fn, batch, (fn(values, batch) for values in members))

    def sample_values(self, fn: AdapterFn, batch, n_samples: int, generator=None) -> list[dict[str, torch.Tensor]]:
        """The members in order, ``n_samples`` of them (at most K; ``generator`` is unused): draw i is member i."""
        members = require_fitted(self, "members")
        if not 1 <= n_samples <= len(members):
            raise ValueError(
                f"n_samples: an ensemble of {len(members)} members draws 1..{len(members)}, got {n_samples}."
            )
        return members[:n_samples]

    def config(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "train": self.train,
            "seeds": self.seeds,
            "base_seed": self.base_seed,
            "prior_precision": self.prior_precision,
            "keep_on_device": self.keep_on_device,
            "include_current": self.include_current,
            "progress": self.progress,
        }

    def state_dict(self) -> dict[str, Any]:
        members = require_fitted(self, "members")
        return {"members": [{n: v.cpu() for n, v in m.items()} for m in members], "histories": self.histories}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        members = list(state["members"])
        if len(members) != self.k:
            raise ValueError(f"state: expected {self.k} ensemble members, got {len(members)}.")
        self.members = [dict(m) for m in members]
        self.histories = [list(h) for h in state.get("histories", [])]
