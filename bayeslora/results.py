"""The results store: the run record, what identifies a run, and how stored runs are collected and told apart.

A run directory holds ``metrics.json`` (a :class:`RunRecord`, written last and atomically) and ``predictions.pt``
(per-example :class:`~bayeslora.metrics.Predictions` by key: each split, ``<split>_ts`` for its
temperature-scaled row, ``ood/<name>`` and ``ood/<name>_ts`` for shifted sets). :func:`collect` reads every
record under a results directory, :func:`select` keeps one model (and training set), :func:`row_variants`
gives a record's table rows. :mod:`bayeslora.tables` and :mod:`bayeslora.figures` are built on these.

A run is identified by **everything that changes its result**: the resolved config minus the keys in
:data:`RUNTIME_KEYS` (where and how it runs: devices, paths of the results store, progress bars, evaluation
batch size, names). The identity is written into every ``metrics.json`` (``"identity"``, with ``"run_id"``
and ``"setting_id"``), and

* the run directory contains the ``setting_id`` (the identity without the seed), so a sweep over *any*
  result-changing key yields distinct runs (``<data>/<model>/<method_label>/<setting_id>/seed_<seed>``, via
  the ``${bayeslora_setting:}`` resolver in ``configs/config.yaml``);
* a stored run is reused only when its identity equals the requested one; otherwise
  :func:`identity_mismatch` names the differing keys and the run stops with that error;
* the MAP cache key (:func:`map_identity`) is the identity without the keys that only act after the MAP
  (``method``, ``eval``), so every setting that changes the MAP adapter is part of it;
* tables label each row with the method label plus the settings that distinguish runs sharing that label
  and column (:func:`label_runs`), e.g. ``kfac_laplace (prior_precision=0.01)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from .io import load_torch, save_json

TS_SUFFIX = " + TS"  # a method's temperature-scaled row is labelled f"{label}{TS_SUFFIX}"
TS_KEY = "_ts"  # ... and its split / OOD set keys end in TS_KEY
OOD_PREFIX = "ood/"  # predictions.pt key of a shifted set: f"{OOD_PREFIX}{name}"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.pt"

# Dotted keys that never change a run's result: where and how it runs, what it is called.
RUNTIME_KEYS = frozenset(
    {
        "hydra",
        "device",
        "gpu_slots",
        "force",
        "stages",  # the study's staged sweeps (read by its script), not a setting of one run
        "logger",  # an experiment tracker watches the run
        "results_dir",
        "run_dir",
        "run_name",
        "map_cache",
        "method_label",
        "data.root",  # where the files are read from (machine-specific); the data's provenance is in data_info
        "train.progress",
        "method.progress",
        "method.train.progress",
        "method.keep_on_device",  # ensemble members on the device or on CPU: same numbers
        "method.chunk_size",  # examples per GLM forward: bounds memory, same numbers
        "eval.batch_size",  # padding only (attention masks make results equal up to float rounding)
        "eval.reliability_diagram",
        "prefix_cache.dir",  # where the cached prefix states are kept (keyed by everything they depend on)
    }
)
# Keys added after results were stored, with the value that reproduces what runs did before they existed: at that
# value a key is left out of the identity, so stored runs keep their ids (and are never silently re-labelled); any
# other value is part of the identity. The value of an entry must never change.
ADDED_KEYS: dict[str, Any] = {
    "eval.answers": None,  # answer-level uncertainty of free-form answers (bayeslora.answers): off
}
# Keys that only act after the MAP adapter is trained (the MAP cache ignores them).
POST_MAP_KEYS = frozenset({"method", "eval"})
RESOLVER = "bayeslora_setting"


def _plain(cfg: Any) -> Any:
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _drop(tree: Mapping[str, Any], keys: Iterable[str], prefix: str = "") -> dict[str, Any]:
    keys = set(keys)
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if path in keys:
            continue
        out[k] = _drop(v, keys, f"{path}.") if isinstance(v, Mapping) else v
    return out


_REFERENCE = re.compile(r"^\$\{[A-Za-z_][\w.]*\}$")  # ${seed}, ${train.lr}: a value wired to another key


def _identity_tree(node: DictConfig, prefix: str = "") -> dict[str, Any]:
    """The identity keys of a config node: runtime keys and keys wired to another key (derived) left out."""
    out: dict[str, Any] = {}
    for key in node:
        path = f"{prefix}{key}"
        if path in RUNTIME_KEYS:
            continue
        raw = node._get_node(key)
        reference = OmegaConf.is_interpolation(node, key) and _REFERENCE.match(str(raw._value()))
        if reference and _derived(path, str(raw._value())[2:-1]):
            continue  # e.g. method.seed: ${seed} — determined by a key already in the identity
        value = node[key]
        if path in ADDED_KEYS and _plain(value) == ADDED_KEYS[path]:
            continue  # a key added later, at the value that reproduces the runs stored before it
        out[key] = _identity_tree(value, f"{path}.") if isinstance(value, DictConfig) else _plain(value)
    return out


def _derived(path: str, target: str) -> bool:
    """Whether ``path: ${target}`` adds nothing to the identity: its target is an identity key itself (not a runtime
    key) and, for a key that shapes the MAP, not a post-MAP key (else the MAP cache key would lose it)."""
    parts = target.split(".")
    if any(".".join(parts[: i + 1]) in RUNTIME_KEYS for i in range(len(parts))):
        return False
    return not (path.split(".")[0] not in POST_MAP_KEYS and parts[0] in POST_MAP_KEYS)


def effective_dtype(dtype: Any, device: Any) -> str:
    """The dtype a run computes in (:func:`bayeslora.models.resolve_dtype`: ``auto`` is bf16 on a GPU and fp32 on
    the CPU); a device is runtime-only, but the precision it implies changes the result. A dtype or device the
    run cannot use is kept as written (the run's own checks name it)."""
    import torch

    from .models import resolve_dtype

    device = str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return str(resolve_dtype(dtype, torch.device(device))).removeprefix("torch.")
    except (ValueError, RuntimeError):
        return str(dtype)


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """The result-changing part of a composed run config (a JSON-able nested dict).

    Keys wired to another key (``method.seed: ${seed}``) are left out (they are determined by it), so the seeds of
    one setting share its setting id; ``dtype`` is the effective one.
    """
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"cfg: expected a composed config (DictConfig), got {type(cfg).__name__}.")
    tree = _identity_tree(cfg)
    if "dtype" in tree:
        tree["dtype"] = effective_dtype(tree["dtype"], cfg.get("device", "auto"))
    return json.loads(json.dumps(tree, sort_keys=True, default=str))


