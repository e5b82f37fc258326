"""K-FAC curvature of the selected LoRA ``nn.Linear`` layers (and the head), from hooks and vjps.

For a layer with weight ``W [out, in]`` (a bias is folded in by appending a 1 to the input, so the
layer parameter is the matrix ``[W | b]`` of shape ``[out, in']``), one example's Jacobian row for
the output direction ``v`` is

    J_v = Σ_t g_t ã_tᵀ        (g_t = ∂(vᵀ f)/∂(layer output at position t), ã_t = [a_t, 1])

summed over the sequence positions ``t``. The GGN of the softmax cross-entropy is
``Σ_n J_nᵀ H_n J_n`` with ``H_n = diag(p_n) − p_n p_nᵀ``; writing ``H_n = S_n S_nᵀ`` turns it into
``Σ_n Σ_k vec(J_{n,s_k}) vec(J_{n,s_k})ᵀ`` — one backward pass per column ``s_k`` of ``S_n``.
Because ``H_n 1 = 0`` only ``C − 1`` columns are needed (``S_n = V L_n`` with ``V [C, C−1]`` an
orthonormal basis of ``1⊥`` and ``L_n Lₙᵀ = Vᵀ H_n V``), so the exact GGN of a binary task costs
one backward pass.

Fisher types (the vectors ``s_k``, from the readout's likelihood: :meth:`bayeslora.likelihoods.Categorical.loss_sqrt`
for classification): ``"ggn"`` the exact GGN above; ``"mc"`` ``mc_samples`` labels drawn from the model,
``s = (p − e_ŷ)/√S`` (Martens & Grosse 2015); ``"empirical"`` the true label, ``s = p − e_y``. A token-level likelihood
(:class:`~bayeslora.likelihoods.TokenCategorical`) gives one column per (target token, sample) of each row, so
``G`` sums the per-token outer products over the target tokens of an example (the example is the sequence: ``N``
counts sequences, the loss is summed over target tokens).

K-FAC (Martens & Grosse 2015; ``reduce`` for weight sharing, Eschenhagen et al. NeurIPS 2023, as
in curvlinops' ``kfac_approx="reduce"``): per example, the positions are reduced *before* the
outer products,

    ā_n = mean_t ã_{n,t}  (over non-padding positions),   ḡ_{n,k} = Σ_t g_{n,k,t},
    A = (1/N) Σ_n ā_n ā_nᵀ,   G = (1/N) Σ_n Σ_k ḡ_{n,k} ḡ_{n,k}ᵀ,   GGN_ℓ ≈ N · G ⊗ A,

which is exact for one example whose inputs do not vary over positions (and for layers without a
sequence dimension, e.g. the head, it is the classic K-FAC). ``"expand"`` treats each position as
an example (``A = (1/N) Σ_n mean_t ã ãᵀ``, ``G = (1/N) Σ_{n,t} g gᵀ``) — laplace-torch's default.
Parameters are vectorised row-major (``W.reshape(-1)``), so the block is ``G ⊗ A``.

Activations are accumulated in float32 whatever the model dtype; sides with
``d >= lowrank_threshold`` are sketched with Frequent Directions (see :mod:`.lowrank`).
The exact diagonal GGN (``structure="diag"``) uses the same vjps and the exact per-example
Jacobians ``J_v`` (no Kronecker approximation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import distributed
from ..function import AdapterFn
from ..likelihoods import sqrt_columns
from ..params import ParamGroup
from ..progress import bar as progress_bar
from .lowrank import FrequentDirections, eig_psd

KFAC_APPROX = ("reduce", "expand")


# ----------------------------------------------------------------------------- layers
@dataclass
class LayerRecord:
    """Input and output of one layer in the current forward pass."""

    input: torch.Tensor | None = None
    output: torch.Tensor | None = None


@contextlib.contextmanager
def record_layers(groups: Sequence[ParamGroup]) -> Iterator[list[LayerRecord]]:
    """Forward hooks that keep each group's layer input and output (one forward per context)."""
    records = [LayerRecord() for _ in groups]
    handles = []
    for rec, group in zip(records, groups):
        if not isinstance(group.module, torch.nn.Linear):
            raise ValueError(
                f"params: layer {group.module_name!r} ({group.kind}) is not an nn.Linear; Laplace supports LoRA "
                "Linear layers and Linear heads. Exclude it with params.exclude."
            )

        def hook(module, inputs, output, rec=rec, name=group.module_name):
            if rec.output is not None:
                raise ValueError(
                    f"model: layer {name!r} ran twice in one forward pass; K-FAC needs each selected layer to run "
                    "once per forward. Exclude shared layers with params.exclude."
                )
            rec.input, rec.output = inputs[0], output

        handles.append(group.module.register_forward_hook(hook))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def layer_dims(group: ParamGroup) -> tuple[int, int]:
    """``(out, in')`` of the layer parameter matrix ``[W | b]``."""
    out_dim, in_dim = group.module.weight.shape
    return int(out_dim), int(in_dim) + (group.bias is not None)


