"""laplace-torch as a second Laplace backend and the test oracle (public API only).

laplace-torch (Daxberger et al., "Laplace Redux", NeurIPS 2021) chooses its parameters by
``requires_grad`` and calls the model on whole batches; a small module wraps the
:class:`~bayeslora.function.AdapterFn` (batch dict → class logits ``[B, C]``) and the selected
tensors are made the only trainable ones while laplace-torch runs (flags restored afterwards).
Batches are dicts, read with ``dict_key_x="input_ids"`` / ``dict_key_y="labels"`` (laplace-torch
>= 0.2). K-FAC uses curvlinops; ``kfac_approx`` is passed through (its default is ``"expand"``).

Differences from the own engine, by construction of laplace-torch: a Linear bias is its own block
(not folded into ``[W | b]``), per-layer priors are per tensor, marglik is optimised with Adam on
``log λ`` (100 steps), and the GLM Jacobians are ``torch.func.jacrev`` over the whole batch.

**Padding.** laplace-torch (through curvlinops' KFAC) sees only the inputs and outputs of each layer, not the
attention mask, so on padded batches the activations of pad positions enter its ``A`` factors (and, with
``kfac_approx="expand"``, its ``G`` factors); the own engine sums over unmasked positions only, so its factors
do not depend on how a batch is padded. On real MiniLM batches that are 60–75% padding the ``A`` factors differ
by up to ~200%. :meth:`LaplaceTorch.fit` warns (:class:`PaddedBatchWarning`) when an attention mask has zeros;
``tests/test_laplace_torch.py::test_padded_batches_enter_laplace_torchs_factors_not_ours`` measures the
difference. Use this backend as an oracle on unpadded (fixed-length) batches.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..function import AdapterFn, model_mode
from ..predictive import Predictive
from . import predictive_of
from .glm import epistemic, glm_predictive

if TYPE_CHECKING:  # pragma: no cover
    from ..params import ParamGroup
    from .laplace_own import LaplaceSettings


class _Logits(nn.Module):
    """``batch dict -> [B, C]`` logits through the live adapter (laplace-torch's model)."""

    def __init__(self, fn: AdapterFn):
        super().__init__()
        self.net = fn.model
        object.__setattr__(self, "fn", fn)  # not a submodule

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.fn(None, batch)


@contextlib.contextmanager
def only_trainable(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Temporarily make exactly the parameters ``names`` require grad (laplace-torch's selection)."""
    keep = set(names)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in keep)
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # laplace-torch warns on every prior tuning call that the probit link is its default.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="By default `link_approx` is `probit`")
        yield


def _to_device(state: Any, device: torch.device) -> Any:
    """Every tensor of a (nested) state on ``device``."""
    if torch.is_tensor(state):
        return state.to(device)
    if isinstance(state, Mapping):
        return {k: _to_device(v, device) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_to_device(v, device) for v in state)
    return state


class PaddedBatchWarning(UserWarning):
    """laplace-torch's K-FAC factors include the pad positions of a padded batch (module docstring)."""


def padded_fraction(loader) -> float:
    """The fraction of masked-out (pad) positions over a loader's attention masks (0 without masks)."""
    pad = total = 0
    for batch in loader:
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        if mask is not None:
            pad += int((mask == 0).sum())
            total += mask.numel()
    return pad / total if total else 0.0


class LaplaceTorch:
    """laplace-torch posterior behind :class:`Laplace` when ``backend="laplace-torch"``.

    Built at :meth:`fit` (or lazily at the first prediction after :meth:`load_state_dict`).
    """

    def __init__(self, settings: LaplaceSettings):
        self.cfg = settings
        self.fn: AdapterFn | None = None
        self.la = None
        self.names: list[str] = []
        self.values: dict[str, torch.Tensor] = {}
        self._state: Mapping[str, Any] | None = None

    def _build(self, fn: AdapterFn, groups: Sequence[ParamGroup]) -> None:
        from laplace import Laplace as make_laplace
        from laplace.curvature import CurvlinopsEF, CurvlinopsGGN

        cfg = self.cfg
        if cfg.structure == "diag" and cfg.fisher == "empirical":
            raise ValueError("fisher: laplace-torch has no diagonal empirical Fisher for dict inputs; use 'ggn'.")
        names = [n for g in groups for n in g.names]
        if self._state is not None and names != list(self._state["names"]):
            raise ValueError(
                "fn: the model's adapter tensors do not match the fitted posterior; load it into the same model, "
                "adapter name and params include/exclude."
            )
        self.fn, self.names = fn, names
        kwargs: dict[str, Any] = {
            "backend": CurvlinopsEF if cfg.fisher == "empirical" else CurvlinopsGGN,
            "backend_kwargs": {"stochastic": True} if cfg.fisher in ("mc", "mc_sequence") else None,
        }
        if cfg.structure != "diag":
            kron: dict[str, Any] = {"kfac_approx": cfg.kfac_approx}
            if cfg.fisher in ("mc", "mc_sequence"):
                kron["mc_samples"] = cfg.mc_samples
            kwargs["asdl_fisher_kwargs"] = kron
        if fn.likelihood.name == "categorical":
            kind = "classification"
        elif fn.likelihood.name == "gaussian" and getattr(fn.readout, "num_classes", None) == 1:
            kind, kwargs["sigma_noise"] = "regression", fn.likelihood.noise_std
        else:
            raise ValueError(
                f"likelihood: backend='laplace-torch' takes class logits or one Gaussian regression output; the "
                f"readout has a {fn.likelihood.name!r} likelihood with {fn.readout.num_classes} outputs. Use "
                "backend='own'."
            )
        with self._trainable():
            self.la = make_laplace(
                _Logits(fn), kind, subset_of_weights="all",
                hessian_structure="diag" if cfg.structure == "diag" else "kron",
                prior_precision=cfg.prior_precision, dict_key_x="input_ids", dict_key_y="labels", **kwargs,
            )  # fmt: skip
            if self._state is not None:  # saved on the CPU: onto the model's device first
                self.la.load_state_dict(_to_device(self._state["la"], fn.device))
                self.values = dict(self._state["values"])

    def _trainable(self):
        return only_trainable(self.fn.model, self.names)

    def _ready(self, fn: AdapterFn, groups: Sequence[ParamGroup]) -> None:
        if self.la is None or self.fn is not fn:
            self._build(fn, groups)
        live = fn.params.values()
        if any(not torch.equal(live[n], v.to(live[n].device)) for n, v in self.values.items()):
            raise ValueError(
                "fn: the model's live adapter differs from the MAP the laplace-torch posterior was fit at; load "
                "the saved adapter (backend='laplace-torch' predicts with the live parameters)."
            )

    @property
    def _link(self) -> str:
        return "mc" if self.cfg.predictive == "glm_mc" else "probit"

    def fit(self, fn: AdapterFn, loader, groups: Sequence[ParamGroup], val_loader=None, num_data=None) -> None:
        cfg = self.cfg
        padded = padded_fraction(loader)
        if padded > 0:
            warnings.warn(
                f"backend='laplace-torch': {100 * padded:.1f}% of the training positions are padding, and "
                "laplace-torch includes pad-token activations in its K-FAC factors (the own engine does not); its "
                "posterior then differs from backend='own'. Use fixed-length batches for an oracle comparison.",
                PaddedBatchWarning,
                stacklevel=3,
            )
        self._state = None
        self._build(fn, groups)
        with self._trainable(), model_mode(fn.model, False):
            self.la.fit(loader)
        self.values = {n: p.detach().clone() for n, p in fn.params.tensors().items()}
        self.optimize_prior(fn, groups, cfg.prior_fit, val_loader, cfg.prior_grid)

    def optimize_prior(self, fn: AdapterFn, groups, method: str, val_loader=None, grid=None) -> torch.Tensor:
        """laplace-torch's ``optimize_prior_precision``: ``"marglik"`` (Adam on log λ) or ``"val_nll"`` (grid
        search on the validation NLL); ``"none"`` resets λ to ``prior_precision``."""
        cfg = self.cfg
        self._ready(fn, groups)
        structure = "layerwise" if cfg.prior_per_layer else "scalar"
        with self._trainable(), model_mode(fn.model, False), _quiet():
            if method == "none":
                self.la.prior_precision = cfg.prior_precision
            elif method == "marglik":
                self.la.optimize_prior_precision(
                    pred_type="glm", method="marglik", prior_structure=structure, init_prior_prec=cfg.prior_precision,
                )  # fmt: skip
            else:
                low, high, points = grid or cfg.prior_grid
                self.la.optimize_prior_precision(
                    pred_type="glm", method="gridsearch", val_loader=val_loader, link_approx=self._link,
                    log_prior_prec_min=math.log10(low), log_prior_prec_max=math.log10(high), grid_size=int(points),
                    n_samples=cfg.samples() if self._link == "mc" else 100,
                )  # fmt: skip
        return self.prior

    def glm_moments(
        self, fn: AdapterFn, groups: Sequence[ParamGroup], batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._ready(fn, groups)
        with self._trainable(), model_mode(fn.model, False):
            js, f_mu = self.la.backend.jacobians(fn.to_device(batch))
            return f_mu.detach().float(), self.la.functional_variance(js).detach().double()

    def predict(self, fn: AdapterFn, groups: Sequence[ParamGroup], batch, n_samples: int, generator) -> Predictive:
        self._ready(fn, groups)
        batch = fn.to_device(batch)
        if fn.likelihood.name != "categorical" and self.cfg.predictive != "sampling":  # exact N(f_μ, f_Σ + σ²)
            mean, cov = self.glm_moments(fn, groups, batch)
            return glm_predictive(fn.likelihood, mean, cov, self.cfg.predictive)
        if self.cfg.predictive == "glm_probit":  # laplace-torch's probit, with the MI of its logit Gaussian
            with self._trainable(), model_mode(fn.model, False), torch.no_grad():
                probs = self.la(batch, pred_type="glm", link_approx="probit")
            mean, cov = self.glm_moments(fn, groups, batch)
            return Predictive.point(probs.double().clamp_min(1e-300).log().float(), epistemic(mean, cov, generator))
        with self._trainable(), model_mode(fn.model, False), torch.no_grad():
            pred_type = "glm" if self.cfg.predictive == "glm_mc" else "nn"
            samples = self.la.functional_samples(batch, pred_type=pred_type, n_samples=n_samples, generator=generator)
            return predictive_of(fn, batch, samples.float())

    def state_dict(self) -> dict[str, Any]:
        if self.la is None:
            return dict(self._state)
        return {"la": self.la.state_dict(), "names": self.names, "values": {k: v.cpu() for k, v in self.values.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._state, self.la, self.fn = dict(state), None, None

    @property
    def prior(self) -> torch.Tensor:
        """laplace-torch's prior precision, per tensor (a scalar expanded when it is one)."""
        if self.la is None:
            raise ValueError("backend: the laplace-torch posterior is rebuilt at its first prediction; predict first.")
        return self.la.prior_precision.detach().double().cpu().reshape(-1)

    def mean_values(self) -> dict[str, torch.Tensor] | None:
        """The MAP the posterior was fit at (laplace-torch predicts with the live adapter, which must equal it)."""
        return dict(self.values or (self._state or {}).get("values") or {}) or None

    def factor_bytes(self) -> int:
        h = self.state_dict()["la"]["H"]
        flat = [t for f in h for t in f] if isinstance(h, list) else [h]
        return sum(t.numel() * t.element_size() for t in flat)
