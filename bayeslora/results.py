"""What identifies a run, and how stored runs are told apart.

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
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Dotted keys that never change a run's result: where and how it runs, what it is called.
RUNTIME_KEYS = frozenset(
    {
        "hydra",
        "device",
        "gpu_slots",
        "force",
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
    }
)
# Keys that only act after the MAP adapter is trained (the MAP cache ignores them).
POST_MAP_KEYS = frozenset({"method", "eval"})
RESOLVER = "bayeslora_setting"


def _plain(cfg: Any) -> Any:
    if isinstance(cfg, DictConfig):
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


def run_identity(cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """The result-changing part of a run config (a JSON-able nested dict)."""
    return json.loads(json.dumps(_drop(_plain(cfg), RUNTIME_KEYS), sort_keys=True, default=str))


def digest(tree: Mapping[str, Any], length: int = 12) -> str:
    """A short stable hash of a JSON-able tree."""
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:length]


def setting_id(identity: Mapping[str, Any]) -> str:
    """The hash of an identity without its seed: the runs of one setting differ only in the seed."""
    return digest({k: v for k, v in identity.items() if k != "seed"}, 10)


def run_id(identity: Mapping[str, Any]) -> str:
    return digest(identity, 16)


def map_identity(cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """The part of the identity that determines the MAP adapter (everything but ``method`` and ``eval``)."""
    return _drop(run_identity(cfg), POST_MAP_KEYS)


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


def _setting_resolver(*, _root_: DictConfig) -> str:
    """``${bayeslora_setting:}``: the setting id of the config being resolved (its run keys left out)."""
    top = [k for k in _root_ if k not in RUNTIME_KEYS]
    return setting_id(run_identity(OmegaConf.masked_copy(_root_, top)))


def register_resolver() -> None:
    """Register ``${bayeslora_setting:}`` with OmegaConf (idempotent)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, _setting_resolver)


register_resolver()


# ----------------------------------------------------------------------------- telling stored runs apart
def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_short(v) for v in value) + "]"
    return str(value)


def distinguishing_keys(runs: Iterable[Mapping[str, Any]]) -> list[str]:
    """The identity keys (dotted) that take several values among runs of one label *within one column*.

    Keys that only vary with the column (the dataset: ``data.*``) or with the seed are not distinguishing.
    """
    by_column: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        flat = flatten(run.get("identity") or {})
        flat.pop("seed", None)
        by_column[str(run.get("data"))].append(flat)
    keys: set[str] = set()
    for flats in by_column.values():
        every = set().union(*flats) if flats else set()
        for k in every:
            if len({json.dumps(f.get(k, _MISSING), sort_keys=True, default=str) for f in flats}) > 1:
                keys.add(k)
    return sorted(keys)


def label_runs(runs: list[dict]) -> list[dict]:
    """Set ``run["label"]``: the method label, plus ``(key=value, ...)`` of the distinguishing settings.

    Runs sharing a method label and a column but made with different settings (e.g. a prior-precision sweep)
    get one row each instead of being averaged as if they were seeds.
    """
    by_label: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        by_label[run["method_label"]].append(run)
    for label, group in by_label.items():
        keys = distinguishing_keys(group)
        for run in group:
            if not keys:
                run["label"] = label
                continue
            flat = flatten(run.get("identity") or {})
            run["label"] = f"{label} (" + ", ".join(f"{k}={_short(flat.get(k, _MISSING))}" for k in keys) + ")"
    return runs
