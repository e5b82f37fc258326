"""Speed and memory benchmarks: ``python -m bayeslora.bench <suite> --size tiny|1b|7b [options]``.

Suites (all on one Llama-shaped random model, batch ``B × L`` of random tokens, ``C`` answer tokens,
LoRA ``r`` on ``q_proj, v_proj`` by default; see :mod:`bayeslora.benchmarks.common`):

* ``train`` – the textbook peft loop vs :func:`~bayeslora.train.train_map` per optimizer step;
* ``laplace`` – K-FAC (exact GGN, MC Fisher) and diagonal Laplace: fit per batch, GLM probit / GLM MC /
  weight-sampling predictive per batch, persistent memory (bytes of the state dict);
* ``vi`` – Pyro SVI step and sampling predictive; ``ensemble`` – time per member and predictive;
* ``all`` – all four; ``scaling`` – curves vs sequence length, LoRA rank and adapted modules (``--plot``);
* ``prefix`` – the frozen-prefix cache on a real model (``--model``, default SmolLM2-135M): train step, K-FAC fit and
  GLM predictive with the full model vs the cached prefix, LoRA on the top k blocks (``--top-layers``), interleaved;
* ``generative`` – the token-level path on a real causal LM (``--model``): forward, train step, K-FAC fit with the MC
  Fisher over the target tokens and the S-sample predictive over the whole vocabulary, with peak memory
  (LoRA on the top ``--top-layers`` blocks, its first value; 0: all).

Every run also measures the baseline (forward, functional forward, ``train_map`` step) that the
ratios are relative to; ``--compare`` adds the peers in the same process (laplace-torch KronLaplace
fit + GLM predictive; bayesian-lora K-FAC fit). The JSON (``--out``, and stdout) has
``schema, command, env, config, model, results, ratios, targets``; each timing is
``{median_s, min_s, times_s, repeats, warmup, per, peak_bytes, peak_extra_bytes}`` (seconds per
batch / step / member; GPU memory null on CPU) or ``{error}``, and a method that is not
installed is ``{available: false, reason}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

# the heavy modules (torch, the suites) are imported inside the functions, so `--help` is instant

SCHEMA = "bayeslora.bench/1"
SUITES = ("train", "laplace", "vi", "ensemble")
COMMANDS = (*SUITES, "all", "scaling", "prefix", "generative")
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SCALING_DEFAULTS = {"tiny": ([32, 64, 128], [2, 4, 8]), "gpu": ([128, 256, 512, 1024], [4, 8, 16, 32])}


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive(text: str) -> int:
    values = _ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return values[0]


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bayeslora.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("--size", choices=("tiny", "1b", "7b"), default="tiny")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16")
    p.add_argument("--batch-size", type=_positive, default=4)
    p.add_argument("--seq-len", type=_positive, default=256)
    p.add_argument("--num-classes", type=_positive, default=5)
    p.add_argument("--lora-r", type=_positive, default=8)
    p.add_argument("--targets", type=_names, default=["q_proj", "v_proj"], help="LoRA target modules, comma-separated")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before the timed ones")
    p.add_argument("--repeats", type=_positive, default=5, help="timed calls (the median is reported)")
    p.add_argument("--steps", type=_positive, default=8, help="optimizer steps per timed training call")
    p.add_argument("--fit-batches", type=_positive, default=16, help="batches per timed posterior fit")
    p.add_argument("--samples", type=_positive, default=32, help="S of the sampling predictives")
    p.add_argument("--glm-samples", type=_positive, default=1000, help="S of the GLM MC predictive")
    p.add_argument("--members", type=_positive, default=3, help="ensemble members")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--prior-precision", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compare", action="store_true", help="also run laplace-torch and bayesian-lora in-process")
    p.add_argument("--seq-lens", type=_ints, default=None, help="scaling: sequence lengths")
    p.add_argument("--ranks", type=_ints, default=None, help="scaling: LoRA ranks")
    p.add_argument("--module-sets", type=lambda t: [_names(s) for s in t.split(";") if s.strip()],
                   default=None, help="scaling: ';'-separated comma lists of target modules")  # fmt: skip
    p.add_argument("--model", default="smollm2-135m", help="prefix: the model (a bayeslora.models name)")
    p.add_argument("--top-layers", type=lambda t: [] if t == "0" else _ints(t), default=[2, 4, 8],
                   help="prefix: k of the top-k LoRA blocks; generative: its first value (0: all blocks)")  # fmt: skip
    p.add_argument("--profile", type=int, default=0, help="add the top-N operators of one profiled call per timing")
    p.add_argument("--out", default=None, help="write the JSON here (atomically)")
    p.add_argument("--plot", default=None, help="scaling: write the PNG here")
    p.add_argument("--quiet", action="store_true", help="do not print the JSON to stdout")
    return p


def summarize(results: dict[str, Any], opts) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Ratios between timings and the issue's targets (value, bound, met)."""
    from .benchmarks.common import ratio, target

    base = results.get("baseline", {})
    fwd, step = base.get("forward"), base.get("train_map_step")
    lap = results.get("laplace", {})
    ggn, mc = lap.get("kfac_ggn", {}), lap.get("kfac_mc", {})
    r: dict[str, Any] = {
        "train_map_throughput_vs_plain": ratio(results.get("train", {}).get("plain_step"), step),
        "kfac_fit_mc_vs_train_step": ratio(mc.get("fit"), step),
        "kfac_fit_ggn_vs_train_step": ratio(ggn.get("fit"), step),
        "diag_fit_vs_train_step": ratio(lap.get("diag", {}).get("fit"), step),
        "glm_probit_vs_forward": ratio(ggn.get("glm_probit"), fwd),
        "glm_mc_vs_forward": ratio(ggn.get("glm_mc"), fwd),
        "sampling_vs_forward": ratio(ggn.get("sampling"), fwd),
    }
    targets = [
        target("train_map_throughput_vs_plain", r["train_map_throughput_vs_plain"], 0.95, at_least=True),
        target("kfac_fit_mc_vs_train_step", r["kfac_fit_mc_vs_train_step"], 1.5),
        target("glm_probit_vs_forward", r["glm_probit_vs_forward"], opts.num_classes + 1),
        target("sampling_vs_forward", r["sampling_vs_forward"], opts.samples),
    ]
    if "glm_probit" in ggn:
        ok = "median_s" in ggn["glm_probit"]
        targets.append({"name": "glm_predictive_fits_in_memory", "value": ok, "target": "no OOM", "met": ok})
    for method, entry in results.get("vi", {}).items():
        if isinstance(entry, dict) and "fit_step" in entry:
            r[f"{method}_step_vs_map_step"] = ratio(entry["fit_step"], step)
            r[f"{method}_sampling_vs_forward"] = ratio(entry.get("sampling"), fwd)
            targets.append(target(f"{method}_step_vs_map_step", r[f"{method}_step_vs_map_step"], 1.3))
            targets.append(target(f"{method}_sampling_vs_forward", r[f"{method}_sampling_vs_forward"], opts.samples))
    ens = results.get("ensemble", {})
    if "predict" in ens:
        r["ensemble_predict_vs_forward"] = ratio(ens["predict"], fwd)
        targets.append(target("ensemble_predict_vs_forward", r["ensemble_predict_vs_forward"], opts.members))
    peers = results.get("peers", {})
    lt, bl = peers.get("laplace-torch", {}), peers.get("bayesian-lora", {})
    r["laplace_torch_fit_vs_ours_ggn"] = ratio(lt.get("fit"), ggn.get("fit"))
    r["laplace_torch_glm_vs_ours"] = ratio(lt.get("glm_probit"), ggn.get("glm_probit"))
    r["bayesian_lora_fit_vs_ours_mc"] = ratio(bl.get("fit"), mc.get("fit"))
    return {k: v for k, v in r.items() if v is not None}, [t for t in targets if t["value"] is not None]


