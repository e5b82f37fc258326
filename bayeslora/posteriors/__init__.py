"""Posteriors over the LoRA adapter tensors: one Protocol, one registry.

Every method is configured without a model (so Hydra can instantiate it from a config) and bound
to an :class:`~bayeslora.function.AdapterFn` at :meth:`Posterior.fit`. Prediction returns a
:class:`~bayeslora.predictive.Predictive` of logit samples ``[S, B, C]``.

A method declares what it needs from whoever fits it in :attr:`Posterior.needs` (:class:`Needs`): a trained
MAP adapter in the model, a validation split, the MAP training's adapter checkpoints. The façade
(:class:`~bayeslora.wrapper.BayesianLoRA`) and ``bayeslora-run`` read only that.

``n_samples`` means one thing for every method (:func:`sample_count`): ``None`` is the method's default,
``k >= 1`` draws k posterior samples, ``0`` predicts at the posterior mean (a point predictive); a method whose
samples are fixed (ensemble members, checkpoints) accepts only ``None`` or its number of members.

A token-level readout (:class:`~bayeslora.readout.TokenLogits`) makes the same ``predict`` return a
:class:`~bayeslora.predictive.TokenPredictive`: every method builds its predictive from its logit samples with
:func:`predictive_of`, which stacks class logits and streams token logits.

Methods with weight samples (Laplace, VI, ensembles, MAP, IVON, SWAG / MultiSWAG, TFB) also offer
``sample_values(fn, batch, n_samples, generator)``:
``n_samples`` dicts of adapter values (the draws its sampling predictive uses; ensemble members in order), which
:meth:`~bayeslora.wrapper.BayesianLoRA.generate` loads into the model one at a time. MC dropout has none: its
draws are dropout masks, so it offers ``sampling_mode(fn, generator)`` instead (the LoRA dropout on, in a forked
RNG seeded from ``generator``). Both are optional; :func:`has_weight_samples` tells which a posterior has.

``METHODS`` maps a method name to ``"module:attribute"`` of its factory and the options the method fixes; it is
read from the ``REGISTER`` literal of each module of this package (:func:`discover`) without importing them, so that
e.g. Pyro is only imported when a VI method is used, and a new method is registered by its own module alone.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from ..function import AdapterFn
from ..likelihoods import is_token_level
from ..predictive import Predictive, TokenPredictive
from ..validate import is_int


@dataclass(frozen=True)
class Needs:
    """What a method needs from whoever fits it.

    Attributes:
        map_adapter: ``fit`` works around the trained adapter the model holds, so the caller trains (or loads)
            the MAP first; False: the method trains its adapters itself (a deep ensemble from scratch).
        validation: ``fit`` needs ``val_loader`` (temperature scaling, a validation-NLL prior).
        checkpoints: ``fit`` needs the MAP training's adapter checkpoints (``checkpoints=``, oldest first).
    """

    map_adapter: bool = True
    validation: bool = False
    checkpoints: bool = False


@runtime_checkable
class TunablePrior(Protocol):
    """A posterior whose prior precision can be fit after ``fit`` (the Laplace methods; its ``prior`` property
    gives the fitted λ). Methods only: ``isinstance`` never evaluates a property."""

    def optimize_prior_precision(
        self, fn: AdapterFn, method: str = "marglik", *, val_loader=None, grid: Sequence[float] | None = None
    ) -> torch.Tensor: ...


@runtime_checkable
class Posterior(Protocol):
    """An approximate posterior over the selected adapter tensors.

    Attributes:
        name: the registry name of the method.
        needs: what :meth:`fit` needs (:class:`Needs`).
    """

    name: str
    needs: Needs

    def fit(self, fn: AdapterFn, loader, *, val_loader=None, checkpoints: Sequence[str] | None = None) -> Posterior:
        """Fit around the adapter currently in ``fn.model`` (or train it, when ``needs.map_adapter`` is False)."""
        ...

    def predict(
        self, fn: AdapterFn, batch: Mapping[str, torch.Tensor], *, n_samples: int | None = None, generator=None
    ) -> Predictive:
        """Predictive logit samples ``[S, B, C]`` for one batch; changes no state of the model."""
        ...

    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (JSON-able), so ``make_posterior(name, **config())`` rebuilds it."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


REGISTER_NAME = "REGISTER"


def discover(directory: str | Path, package: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """The methods the modules of ``directory`` (the package ``package``) register, read without importing them.

    A module registers methods with a module-level literal ``REGISTER = {name: attribute}`` (or
    ``{name: (attribute, {fixed options})}``); the result maps each name to ``("package.module:attribute", fixed)``.
    Adding a method is therefore its module, its ``configs/method/<name>.yaml`` and its test: nothing else names it.
    """
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for path in sorted(Path(directory).glob("*.py")):
        source = path.read_text(encoding="utf-8")
        if REGISTER_NAME not in source:
            continue
        for node in ast.parse(source, filename=str(path)).body:
            target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
            target = node.target if isinstance(node, ast.AnnAssign) else target
            if not (isinstance(target, ast.Name) and target.id == REGISTER_NAME and node.value is not None):
                continue
            try:
                entries = ast.literal_eval(node.value)
            except ValueError as err:
                raise TypeError(
                    f"{path}: {REGISTER_NAME} must be a literal dict of name -> attribute ({err})."
                ) from None
            for name, entry in entries.items():
                attr, fixed = (entry, {}) if isinstance(entry, str) else entry
                if not (isinstance(name, str) and isinstance(attr, str) and isinstance(fixed, dict)):
                    raise TypeError(f"{path}: {REGISTER_NAME}[{name!r}] must be 'Attribute' or ('Attribute', {{...}}).")
                if name in found:
                    raise ValueError(f"method {name!r} is registered twice: {found[name][0]} and {path.stem}:{attr}.")
                found[name] = (f"{package}.{path.stem}:{attr}", dict(fixed))
    return found


# name -> ("module:attribute" of its factory, the options the method fixes): every REGISTER of this package.
METHODS: dict[str, tuple[str, dict[str, Any]]] = discover(Path(__file__).parent, __name__)


def _entry(method: str) -> tuple[str, dict[str, Any]]:
    if method not in METHODS:
        raise ValueError(f"method: unknown method {method!r}; expected one of {sorted(METHODS)}.")
    target, fixed = METHODS[method]
    return target, dict(fixed)


def _load(target: str) -> Any:
    module_name, attr = target.split(":")
    return getattr(importlib.import_module(module_name), attr)


def registered_name(target: str, **fixed: Any) -> str:
    """The registry name of ``target`` with the fixed options ``fixed`` (the registry alone names methods)."""
    for name in METHODS:
        if _entry(name) == (target, fixed):
            return name
    raise ValueError(f"{target} with {fixed} is not a registered method; see bayeslora.posteriors.METHODS.")


def make_posterior(method: str, **kwargs: Any) -> Posterior:
    """Instantiate a registered method by name with its keyword options.

    A registry entry may fix some options (e.g. ``diag_laplace`` is ``Laplace(structure="diag")``);
    passing a different value for a fixed option is an error.
    """
    target, fixed = _entry(method)
    for k, v in fixed.items():
        if k in kwargs and kwargs[k] != v:
            raise ValueError(f"method {method!r}: option {k}={kwargs[k]!r} conflicts with the method ({k}={v!r}).")
    factory = _load(target)
    kwargs = {**kwargs, **fixed}
    sig = inspect.signature(factory)
    unknown = [k for k in kwargs if k not in sig.parameters]
    if unknown and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        valid = [k for k in sig.parameters if k != "self" and k not in fixed]
        raise TypeError(f"method {method!r}: unexpected option(s) {unknown}; valid options are {valid}.")
    return factory(**kwargs)


def build(name: str, **options: Any) -> Posterior:
    """The Hydra ``_target_`` of the method group: ``instantiate(cfg.method)`` calls ``make_posterior``."""
    return make_posterior(name, **options)


def accepts(method: str, option: str) -> bool:
    """Whether a registered method takes the keyword ``option`` (e.g. ``prior_precision``)."""
    target, fixed = _entry(method)
    return option in inspect.signature(_load(target)).parameters and option not in fixed


# Options the run config supplies from its top level (the one prior number), not the method's defaults.
RUN_LEVEL_OPTIONS = ("prior_precision",)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def method_defaults(method: str) -> dict[str, Any]:
    """The keyword options of a registered method with their Python defaults (the one source of defaults).

    Options fixed by the registry entry (e.g. ``structure`` of ``diag_laplace``) and :data:`RUN_LEVEL_OPTIONS`
    are left out. Hydra's ``method/<name>`` configs are built from this (:mod:`bayeslora.hydra_store`), so the
    library and ``bayeslora-run`` run the same method with the same defaults.
    """
    target, fixed = _entry(method)
    out: dict[str, Any] = {}
    for name, p in inspect.signature(_load(target)).parameters.items():
        if name in fixed or name in RUN_LEVEL_OPTIONS or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if p.default is inspect.Parameter.empty:
            raise TypeError(f"method {method!r}: option {name!r} has no default; every option needs one.")
        out[name] = _jsonable(p.default)
    return out


def sample_count(method: str, n_samples: Any, default: int, *, mean: bool = True, fixed: int | None = None) -> int:
    """The number of samples a method draws for ``n_samples`` (module docstring); 0 is the posterior mean.

    Args:
        method: the method's name (for errors).
        n_samples: the caller's value (None, 0 or a positive int).
        default: the method's default.
        mean: whether the method has a posterior-mean predictive (``n_samples=0``).
        fixed: the number of samples of a method whose samples are fixed (ensemble members), else None.
    """
    if n_samples is None:
        return default
    if not is_int(n_samples) or n_samples < 0:
        raise ValueError(
            f"n_samples: expected None (the default), 0 (posterior mean) or an int >= 1, got {n_samples!r}."
        )
    if n_samples == 0 and not mean:
        raise ValueError(f"n_samples: {method} has no posterior-mean predictive; pass None (its {default} samples).")
    if fixed is not None and n_samples not in (0, fixed):
        raise ValueError(
            f"n_samples: {method} predicts with its {fixed} fixed members; pass None (or {fixed}), got {n_samples}."
        )
    return n_samples


def require_fitted(posterior: Any, attribute: str) -> Any:
    """Return ``posterior.<attribute>`` or raise a clear error if ``fit`` has not been called."""
    value = getattr(posterior, attribute, None)
    if value is None:
        raise RuntimeError(
            f"{type(posterior).__name__}: not fitted; call fit(fn, loader) (or load_state_dict) before predict."
        )
    return value


def predictive_of(
    fn: AdapterFn,
    batch: Mapping[str, torch.Tensor],
    samples,
    *,
    likelihood=None,
    variance: torch.Tensor | None = None,
    epistemic: torch.Tensor | None = None,
) -> Predictive | TokenPredictive:
    """The predictive of output samples (an iterable of ``fn(values, batch)`` outputs) under ``likelihood`` (None:
    the readout's, ``fn.likelihood``): class logits or regression outputs are stacked into ``Predictive [S, B, O]``
    (with a Gaussian likelihood's closed-form ``variance [B, O]`` or a closed-form ``epistemic`` score, if given);
    token logits ``[B, T, V]`` are streamed into a :class:`TokenPredictive` (one sample held at a time)."""
    likelihood = fn.likelihood if likelihood is None else likelihood
    if is_token_level(likelihood):
        if variance is not None or epistemic is not None:
            raise ValueError("variance / epistemic: a token-level predictive is built from its samples alone.")
        return TokenPredictive.from_samples(samples, fn.labels(batch), likelihood)
    return Predictive(torch.stack(list(samples)), epistemic, likelihood, variance)


def refuse_token_level(fn: AdapterFn, method: str, alternatives: str) -> None:
    """A clear error for a method that has no token-level version."""
    if is_token_level(fn.likelihood):
        raise ValueError(
            f"method: {method} is not defined for a token-level likelihood ({fn.likelihood.name!r}); use "
            f"{alternatives}."
        )


def has_weight_samples(posterior: Any) -> bool:
    """Whether a posterior can draw adapter values (``sample_values``; module docstring)."""
    return callable(getattr(posterior, "sample_values", None))


__all__ = [
    "METHODS",
    "Needs",
    "Posterior",
    "TunablePrior",
    "accepts",
    "build",
    "has_weight_samples",
    "make_posterior",
    "method_defaults",
    "predictive_of",
    "refuse_token_level",
    "require_fitted",
    "sample_count",
]
