"""The linearised (GLM) predictive of a Laplace posterior, with bounded memory.

Linearising the logits around the MAP, ``f(x; θ) ≈ f(x; θ*) + J(x)(θ − θ*)``, turns the Gaussian
posterior ``N(θ*, P⁻¹)`` into a Gaussian over the logits (Immer, Korzepa & Bauer, AISTATS 2021;
MacKay 1992):

    f_μ = f(x; θ*)  [B, C],      f_Σ = Σ_ℓ J_ℓ P_ℓ⁻¹ J_ℓᵀ  [B, C, C].

Per layer ``ℓ`` the precision is ``P_ℓ = N · Kᵢⱼ + λ_ℓ`` in the eigenbasis of the curvature
(``K = g_i a_j`` for K-FAC, the diagonal for ``diag``). With ``Z_c = U_Gᵀ J_c U_A`` the
eigen-coordinates of the Jacobian row ``J_c [out, in']`` and ``R_c = J_c − U_G Z_c U_Aᵀ`` its part
outside a low-rank eigenbasis (where the curvature is 0 and the precision is the prior's),

    f_Σ[c, d] = Σ_ℓ Σ_ij Z_c[ij] Z_d[ij] / (N K_ij + λ_ℓ)  +  ⟨R_c, R_d⟩_F / λ_ℓ,

exactly (the second term vanishes for full eigenbases). No ``D × D`` or ``d × d`` matrix is formed,
and forming ``R`` explicitly (instead of ``⟨J, J⟩ − ⟨Z, Z⟩``) avoids cancellation.

Jacobians come from one forward with hooks and ``C`` backward passes, one per class, each
returning the output gradients ``g_t`` of every selected layer; ``J_c = Σ_t g_t ã_tᵀ`` is
contracted immediately, so memory is one forward graph plus ``[B, C, out, in']`` per layer
(LoRA-sized), and ``chunk_size`` splits large batches. Nothing is vmapped over ``B × C``.

Links: probit, ``softmax(f_μ / √(1 + π/8 · diag f_Σ))`` (Spiegelhalter & Lauritzen 1990; MacKay
1992), or Monte Carlo in logit space, ``f_μ + L ε`` with ``L Lᵀ = f_Σ`` (cheap for thousands of
samples).

For a Gaussian likelihood the link is the identity and the predictive is exact: ``N(f_μ, f_Σ + σ² I)``
(:func:`glm_predictive`: one component ``f_μ`` with the closed-form variance ``diag f_Σ``, whatever the configured
link; for ``O > 1`` outputs the marginals are kept, i.e. the off-diagonal of ``f_Σ`` is dropped).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..function import AdapterFn
from ..params import ParamGroup
from .kfac import Factor, layer_jacobian, random_values, record_layers


@dataclass
class Coordinates:
    """GLM quantities of a batch.

    Attributes:
        mean: ``f_μ [B, C]`` (float32).
        z: per layer, eigen-coordinates ``[B, C, *K.shape]`` (float64).
        residual: per layer, ``⟨R_c, R_d⟩ [B, C, C]`` (float64), or None for a full eigenbasis.
    """

    mean: torch.Tensor
    z: list[torch.Tensor]
    residual: list[torch.Tensor | None]

    @staticmethod
    def cat(parts: Sequence[Coordinates]) -> Coordinates:
        return Coordinates(
            torch.cat([p.mean for p in parts]),
            [torch.cat(zs) for zs in zip(*[p.z for p in parts])],
            [None if rs[0] is None else torch.cat(rs) for rs in zip(*[p.residual for p in parts])],
        )


def split_batch(batch: Mapping[str, torch.Tensor], chunk_size: int | None) -> list[dict[str, torch.Tensor]]:
    """Split a batch into sub-batches of at most ``chunk_size`` rows (None: one chunk)."""
    size = next(v.shape[0] for v in batch.values() if torch.is_tensor(v))
    if chunk_size is None or chunk_size >= size:
        return [dict(batch)]
    return [
        {k: v[i : i + chunk_size] if torch.is_tensor(v) else v for k, v in batch.items()}
        for i in range(0, size, chunk_size)
    ]


def coordinates(
    fn: AdapterFn,
    values: Mapping[str, torch.Tensor],
    groups: Sequence[ParamGroup],
    factors: Sequence[Factor],
    batch: Mapping[str, torch.Tensor],
    chunk_size: int | None = None,
) -> Coordinates:
    """Forward + ``C`` backward passes per chunk: ``f_μ`` and each layer's Jacobian eigen-coordinates.

    Call in eval mode; the model is used through ``fn(values, ·)`` and left unchanged.
    """
    parts = []
    for chunk in split_batch(fn.to_device(batch), chunk_size):
        with torch.enable_grad(), record_layers(groups) as records:
            logits = fn(random_values(values, groups), chunk)
            if not logits.requires_grad:
                raise ValueError("params: the logits do not depend on the selected layers; nothing is random.")
            outputs = [rec.output for rec in records]
            c = logits.shape[1]
            zs = [[] for _ in groups]
            rs = [[] for _ in groups]
            for k in range(c):
                grads = torch.autograd.grad(logits[:, k].sum(), outputs, retain_graph=k < c - 1, allow_unused=True)
                for i, (group, factor, rec, grad) in enumerate(zip(groups, factors, records, grads)):
                    g = torch.zeros_like(rec.output) if grad is None else grad
                    jac = layer_jacobian(g, rec.input.detach(), group.bias is not None).double()
                    z = factor.project(jac)
                    zs[i].append(z)
                    if not factor.full:
                        rs[i].append(jac - factor.unproject(z))
        residual = [None if not r else torch.einsum("bcp,bdp->bcd", *(2 * [torch.stack(r, 1).flatten(2)])) for r in rs]
        parts.append(Coordinates(logits.detach(), [torch.stack(z, 1) for z in zs], residual))
    return Coordinates.cat(parts)


def functional_covariance(
    coords: Coordinates, factors: Sequence[Factor], num_data: int, prior: torch.Tensor
) -> torch.Tensor:
    """``f_Σ`` for one or many prior precisions.

    Args:
        coords: from :func:`coordinates`.
        factors: the per-layer curvature (per-example normalised).
        num_data: N.
        prior: per-layer prior precisions ``[L]``, or a grid of them ``[K, L]``.

    Returns:
        ``[B, C, C]`` for ``prior [L]``, ``[K, B, C, C]`` for ``prior [K, L]`` (float64).
    """
    grid = prior.ndim == 2
    lam = prior.reshape(-1, len(factors)).double()  # [K, L]
    b, c = coords.mean.shape
    total = torch.zeros(b, c, c, lam.shape[0], dtype=torch.float64, device=coords.mean.device)
    for i, (factor, z, res) in enumerate(zip(factors, coords.z, coords.residual)):
        eig = num_data * factor.eigenvalues().reshape(-1).to(total.device)  # [p]
        lam_i = lam[:, i].to(total.device)
        weights = 1.0 / (eig[:, None] + lam_i[None, :])  # [p, K]
        zf = z.reshape(b, c, -1)
        if weights.shape[1] == 1:
            total[..., 0] += torch.einsum("bcp,bdp->bcd", zf * weights[:, 0], zf)
        else:  # a grid: form the pairwise products once, reweight for every λ
            total += (zf[:, :, None, :] * zf[:, None, :, :]) @ weights
        if res is not None:
            total += res[..., None] / lam_i
    out = total.permute(3, 0, 1, 2)
    return out if grid else out[0]


def probit(mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Probit-adjusted logits ``f_μ / √(1 + π/8 · diag f_Σ)`` ``[..., B, C]``."""
    var = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(0.0)
    return (mean.double() / torch.sqrt(1.0 + math.pi / 8.0 * var)).float()