def run(opts: argparse.Namespace) -> dict[str, Any]:
    """Build the model and run the requested suite(s); returns the report dict."""
    from .benchmarks import suites
    from .benchmarks.common import Setup, attach_lora, build_base, environment
    from .models import resolve_device, resolve_dtype

    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    if opts.command in ("prefix", "generative"):  # a real model, not the random Llama of the other suites
        from .benchmarks.generative import generative_suite
        from .benchmarks.prefix import prefix_suite

        report = {"schema": SCHEMA, "command": opts.command, "env": environment(device),
                  "config": {k: v for k, v in vars(opts).items() if k not in ("out", "plot", "quiet")}}  # fmt: skip
        suite = prefix_suite if opts.command == "prefix" else generative_suite
        report["results"] = {opts.command: suite(opts)}
        if opts.command == "generative":  # its ratios and targets sit beside the results, as in the other suites
            for key in ("ratios", "targets"):
                report[key] = report["results"]["generative"].pop(key)
        report["env"]["max_rss_bytes"] = environment(device)["max_rss_bytes"]
        return report
    base = build_base(opts.size, device, dtype, seed=opts.seed)
    fn = attach_lora(base, r=opts.lora_r, targets=opts.targets, num_classes=opts.num_classes, dtype=dtype,
                     seed=opts.seed)  # fmt: skip
    setup = Setup(fn, opts.size, opts.batch_size, opts.seq_len, opts.num_classes, opts.seed)
    report: dict[str, Any] = {"schema": SCHEMA, "command": opts.command, "env": environment(device),
                              "config": {k: v for k, v in vars(opts).items() if k not in ("out", "plot", "quiet")},
                              "model": setup.info(), "results": {}}  # fmt: skip
    results = report["results"]
    if opts.command == "scaling":
        from .benchmarks.scaling import plot, scaling

        lens, ranks = SCALING_DEFAULTS["tiny" if opts.size == "tiny" else "gpu"]
        opts.seq_lens, opts.ranks = opts.seq_lens or lens, opts.ranks or ranks
        opts.module_sets = opts.module_sets or [opts.targets, ALL_MODULES[:4], ALL_MODULES]
        report["config"].update(seq_lens=opts.seq_lens, ranks=opts.ranks, module_sets=opts.module_sets)
        results["scaling"] = scaling(setup, opts, dtype)
        if opts.plot:
            report["plot"] = str(plot(results["scaling"], opts.plot, f"bayeslora scaling ({opts.size}, {device.type})"))
        return report
    results["baseline"] = suites.baseline(setup, opts)
    for name in SUITES if opts.command == "all" else (opts.command,):
        results[name] = getattr(suites, name)(setup, opts)
    if opts.compare:
        results["peers"] = suites.peers(setup, opts)
    report["ratios"], report["targets"] = summarize(results, opts)
    report["env"]["max_rss_bytes"] = environment(device)["max_rss_bytes"]
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point; returns the report (also written to ``--out`` and printed unless ``--quiet``)."""
    opts = parser().parse_args(argv)
    import torch

    from .io import save_json

    if opts.warmup < 0:
        raise ValueError(f"--warmup: expected an integer >= 0, got {opts.warmup}.")
    if opts.plot and opts.command != "scaling":
        raise ValueError(f"--plot: only the 'scaling' command draws a plot; got command {opts.command!r}.")
    threads = torch.get_num_threads()
    try:
        if opts.threads:
            torch.set_num_threads(opts.threads)
        torch.manual_seed(opts.seed)
        report = run(opts)
    finally:
        torch.set_num_threads(threads)
    if opts.out:
        save_json(report, opts.out)
    if not opts.quiet:
        json.dump(report, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    return report


if __name__ == "__main__":
    main()
