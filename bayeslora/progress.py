"""Progress bars for every step a person waits for (one helper, so every bar behaves the same).

Bars are tqdm bars that disappear when done (``leave=False``) and switch themselves off when the output is not a
terminal (``disable=None``): a log file or a redirected stderr gets no bar debris (no ``\\x1b[A`` cursor moves).
``enabled=False`` turns a bar off everywhere (``progress=false`` in the configs, for the training bars);
``TQDM_DISABLE=1`` in the environment turns every bar off.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def bar(iterable: Iterable[Any] | None = None, *, desc: str, total: int | None = None, enabled: bool = True) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual one with ``total``), off on non-terminals and when not enabled."""
    if total is None and iterable is not None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    off = not enabled or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    return tqdm(iterable, desc=desc, total=total, disable=True if off else None, leave=False, dynamic_ncols=True)
