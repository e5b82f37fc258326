"""Sweep support: GPU leases for parallel runs, a lock for the shared MAP cache, stale temporary files.

A sweep is a Hydra multirun (``bayeslora-run -m ...``); with the joblib launcher
(``hydra/launcher=parallel``, see ``configs/hydra/launcher/parallel.yaml``) several runs execute at once in
worker processes. Three things make that safe:

* :func:`run_device` – a run with ``device=auto`` on a machine with several GPUs *leases* one: it takes an
  exclusive file lock ``gpu<i>.slot<j>.lock`` for the first free (GPU, slot) pair, runs on ``cuda:<i>`` and
  releases the lock when it ends (also when the process dies: the OS drops the lock). So ``n_jobs`` parallel
  jobs on ``n`` GPUs spread over the GPUs whatever order they finish in; with more jobs than
  ``n * gpu_slots`` the extra ones wait for a free GPU. With one GPU (or none) nothing is leased.
* :func:`file_lock` – the MAP cache shared by the methods of a sweep is filled under a lock, so two parallel
  runs that need the same MAP adapter train it once (the second waits, then loads it).
* :func:`remove_stale_temporaries` – a run killed while writing leaves ``.<name>.<random>.tmp`` files (the
  atomic writes of :mod:`bayeslora.io`); the next attempt of the run deletes them from its run directory.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

try:  # POSIX; on other systems runs are not coordinated (parallel GPU sweeps need a POSIX machine)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_DIR_NAME = "bayeslora-gpu-locks"


def default_lock_dir() -> Path:
    """Where GPU lease locks live: one directory per machine, shared by every sweep of a user."""
    return Path(tempfile.gettempdir()) / f"{LOCK_DIR_NAME}-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def _try_lock(path: Path):
    """An open file holding an exclusive lock on ``path``, or None if another process holds it."""
    f = open(path, "a+")  # noqa: SIM115 - the caller closes it (closing releases the lock)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


@contextlib.contextmanager
def lease_gpu(
    device_count: int, slots: int = 1, lock_dir: str | os.PathLike | None = None, poll_s: float = 0.5
) -> Iterator[int]:
    """Hold one of ``device_count * slots`` GPU slots for the duration of the block; yields the GPU index.

    Slots are tried GPU-major by slot (every GPU's slot 0 first), so jobs spread over the GPUs before any
    GPU takes a second job. Blocks (polling every ``poll_s`` seconds) while all slots are taken.

    Args:
        device_count: number of GPUs (``torch.cuda.device_count()``).
        slots: runs that may share one GPU at a time (small models: 2 or more).
        lock_dir: directory of the lock files (default: :func:`default_lock_dir`).
        poll_s: seconds between attempts while every slot is taken.
    """
    if not isinstance(device_count, int) or device_count < 1:
        raise ValueError(f"device_count: expected a positive int (number of GPUs), got {device_count!r}.")
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
        raise ValueError(f"gpu_slots: expected a positive int (runs per GPU at a time), got {slots!r}; e.g. 1.")
    if fcntl is None:  # pragma: no cover - Windows
        yield 0
        return
    root = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    root.mkdir(parents=True, exist_ok=True)
    order = [(gpu, slot) for slot in range(slots) for gpu in range(device_count)]
    while True:
        for gpu, slot in order:
            held = _try_lock(root / f"gpu{gpu}.slot{slot}.lock")
            if held is not None:
                try:
                    yield gpu
                finally:
                    held.close()
                return
        time.sleep(poll_s)


@contextlib.contextmanager
def run_device(device: str, gpu_slots: int = 1, lock_dir: str | os.PathLike | None = None) -> Iterator[str]:
    """The device a run uses: ``device`` itself, or with ``"auto"`` and several GPUs a leased ``"cuda:<i>"``.

    The leased GPU is also made the current CUDA device inside the block (restored on exit), so code that
    allocates on the default CUDA device lands on the leased GPU too.
    """
    if str(device) != "auto":
        yield str(device)
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count <= 1:
        yield "auto"
        return
    with lease_gpu(count, gpu_slots, lock_dir) as gpu, torch.cuda.device(gpu):
        yield f"cuda:{gpu}"


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive, blocking lock on ``path`` (created if missing) for the duration of the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def remove_stale_temporaries(*dirs: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (``.*.tmp``) an interrupted run left directly inside ``dirs``.

    Only call this for directories no other process writes to at the time (a run directory is owned by its
    run; a MAP cache entry by the holder of its lock). Returns the removed paths.
    """
    removed = []
    for root in map(Path, dirs):
        if not root.is_dir():
            continue
        for path in root.glob(".*.tmp"):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed
