"""One experiment run: data -> LoRA model -> MAP -> posterior -> metrics, driven by a Hydra config.

``run(cfg)`` is a plain function (tests and scripts call it with a composed config);
``main()`` is the thin ``@hydra.main`` entry point behind the ``bayeslora-run`` console script.

Each run writes into its run directory (``results_dir/<data>/<model>/<method>/seed_<seed>``):

* ``metrics.json`` – task, model, method, seed, acc/ece/nll/brier/aurc on the test split (and on
  every evaluated split), the temperature-scaled row, timings and the resolved config. It is
  written last and atomically: a run whose ``metrics.json`` exists is complete and is skipped.
* ``predictions.pt`` – per-example predictions of every split (tables can be recomputed).
* ``reliability.png`` – the reliability diagram of the method (and its temperature-scaled row).

With ``eval.ood`` (name -> options, see :mod:`bayeslora.ood`) the fitted posterior is also evaluated on
shifted test sets: ``metrics.json`` ``"ood"`` holds their metrics and OOD-detection AUROCs (entropy, MI),
``predictions.pt`` their predictions under ``"ood/<name>"``.

Parallel sweeps (joblib launcher): with ``device=auto`` and several GPUs each run leases a free GPU
(``gpu_slots`` runs per GPU), and the MAP cache is filled under a lock (see :mod:`bayeslora.sweep`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from . import distributed
from .adapter_state import list_checkpoints, load_trained, trained_values
from .calibration import fit_temperature, temperature_scaled
from .cli import config_dir
from .config_check import check_run_config
from .data import make_loader
from .hydra_store import register as register_method_defaults
from .io import load_torch, save_torch
from .metrics import CLASSIFICATION_KEYS, REGRESSION_KEYS, TOKEN_KEYS, Predictions
from .models import add_lora, load_model, load_tokenizer, locate
from .ood import ood_report, predict_ood, prepare_ood
from .posteriors import accepts
from .results import TS_SUFFIX, RunRecord, digest, identity_mismatch, map_identity, run_id, run_identity, setting_id
from .sweep import file_lock, remove_stale_temporaries, run_device
from .trackers import flat_metrics
from .train import TrainConfig, TrainResult, fit_noise_std
from .wrapper import BayesianLoRA

logger = logging.getLogger(__name__)
register_method_defaults()  # the method configs' defaults (Hydra ConfigStore), for any way of composing configs/


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose the run config without starting a Hydra app (for scripts and tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []), return_hydra_config=False)


def study_stages(overrides: list[str]) -> list[list[str]]:
    """The staged sweeps of a study: its experiment config's ``stages`` (lists of Hydra overrides), in order."""
    stages = compose(overrides).get("stages") or []
    return [[str(o) for o in stage] for stage in stages]


def _map_key(identity: Mapping[str, Any]) -> str:
    """The MAP cache key: a hash of every setting that changes the MAP adapter (:func:`results.map_identity`)."""
    return digest(map_identity(identity), 16)