def mc_logits(
    mean: torch.Tensor, cov: torch.Tensor, n_samples: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Logit samples ``f_μ + L ε`` ``[S, B, C]`` with ``L Lᵀ = f_Σ`` (symmetric square root, PSD-clamped)."""
    vals, vecs = torch.linalg.eigh(0.5 * (cov + cov.transpose(-1, -2)).double())
    root = vecs * vals.clamp_min(0.0).sqrt()[..., None, :]  # [B, C, C]
    eps = torch.randn(n_samples, *mean.shape, generator=generator, device=mean.device, dtype=torch.float64)
    return (mean.double() + torch.einsum("bcd,sbd->sbc", root, eps)).float()


def glm_predictive(
    likelihood,
    mean: torch.Tensor,
    cov: torch.Tensor,
    link: str,
    n_samples: int = 1,
    generator: torch.Generator | None = None,
    *,
    with_epistemic: bool = False,
    seed: int = 0,
):
    """The GLM predictive of ``N(f_μ, f_Σ)`` over the outputs under ``likelihood``: for class logits the probit
    (``link="glm_probit"``; its MI as the epistemic score when ``with_epistemic``) or ``n_samples`` MC logit samples;
    for a Gaussian likelihood the exact ``N(f_μ, f_Σ + σ²)`` (module docstring)."""
    from ..predictive import Predictive

    if likelihood.name != "categorical":
        return Predictive(mean[None], likelihood=likelihood, variance=torch.diagonal(cov, dim1=-2, dim2=-1))
    if link == "glm_probit":
        score = epistemic(mean, cov, generator, seed) if with_epistemic else None
        return Predictive.point(probit(mean, cov), score)
    return Predictive(mc_logits(mean, cov, n_samples, generator))


EPISTEMIC_SAMPLES = 512  # logit samples of the GLM Gaussian for the probit predictive's mutual information


def epistemic(mean: torch.Tensor, cov: torch.Tensor, generator: torch.Generator | None, seed: int = 0) -> torch.Tensor:
    """The mutual information ``[B]`` of the GLM Gaussian over the logits (:data:`EPISTEMIC_SAMPLES` MC samples),
    the epistemic score of the probit predictive (whose one adjusted-logit sample carries none)."""
    from ..predictive import Predictive

    if generator is None:
        generator = torch.Generator(device=mean.device).manual_seed(seed)
    return Predictive(mc_logits(mean, cov, EPISTEMIC_SAMPLES, generator)).mutual_information
