"""Seeded, reproducible splitting and subsampling of record lists.

Row orders come from :func:`permutation`, which sorts the row indices by a BLAKE2 hash of
``(purpose, seed, index)``. Unlike ``random.shuffle`` or NumPy generators, whose streams may change between
versions, this gives the same split on every Python / NumPy / platform, and different purposes (the validation
carve, the subsampling of each split) are independent for the same seed. Every function keeps the selected
rows in their file order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")

BOOLQ_TEST_SIZE = 1000
BOOLQ_TEST_SEED = 20240501  # fixed: every run seed shares one BoolQ test set
TEST_SUBSAMPLE_SEED = 0  # fixed: a max_eval subsample of the test split is shared by every run seed


def permutation(n: int, seed: int, purpose: str) -> list[int]:
    """A permutation of ``range(n)`` determined by ``(seed, purpose)`` alone."""

    def key(i: int) -> bytes:
        return hashlib.blake2b(f"{purpose}\0{seed}\0{i}".encode(), digest_size=16).digest()

    return sorted(range(n), key=key)


def resolve_size(size: float | int, n: int, name: str) -> int:
    """The number of rows ``size`` means out of ``n``: a fraction in (0, 1) or a count in [1, n - 1].

    Raises:
        ValueError: out of range, or fewer than two rows to split.
    """
    if n < 2:
        raise ValueError(f"{name}: cannot split {n} row(s) into two non-empty parts; provide more rows.")
    if isinstance(size, float) and 0.0 < size < 1.0:
        return min(n - 1, max(1, round(size * n)))
    if isinstance(size, int) and not isinstance(size, bool) and 1 <= size <= n - 1:
        return size
    raise ValueError(
        f"{name}: expected a fraction in (0, 1) or a row count in [1, {n - 1}] for {n} rows, got {size!r}; "
        "e.g. 0.1 for 10%."
    )


def carve(rows: Sequence[T], size: float | int, seed: int, purpose: str, name: str) -> tuple[list[T], list[T]]:
    """Split ``rows`` into ``(rest, held_out)`` with ``len(held_out) = resolve_size(size, len(rows))``.

    Args:
        rows: the rows to split.
        size: fraction or count of held-out rows.
        seed: the seed of the split.
        purpose: names the split, so different splits with one seed are independent.
        name: the argument named in errors (e.g. ``"val_size"``).
    """
    k = resolve_size(size, len(rows), name)
    held = set(permutation(len(rows), seed, purpose)[:k])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def subsample(rows: Sequence[T], k: int | None, seed: int, purpose: str) -> list[T]:
    """At most ``k`` rows of ``rows`` (all of them when ``k`` is None or not smaller), in file order."""
    if k is None or k >= len(rows):
        return list(rows)
    keep = sorted(permutation(len(rows), seed, purpose)[:k])
    return [rows[i] for i in keep]


def dev_only_test_size(n: int) -> int:
    """Test rows taken from a dev-only BoolQ file: 1000 (of the 3270 dev rows), or 30% of a file under 2000 rows."""
    return BOOLQ_TEST_SIZE if n >= 2 * BOOLQ_TEST_SIZE else max(1, round(0.3 * n))
