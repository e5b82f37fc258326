"""Baselines every calibration table needs.

* Temperature scaling (Guo et al., 2017): one scalar T > 0 fit by validation NLL, applied to the
  model-average log-probabilities of a base method (MAP by default), so accuracy is the base method's
  (the one implementation is :mod:`bayeslora.calibration`).
* MC dropout (Gal & Ghahramani, 2016): the LoRA dropout kept active at test time, S samples.
* Checkpoint ensemble: the last M adapter checkpoints of one MAP training run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..adapter_state import list_checkpoints, load_checkpoint
from ..calibration import fit_temperature, require_categorical, temperature_predictive
from ..function import AdapterFn, lora_dropout_only, model_mode
from ..predictive import Predictive
from ..rng import forked, seed_from
from ..validate import positive_int
from . import Needs, accepts, make_posterior, predictive_of, refuse_token_level, require_fitted, sample_count

# the methods this module registers (bayeslora.posteriors.discover)
REGISTER = {
    "mc_dropout": "MCDropout",
    "temperature": "TemperatureScaling",
    "checkpoint_ensemble": "CheckpointEnsemble",
}


class TemperatureScaling:
    """Temperature scaling (Guo et al., ICML 2017) on top of a base method's model average.

    ``fit`` fits the base method, predicts the validation split with it and fits one scalar T by NLL
    (:func:`~bayeslora.calibration.fit_temperature`); ``predict`` returns the point predictive
    ``log_softmax(log p̄ / T)`` ``[1, B, C]`` of the base method's model average ``p̄``. Accuracy is the base
    method's (T > 0 keeps the argmax of ``p̄``); for ``base="map"`` this is ``softmax(logits / T)``.

    Args:
        base: the registered method whose mean logits are scaled (default ``"map"``; any method but
            ``"temperature"``, e.g. ``"ensemble"`` or ``"kfac_laplace"``).
        base_options: keyword options of the base method.
        n_samples: samples the base method draws when fitting T and predicting (None: its default).
        prior_precision: λ, passed on to the base method when it takes one and ``base_options`` does not set it.
    """

    name = "temperature"

    def __init__(
        self,
        base: str = "map",
        base_options: Mapping[str, Any] | None = None,
        n_samples: int | None = None,
        prior_precision: float | None = None,
    ):
        if base == self.name:
            raise ValueError("base: temperature scaling cannot scale itself; pass another method, e.g. base='map'.")
        self.base_name = base
        self.base_options = dict(base_options or {})
        self.prior_precision = prior_precision
        options = dict(self.base_options)
        if prior_precision is not None and accepts(base, "prior_precision"):
            options.setdefault("prior_precision", prior_precision)
        self.base = make_posterior(base, **options)
        self.n_samples = n_samples
        self.temperature: float | None = None

    @property
    def needs(self) -> Needs:
        """The base method's needs, and a validation split (to fit T)."""
        base = self.base.needs
        return Needs(map_adapter=base.map_adapter, validation=True, checkpoints=base.checkpoints)

    def fit(self, fn: AdapterFn, loader, *, val_loader=None, checkpoints=None) -> TemperatureScaling:
        refuse_token_level(
            fn, "temperature scaling", "the MAP, a Laplace sampling predictive, VI, an ensemble or MC dropout"
        )
        require_categorical(fn, "method=temperature")  # a regression: names the noise fit instead
        if val_loader is None:
            raise ValueError(
                "val_loader: temperature scaling needs a validation split to fit T; pass val_loader= "
                "(the task builders carve one from train: data.val_size)."
            )
        self.base.fit(fn, loader, val_loader=val_loader, checkpoints=checkpoints)
        generator = torch.Generator(device=fn.device).manual_seed(0)
        log_probs, labels = [], []
        for batch in val_loader:
            pred = self.base.predict(fn, batch, n_samples=self.n_samples, generator=generator)
            log_probs.append(pred.log_probs.detach().cpu())
            labels.append(batch["labels"].cpu())
        if not log_probs:
            raise ValueError("val_loader: the validation split is empty; temperature scaling needs examples to fit T.")
        self.temperature = fit_temperature(torch.cat(log_probs), torch.cat(labels), where="method=temperature")
        return self

    def predict(self, fn: AdapterFn, batch, *, n_samples: int | None = None, generator=None) -> Predictive:
        t = require_fitted(self, "temperature")
        pred = self.base.predict(fn, batch, n_samples=self.n_samples if n_samples is None else n_samples,
                                 generator=generator)  # fmt: skip
        return temperature_predictive(pred, t)

    def config(self) -> dict[str, Any]:
        return {
            "base": self.base_name,
            "base_options": self.base_options,
            "n_samples": self.n_samples,
            "prior_precision": self.prior_precision,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"temperature": require_fitted(self, "temperature"), "base": self.base.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.temperature = float(state["temperature"])
        self.base.load_state_dict(state["base"])


class MCDropout:
    """MC dropout (Gal & Ghahramani, ICML 2016) on the LoRA dropout of the fine-tuned adapter.

    ``predict`` runs S forward passes with the LoRA dropout modules in train mode (the rest of the model
    in eval mode, or all of it with ``include_model_dropout``) around the adapter values snapshotted at
    ``fit`` and returns ``Predictive [S, B, C]``. Dropout masks come from a forked RNG seeded from
    ``generator``: reproducible, and the global RNG is untouched. With ``p=0`` every sample is the MAP.

    Args:
        n_samples: S, stochastic forward passes per batch.
        p: LoRA dropout probability at test time, set on the LoRA dropout modules for the duration of
            ``predict`` (None: the LoRA dropout the model was trained with). The model's own dropout keeps its p.
        include_model_dropout: also keep the base model's own dropout layers active.
    """

    name = "mc_dropout"
    needs = Needs()

    def __init__(self, n_samples: int = 16, p: float | None = None, include_model_dropout: bool = False):
        positive_int("n_samples", n_samples)
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0):
            raise ValueError(f"p: expected a dropout probability in [0, 1) or None, got {p!r}.")
        self.n_samples = n_samples
        self.p = p
        self.include_model_dropout = bool(include_model_dropout)
        self.values: dict[str, torch.Tensor] | None = None

    def fit(self, fn: AdapterFn, loader=None, *, val_loader=None, checkpoints=None) -> MCDropout:
        dropouts = _lora_dropouts(fn.model)
        if not dropouts and not self.include_model_dropout:
            raise ValueError(
                "model: the LoRA layers have no dropout (peft uses Identity when lora dropout is 0); add LoRA with "
                "dropout > 0 (LoraSpec(dropout=0.1), lora.dropout=0.1) or set include_model_dropout=True."
            )
        if not dropouts and self.p is not None:
            raise ValueError(
                f"p: p={self.p} needs LoRA dropout modules to set, but the model's LoRA layers have none (lora dropout "
                "0); add LoRA with dropout > 0 or leave p=None."
            )
        self.values = fn.params.values()
        return self

    @torch.no_grad()
    def predict(self, fn: AdapterFn, batch, *, n_samples: int | None = None, generator=None) -> Predictive:
        values = require_fitted(self, "values")
        s = sample_count(self.name, n_samples, self.n_samples)
        if s == 0:  # the posterior mean: dropout off, the fine-tuned adapter
            with model_mode(fn.model, False):
                return predictive_of(fn, batch, [fn(values, batch)])
        with self.sampling_mode(fn, generator):
            return predictive_of(fn, batch, (fn(values, batch) for _ in range(s)))

    @contextlib.contextmanager
    def sampling_mode(self, fn: AdapterFn, generator=None):
        """The model with its (LoRA) dropout on at the test-time p, in a forked RNG seeded from ``generator``: every
        forward pass inside draws fresh masks (predict: one per sample; generate: one per decoding step)."""
        require_fitted(self, "values")
        mode = model_mode(fn.model, True) if self.include_model_dropout else lora_dropout_only(fn.model)
        with forked(fn.device, seed_from(generator)), mode, _dropout_p(fn.model, self.p):
            yield

    def config(self) -> dict[str, Any]:
        return {"n_samples": self.n_samples, "p": self.p, "include_model_dropout": self.include_model_dropout}

    def state_dict(self) -> dict[str, Any]:
        return {"values": {k: v.cpu() for k, v in require_fitted(self, "values").items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.values = dict(state["values"])


def _lora_dropouts(model: torch.nn.Module) -> list[torch.nn.Dropout]:
    return [m for n, m in model.named_modules() if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]


@contextlib.contextmanager
def _dropout_p(model: torch.nn.Module, p: float | None):
    """Temporarily set the p of every LoRA dropout module (None: leave them)."""
    mods = _lora_dropouts(model) if p is not None else []
    old = [m.p for m in mods]
    for m in mods:
        m.p = p
    try:
        yield
    finally:
        for m, q in zip(mods, old):
            m.p = q


class CheckpointEnsemble:
    """Average the predictives of the last M adapter checkpoints of one MAP training run
    (checkpoint / snapshot ensembles: Huang et al., ICLR 2017; Chen et al., 2017).

    ``fit`` loads the last M of the checkpoints it is given (``checkpoints=``, the MAP training's: the façade and
    ``bayeslora-run`` pass them) or finds in ``checkpoint_dir``; ``predict`` evaluates each once
    and returns ``Predictive [M, B, C]``. A checkpoint holds the selected adapter tensors; any other trainable
    tensor (e.g. a head left out with ``include_head=False``) keeps its live (final MAP) value.

    Args:
        m: number of checkpoints (the last M saved by :func:`~bayeslora.train.train_map`).
        checkpoint_dir: a directory ``train_map`` wrote (``TrainConfig(checkpoint_every=..., checkpoint_dir=...)``);
            None: the checkpoints passed to ``fit`` (bayeslora-run saves one per epoch of the MAP training unless
            ``train.checkpoint_every`` is set).
    """

    name = "checkpoint_ensemble"

    def __init__(self, m: int = 3, checkpoint_dir: str | None = None):
        positive_int("m", m)
        self.m = m
        self.checkpoint_dir = checkpoint_dir
        self.members: list[dict[str, torch.Tensor]] | None = None
        self.steps: list[int] = []

    @property
    def needs(self) -> Needs:
        return Needs(checkpoints=self.checkpoint_dir is None)

    def fit(self, fn: AdapterFn, loader=None, *, val_loader=None, checkpoints=None) -> CheckpointEnsemble:
        if self.checkpoint_dir is not None:
            files, where = list_checkpoints(self.checkpoint_dir), repr(self.checkpoint_dir)
        elif checkpoints is not None:
            files, where = sorted(Path(p) for p in checkpoints), "the checkpoints passed to fit"
        else:
            raise ValueError(
                "checkpoints: no MAP training checkpoints; train the MAP with TrainConfig(checkpoint_every=..., "
                "checkpoint_dir=...) (BayesianLoRA.fit_map keeps them for fit) or pass checkpoint_dir="
                " (bayeslora-run does this for you)."
            )
        if len(files) < self.m:
            raise ValueError(
                f"m: {self.m} checkpoints requested but {where} holds {len(files)}; save more often "
                "(TrainConfig.checkpoint_every; with bayeslora-run train.checkpoint_every=<steps> or more "
                "train.epochs, one checkpoint per epoch by default) or lower m."
            )
        members = []
        for path in files[-self.m :]:
            values = load_checkpoint(path)
            fn.params.check(values, argument=f"checkpoint {path.name}")
            members.append(values)
        self.members = members
        self.steps = [int(p.stem.split("_")[-1]) for p in files[-self.m :]]
        return self

    @torch.no_grad()
    def predict(self, fn: AdapterFn, batch, *, n_samples: int | None = None, generator=None) -> Predictive:
        members = require_fitted(self, "members")
        sample_count(self.name, n_samples, len(members), mean=False, fixed=len(members))
        with model_mode(fn.model, False):
            return predictive_of(fn, batch, (fn(values, batch) for values in members))

    def sample_values(self, fn: AdapterFn, batch, n_samples: int, generator=None) -> list[dict[str, torch.Tensor]]:
        """The checkpoints in order, ``n_samples`` of them (at most M): draw i is checkpoint i."""
        members = require_fitted(self, "members")
        if not 1 <= n_samples <= len(members):
            raise ValueError(f"n_samples: {len(members)} checkpoints draw 1..{len(members)}, got {n_samples}.")
        return members[:n_samples]

    def config(self) -> dict[str, Any]:
        return {"m": self.m, "checkpoint_dir": self.checkpoint_dir}

    def state_dict(self) -> dict[str, Any]:
        return {
            "members": [{k: v.cpu() for k, v in m.items()} for m in require_fitted(self, "members")],
            "steps": self.steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.members = [dict(m) for m in state["members"]]
        self.steps = list(state.get("steps", []))