def as_matrix(values: Mapping[str, torch.Tensor], group: ParamGroup) -> torch.Tensor:
    """The layer parameter ``[W | b]`` ``[..., out, in']`` from a values dict (leading dims allowed)."""
    w = values[group.weight]
    return w if group.bias is None else torch.cat([w, values[group.bias].unsqueeze(-1)], dim=-1)


def from_matrix(matrix: torch.Tensor, group: ParamGroup) -> dict[str, torch.Tensor]:
    """Inverse of :func:`as_matrix` (works with leading batch dimensions)."""
    if group.bias is None:
        return {group.weight: matrix}
    return {group.weight: matrix[..., :-1], group.bias: matrix[..., -1]}


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, ..., d] -> [B, T, d]`` in float32 (a 2-D input has T = 1)."""
    return x.float().reshape(x.shape[0], -1, x.shape[-1])


def layer_jacobian(grad_output: torch.Tensor, inputs: torch.Tensor, bias: bool) -> torch.Tensor:
    """Exact per-example Jacobian ``Σ_t g_t ã_tᵀ`` ``[B, out, in']`` (float32)."""
    g, x = _tokens(grad_output), _tokens(inputs)
    jac = torch.bmm(g.transpose(1, 2), x)
    return torch.cat([jac, g.sum(1, keepdim=True).transpose(1, 2)], dim=2) if bias else jac


# ----------------------------------------------------------------------------- factors
@dataclass
class KronFactor:
    """Eigendecomposed K-FAC block of one layer: per-example curvature ``G ⊗ A``.

    ``G ≈ g_vecs diag(g_vals) g_vecsᵀ`` and ``A ≈ a_vecs diag(a_vals) a_vecsᵀ``; a low-rank side keeps
    ``k < d`` eigenpairs (curvature 0 on the complement).

    Attributes:
        g_vals: ``[kG]`` (float64), g_vecs: ``[out, kG]``; a_vals: ``[kA]``, a_vecs: ``[in', kA]``.
        g_error, a_error: spectral error bound of each side relative to its top eigenvalue (0: exact).
    """

    g_vals: torch.Tensor
    g_vecs: torch.Tensor
    a_vals: torch.Tensor
    a_vecs: torch.Tensor
    g_error: float = 0.0
    a_error: float = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        return self.g_vecs.shape[0], self.a_vecs.shape[0]

    @property
    def full(self) -> bool:
        """Whether the eigenbasis spans the whole layer (no low-rank side)."""
        return self.g_vecs.shape[1] == self.g_vecs.shape[0] and self.a_vecs.shape[1] == self.a_vecs.shape[0]

    def eigenvalues(self) -> torch.Tensor:
        """Per-example curvature eigenvalues ``g_i a_j`` ``[kG, kA]`` (float64)."""
        return self.g_vals[:, None] * self.a_vals[None, :]

    def project(self, m: torch.Tensor) -> torch.Tensor:
        """Eigen-coordinates ``U_Gᵀ M U_A`` of ``M [..., out, in']``."""
        return self.g_vecs.T.to(m.dtype) @ m @ self.a_vecs.to(m.dtype)

    def unproject(self, z: torch.Tensor) -> torch.Tensor:
        """``U_G Z U_Aᵀ`` ``[..., out, in']``."""
        return self.g_vecs.to(z.dtype) @ z @ self.a_vecs.T.to(z.dtype)

    def state(self) -> dict[str, Any]:
        return {"type": "kron", **{k: getattr(self, k) for k in ("g_vals", "g_vecs", "a_vals", "a_vecs")},
                "g_error": self.g_error, "a_error": self.a_error}  # fmt: skip


@dataclass
class DiagFactor:
    """Exact diagonal of the per-example GGN of one layer ``[out, in']`` (float64)."""

    diag: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.diag.shape)

    full = True

    def eigenvalues(self) -> torch.Tensor:
        return self.diag

    def project(self, m: torch.Tensor) -> torch.Tensor:
        return m

    def unproject(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def state(self) -> dict[str, Any]:
        return {"type": "diag", "diag": self.diag}


Factor = KronFactor | DiagFactor


ORTHONORMAL_TOL = 1e-3  # float32 eigenbases of a few thousand rows are orthonormal to ~1e-5


def factor_from_state(state: Mapping[str, Any], name: str) -> Factor:
    """Rebuild a factor from :meth:`KronFactor.state` / :meth:`DiagFactor.state`, checking it is PSD."""
    if state.get("type") == "diag":
        diag = torch.as_tensor(state["diag"], dtype=torch.float64)
        if not torch.isfinite(diag).all() or float(diag.min()) < 0:
            raise ValueError(f"{name}: the diagonal curvature must be finite and >= 0; recompute it with fit().")
        return DiagFactor(diag)
    if state.get("type") != "kron":
        raise ValueError(f"{name}: unknown factor type {state.get('type')!r}; expected 'kron' or 'diag'.")
    out = {}
    for side in ("g", "a"):
        vals = torch.as_tensor(state[f"{side}_vals"], dtype=torch.float64)
        if not torch.isfinite(vals).all() or (vals.numel() and float(vals.min()) < 0):
            raise ValueError(
                f"{name}: Kronecker factor {side.upper()} is not positive semi-definite (eigenvalues must be finite "
                f"and >= 0, got min {float(vals.min()) if vals.numel() else 0:.3g}); recompute it with fit()."
            )
        vecs = torch.as_tensor(state[f"{side}_vecs"])
        if vecs.ndim != 2 or vecs.shape[1] != vals.numel():
            raise ValueError(
                f"{name}: Kronecker factor {side.upper()} eigenvectors have shape {tuple(vecs.shape)} for "
                f"{vals.numel()} eigenvalues; expected [d, {vals.numel()}]. Recompute it with fit()."
            )
        gram = vecs.double().T @ vecs.double()
        err = float((gram - torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)).abs().max()) if (
            gram.numel()) else 0.0  # fmt: skip
        if not err <= ORTHONORMAL_TOL:
            raise ValueError(
                f"{name}: Kronecker factor {side.upper()} eigenvectors are not orthonormal (max |UᵀU - I| = "
                f"{err:.3g} > {ORTHONORMAL_TOL}); the state is corrupt or was edited. Recompute it with fit()."
            )
        out[f"{side}_vals"], out[f"{side}_vecs"] = vals, state[f"{side}_vecs"]
    return KronFactor(**out, g_error=float(state.get("g_error", 0.0)), a_error=float(state.get("a_error", 0.0)))


