"""The likelihood seam: how the outputs ``f [B, O]`` of a readout explain the labels.

Every part that needs the likelihood takes it from the readout (``readout.likelihood``, through
``AdapterFn.likelihood``) instead of hard-coding the cross-entropy: the MAP training loss
(:func:`~bayeslora.train.train_map`), the data term of the Laplace evidence and the K-FAC loss square root /
Fisher sampling (:func:`~bayeslora.posteriors.kfac.fit_curvature`), and the Pyro observation of the VI model
(:class:`~bayeslora.posteriors.vi_guides.AdapterModel`). A likelihood provides

* ``nll(f, y, reduction)``: the negative log-likelihood (mean or sum over examples);
* ``loss_sqrt(f, y, fisher, mc_samples, generator)``: vectors ``S [B, O, K]`` whose outer products give the
  Hessian of the NLL in ``f`` (``fisher="ggn"``, exact), its sampled-label Fisher (``"mc"``) or the empirical
  Fisher (``"empirical"``); K-FAC and the diagonal GGN are ``Σ_k (Jᵀ s_k)(Jᵀ s_k)ᵀ``;
* ``observation(f)``: the Pyro distribution of ``y`` given ``f`` (one event per example);
* ``config()``: JSON-able constructor arguments (:func:`likelihood_from_config` rebuilds it).

:class:`Categorical` is the classification case (labels ``[B]`` in ``[0, C)``); :class:`Gaussian` is regression
on targets ``[B, O]`` with a fixed observation std (then the GGN is ``JᵀJ / σ²``). A token-level likelihood (labels
``[B, T]`` with an ignore index) is the next case of the same interface.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch

FISHERS = ("ggn", "mc", "empirical")


def _check_fisher(fisher: str) -> None:
    if fisher not in FISHERS:
        raise ValueError(f"fisher: expected one of {list(FISHERS)}, got {fisher!r}.")


@runtime_checkable
class Likelihood(Protocol):
    name: str

    def nll(self, outputs: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor: ...

    def loss_sqrt(
        self, outputs: torch.Tensor, labels: torch.Tensor, fisher: str, mc_samples: int = 1, generator=None
    ) -> torch.Tensor: ...

    def observation(self, outputs: torch.Tensor): ...

    def config(self) -> dict[str, Any]: ...


class Categorical:
    """Softmax over C class logits, labels ``[B]`` in ``[0, C)`` (the classification case)."""

    name = "categorical"

    def nll(self, outputs: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return torch.nn.functional.cross_entropy(outputs, labels.long(), reduction=reduction)

    def loss_sqrt(
        self, outputs: torch.Tensor, labels: torch.Tensor, fisher: str, mc_samples: int = 1, generator=None
    ) -> torch.Tensor:
        """``"ggn"``: the exact square root of ``diag(p) − p pᵀ`` with ``K = C − 1`` (the Hessian annihilates
        the all-ones direction); ``"mc"``: ``K = mc_samples`` sampled-label gradients ``(p − e_ŷ)/√K``;
        ``"empirical"``: the true-label gradient ``p − e_y``."""
        _check_fisher(fisher)
        p = torch.softmax(outputs.detach().double(), dim=-1)
        b, c = p.shape
        if fisher == "ggn":
            basis = torch.linalg.qr(torch.eye(c, dtype=p.dtype, device=p.device) - 1.0 / c)[0][:, : c - 1]
            hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
            vals, vecs = torch.linalg.eigh(basis.T @ hess @ basis)
            out = basis @ (vecs * vals.clamp_min(0.0).sqrt()[:, None, :])
        elif fisher == "mc":
            draws = torch.multinomial(p.float(), mc_samples, replacement=True, generator=generator)  # [B, K]
            onehot = torch.nn.functional.one_hot(draws, c).to(p.dtype).transpose(1, 2)  # [B, C, K]
            out = (p[:, :, None] - onehot) / mc_samples**0.5
        else:
            out = (p - torch.nn.functional.one_hot(labels.long(), c).to(p.dtype))[:, :, None]
        return out.to(outputs.dtype)

    def observation(self, outputs: torch.Tensor):
        import pyro.distributions as dist

        return dist.Categorical(logits=outputs)

    def config(self) -> dict[str, Any]:
        return {"name": self.name}


class Gaussian:
    """``y ~ N(f, σ² I)`` on targets ``[B, O]`` with a fixed observation std ``noise_std`` (regression)."""

    name = "gaussian"

    def __init__(self, noise_std: float = 1.0):
        if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or not noise_std > 0:
            raise ValueError(f"noise_std: expected a positive observation std, got {noise_std!r}.")
        self.noise_std = float(noise_std)

    def _targets(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        y = labels.to(outputs.dtype)
        if y.shape != outputs.shape:
            raise ValueError(
                f"labels: a Gaussian likelihood needs targets shaped like the outputs {tuple(outputs.shape)}, got "
                f"{tuple(y.shape)}."
            )
        return y

    def nll(self, outputs: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        y = self._targets(outputs, labels)
        per = 0.5 * ((outputs - y) / self.noise_std).square().sum(-1) + outputs.shape[-1] * (
            torch.log(torch.tensor(self.noise_std, dtype=outputs.dtype, device=outputs.device))
            + 0.5 * torch.log(torch.tensor(2 * torch.pi, dtype=outputs.dtype, device=outputs.device))
        )
        return per.mean() if reduction == "mean" else per.sum()

    def loss_sqrt(
        self, outputs: torch.Tensor, labels: torch.Tensor, fisher: str, mc_samples: int = 1, generator=None
    ) -> torch.Tensor:
        """``"ggn"``: ``I / σ`` (``K = O``: the Hessian ``I / σ²`` is constant); ``"mc"``: ``ε / σ`` with
        ``ε ~ N(0, I)`` (``E[ε εᵀ] = I``), ``K = mc_samples`` scaled by ``1/√K``; ``"empirical"``: ``(f − y) / σ²``."""
        _check_fisher(fisher)
        b, o = outputs.shape
        if fisher == "ggn":
            eye = torch.eye(o, dtype=outputs.dtype, device=outputs.device) / self.noise_std
            return eye.expand(b, o, o).clone()
        if fisher == "mc":
            eps = torch.randn(b, o, mc_samples, generator=generator, device=outputs.device, dtype=torch.float64)
            return (eps / (self.noise_std * mc_samples**0.5)).to(outputs.dtype)
        y = self._targets(outputs, labels)
        return ((outputs.detach() - y) / self.noise_std**2)[:, :, None]

    def observation(self, outputs: torch.Tensor):
        import pyro.distributions as dist

        return dist.Normal(outputs, self.noise_std).to_event(1)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "noise_std": self.noise_std}


LIKELIHOODS = {"categorical": Categorical, "gaussian": Gaussian}


def likelihood_from_config(config: Mapping[str, Any]) -> Likelihood:
    """Rebuild a likelihood from its :meth:`config`."""
    options = dict(config)
    name = options.pop("name", None)
    if name not in LIKELIHOODS:
        raise ValueError(f"likelihood: expected one of {sorted(LIKELIHOODS)}, got {name!r}.")
    return LIKELIHOODS[name](**options)
