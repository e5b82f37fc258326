"""PSD eigendecompositions and a streaming low-rank sketch for wide Kronecker factors.

A K-FAC factor of a wide layer side (``d`` = 4096 for a 7B model) is a sum of rank-``m`` updates
``X Xᵀ`` (one column per example or per backward pass). Keeping ``d × d`` matrices for every LoRA
layer costs gigabytes, so sides with ``d >= lowrank_threshold`` are sketched with *Frequent
Directions* (Liberty, KDD 2013; Ghashami, Liberty, Phillips & Woodruff, SIAM J. Comput. 2016):

* the sketch ``S [d, ℓ]`` is updated batch by batch in ``O(d ℓ)`` memory (no ``d × d`` matrix);
* it never over-estimates: ``0 ⪯ X Xᵀ − S Sᵀ``, so a low-rank K-FAC posterior is always *more*
  uncertain than the full one (the discarded curvature falls back to the prior);
* the error is bounded and tracked: ``||X Xᵀ − S Sᵀ||₂ ≤ Δ`` where ``Δ`` (the total shrinkage) is
  accumulated exactly and ``Δ ≤ ||X − X_k||_F² / (ℓ − k)`` for every ``k < ℓ``;
* it is exact when the columns seen span at most ``ℓ`` dimensions.

The final factor keeps the top ``rank`` eigenpairs of ``S Sᵀ`` (``ℓ = 2 · rank``); its spectral
error is at most ``Δ + σ²_{rank+1}(S)``, reported as ``error_bound``.
"""

from __future__ import annotations

import torch


def eig_psd(matrix: torch.Tensor, name: str, rtol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a symmetric PSD matrix, eigenvalues descending and clamped at 0 (float64).

    Args:
        matrix: ``[d, d]``.
        name: what the matrix is (for error messages).
        rtol: eigenvalues below ``-rtol · max|eigenvalue|`` mean the matrix is not PSD (round-off
            negatives above it are clamped to 0).

    Returns:
        ``(values [d], vectors [d, d])``.

    Raises:
        ValueError: if the matrix is not square, not finite, or clearly indefinite.
    """
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{name}: expected a square matrix, got shape {tuple(matrix.shape)}.")
    m = matrix.detach().to(torch.float64)
    if not torch.isfinite(m).all():
        raise ValueError(
            f"{name}: the curvature factor contains NaN/inf; check the model's logits (bf16 overflow?) and the data."
        )
    vals, vecs = torch.linalg.eigh(0.5 * (m + m.T))
    scale = float(vals.abs().max()) if vals.numel() else 0.0
    if vals.numel() and float(vals.min()) < -rtol * scale:
        raise ValueError(
            f"{name}: the factor is not positive semi-definite (smallest eigenvalue {float(vals.min()):.3g}, "
            f"largest {scale:.3g}); Kronecker factors must be sums of outer products. Recompute it with fit()."
        )
    return vals.flip(0).clamp_min(0.0), vecs.flip(1)


class FrequentDirections:
    """Streaming sketch of ``X Xᵀ`` from column blocks ``X_t [d, m_t]`` (Frequent Directions).

    Args:
        dim: ``d``.
        sketch_size: ``ℓ``, the columns kept between updates (memory ``O(d · 2ℓ)``).
        device: where the sketch lives.

    Attributes:
        shrinkage: ``Δ``, the total shrinkage; ``||X Xᵀ − S Sᵀ||₂ ≤ Δ``.
        mass: ``tr(X Xᵀ)`` of everything added (for relative errors).
    """

    def __init__(self, dim: int, sketch_size: int, device: torch.device | str | None = None):
        if sketch_size < 1:
            raise ValueError(f"sketch_size: expected a positive integer, got {sketch_size!r}.")
        self.dim, self.sketch_size = int(dim), int(sketch_size)
        self.sketch = torch.zeros(self.dim, 0, dtype=torch.float64, device=device)
        self._buffer: list[torch.Tensor] = []
        self._buffered = 0
        self.shrinkage = 0.0
        self.mass = 0.0

    def add(self, columns: torch.Tensor) -> None:
        """Add the columns of ``X_t [d, m]`` (any float dtype; accumulated in float64)."""
        if columns.ndim != 2 or columns.shape[0] != self.dim:
            raise ValueError(f"columns: expected [{self.dim}, m], got {tuple(columns.shape)}.")
        cols = columns.detach().to(device=self.sketch.device, dtype=torch.float64)
        self.mass += float(cols.square().sum())
        self._buffer.append(cols)
        self._buffered += cols.shape[1]
        if self._buffered >= self.sketch_size:
            self._compress()

    def _compress(self) -> None:
        z = torch.cat([self.sketch, *self._buffer], dim=1)
        self._buffer, self._buffered = [], 0
        if z.shape[1] <= self.sketch_size:
            self.sketch = z
            return
        q, r = torch.linalg.qr(z)
        u_r, s, _ = torch.linalg.svd(r, full_matrices=False)
        sq = s.square()
        delta = float(sq[self.sketch_size]) if sq.numel() > self.sketch_size else 0.0
        keep = (sq[: self.sketch_size] - delta).clamp_min(0.0)
        self.sketch = (q @ u_r[:, : self.sketch_size]) * keep.sqrt()
        self.shrinkage += delta

    def eig(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Top-``rank`` eigenpairs of the sketch: ``(values [k] descending, vectors [d, k], error_bound)``.

        ``error_bound`` bounds ``||X Xᵀ − V diag(values) Vᵀ||₂`` (``0`` when the sketch is exact).
        """
        self._compress()
        if self.sketch.shape[1] == 0:
            z = torch.zeros(self.dim, 0, dtype=torch.float64, device=self.sketch.device)
            return torch.zeros(0, dtype=torch.float64, device=z.device), z, self.shrinkage
        q, r = torch.linalg.qr(self.sketch)
        u_r, s, _ = torch.linalg.svd(r, full_matrices=False)
        sq = s.square()
        k = min(int(rank), sq.numel())
        tail = float(sq[k]) if sq.numel() > k else 0.0
        return sq[:k], q @ u_r[:, :k], self.shrinkage + tail
