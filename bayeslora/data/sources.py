"""Where raw rows come from: local files under a data root, or the Hugging Face hub.

Everything goes through :func:`datasets.load_dataset`: ``load_dataset("json" | "csv", data_files=...)`` for
local files and ``load_dataset(hub_id, config, split=...)`` for the hub. Local files follow the layout of the
project's offline copies::

    <root>/<task dir>/<split>.jsonl        e.g. <root>/sst2/train.jsonl, <root>/winogrande/train_s.jsonl

The data root is resolved by :func:`data_root`: an explicit ``root`` argument, else the environment variable
``BAYESLORA_DATA``, else ``None`` (the hub). ``root="demo"`` names the small real SST-2 subset shipped inside
the package (``bayeslora/data/demo``, see its README).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets

ENV_VAR = "BAYESLORA_DATA"
DEMO = "demo"
DEMO_ROOT = Path(__file__).resolve().parent / DEMO
_EXPECTED = {"json": "one JSON object per line", "csv": "a CSV file with a header row", "text": "one text per line"}
_FIX = (
    f"set {ENV_VAR} or pass root= to a directory laid out as <root>/<task>/<split>.jsonl "
    f"(e.g. root='{DEMO}' for the packaged SST-2 subset), or root=None with network access for the hub"
)


@dataclass(frozen=True)
class HubSource:
    """A dataset on the Hugging Face hub.

    Attributes:
        hub_id: repository id, e.g. ``"nyu-mll/glue"``.
        config: the dataset config (``None`` for the default one).
        splits: ``{role: hub split}``; role is ``"train"``, ``"validation"`` or ``"test"``.
    """

    hub_id: str
    config: str | None
    splits: Mapping[str, str]

    def describe(self) -> str:
        """``"hub:<id>/<config>"``, the source recorded in ``TaskData.info``."""
        return f"hub:{self.hub_id}" + (f"/{self.config}" if self.config else "")


def data_root(root: str | os.PathLike | None = None) -> Path | None:
    """Resolve the data root.

    Args:
        root: a directory laid out as ``<root>/<task>/<split>.jsonl``, the special value ``"demo"`` (the
            SST-2 subset shipped in the package), or ``None``.

    Returns:
        The explicit ``root`` if given, else ``$BAYESLORA_DATA`` if set, else ``None`` (load from the hub).

    Raises:
        FileNotFoundError: the resolved root is not a directory.
    """
    source = "root"
    if root is None or str(root) == "":
        root = os.environ.get(ENV_VAR) or None
        source = f"${ENV_VAR}"
    if root is None:
        return None
    if str(root) == DEMO:
        return DEMO_ROOT
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{source}: expected a data directory, got {str(path)!r}, which does not exist; {_FIX}."
        )
    return path


@contextmanager
def _quiet_progress() -> Iterator[None]:
    """Silence the datasets progress bars for the duration, restoring the previous setting afterwards."""
    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            datasets.utils.logging.enable_progress_bar()


def load_file(path: str | os.PathLike, *, task: str, split: str, kind: str = "json") -> datasets.Dataset:
    """Load one local ``.jsonl`` / ``.json`` (``kind="json"``), ``.csv`` (``kind="csv"``) or text file (``"text"``).

    Args:
        path: the file.
        task: task name, for error messages.
        split: split role (``"train"``, ``"validation"``, ``"test"``), for error messages.
        kind: the :func:`datasets.load_dataset` builder, ``"json"``, ``"csv"`` or ``"text"``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty or cannot be parsed.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file: task {task!r} split {split!r} expected the file {str(path)!r}, not found.")
    if path.stat().st_size == 0:
        raise _empty_error(task, split, path)
    try:
        with _quiet_progress():
            ds = datasets.load_dataset(kind, data_files={"data": str(path)}, split="data")
    except Exception as err:  # the builders raise StopIteration, ArrowInvalid, DatasetGenerationError, ...
        raise ValueError(
            f"data file: task {task!r} split {split!r}: could not read {str(path)!r} as {kind} "
            f"({type(err).__name__}: {err}); expected {_EXPECTED[kind]}. "
            "Fix the file or use the task that matches it ('jsonl' or 'csv')."
        ) from err
    if len(ds) == 0:
        raise _empty_error(task, split, path)
    return ds


def _empty_error(task: str, split: str, path: Path) -> ValueError:
    return ValueError(
        f"data file: task {task!r} split {split!r}: {str(path)!r} has no rows; expected at least one example. "
        "Point the task at a non-empty file."
    )


def load_local_splits(
    root: Path, task: str, directory: str, files: Mapping[str, str]
) -> tuple[dict[str, datasets.Dataset], dict[str, str]]:
    """Load ``{role: <root>/<directory>/<stem>.jsonl}``.

    Args:
        root: the resolved data root.
        task: task name, for error messages.
        directory: the task's folder under ``root``.
        files: ``{role: file stem}``.

    Returns:
        ``({role: Dataset}, {role: path})``.

    Raises:
        FileNotFoundError: a file is missing; the message names the data root, ``BAYESLORA_DATA`` and ``root=``.
    """
    out, paths = {}, {}
    for role, stem in files.items():
        path = root / directory / f"{stem}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(
                f"root: task {task!r} needs {directory}/{stem}.jsonl for its {role} split, but {str(path)!r} does "
                f"not exist under the data root {str(root)!r}; {_FIX}."
            )
        out[role] = load_file(path, task=task, split=role)
        paths[role] = str(path)
    return out, paths


def load_hub_splits(source: HubSource, task: str) -> dict[str, datasets.Dataset]:
    """Load ``{role: hub split}`` of ``source`` from the Hugging Face hub.

    Raises:
        FileNotFoundError: the dataset could not be loaded (offline, no network, missing dataset); the
            message names ``BAYESLORA_DATA`` and ``root=`` as the way to use local copies.
    """
    out = {}
    for role, split in source.splits.items():
        try:
            with _quiet_progress():
                out[role] = datasets.load_dataset(source.hub_id, source.config, split=split)
        except Exception as err:  # offline mode, no network, unknown dataset: one clear message
            raise FileNotFoundError(
                f"root: no data root was given (root=None and ${ENV_VAR} unset), so task {task!r} tried the hub "
                f"dataset {source.hub_id!r} config {source.config!r} split {split!r}, which could not be loaded "
                f"({type(err).__name__}: {err}); {_FIX}."
            ) from err
    return out