# ----------------------------------------------------------------------------- accumulation
class _Side:
    """Accumulates ``Σ x xᵀ`` of one Kronecker side, dense (float32) or sketched."""

    def __init__(self, dim: int, rank: int | None, threshold: int, device: torch.device):
        self.rank = rank
        self.lowrank = rank is not None and dim >= threshold and rank < dim
        if self.lowrank:
            self.sketch = FrequentDirections(dim, 2 * rank, device=device)
        else:
            self.total = torch.zeros(dim, dim, dtype=torch.float32, device=device)

    def add(self, rows: torch.Tensor) -> None:
        """Add ``Σ_m x_m x_mᵀ`` for the rows ``x_m`` of ``[M, d]``."""
        if self.lowrank:
            self.sketch.add(rows.T)
        else:
            self.total.addmm_(rows.T, rows)

    def eig(self, n: int, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        if self.lowrank:
            vals, vecs, err = self.sketch.eig(self.rank)
            top = float(vals[0]) if vals.numel() else 0.0
            return vals / n, vecs.float(), (err / top if top > 0 else 0.0)
        vals, vecs = eig_psd(self.total / n, name)
        return vals, vecs.float(), 0.0


class _KronAccumulator:
    def __init__(self, group, approx, rank, threshold, device):
        out_dim, in_dim = layer_dims(group)
        self.name, self.bias, self.approx = group.module_name, group.bias is not None, approx
        self.a = _Side(in_dim, rank, threshold, device)
        self.g = _Side(out_dim, rank, threshold, device)

    def add_inputs(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        x = _tokens(x)
        weights = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
        if mask is not None and tuple(mask.shape) == tuple(x.shape[:2]):
            weights = mask.to(x.dtype)
        count = weights.sum(1, keepdim=True).clamp_min(1.0)
        if self.bias:
            x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
        if self.approx == "reduce":
            rows = (x * (weights / count)[..., None]).sum(1)
        else:
            rows = (x * (weights / count).sqrt()[..., None]).reshape(-1, x.shape[-1])
        self.a.add(rows)

    def add_grads(self, grad_output: torch.Tensor, inputs: torch.Tensor) -> None:
        g = _tokens(grad_output)
        self.g.add(g.sum(1) if self.approx == "reduce" else g.reshape(-1, g.shape[-1]))

    def finish(self, n: int) -> KronFactor:
        a_vals, a_vecs, a_err = self.a.eig(n, f"{self.name} (A factor)")
        g_vals, g_vecs, g_err = self.g.eig(n, f"{self.name} (G factor)")
        return KronFactor(g_vals, g_vecs, a_vals, a_vecs, g_error=g_err, a_error=a_err)


class _DiagAccumulator:
    def __init__(self, group, device):
        self.bias = group.bias is not None
        self.total = torch.zeros(layer_dims(group), dtype=torch.float64, device=device)

    def add_inputs(self, x, mask) -> None:
        pass

    def add_grads(self, grad_output: torch.Tensor, inputs: torch.Tensor) -> None:
        self.total += layer_jacobian(grad_output, inputs, self.bias).square().sum(0).double()

    def finish(self, n: int) -> DiagFactor:
        return DiagFactor(self.total / n)


@dataclass
class Curvature:
    """Result of :func:`fit_curvature`.

    Attributes:
        factors: one per group, per-example normalised (mean over the ``n_seen`` examples).
        loss: summed cross-entropy ``−log p(D | θ*)`` over the data (float).
        n_seen: examples processed.
    """

    factors: list[Factor]
    loss: float
    n_seen: int


def random_values(values: Mapping[str, torch.Tensor], groups: Sequence[ParamGroup]) -> dict[str, torch.Tensor]:
    """Detached copies of ``values`` where the groups' tensors require grad (so layer outputs do)."""
    names = {n for g in groups for n in g.names}
    return {k: v.detach().clone().requires_grad_(k in names) for k, v in values.items()}


def fit_curvature(
    fn: AdapterFn,
    loader,
    groups: Sequence[ParamGroup],
    values: Mapping[str, torch.Tensor],
    *,
    structure: str = "kron",
    fisher: str = "ggn",
    mc_samples: int = 1,
    kfac_approx: str = "reduce",
    rank: int | None = None,
    lowrank_threshold: int = 1024,
    generator: torch.Generator | None = None,
) -> Curvature:
    """One pass over ``loader``: per-layer K-FAC factors (or the exact diagonal GGN) at ``values``.

    The model is called through ``fn(values, batch)`` (so ``requires_grad`` flags of the model are
    irrelevant); call it in eval mode. Memory: one forward graph plus the accumulators. Under
    ``torch.distributed`` each rank passes its shard (``distributed.shard(loader, even=False)``) and the
    sums (factors, loss, count) are all-reduced once at the end, so every rank gets the full-data fit.

    Args:
        fn: the AdapterFn.
        loader: batches with ``labels``.
        groups: the layers to fit (a subset of ``fn.params.groups``).
        values: adapter values to linearise at (all of ``fn.params``).
        structure: ``"kron"`` or ``"diag"``.
        fisher: ``"ggn"``, ``"mc"`` or ``"empirical"``.
        mc_samples: sampled labels per example for ``"mc"``.
        kfac_approx: ``"reduce"`` or ``"expand"`` (Kronecker structure only).
        rank: eigenpairs kept for a low-rank side (None: all sides full).
        lowrank_threshold: sides with at least this many rows are low-rank.
        generator: for the ``"mc"`` labels (on ``fn.device``).
    """
    device = fn.device
    if structure == "kron":
        accs = [_KronAccumulator(g, kfac_approx, rank, lowrank_threshold, device) for g in groups]
    else:
        accs = [_DiagAccumulator(g, device) for g in groups]
    loss, n_seen = 0.0, 0
    for batch in progress_bar(loader, desc=f"curvature ({structure})"):
        batch = fn.to_device(batch)
        labels = fn.labels(batch)
        with torch.enable_grad(), record_layers(groups) as records:
            logits = fn(random_values(values, groups), batch)
            if not logits.requires_grad:
                raise ValueError("params: the logits do not depend on the selected layers; nothing to fit.")
            loss += float(fn.likelihood.nll(logits.detach().double(), labels, reduction="sum"))
            for acc, rec in zip(accs, records):
                acc.add_inputs(rec.input.detach(), batch.get("attention_mask"))
            outputs = [rec.output for rec in records]
            for vector in sqrt_columns(fn.likelihood, logits, labels, fisher, mc_samples, generator):
                grads = torch.autograd.grad(logits, outputs, vector, retain_graph=True, allow_unused=True)
                for acc, rec, grad in zip(accs, records, grads):
                    acc.add_grads(torch.zeros_like(rec.output) if grad is None else grad, rec.input.detach())
        n_seen += labels.shape[0]
    # data-parallel fits (torchrun): add up every rank's sums over its shard (a no-op on one process)
    loss, n_seen = distributed.reduce_sums_(accs, loss, n_seen)
    if n_seen == 0:
        raise ValueError("loader: yielded no batches; Laplace needs the training data the MAP was fit on.")
    return Curvature([acc.finish(n_seen) for acc in accs], loss, n_seen)
