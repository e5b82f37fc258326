"""Validation metrics of a MAP training after each epoch, from the checkpoints in its MAP cache entry.

Used to choose the number of LoRA'd blocks and epochs of a study on validation data only:

    BAYESLORA_DATA=/path/to/data .venv/bin/python experiments/select_epochs.py --out <json> \
        -- experiment=llm_mc_cpu lora.layers=4 map_cache=paper/results/llm_mc_cpu/.map_cache

Writes ``{"overrides", "map_key", "epochs": [{"checkpoint", "step", "acc", "ece", "nll", ...}]}`` (validation split;
the run's own data, model, LoRA and prefix cache). The MAP of these overrides must have been trained already
(``bayeslora-run ... method=map``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from bayeslora.adapter_state import list_checkpoints, load_checkpoint, load_trained
from bayeslora.data import make_loader
from bayeslora.io import save_json
from bayeslora.models import load_tokenizer, locate
from bayeslora.results import run_identity
from bayeslora.run import _build_model, _build_task, _map_key, _prefix_cache, compose


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    composed = compose(["method=map", *args.overrides])
    key = _map_key(run_identity(composed))
    cfg = OmegaConf.to_container(composed, resolve=True)
    ckpt_dir = Path(cfg["map_cache"]) / key / "checkpoints"
    checkpoints = list_checkpoints(ckpt_dir)
    if not checkpoints:
        raise SystemExit(f"--: no MAP checkpoints in {ckpt_dir}; train the MAP first (bayeslora-run ... method=map).")
    tokenizer = load_tokenizer(locate(cfg["model"]["name"]), cfg["model"]["format"])
    task = _build_task(cfg, tokenizer)
    bl = _build_model({**cfg, "device": "cpu"}, task)
    loader = make_loader(task.validation, tokenizer, batch_size=cfg["eval"]["batch_size"])
    prepare = _prefix_cache(cfg, bl)
    loader = prepare(loader) if prepare else loader
    epochs = []
    for path in checkpoints:
        load_trained(bl.fn, load_checkpoint(path), argument=str(path))
        bl.fit(loader)  # the MAP "posterior": the adapter as it is
        metrics = bl.predictions(loader, n_samples=None, seed=int(cfg["seed"])).metrics()
        epochs.append({"checkpoint": path.name, "step": int(path.stem.split("_")[-1]), **metrics})
        print(json.dumps(epochs[-1]), flush=True)
    report = {"overrides": args.overrides, "map_key": key, "split": "validation", "epochs": epochs}
    save_json(report, args.out)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