def digest(tree: Mapping[str, Any], length: int = 12) -> str:
    """A short stable hash of a JSON-able tree."""
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:length]


def setting_id(identity: Mapping[str, Any]) -> str:
    """The hash of an identity without its seed: the runs of one setting differ only in the seed."""
    return digest({k: v for k, v in identity.items() if k != "seed"}, 10)


def run_id(identity: Mapping[str, Any]) -> str:
    return digest(identity, 16)


def map_identity(identity: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a run identity (:func:`run_identity`) that determines the MAP adapter (all but method, eval)."""
    return _drop(identity, POST_MAP_KEYS)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (lists are leaves)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_MISSING = "<absent>"


def identity_diff(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (stored value, requested value)}`` for every key where two identities differ."""
    a, b = flatten(stored), flatten(requested)
    pairs = {k: (a.get(k, _MISSING), b.get(k, _MISSING)) for k in sorted(set(a) | set(b))}
    return {k: pair for k, pair in pairs.items() if pair[0] != pair[1]}


def identity_mismatch(where: str, stored: Mapping[str, Any] | None, requested: Mapping[str, Any]) -> str | None:
    """None when ``stored`` equals ``requested``, else an error message naming the differing keys and the fix."""
    if stored is None:
        return (
            f"{where}: holds a run without a stored identity (made by an older bayeslora), so it cannot be checked "
            "against this config; re-run it with force=true, or use another results_dir."
        )
    diff = identity_diff(stored, requested)
    if not diff:
        return None
    shown = "; ".join(f"{k}: stored {a!r}, requested {b!r}" for k, (a, b) in list(diff.items())[:8])
    more = f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""
    return (
        f"{where}: holds a run made with a different config ({shown}{more}); it is not reused. Re-run with "
        "force=true to replace it, or give this run its own directory (another results_dir or method_label)."
    )


_RESOLVING: list[bool] = []  # re-entrance guard of the resolver (a setting that refers to run_dir)


def _setting_resolver(*, _root_: DictConfig) -> str:
    """``${bayeslora_setting:}``: the setting id of the config being resolved (its run keys left out).

    A missing mandatory value (``???``) gives the placeholder ``missing`` (``run`` then names the key); a setting
    that refers to ``run_dir`` / ``run_name`` (which depend on the settings) is an error that says so."""
    from omegaconf.errors import MissingMandatoryValue

    if _RESOLVING:
        raise ValueError(
            "a setting refers to run_dir or run_name, which are derived from the settings themselves; refer to "
            "results_dir (e.g. ${results_dir}/ckpts) instead."
        )
    _RESOLVING.append(True)
    try:
        return setting_id(run_identity(_root_))
    except MissingMandatoryValue:
        return "missing"
    finally:
        _RESOLVING.pop()


def register_resolver() -> None:
    """Register ``${bayeslora_setting:}`` with OmegaConf (idempotent)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, _setting_resolver)


register_resolver()


# ----------------------------------------------------------------------------- the run record
@dataclass
class RunRecord:
    """One run's ``metrics.json``.

    Attributes (as written): the run's task / data config name / model / method / method label / seed / prior
    precision; ``num_classes`` and the split sizes; ``splits`` (metrics of every evaluated split and of its
    ``_ts`` row); ``label_counts`` (per split); ``temperature`` (of the ``+ TS`` rows); ``ood`` / ``ood_info``
    (shifted sets); the main split's ``acc``, ``ece``, ``nll``, ``brier``, ``aurc`` (a regression run: ``nll``,
    ``rmse``, ``cov50``, ``cov90``, ``cov95``, ``rce``, :func:`bayeslora.metrics.regression_metrics`); ``data_info``
    (provenance),
    ``map`` (the MAP training or cache entry), ``timings``, ``device``, ``run_dir``, ``config`` (resolved),
    ``identity`` / ``run_id`` / ``setting_id`` (:func:`run_identity`), ``bayeslora_version``,
    ``reliability_diagram``. Keys this version does not know are kept in ``extra``.
    In memory only: ``directory`` (where it was read from) and ``label`` (its table row, :func:`label_runs`).
    """

    task: str
    data: str
    model: str
    method: str
    method_label: str
    seed: int
    prior_precision: float | None = None
    num_classes: int | None = None
    num_train: int | None = None
    num_validation: int | None = None
    num_test: int | None = None
    data_info: dict = field(default_factory=dict)
    map: dict = field(default_factory=dict)
    splits: dict = field(default_factory=dict)
    label_counts: dict = field(default_factory=dict)
    temperature: float | None = None
    ood: dict | None = None
    ood_info: dict | None = None
    acc: float | None = None
    ece: float | None = None
    nll: float | None = None
    brier: float | None = None
    aurc: float | None = None
    rmse: float | None = None
    cov50: float | None = None
    cov90: float | None = None
    cov95: float | None = None
    rce: float | None = None
    reliability_diagram: str | None = None
    timings: dict = field(default_factory=dict)
    device: str | None = None
    run_dir: str | None = None
    config: dict = field(default_factory=dict)
    identity: dict | None = None
    run_id: str | None = None
    setting_id: str | None = None
    bayeslora_version: str | None = None
    extra: dict = field(default_factory=dict)
    directory: Path | None = field(default=None, compare=False)
    label: str | None = field(default=None, compare=False)

    _MEMORY = ("extra", "directory", "label")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``metrics.json`` (fields left at their empty default, None or {}, are left out)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self._MEMORY}
        return {**self.extra, **{k: v for k, v in out.items() if v is not None and v != {}}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], directory: str | os.PathLike | None = None) -> RunRecord:
        known = {f.name for f in fields(cls)} - set(cls._MEMORY)
        missing = [k for k in ("task", "data", "model", "method", "method_label", "seed") if k not in d]
        if missing:
            where = f"{directory}/{METRICS_FILE}" if directory is not None else METRICS_FILE
            raise ValueError(
                f"{where}: not a bayeslora run record (missing {missing}); it was not written by bayeslora-run."
            )
        record = cls(**{k: v for k, v in d.items() if k in known})
        record.extra = {k: v for k, v in d.items() if k not in known}
        record.directory = Path(directory) if directory is not None else None
        return record

    def write(self, path: str | os.PathLike) -> Path:
        """Write ``metrics.json`` atomically."""
        return save_json(self.to_dict(), path)

    @classmethod
    def read(cls, path: str | os.PathLike) -> RunRecord:
        path = Path(path)
        return cls.from_dict(json.loads(path.read_text()), path.parent)

    def predictions(self) -> dict[str, Any]:
        """The run's ``predictions.pt`` (``{key: Predictions state}``)."""
        if self.directory is None:
            raise ValueError("directory: this record was not read from a run directory; use RunRecord.read().")
        return load_torch(self.directory / PREDICTIONS_FILE)

    def metrics(self, key: str, ood: bool = False) -> dict[str, Any] | None:
        """The stored metrics of a split (``ood``: of a shifted set), or None."""
        return (self.ood or {}).get(key) if ood else self.splits.get(key)


