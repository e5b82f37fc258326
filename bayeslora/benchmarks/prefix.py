"""The frozen-prefix cache: full model vs cached prefix, for LoRA on the top k blocks of a real model.

For each k, with LoRA on ``--targets`` of the top k blocks only: a no-grad forward (the unit of a sampling
predictive), a ``train_map`` step, a K-FAC fit (MC Fisher,
per batch) and the GLM probit predictive (per batch), each with the full model and with the cached prefix,
interleaved round by round in one process (so machine noise hits both alike); the one-off cost of computing the
cache (per batch); and the largest logit difference between the two paths with float16 and float32 storage.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from ..function import AdapterFn, model_mode
from ..models import LoraSpec, add_lora, load_model
from ..params import AdapterParams
from ..posteriors import make_posterior
from ..prefix import cache_loader
from ..readout import AnswerTokenLogits
from ..train import TrainConfig, train_map
from .common import RandomTokens, synchronize


def _interleaved(ops: dict[str, Callable[[], Any]], device, warmup: int, rounds: int, per: int) -> dict[str, Any]:
    for _ in range(warmup):
        for op in ops.values():
            op()
    times: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(rounds):
        for name, op in ops.items():
            synchronize(device)
            t = time.perf_counter()
            op()
            synchronize(device)
            times[name].append((time.perf_counter() - t) / per)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "times_s": v, "per": per} for k, v in times.items()}


def _fn(base, k: int, opts) -> AdapterFn:
    model = add_lora(base, LoraSpec(r=opts.lora_r, alpha=2 * opts.lora_r, dropout=0.0, target_modules=opts.targets,
                                    layers=k, seed=opts.seed), format="mc")  # fmt: skip
    g = torch.Generator().manual_seed(opts.seed + 1)
    params = AdapterParams(model)
    with torch.no_grad():  # B starts at zero; small random values give the A side curvature (timing is unaffected)
        for name, p in params.tensors().items():
            if "lora_B" in name:
                p.copy_(1e-2 * torch.randn(p.shape, generator=g))
    readout = AnswerTokenLogits(list(range(10, 10 + opts.num_classes)))
    return AdapterFn(model, params, readout)


def prefix_suite(opts) -> dict[str, Any]:
    """Full vs cached timings and the exactness check for each k of ``opts.top_layers``."""
    base, _ = load_model(opts.model, format="mc", device=opts.device, dtype=opts.dtype, seed=opts.seed)
    device = next(base.parameters()).device
    n_layers = base.config.get_text_config().num_hidden_layers
    data = RandomTokens(opts.steps * opts.batch_size, opts.seq_len, base.config.vocab_size, opts.num_classes, opts.seed)
    out: dict[str, Any] = {"model": opts.model, "num_layers": n_layers, "batch": [opts.batch_size, opts.seq_len]}
    for k in opts.top_layers:
        fn = _fn(base, k, opts)
        out[f"top_{k}"] = _one(fn, k, n_layers, data, device, opts)
        base = fn.model.unload()
    return out


def _one(fn: AdapterFn, k: int, n_layers: int, data, device, opts) -> dict[str, Any]:
    steps = opts.steps
    loader = torch.utils.data.DataLoader(data, batch_size=opts.batch_size)
    t = time.perf_counter()
    cached = cache_loader(fn, loader, dtype="float16")
    build_s = (time.perf_counter() - t) / len(loader)
    cached32 = cache_loader(fn, loader, dtype="float32")
    batch, cbatch, cbatch32 = (fn.to_device(next(iter(x))) for x in (loader, cached, cached32))
    with torch.no_grad(), model_mode(fn.model, False):
        full = fn(None, batch)
        err16 = (fn(None, cbatch) - full).abs().max().item()
        err32 = (fn(None, cbatch32) - full).abs().max().item()
    config = TrainConfig(lr=1e-4, max_steps=steps, warmup_ratio=0.0, progress=False)
    post_full = make_posterior("kfac_laplace", fisher="mc", prior_fit="none")
    post_cached = make_posterior("kfac_laplace", fisher="mc", prior_fit="none")
    states = cached.dataset.states
    entry: dict[str, Any] = {
        "layers": k,
        "cache_build_per_batch_s": build_s,
        "max_abs_logit_diff": {"float16": err16, "float32": err32},
        "max_abs_logit": full.abs().max().item(),
        "cache_bytes_per_token": states.element_size() * states.shape[-1],
    }

    def forward(b):
        with torch.no_grad(), model_mode(fn.model, False):
            return fn(None, b)

    entry.update(_interleaved({"forward_full": lambda: forward(batch), "forward_cached": lambda: forward(cbatch)},
                              device, opts.warmup, opts.repeats, 1))  # fmt: skip
    ops = {
        "train_step_full": lambda: train_map(fn, loader, config),
        "train_step_cached": lambda: train_map(fn, cached, config),
    }
    entry.update(_interleaved(ops, device, opts.warmup, opts.repeats, steps))
    fits = {"kfac_fit_full": lambda: post_full.fit(fn, loader), "kfac_fit_cached": lambda: post_cached.fit(fn, cached)}
    entry.update(_interleaved(fits, device, 0, opts.repeats, len(loader)))

    def glm(b):
        with torch.no_grad():
            return post_full.predict(fn, b)

    entry.update(_interleaved({"glm_full": lambda: glm(batch), "glm_cached": lambda: glm(cbatch)}, device,
                              opts.warmup, opts.repeats, 1))  # fmt: skip
    entry["speedup"] = {
        op: entry[f"{op}_full"]["median_s"] / entry[f"{op}_cached"]["median_s"]
        for op in ("forward", "train_step", "kfac_fit", "glm")
    }
    # no-grad forward: blocks run, N / k; a step or fit also runs the backward (about twice a forward) through the k
    # adapted blocks only, so its bound is (N + 2k) / 3k
    entry["expected_speedup"] = {"forward": n_layers / k, "train_step": (n_layers + 2 * k) / (3 * k)}
    return entry
