"""The token-level (free-text) path on a real causal LM: its cost per batch against a train step and a forward.

With LoRA on ``--targets`` (of the top ``--layers`` blocks, or all) and the token-level likelihood over the whole
vocabulary (labels on the second half of each row, the first half a prompt): a no-grad forward, a ``train_map`` step,
a K-FAC fit with the MC Fisher summed over the target tokens (per batch; ``fisher="mc"``, one backward pass per
target token and sample, and ``"mc_sequence"``, one per sample) and the K-FAC weight-sampling predictive
with S samples (per batch; streamed, one ``[B, T, V]`` sample held at a time), interleaved round by round in one
process. Peak memory per operation: on CUDA ``max_memory_allocated`` over the memory allocated before the call; on a
CPU the peak resident set size over the RSS before the call, after returning the free heap to the OS (glibc
``malloc_trim``) and resetting the high-water mark through ``/proc/self/clear_refs`` (Linux; approximate: pages the
allocator keeps are reused without showing, so it is a lower bound on the call's own peak). The targets:
K-FAC fit ≤ 2× a train step, S samples ≤ S× a forward, the sampling predictive's peak ≤ 1.3× a train step's.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..function import AdapterFn, model_mode
from ..models import LoraSpec, add_lora, load_model
from ..params import AdapterParams
from ..posteriors import make_posterior
from ..readout import TokenLogits
from ..train import TrainConfig, train_map
from .common import synchronize, target

IGNORE = -100


class PromptTarget(Dataset):
    """Rows of random tokens; the labels score the second half (the target), the first half is the prompt."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab, (n, seq_len), generator=g)
        self.split = seq_len // 2

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i].clone()
        labels[: self.split] = IGNORE
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": labels}


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_free_heap() -> None:
    """Hand the allocator's free memory back to the OS (glibc ``malloc_trim``), so that the memory a call allocates
    shows as new resident pages instead of reusing pages freed earlier."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def cpu_peak_extra_bytes(op: Callable[[], Any]) -> int | None:
    """The peak RSS of one call of ``op`` over the RSS before it (None where ``/proc/self/clear_refs`` is missing):
    the allocator's free memory is returned to the OS first and the high-water mark reset, in this process (a forked
    child would hang in OpenMP's thread pool)."""
    clear = Path("/proc/self/clear_refs")
    if not clear.exists():
        return None
    gc.collect()
    _release_free_heap()
    try:
        clear.write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    before = _rss_bytes("VmRSS")
    op()
    return _rss_bytes("VmHWM") - before


def peak_extra_bytes(op: Callable[[], Any], device: torch.device) -> int | None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        op()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return cpu_peak_extra_bytes(op)


def _interleaved(ops: dict[str, tuple[Callable[[], Any], int]], device, warmup: int, rounds: int) -> dict[str, Any]:
    """Each op (callable, units per call) ``rounds`` times, round by round; seconds per unit."""
    for _ in range(warmup):
        for op, _per in ops.values():
            op()
    times: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(rounds):
        for name, (op, per) in ops.items():
            synchronize(device)
            t = time.perf_counter()
            op()
            synchronize(device)
            times[name].append((time.perf_counter() - t) / per)
    return {
        k: {"median_s": statistics.median(v), "min_s": min(v), "times_s": v, "per": ops[k][1]} for k, v in times.items()
    }