def collect(results_dir: str | os.PathLike) -> list[RunRecord]:
    """Every run record under ``results_dir`` (hidden directories such as the MAP cache are skipped), labelled."""
    root = Path(results_dir)
    if not root.is_dir():
        raise ValueError(f"results_dir: {str(root)!r} is not a directory; pass the results_dir of a sweep.")
    runs = [
        RunRecord.read(path)
        for path in sorted(root.rglob(METRICS_FILE))
        if not any(part.startswith(".") for part in path.relative_to(root).parts)
    ]
    if not runs:
        raise ValueError(f"results_dir: no {METRICS_FILE} found under {str(root)!r}; run bayeslora-run first.")
    return label_runs(runs)


def select(runs: list[RunRecord], *, model: str | None, data: str | None, where: str) -> list[RunRecord]:
    """The runs of one model (required when there are several) and optionally one training dataset."""
    for key, value in (("model", model), ("data", data)):
        if value is not None:
            runs = [r for r in runs if getattr(r, key) == value]
            if not runs:
                raise ValueError(f"{key}: no runs with {key}={value!r} under {where!r}.")
    models = sorted({r.model for r in runs})
    if len(models) > 1:
        raise ValueError(f"model: {where!r} holds runs of several models {models}; pass model= (--model) for one.")
    return runs


