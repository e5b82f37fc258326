"""The keys each group of the run config takes: an unknown key is an error, never silently ignored.

Hydra checks overrides of existing keys, but ``+group.key=value`` adds any key, and a key a config file sets
but no code reads would be ignored without a word (``+lora.target_modules=[...]`` used to train query/value
regardless). :func:`check_run_config` runs before anything is loaded and names the key, the keys its group
takes and the fix. The method group is checked against the method's own options
(:func:`bayeslora.posteriors.method_defaults`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

TOP_LEVEL = frozenset(
    {"model", "lora", "data", "method", "train", "params", "eval", "seed", "prior_precision", "device", "gpu_slots",
     "dtype", "results_dir", "method_label", "run_name", "run_dir", "map_cache", "force", "hydra", "stages", "logger",
     "prefix_cache"}
)  # fmt: skip
DATA_KEYS = frozenset({"name", "task", "root", "max_length", "max_train", "max_eval", "val_size", "options", "answers"})
MODEL_KEYS = frozenset({"name", "format", "lora_targets"})
PARAMS_KEYS = frozenset({"include", "exclude", "include_head", "lora_tensors"})
PREFIX_CACHE_KEYS = frozenset({"enabled", "dtype", "dir"})
EVAL_KEYS = frozenset({"splits", "n_samples", "temperature_row", "reliability_diagram", "batch_size", "ood", "answers"})
ANSWERS_KEYS = frozenset({"n_samples", "max_new_tokens", "max_eval"})


def group_keys() -> dict[str, frozenset[str]]:
    """The keys every group takes (LoRA and training keys from their dataclasses)."""
    from .models import LoraSpec
    from .train import TrainConfig

    lora = {f.name for f in dataclasses.fields(LoraSpec)} - {"seed", "extra"}
    train = {f.name for f in dataclasses.fields(TrainConfig)} - {"seed", "prior_precision", "checkpoint_dir"}
    return {
        "model": MODEL_KEYS,
        "lora": frozenset(lora),
        "data": DATA_KEYS,
        "train": frozenset(train | {"batch_size", "group_by_length"}),
        "params": PARAMS_KEYS,
        "eval": EVAL_KEYS,
        "prefix_cache": PREFIX_CACHE_KEYS,
    }


INSTANTIATE_KEYS = frozenset({"_target_", "_partial_", "_convert_", "_recursive_"})


def _unknown(where: str, found: Mapping[str, Any], allowed: frozenset[str] | set[str]) -> None:
    unknown = sorted(set(found) - set(allowed) - (INSTANTIATE_KEYS if where else set()))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ValueError(
            f"{key}: unknown key (config {where or 'top level'} takes {sorted(allowed)}); remove it or fix its name "
            "(a '+key=value' override adds keys that nothing reads)."
        )


def check_run_config(cfg: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first unknown key of any group of a resolved run config."""
    from .posteriors import METHODS, method_defaults

    _unknown("", cfg, TOP_LEVEL)
    for group, allowed in group_keys().items():
        node = cfg.get(group)
        if not isinstance(node, Mapping):
            raise ValueError(f"{group}: expected a config group (a mapping), got {type(node).__name__}.")
        _unknown(group, node, allowed)
    answers = cfg["eval"].get("answers")
    if answers is not None:
        if not isinstance(answers, Mapping):
            raise ValueError(
                f"eval.answers: expected null (off) or a mapping {{n_samples, max_new_tokens, max_eval}}, got "
                f"{answers!r}; e.g. eval.answers='{{n_samples: 8, max_new_tokens: 16}}'."
            )
        _unknown("eval.answers", answers, ANSWERS_KEYS)
        if cfg["model"].get("format") != "generative":
            raise ValueError(
                f"eval.answers: answer-level uncertainty needs free-form answers (model.format=generative), got "
                f"format {cfg['model'].get('format')!r}; set data/model to a generative task or eval.answers=null."
            )
    method = cfg.get("method") or {}
    name = method.get("name")
    if name not in METHODS:
        raise ValueError(f"method: unknown method {name!r}; expected one of {sorted(METHODS)}.")
    _unknown("method", method, {"name", *method_defaults(name)})
