"""Data-parallel training and posterior fitting on ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Processes are started by ``torchrun`` (or ``accelerate launch``, which sets the same environment:
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); every rank holds the
whole model and the same adapter, and sees a disjoint shard of the data. Communication is
``torch.distributed`` collectives only:

* **MAP training** (:func:`~bayeslora.train.train_map`): after the backward passes of an optimizer
  step the adapter gradients and the step's loss are averaged over the ranks
  (:func:`sync_step_`, one all-reduce of a flat buffer), so every rank takes the same AdamW step
  and holds identical adapters. Adapter gradients are small, so wrapping the model in DDP (which
  would rename the parameters that :class:`~bayeslora.params.AdapterParams` and
  ``functional_call`` address) buys nothing. With a per-rank batch ``b`` on ``W`` ranks the
  effective batch is ``W · b``: the run equals a single-process run with batch ``W · b`` on the
  same data order (:func:`shard` keeps the order of the original sampler).
* **Posterior fitting** (sums over the data, e.g. K-FAC factors and the marginal-likelihood data
  term): each rank accumulates over its shard and the sums are added once at the end
  (:func:`all_reduce_sum_`, :func:`all_reduce_scalars`, :func:`merge_sketch_` for low-rank
  Frequent-Directions sketches, which are mergeable; Ghashami et al., SIAM J. Comput. 2016).
* **Metrics**: per-example predictions are gathered from all ranks (:func:`all_gather_cat`,
  padding-aware; :func:`gather_predictions` restores the loader's order), so metrics are computed
  once over the whole split.

Every helper is a no-op on a single process (no process group, or a world of one).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, RandomSampler, Sampler


@dataclass(frozen=True)
class World:
    """Where this process stands: ``rank`` in ``[0, size)``, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the process that writes results)."""
        return self.rank == 0


def world() -> World:
    """The current process group (a world of one when ``torch.distributed`` is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def init_from_env(backend: str | None = None) -> World:
    """Join the process group described by the launcher's environment (torchrun / accelerate).

    Does nothing when ``WORLD_SIZE`` is unset or 1, or when a group already exists. On GPU each
    rank uses ``cuda:LOCAL_RANK``.

    Args:
        backend: ``"gloo"``, ``"nccl"`` or None (NCCL when CUDA is available, else gloo).

    Returns:
        The :class:`World` after joining.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        return world()
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build; launch a single process.")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend: expected 'gloo', 'nccl' or None, got {backend!r}.")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return world()


def shutdown() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- data
class ShardSampler(Sampler[int]):
    """This rank's share of another sampler's index stream: stream positions ``rank, rank + W, ...``.

    Unlike ``DistributedSampler`` nothing is duplicated (so sums over the data stay exact) and the
    order is the wrapped sampler's, so a shuffling sampler seeded the same way on every rank gives
    each rank's batch ``k`` exactly one ``W``-th of the single-process batch ``k`` of size ``W · b``.

    Args:
        base: the global sampler (e.g. the original loader's ``RandomSampler``); :func:`~bayeslora.train.train_map`
            reseeds it through ``.base``.
        rank, size: this rank and the world size.
        even: drop the last ``len(base) % size`` positions so every rank gets the same number of
            examples (needed when ranks synchronise per step, i.e. training).
    """

    def __init__(self, base: Sampler, rank: int, size: int, even: bool = True):
        self.base, self.rank, self.size, self.even = base, int(rank), int(size), bool(even)

    def _length(self) -> int:
        n = len(self.base)
        return n - n % self.size if self.even else n

    def __iter__(self) -> Iterator[int]:
        indices = list(self.base)[: self._length()]
        return iter(indices[self.rank :: self.size])

    def __len__(self) -> int:
        return len(range(self.rank, self._length(), self.size))


def shard(loader: DataLoader, *, even: bool = True, current: World | None = None) -> DataLoader:
    """A loader over this rank's share of ``loader``'s examples (the loader itself on one process).

    The batch size stays ``loader.batch_size`` per rank (effective batch ``W · b``). Use
    ``even=True`` for training (equal steps on every rank; at most ``W − 1`` examples per epoch are
    left out) and ``even=False`` to visit every example exactly once (fitting sums, evaluation).
    """
    current = current or world()
    if current.size == 1:
        return loader
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        raise TypeError(
            "loader: expected a torch DataLoader built with batch_size (not a batch_sampler) to shard; "
            f"got {type(loader).__name__}."
        )
    if isinstance(loader.sampler, RandomSampler) and loader.sampler.generator is None:
        raise ValueError(
            "loader: a shuffling loader without a seeded generator draws a different order on every rank, so the "
            "shards would overlap; build it with generator=torch.Generator().manual_seed(seed) (make_loader does)."
        )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=ShardSampler(loader.sampler, current.rank, current.size, even=even),
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
    )


# ----------------------------------------------------------------------------- collectives
def _flat_groups(tensors: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """Sum ``tensors`` over the ranks in place (one all-reduce per device and dtype).

    Every rank must pass tensors of the same shapes, dtypes and order.
    """
    if world().size == 1 or not tensors:
        return tensors
    for idx in _flat_groups(tensors).values():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for i, part in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            tensors[i].detach().copy_(part.view_as(tensors[i]))
    return tensors


def all_reduce_scalars(*values: float) -> tuple[float, ...]:
    """Sums of Python numbers over the ranks (in float64; an ``int`` comes back as an ``int``).

    E.g. ``loss, n_seen = all_reduce_scalars(loss, n_seen)`` for a summed loss and an example count.
    """
    if world().size == 1:
        return tuple(values)
    buf = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return tuple(round(s) if isinstance(v, int) else s for v, s in zip(values, buf.tolist()))


def sync_step_(params: Sequence[torch.nn.Parameter], loss: float) -> float:
    """Average the gradients of ``params`` and the step's ``loss`` over the ranks; returns the mean loss.

    One all-reduce of a flat buffer per device and dtype. A missing gradient counts as zero (and
    is created), so every rank runs the same collective.
    """
    size = world().size
    if size == 1:
        return loss
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    box = torch.tensor([loss], dtype=torch.float64, device=grads[0].device if grads else "cpu")
    all_reduce_sum_([*grads, box])
    for g in grads:
        g.div_(size)
    return float(box) / size


def all_gather_cat(tensor: torch.Tensor, dim: int = 0) -> list[torch.Tensor]:
    """Every rank's ``tensor``, padding-aware: sizes along ``dim`` may differ between ranks.

    Returns:
        One tensor per rank (in rank order), each with its own size along ``dim``.
    """
    current = world()
    if current.size == 1:
        return [tensor]
    tensor = tensor.contiguous()
    size = torch.tensor([tensor.shape[dim]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(current.size)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    pad_shape = list(tensor.shape)
    pad_shape[dim] = max(sizes) - tensor.shape[dim]
    padded = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
    out = [torch.empty_like(padded) for _ in range(current.size)]
    dist.all_gather(out, padded)
    return [t.narrow(dim, 0, n) for t, n in zip(out, sizes)]


def interleave(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Undo :class:`ShardSampler`: rank ``r``'s ``j``-th row goes to stream position ``j · W + r`` ``[N, ...]``."""
    total = sum(p.shape[0] for p in parts)
    out = parts[0].new_empty((total, *parts[0].shape[1:]))
    for r, p in enumerate(parts):
        out[r :: len(parts)] = p
    return out


def gather_predictions(predictions):
    """All ranks' :class:`~bayeslora.metrics.Predictions` from a loader made by ``shard(..., even=False)``.

    The rows come back in the original loader's order (for an unshuffled loader: dataset order),
    so metrics and saved predictions equal a single-process evaluation.
    """
    if world().size == 1:
        return predictions
    fields = {}
    for k in predictions.TENSOR_FIELDS:
        local = getattr(predictions, k)
        gathered = all_gather_cat(local.to(_comm_device()))
        fields[k] = interleave(gathered).to(local.device)
    return type(predictions)(**fields)


def _comm_device() -> torch.device:
    backend = dist.get_backend() if world().size > 1 else "gloo"
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def merge_sketch_(sketch) -> None:
    """Merge a :class:`~bayeslora.posteriors.lowrank.FrequentDirections` sketch over the ranks, in place.

    The ranks' sketch columns are sketched together in rank order (Frequent Directions sketches
    are mergeable); the shrinkage (the error bound) and the mass add up. The result is identical
    on every rank, and exact whenever all the columns seen span at most ``sketch_size`` dimensions.
    """
    if world().size == 1:
        return
    sketch._compress()  # flush the buffer into sketch.sketch [d, <= ℓ]
    device = sketch.sketch.device
    parts = all_gather_cat(sketch.sketch.to(_comm_device()), dim=1)
    shrinkage, mass = all_reduce_scalars(sketch.shrinkage, sketch.mass)
    sketch.sketch, sketch.shrinkage = parts[0].to(device), 0.0
    for part in parts[1:]:
        sketch.add(part.to(device))
    sketch._compress()
    sketch.shrinkage += shrinkage
    sketch.mass = mass


def reduce_sums_(accumulators: Sequence[object], *scalars: float) -> tuple[float, ...]:
    """Add up per-rank accumulators of sums over the data, in place, and return the summed ``scalars``.

    The contract: every floating tensor attribute of an accumulator (and of the plain objects it
    holds, e.g. the two Kronecker sides) is a sum over examples, and every
    :class:`~bayeslora.posteriors.lowrank.FrequentDirections` attribute is a sketch of one. Tensors
    are summed with :func:`all_reduce_sum_`, sketches merged with :func:`merge_sketch_`. This is
    the one call a fitting loop makes after its pass over its shard, e.g. in K-FAC
    ``loss, n_seen = reduce_sums_(accs, loss, n_seen)`` before the factors are finished.
    """
    if world().size == 1:
        return tuple(scalars)
    from .posteriors.lowrank import FrequentDirections

    tensors, sketches = [], []

    def visit(obj, depth: int) -> None:
        for _, value in sorted(vars(obj).items()):
            if isinstance(value, FrequentDirections):
                sketches.append(value)
            elif torch.is_tensor(value) and value.is_floating_point():
                tensors.append(value)
            elif depth < 2 and hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, type)):
                visit(value, depth + 1)

    for acc in accumulators:
        visit(acc, 0)
    all_reduce_sum_(tensors)
    for sketch in sketches:
        merge_sketch_(sketch)
    return all_reduce_scalars(*scalars)


__all__ = [
    "ShardSampler",
    "World",
    "all_gather_cat",
    "all_reduce_scalars",
    "all_reduce_sum_",
    "gather_predictions",
    "init_from_env",
    "interleave",
    "merge_sketch_",
    "reduce_sums_",
    "shard",
    "shutdown",
    "sync_step_",
]