def row_label(run: RunRecord) -> str:
    """The table row of a run: its method label plus any distinguishing settings (set by :func:`collect`)."""
    return run.label or run.method_label


def row_variants(run: RunRecord, ts_rows: bool) -> list[tuple[str, str]]:
    """(row label, key suffix): the method's own row and, with ``ts_rows``, its temperature-scaled row."""
    label = row_label(run)
    return [(label, ""), *([(label + TS_SUFFIX, TS_KEY)] if ts_rows else [])]


# ----------------------------------------------------------------------------- telling stored runs apart
def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_short(v) for v in value) + "]"
    return str(value)


def distinguishing_keys(runs: Iterable[RunRecord]) -> list[str]:
    """The identity keys (dotted) that take several values among runs of one label *within one column*.

    Keys that only vary with the column (the dataset: ``data.*``) or with the seed are not distinguishing.
    """
    by_column: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        flat = flatten(run.identity or {})
        flat.pop("seed", None)
        by_column[str(run.data)].append(flat)
    keys: set[str] = set()
    for flats in by_column.values():
        every = set().union(*flats) if flats else set()
        for k in every:
            if len({json.dumps(f.get(k, _MISSING), sort_keys=True, default=str) for f in flats}) > 1:
                keys.add(k)
    return sorted(keys)


def label_runs(runs: list[RunRecord]) -> list[RunRecord]:
    """Set ``run.label``: the method label, plus ``(key=value, ...)`` of the distinguishing settings.

    Runs sharing a method label and a column but made with different settings (e.g. a prior-precision sweep)
    get one row each instead of being averaged as if they were seeds.
    """
    by_label: dict[tuple[str, str], list[RunRecord]] = defaultdict(list)
    for run in runs:  # a table holds one model: settings are told apart within a model
        by_label[(run.model, run.method_label)].append(run)
    for (_, label), group in by_label.items():
        keys = distinguishing_keys(group)
        for run in group:
            if not keys:
                run.label = label
                continue
            flat = flatten(run.identity or {})
            run.label = f"{label} (" + ", ".join(f"{k}={_short(flat.get(k, _MISSING))}" for k in keys) + ")"
    return runs
