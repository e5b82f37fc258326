"""Random number generation without touching the caller's RNG: one helper for every forked, seeded region.

Sampling, dropout masks and data order are seeded from explicit seeds or ``torch.Generator`` objects; the global
RNG state (CPU and the model's CUDA device) is forked and restored around every region that must use it
(Pyro samples from the global RNG, dropout too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, RandomSampler


def cuda_devices(device: torch.device | str) -> list[int]:
    """The CUDA device indices whose RNG :func:`forked` forks for ``device`` (none on CPU)."""
    device = torch.device(device)
    return [device.index or 0] if device.type == "cuda" else []


@contextlib.contextmanager
def forked(device: torch.device | str, seed: int | None = None) -> Iterator[None]:
    """Fork the global RNG (CPU and ``device``'s CUDA RNG) for the block, seeded with ``seed`` if given."""
    with torch.random.fork_rng(devices=cuda_devices(device)):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def seed_from(generator: torch.Generator | None) -> int:
    """A seed drawn from ``generator`` (a fixed one without), so a forked region is reproducible."""
    if generator is None:
        return 0
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


@contextlib.contextmanager
def seeded(loader: DataLoader, seed: int, device: torch.device) -> Iterator[None]:
    """Seed dropout (a forked RNG) and the loader's shuffling (a ``RandomSampler`` or a length-grouped sampler:
    any sampler drawing from a ``generator``) for the duration; restore afterwards."""
    sampler = getattr(loader, "sampler", None)
    sampler = getattr(sampler, "base", sampler)  # distributed.shard(): the global sampler behind the rank's share
    shuffles = isinstance(sampler, RandomSampler) or isinstance(getattr(sampler, "generator", None), torch.Generator)
    old = sampler.generator if shuffles else None
    with forked(device, seed):
        if shuffles:
            sampler.generator = torch.Generator().manual_seed(seed)
        try:
            yield
        finally:
            if shuffles:
                sampler.generator = old