def generative_suite(opts) -> dict[str, Any]:
    """Forward, train step, token-level K-FAC fit (MC Fisher) and S-sample predictive on ``opts.model``."""
    base, _ = load_model(opts.model, format="generative", device=opts.device, dtype=opts.dtype, seed=opts.seed)
    device = next(base.parameters()).device
    layers = opts.top_layers[0] if opts.top_layers else None
    spec = LoraSpec(r=opts.lora_r, alpha=2 * opts.lora_r, dropout=0.0, target_modules=opts.targets, layers=layers,
                    seed=opts.seed)  # fmt: skip
    model = add_lora(base, spec, format="generative")
    params = AdapterParams(model)
    g = torch.Generator().manual_seed(opts.seed + 1)
    with torch.no_grad():  # B starts at zero; small random values give the A side curvature (timing is unaffected)
        for name, p in params.tensors().items():
            if "lora_B" in name:
                p.copy_((1e-2 * torch.randn(p.shape, generator=g)).to(p))
    fn = AdapterFn(model, params, TokenLogits.for_model(model))
    vocab = fn.readout.num_classes
    data = PromptTarget(opts.steps * opts.batch_size, opts.seq_len, vocab, opts.seed)
    loader = DataLoader(data, batch_size=opts.batch_size)
    batch = fn.to_device(next(iter(loader)))
    n_layers = base.config.get_text_config().num_hidden_layers
    config = TrainConfig(lr=1e-5, max_steps=opts.steps, warmup_ratio=0.0, progress=False)
    post = make_posterior("kfac_laplace", fisher="mc", predictive="sampling", prior_fit="none", n_samples=opts.samples)
    post.fit(fn, loader)  # fitted once before the timed calls, so the predictive has a posterior
    fit_post = make_posterior("kfac_laplace", fisher="mc", predictive="sampling", prior_fit="none")
    fit_seq = make_posterior("kfac_laplace", fisher="mc_sequence", predictive="sampling", prior_fit="none")

    def forward():
        with torch.no_grad(), model_mode(fn.model, False):
            return fn(None, batch).sum().item()

    def predict():
        return post.predict(fn, batch, n_samples=opts.samples, generator=torch.Generator().manual_seed(0))

    one_batch = DataLoader(torch.utils.data.Subset(data, range(opts.batch_size)), batch_size=opts.batch_size)

    def step_once():
        return train_map(fn, one_batch, TrainConfig(lr=1e-5, max_steps=1, warmup_ratio=0.0, progress=False))

    ops = {
        "forward": (forward, 1),
        "train_step": (lambda: train_map(fn, loader, config), opts.steps),
        "kfac_fit_mc": (lambda: fit_post.fit(fn, loader), len(loader)),
        "kfac_fit_mc_sequence": (lambda: fit_seq.fit(fn, loader), len(loader)),
        "sampling": (predict, 1),
    }
    out: dict[str, Any] = {
        "model": opts.model,
        "num_layers": n_layers,
        "lora_layers": layers or n_layers,
        "vocab_size": vocab,
        "batch": [opts.batch_size, opts.seq_len],
        "target_tokens_per_batch": int((batch["labels"] != IGNORE).sum()),
        "samples": opts.samples,
        "timings": _interleaved(ops, device, opts.warmup, opts.repeats),
        "peak_extra_bytes": {
            "forward": peak_extra_bytes(forward, device),
            "train_step": peak_extra_bytes(step_once, device),
            "kfac_fit_mc_batch": peak_extra_bytes(lambda: fit_post.fit(fn, one_batch), device),
            "kfac_fit_mc_sequence_batch": peak_extra_bytes(lambda: fit_seq.fit(fn, one_batch), device),
            "sampling": peak_extra_bytes(predict, device),
        },
        "memory_note": (
            "CUDA: max_memory_allocated over the allocated memory before the call; CPU: peak RSS over the RSS before "
            "the call after malloc_trim (Linux clear_refs), a lower bound where the allocator reuses freed memory"
        ),
    }
    t, mem = out["timings"], out["peak_extra_bytes"]
    ratios = {
        "kfac_fit_mc_vs_train_step": t["kfac_fit_mc"]["median_s"] / t["train_step"]["median_s"],
        "kfac_fit_mc_sequence_vs_train_step": t["kfac_fit_mc_sequence"]["median_s"] / t["train_step"]["median_s"],
        "sampling_vs_forward": t["sampling"]["median_s"] / t["forward"]["median_s"],
        "train_step_vs_forward": t["train_step"]["median_s"] / t["forward"]["median_s"],
    }
    if mem["sampling"] and mem["train_step"]:
        ratios["sampling_peak_vs_train_step_peak"] = mem["sampling"] / mem["train_step"]
    out["ratios"] = ratios
    out["targets"] = [
        target("kfac_fit_mc_vs_train_step", ratios["kfac_fit_mc_vs_train_step"], 2.0),
        target("kfac_fit_mc_sequence_vs_train_step", ratios["kfac_fit_mc_sequence_vs_train_step"], 2.0),
        target("sampling_vs_forward", ratios["sampling_vs_forward"], float(opts.samples)),
    ]
    if "sampling_peak_vs_train_step_peak" in ratios:
        out["targets"].append(
            target("sampling_peak_vs_train_step_peak", ratios["sampling_peak_vs_train_step_peak"], 1.3)
        )
    return out