def _train_config(cfg: Mapping[str, Any], checkpoint_dir: Path, steps_per_epoch: int) -> TrainConfig:
    """The MAP TrainConfig; checkpoints are saved once per epoch unless ``train.checkpoint_every`` says otherwise
    (they feed the checkpoint ensemble and cost one adapter-sized file each)."""
    t = dict(cfg["train"])
    t.pop("batch_size")  # the loader's options
    t.pop("group_by_length", None)
    t["checkpoint_every"] = t.get("checkpoint_every") or max(1, steps_per_epoch // int(t.get("grad_accum", 1)))
    t["checkpoint_dir"] = str(checkpoint_dir)
    return TrainConfig(**t, seed=int(cfg["seed"]), prior_precision=float(cfg["prior_precision"]))


def _fit_or_load_map(
    bl: BayesianLoRA, cfg: Mapping[str, Any], loader, run_dir: Path, identity: Mapping[str, Any], callbacks=()
) -> tuple[dict, Path]:
    """Train the MAP adapter, or load it from the cache shared by the runs of a sweep.

    Returns the training summary and the directory of the MAP training checkpoints. The cache entry is
    filled under a file lock: parallel runs needing the same MAP adapter train it once.
    """
    if not cfg.get("map_cache"):
        return _fit_map(bl, cfg, loader, run_dir / "checkpoints", None, callbacks)
    cache = Path(cfg["map_cache"]) / _map_key(identity)
    with file_lock(cache / ".lock"):  # only the lock holder writes here: temporaries found now are stale
        remove_stale_temporaries(cache, cache / "checkpoints")
        return _fit_map(bl, cfg, loader, cache / "checkpoints", cache, callbacks)


def _fit_map(bl: BayesianLoRA, cfg: Mapping[str, Any], loader, ckpt_dir: Path, cache: Path | None, callbacks=()):
    if cache is not None and (cache / "map.pt").is_file():
        state = load_torch(cache / "map.pt")
        load_trained(bl.fn, state["values"], argument="MAP cache")
        return {**state["train"], "cached": True}, ckpt_dir
    try:
        result: TrainResult = bl.fit_map(loader, _train_config(cfg, ckpt_dir, len(loader)), callbacks=callbacks)
    except BaseException:
        if cache is not None:  # a failed training leaves nothing in the shared cache (its checkpoints included)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        raise
    info = {
        "steps": result.steps,
        "seconds": result.seconds,
        "final_loss": result.losses[-1] if result.losses else None,
        "num_train": result.num_train,
        "checkpoints": result.checkpoints,
    }
    if cache is not None:
        values = {k: v.cpu() for k, v in trained_values(bl.fn).items()}
        save_torch({"values": values, "train": info}, cache / "map.pt")
    return {**info, "cached": False}, ckpt_dir


def _run_level_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What the run's top level gives the method: the one prior number, where the method takes one."""
    name = cfg["method"]["name"]
    return {"prior_precision": float(cfg["prior_precision"])} if accepts(name, "prior_precision") else {}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment; returns the metrics dict written to ``metrics.json``.

    The whole run holds a lock on its run directory, so two processes given the same run wait for each other
    instead of racing. A run directory that already holds ``metrics.json`` is reused (its stored record is
    returned with ``"skipped"`` saying why) only when the stored identity equals this config's
    (:mod:`bayeslora.results`); a different identity is an error naming the differing keys. ``force=true``
    recomputes. Temporary files an interrupted attempt left in the run directory are removed first.
    """
    if not isinstance(cfg, DictConfig):
        raise TypeError(
            f"cfg: expected the composed config (bayeslora.run.compose([...]) or the one Hydra passes), got "
            f"{type(cfg).__name__}; a resolved dict has lost which keys are wired to others, so its identity would "
            "differ from the composed config's."
        )
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra"))
    if missing:
        more = f" (and {missing[1:]})" if len(missing) > 1 else ""
        raise ValueError(
            f"{missing[0]}: a mandatory value is missing{more}; set it on the command line, e.g. {missing[0]}=... "
            "(the config file's comment shows a full command)."
        )
    identity = run_identity(cfg)  # from the composed config: keys wired to another key are left out
    cfg = OmegaConf.to_container(cfg, resolve=True)
    check_run_config(cfg)
    run_dir = Path(cfg["run_dir"])
    metrics_path = run_dir / "metrics.json"
    with file_lock(run_dir / ".run.lock"):
        if metrics_path.is_file() and not cfg.get("force", False):
            stored = RunRecord.read(metrics_path)
            problem = identity_mismatch(str(run_dir), stored.identity, identity)
            if problem:
                raise ValueError(problem)
            why = f"complete run with the same identity (run_id {stored.run_id}) found"
            logger.info("skipped %s: %s", run_dir, why)
            return {**stored.to_dict(), "skipped": why}
        remove_stale_temporaries(run_dir, run_dir / "checkpoints")
        with run_device(cfg["device"], int(cfg.get("gpu_slots") or 1)) as device:
            # the logger group (TensorBoard, W&B), on rank 0 only, closed however the run ends
            trackers = [_instantiate(cfg["logger"])] if cfg.get("logger") and distributed.world().main else []
            try:
                return _execute({**cfg, "device": device}, run_dir, metrics_path, identity, trackers)
            finally:
                for tracker in trackers:
                    tracker.close()


@dataclass
class _Setup:
    """What the run's stages share: the task, the model, the loaders (prefix-cached where configured)."""

    task: Any
    tokenizer: Any
    bl: BayesianLoRA
    train_loader: Any
    loaders: dict[str, Any]
    ood_sets: dict
    prepare: Any  # the prefix cache's loader transform, or None
    classes: bool  # whether the run is evaluated as classification (its metrics, the + TS row, the diagram)


def _execute(
    cfg: dict[str, Any], run_dir: Path, metrics_path: Path, identity: dict[str, Any], trackers: list
) -> dict[str, Any]:
    """The stages of a run: setup (data and every OOD set, checked before any training; the model; the loaders) ->
    fit (the MAP the method needs, then the posterior) -> predict (every split, the OOD sets) -> score (the record,
    the + TS row, the OOD report) -> write (predictions, diagram, ``metrics.json`` last, the trackers)."""
    t0 = time.perf_counter()
    logger.info("run %s (setting %s, run %s)", run_dir, setting_id(identity), run_id(identity))
    logger.info("config: %s", json.dumps(identity, sort_keys=True, default=str))
    setup = _setup(cfg)
    timings: dict[str, float] = {"setup_s": time.perf_counter() - t0}
    sizes = (len(setup.task.train), len(setup.task.validation), len(setup.task.test))
    logger.info("data: %s train / %s validation / %s test rows of %s (%s %s); setup %.1f s", *sizes,
                cfg["data"]["task"], setup.task.num_classes,
                "output, regression" if setup.task.is_regression else "classes", timings["setup_s"])  # fmt: skip
    map_info = _fit(cfg, setup, run_dir, identity, trackers, timings)
    preds, ood_preds, ood_info = _predict(cfg, setup, timings)
    result = _score(cfg, setup, map_info, preds, ood_preds, ood_info)
    answers = _answers(cfg, setup, result, timings)
    return _write(cfg, setup, result, preds, run_dir, metrics_path, identity, trackers, timings, t0, answers)


def _setup(cfg: dict[str, Any]) -> _Setup:
    tokenizer = load_tokenizer(locate(cfg["model"]["name"]), cfg["model"]["format"])
    task = _build_task(cfg, tokenizer)
    classes = _class_evaluation(cfg, task)  # before any training
    ood_sets = _prepare_ood(cfg, tokenizer, task)
    bl = _build_model(cfg, task)
    tcfg = cfg["train"]
    train_loader = make_loader(task.train, tokenizer, batch_size=tcfg["batch_size"], shuffle=True,
                               seed=int(cfg["seed"]), group_by_length=bool(tcfg.get("group_by_length")))  # fmt: skip
    eval_bs = cfg["eval"]["batch_size"]
    loaders = {
        "validation": make_loader(task.validation, tokenizer, batch_size=eval_bs),
        "test": make_loader(task.test, tokenizer, batch_size=eval_bs),
    }
    prepare = _prefix_cache(cfg, bl)
    if prepare is not None:
        t = time.perf_counter()
        train_loader, loaders = prepare(train_loader), {k: prepare(v) for k, v in loaders.items()}
        logger.info(
            "%s: prefix states of %s cached in %.1f s", bl.fn.prefix, ["train", *loaders], time.perf_counter() - t
        )
    return _Setup(task, tokenizer, bl, train_loader, loaders, ood_sets, prepare, classes)


def _fit(cfg, setup: _Setup, run_dir: Path, identity, trackers, timings: dict[str, float]) -> dict[str, Any]:
    """The MAP adapter when the method needs one (trained or from the MAP cache), then the posterior."""
    bl, task, train_loader = setup.bl, setup.task, setup.train_loader
    t = time.perf_counter()
    map_info: dict[str, Any] = {}
    needs, checkpoints = bl.posterior.needs, None
    if needs.map_adapter:
        map_info, ckpt_dir = _fit_or_load_map(bl, cfg, train_loader, run_dir, identity, trackers)
        if needs.checkpoints:
            checkpoints = [str(p) for p in list_checkpoints(ckpt_dir)]
        if map_info.get("cached") and getattr(bl.fn.readout, "noise", None) == "fit":  # fit_map does it on training
            fit_noise_std(bl.fn, train_loader)
        if task.is_regression:
            map_info["noise_std"] = bl.fn.likelihood.noise_std
        how = "loaded from the MAP cache" if map_info.get("cached") else f"trained ({map_info.get('steps')} steps)"
        logger.info("MAP adapter %s in %.1f s", how, time.perf_counter() - t)
    timings["map_train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    val = setup.loaders["validation"] if needs.validation else None
    bl.fit(train_loader, val_loader=val, checkpoints=checkpoints)
    timings["fit_s"] = time.perf_counter() - t
    logger.info("posterior %s fitted in %.1f s", bl.method, timings["fit_s"])
    prior = bl.fitted_prior_precision()
    if prior is not None:
        logger.info("prior precision (%s): %s", cfg["method"].get("prior_fit"), [round(x, 6) for x in prior])
    return map_info


def _splits(cfg: Mapping[str, Any]) -> list[str]:
    return list(dict.fromkeys(["validation", *cfg["eval"]["splits"]]))


def _predict(cfg, setup: _Setup, timings: dict[str, float]):
    """Per-example predictions of every evaluated split (validation always: the + TS row's T), then the OOD sets."""
    seed, n_samples = int(cfg["seed"]), cfg["eval"]["n_samples"]
    preds: dict[str, Predictions] = {}
    for split in _splits(cfg):
        t = time.perf_counter()
        preds[split] = setup.bl.predictions(setup.loaders[split], n_samples=n_samples, seed=seed)
        timings[f"predict_{split}_s"] = time.perf_counter() - t
        logger.info("predicted %s in %.1f s: %s", split, timings[f"predict_{split}_s"], preds[split].metrics())
    ood_preds, ood_info = {}, {}
    if setup.ood_sets:
        t = time.perf_counter()
        ood_preds, ood_info = predict_ood(
            setup.bl, setup.tokenizer, setup.ood_sets, batch_size=cfg["eval"]["batch_size"], n_samples=n_samples,
            seed=seed, prepare_loader=setup.prepare,
        )  # fmt: skip
        timings["predict_ood_s"] = time.perf_counter() - t
    return preds, ood_preds, ood_info


def _main_split(preds: Mapping[str, Predictions], cfg: Mapping[str, Any]) -> str:
    return "test" if "test" in preds else _splits(cfg)[-1]


def _score(cfg, setup: _Setup, map_info, preds: dict[str, Predictions], ood_preds, ood_info) -> dict[str, Any]:
    """The record's metrics: every split, the + TS rows (adds ``<split>_ts`` to ``preds``), the OOD report (adds
    the OOD sets' predictions), and the main split's headline keys."""
    result = _record(cfg, setup.task, map_info, preds)
    splits = _splits(cfg)
    if setup.classes and cfg["eval"]["temperature_row"]:  # T scales the model-average log-probabilities: its argmax
        temp = fit_temperature(preds["validation"].log_probs, preds["validation"].labels, where="eval.temperature_row")
        result["temperature"] = temp
        logger.info("temperature of the + TS row: %.4g", temp)
        for split in splits:
            scaled = temperature_scaled(preds[split], temp)
            preds[f"{split}_ts"] = scaled
            result["splits"][f"{split}_ts"] = scaled.metrics()
    main_split = _main_split(preds, cfg)
    if setup.ood_sets:
        result["ood"], saved = ood_report(preds, ood_preds, main_split, result.get("temperature"))
        result["ood_info"] = {"in_distribution": main_split, "sets": ood_info}
        preds.update(saved)
    keys = CLASSIFICATION_KEYS if setup.classes else REGRESSION_KEYS if setup.task.is_regression else TOKEN_KEYS
    result.update({k: result["splits"][main_split][k] for k in keys})
    return result


def _answers(cfg, setup: _Setup, result: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    """With ``eval.answers``: the test prompts answered by S posterior draws (:mod:`bayeslora.answers`); their
    metrics go into ``result["splits"]["test_answers"]``, the records (and gold texts) into ``predictions.pt``
    under ``"answers/test"``. Returns what to save (empty when off)."""
    spec = cfg["eval"].get("answers")
    if not spec:
        return {}
    from .answers import answer_metrics
    from .data.collate import IGNORE_INDEX, PadCollator
    from .formats import GENERATION_PADDING_SIDE

    t = time.perf_counter()
    tok, rows = setup.tokenizer, setup.task.test
    limit = spec.get("max_eval")
    rows = rows.select(range(min(int(limit), len(rows)))) if limit else rows
    prompts, gold = [], []
    for ids, labels in zip(rows["input_ids"], rows["labels"]):
        start = next(i for i, y in enumerate(labels) if y != IGNORE_INDEX)
        target = [y for y in labels[start:] if y != tok.eos_token_id]
        prompts.append(list(ids[:start]))
        gold.append(tok.decode(target, skip_special_tokens=True))
    collate = PadCollator(tok.pad_token_id if tok.pad_token_id is not None else 0, GENERATION_PADDING_SIDE)
    generator = torch.Generator().manual_seed(int(cfg["seed"]))
    records, size = [], int(cfg["eval"]["batch_size"])
    for start in range(0, len(prompts), size):
        batch = collate([{"input_ids": p, "attention_mask": [1] * len(p), "labels": [IGNORE_INDEX] * len(p)}
                         for p in prompts[start : start + size]])  # fmt: skip
        records += setup.bl.answer_uncertainty(
            batch["input_ids"], batch["attention_mask"], tok, n_samples=int(spec.get("n_samples", 8)),
            max_new_tokens=int(spec.get("max_new_tokens", 16)), generator=generator,
        )  # fmt: skip
    metrics = {k: v for k, v in answer_metrics(records, gold).items() if v is not None and k != "n"}
    result["splits"]["test_answers"] = metrics
    timings["answers_s"] = time.perf_counter() - t
    logger.info("answered %d test prompts x %s draws in %.1f s: %s", len(records), spec.get("n_samples", 8),
                timings["answers_s"], metrics)  # fmt: skip
    return {"answers/test": {"records": [r.state_dict() for r in records], "gold": gold}}


def _write(cfg, setup: _Setup, result, preds, run_dir: Path, metrics_path: Path, identity, trackers, timings, t0,
           extra: Mapping[str, Any] | None = None):  # fmt: skip
    """Predictions and the diagram first, ``metrics.json`` last (atomically: a run with it is complete)."""
    save_torch({**{s: p.state_dict() for s, p in preds.items()}, **(extra or {})}, run_dir / "predictions.pt")
    if setup.classes and cfg["eval"]["reliability_diagram"]:  # a diagram of class confidences
        result["reliability_diagram"] = _reliability(cfg, preds, _main_split(preds, cfg), run_dir)
    timings["total_s"] = time.perf_counter() - t0
    result.update(timings=timings, device=str(setup.bl.fn.device), run_dir=str(run_dir), config=cfg, identity=identity)
    result.update(run_id=run_id(identity), setting_id=setting_id(identity), bayeslora_version=_version())
    record = RunRecord.from_dict(result, run_dir)
    record.write(metrics_path)
    for tracker in trackers:
        tracker.log_config(identity)
        tracker.log_metrics(flat_metrics(result))
    logger.info("wrote %s in %.1f s", metrics_path, timings["total_s"])
    return record.to_dict()


def _build_task(cfg: Mapping[str, Any], tokenizer):
    """The data group instantiates its task builder (``bayeslora.data.tasks.task_from_config``)."""
    return _instantiate(cfg["data"], tokenizer, format=cfg["model"]["format"], seed=int(cfg["seed"]))


def _prepare_ood(cfg: Mapping[str, Any], tokenizer, task) -> dict:
    sets = cfg["eval"].get("ood") or {}
    if not sets:
        return {}
    return prepare_ood(
        tokenizer,
        sets,
        data_cfg=cfg["data"],
        format=cfg["model"]["format"],
        num_classes=task.num_classes,
        seed=int(cfg["seed"]),
    )


def _build_model(cfg: Mapping[str, Any], task) -> BayesianLoRA:
    mcfg, seed = cfg["model"], int(cfg["seed"])
    model, _ = load_model(
        mcfg["name"],
        format=mcfg["format"],
        num_labels=task.num_classes,
        dtype=cfg["dtype"],
        device=cfg["device"],
        seed=seed,
    )
    spec = _instantiate(cfg["lora"], seed=seed)  # the lora group: a LoraSpec
    peft_model = add_lora(model, spec, format=mcfg["format"])
    posterior = _instantiate(cfg["method"], **_run_level_options(cfg))  # the method group: the posterior
    lam = cfg["prior_precision"]
    return BayesianLoRA(peft_model, task.readout, posterior, params=cfg["params"], prior_precision=lam)


def _prefix_cache(cfg: Mapping[str, Any], bl: BayesianLoRA):
    """The loader wrapper of the frozen-prefix cache, or None (disabled, or an adapter sits in block 0)."""
    pc = cfg["prefix_cache"]
    if not pc["enabled"] or bl.fn.prefix is None:
        return None
    return functools.partial(bl.cache_prefix, dtype=pc["dtype"], store=pc["dir"], batch_size=cfg["eval"]["batch_size"],
                             progress=bool(cfg["train"].get("progress")))  # fmt: skip


def _instantiate(node: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` of a config group, raising the target's own error (not Hydra's wrapper)."""
    from hydra.errors import InstantiationException

    try:
        return instantiate(node, *args, **kwargs, _convert_="all")
    except InstantiationException as err:
        if err.__cause__ is not None:
            raise err.__cause__ from None
        raise


def _record(cfg: Mapping[str, Any], task, map_info: dict, preds: Mapping[str, Predictions]) -> dict[str, Any]:
    dcfg, mcfg = cfg["data"], cfg["model"]
    return {
        "task": dcfg["task"],
        "data": dcfg["name"],
        "model": mcfg["name"],
        "method": cfg["method"]["name"],
        "method_label": cfg["method_label"],
        "seed": int(cfg["seed"]),
        "prior_precision": cfg["prior_precision"],
        "num_classes": task.num_classes,
        "num_train": len(task.train),
        "num_validation": len(task.validation),
        "num_test": len(task.test),
        "data_info": task.info,
        "map": map_info,
        "splits": {s: p.metrics() for s, p in preds.items()},
        "label_counts": {
            s: p.labels.bincount(minlength=task.num_classes).tolist()
            for s, p in preds.items()
            if isinstance(p, Predictions)  # class labels (not regression targets or target tokens)
        },  # fmt: skip
    }


def _class_evaluation(cfg: Mapping[str, Any], task) -> bool:
    """Whether the run's predictions are class predictions (a categorical likelihood). The evaluations defined only
    for those are not run for a regression or a generative (token-level) run: ``eval.ood`` is refused (before any
    training), the + TS row and the reliability diagram (on by default) are left out with a log line."""
    if task.readout.likelihood.name == "categorical":
        return True
    what = "a regression" if task.is_regression else "a generative run (token-level metrics)"
    if cfg["eval"].get("ood"):
        raise ValueError(
            f"eval.ood: OOD detection scores class predictives (entropy, mutual information); this task is {what}. "
            "Remove eval.ood."
        )
    left_out = [k for k in ("temperature_row", "reliability_diagram") if cfg["eval"][k]]
    if left_out:
        logger.info("eval: no %s; they are defined for class predictions and this task is %s", left_out, what)
    return False


def _reliability(cfg: Mapping[str, Any], preds: Mapping[str, Predictions], main_split: str, run_dir: Path) -> str:
    from .plots import reliability_diagram

    shown = {cfg["method_label"]: preds[main_split]}
    if f"{main_split}_ts" in preds:
        shown[cfg["method_label"] + TS_SUFFIX] = preds[f"{main_split}_ts"]
    title = f"{cfg['data']['name']} / {cfg['model']['name']} / {main_split} (seed {cfg['seed']})"
    return str(reliability_diagram(shown, run_dir / "reliability.png", title=title))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bayeslora")
    except PackageNotFoundError:  # pragma: no cover - running from a plain checkout
        return "unknown"


def format_table(result: Mapping[str, Any], split: str = "test") -> str:
    """A small Markdown table of the run's metrics (percentages for acc/ece; a regression run: NLL, RMSE, coverage
    of the 50 / 90 / 95 % central intervals and the regression calibration error)."""
    rows = [(result["method_label"], result["splits"][split])]
    if f"{split}_ts" in result["splits"]:
        rows.append(
            (f"{result['method_label']} + temperature (T={result['temperature']:.2f})", result["splits"][f"{split}_ts"])
        )
    width = max(len(r[0]) for r in rows)
    if "rmse" in rows[0][1]:  # a regression run
        lines = [
            f"| {'method':<{width}} |  NLL   |  RMSE  | cov50 | cov90 | cov95 |  RCE   |",
            f"|{'-' * (width + 2)}|--------|--------|-------|-------|-------|--------|",
        ]
        for name, m in rows:
            cov = " | ".join(f"{m[k]:5.3f}" for k in ("cov50", "cov90", "cov95"))
            lines.append(f"| {name:<{width}} | {m['nll']:6.4f} | {m['rmse']:6.4f} | {cov} | {m['rce']:6.4f} |")
        return "\n".join(lines)
    if "token_nll" in rows[0][1]:  # a generative run: token-level metrics (and the answers', with eval.answers)
        lines = [
            f"| {'method':<{width}} | token NLL | token ACC % | token ECE % | seq NLL | perplexity |",
            f"|{'-' * (width + 2)}|-----------|-------------|-------------|---------|------------|",
        ]
        for name, m in rows:
            lines.append(f"| {name:<{width}} | {m['token_nll']:9.4f} | {100 * m['token_acc']:11.2f} | "
                         f"{100 * m['token_ece']:11.2f} | {m['seq_nll']:7.3f} | {m['perplexity']:10.3f} |")  # fmt: skip
        answers = result["splits"].get(f"{split}_answers")
        if answers:
            lines.append("answers: " + ", ".join(f"{k} {v:.4g}" for k, v in answers.items()))
        return "\n".join(lines)
    lines = [
        f"| {'method':<{width}} | ACC %  | ECE %  |  NLL   | Brier  |",
        f"|{'-' * (width + 2)}|--------|--------|--------|--------|",
    ]
    for name, m in rows:
        lines.append(
            f"| {name:<{width}} | {100 * m['acc']:6.2f} | {100 * m['ece']:6.2f} | {m['nll']:6.4f} | {m['brier']:6.4f} |"
        )
    return "\n".join(lines)


def _report(result: Mapping[str, Any]) -> None:
    split = "test" if "test" in result["splits"] else next(iter(result["splits"]))
    head = f"{result['data']} ({result['task']}, {split} n={result['num_test']})"
    if result.get("skipped"):
        print(f"\nskipped {result['run_dir']}: {result['skipped']}; nothing was recomputed (force=true recomputes).")
        print(f"stored results of {head} · {result['model']} · seed {result['seed']}:")
        print(format_table(result, split))
        return
    print(f"\n{head} · {result['model']} · seed {result['seed']}")
    print(format_table(result, split))
    if "reliability_diagram" in result:
        print(f"reliability diagram: {result['reliability_diagram']}")
    print(f"results: {result['run_dir']}/ (metrics.json, predictions.pt)")
    print(f"wall time: {result['timings']['total_s']:.1f} s")


def main() -> None:
    """Console script ``bayeslora-run`` (Hydra CLI: ``bayeslora-run method=... data=... seed=...``)."""

    import hydra

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
    def _app(cfg: DictConfig) -> float:
        result = run(cfg)
        if distributed.world().main:  # under torchrun only rank 0 prints the results table
            _report(result)
        validation = result["splits"]["validation"]  # what a sweeper (Optuna) minimises: the validation NLL
        return float(validation["nll"] if "nll" in validation else validation["token_nll"])

    _app()


if __name__ == "__main__":
    main()
