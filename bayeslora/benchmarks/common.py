"""Benchmark set-up: Llama-shaped random models, random token batches, timing and memory.

Timing does not depend on weight values, so the 1B and 7B models are built from a
``LlamaConfig`` directly on the target device in bf16 (no checkpoint, no CPU copy); ``tiny`` is a
two-layer Llama that runs on a CPU in seconds. Every timed operation gets warm-up calls, then
``repeats`` measured calls bracketed by ``torch.cuda.synchronize()``; the median is reported. On
CUDA the peak memory of each call is ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats`` (``peak_bytes``) and its excess over the memory allocated before the
call (``peak_extra_bytes``); on a CPU both are ``null`` (there is no comparable allocator
statistic for torch tensors on the host).
"""

from __future__ import annotations

import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..function import AdapterFn
from ..models import LoraSpec, add_lora
from ..params import AdapterParams
from ..readout import AnswerTokenLogits
from ..rng import forked

SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5632, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
}  # fmt: skip
MEMORY_NOTE = (
    "peak_bytes / peak_extra_bytes are torch.cuda.max_memory_allocated (after reset_peak_memory_stats) and its "
    "excess over the memory allocated before the call; null on a CPU, where torch has no comparable statistic."
)


@dataclass
class Setup:
    """One benchmark model: its AdapterFn, a fixed batch and loaders of random batches.

    Attributes:
        fn: the LoRA'd model as an :class:`~bayeslora.function.AdapterFn`.
        size: ``"tiny"``, ``"1b"`` or ``"7b"``.
        batch_size, seq_len, num_classes: the batch shape ``[B, L]`` and C.
        seed: seeds the weights, the LoRA initialisation and the tokens.
    """

    fn: AdapterFn
    size: str
    batch_size: int
    seq_len: int
    num_classes: int
    seed: int = 0

    @property
    def device(self) -> torch.device:
        return self.fn.device

    def batch(self) -> dict[str, torch.Tensor]:
        """The fixed batch ``{input_ids [B, L], attention_mask, labels [B]}`` on the device."""
        return self.fn.to_device(next(iter(self.loader(1))))

    def loader(self, n_batches: int) -> DataLoader:
        """``n_batches`` batches of random tokens (fixed for a given seed)."""
        ds = RandomTokens(n_batches * self.batch_size, self.seq_len, self.fn.model.config.vocab_size,
                          self.num_classes, self.seed)  # fmt: skip
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False)

    def info(self) -> dict[str, Any]:
        model = self.fn.model
        return {
            "size": self.size,
            "config": {k: getattr(model.config, k) for k in SIZES["tiny"]},
            "parameters": sum(p.numel() for p in model.parameters()),
            "adapter_parameters": self.fn.params.numel,
            "adapted_layers": sum(g.kind == "lora_A" for g in self.fn.params.groups),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "adapter_dtype": str(next(iter(self.fn.params.tensors().values())).dtype).replace("torch.", ""),
            "device": str(self.device),
            "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        }


class RandomTokens(Dataset):
    """Rows ``{input_ids [L], attention_mask [L], labels []}`` of uniform random tokens and labels."""

    def __init__(self, n: int, seq_len: int, vocab: int, num_classes: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(min(100, vocab // 2), vocab, (n, seq_len), generator=g)
        self.labels = torch.randint(0, num_classes, (n,), generator=g)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def build_base(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of the given size, created directly on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in SIZES:
        raise ValueError(f"size: expected one of {sorted(SIZES)}, got {size!r}.")
    config = LlamaConfig(**SIZES[size], max_position_embeddings=8192, tie_word_embeddings=False, pad_token_id=0)
    with forked(device, seed), torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def attach_lora(
    base: torch.nn.Module,
    *,
    r: int,
    targets: Sequence[str],
    num_classes: int,
    dtype: torch.dtype,
    seed: int = 0,
    dropout: float = 0.0,
) -> AdapterFn:
    """Add a LoRA adapter (``alpha = 2r``) and an answer-token readout over ``num_classes`` token ids.

    LoRA ``B`` is set to small random values (it starts at zero, which would make the ``A``
    curvature vanish; timings do not depend on it, but the numerics of the fits do).
    """
    model = add_lora(base, LoraSpec(r=r, alpha=2 * r, dropout=dropout, target_modules=list(targets), seed=seed),
                     format="mc")  # fmt: skip
    params = AdapterParams(model)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in params.tensors().items():
            if "lora_B" in name:
                p.copy_(1e-2 * torch.randn(p.shape, generator=g))
    readout = AnswerTokenLogits(list(range(10, 10 + num_classes)))
    on_gpu = next(base.parameters()).device.type == "cuda"
    return AdapterFn(model, params, readout, autocast_dtype=dtype if on_gpu and dtype != torch.float32 else None)


def detach_lora(fn: AdapterFn) -> torch.nn.Module:
    """The base model without its LoRA layers (to attach a different adapter)."""
    return fn.model.unload()


# ----------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    op: Callable[[], Any], device: torch.device, *, warmup: int, repeats: int, per: int = 1, profile: int = 0
) -> dict:
    """Median wall time of ``op`` over ``repeats`` calls (after ``warmup`` calls), divided by ``per``.

    Args:
        profile: if > 0, one more call runs under ``torch.profiler`` and the ``profile`` top operators
            (by self device time on CUDA, self CPU time otherwise) are added to the entry.

    Returns:
        ``{"median_s", "min_s", "times_s", "repeats", "warmup", "per", "peak_bytes", "peak_extra_bytes"}``
        (plus ``"profile"``), or ``{"error": "out of memory", ...}`` when CUDA runs out of memory.
    """
    cuda = device.type == "cuda"
    try:
        for _ in range(warmup):
            op()
        times, peaks, extras = [], [], []
        for _ in range(repeats):
            synchronize(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            op()
            synchronize(device)
            times.append((time.perf_counter() - start) / per)
            if cuda:
                peaks.append(torch.cuda.max_memory_allocated(device))
                extras.append(peaks[-1] - before)
    except torch.cuda.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        return {"error": "out of memory", "detail": str(err).splitlines()[0]}
    entry = {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "times_s": times,
        "repeats": repeats,
        "warmup": warmup,
        "per": per,
        "peak_bytes": max(peaks) if cuda else None,
        "peak_extra_bytes": max(extras) if cuda else None,
    }
    if profile:
        entry["profile"] = profile_top(op, device, profile)
    return entry


def profile_top(op: Callable[[], Any], device: torch.device, top: int) -> list[dict[str, Any]]:
    """The ``top`` operators of one call of ``op`` under ``torch.profiler`` (seconds, self time)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        op()
        synchronize(device)
    rows = []
    for e in prof.key_averages():
        device_us = getattr(e, "self_device_time_total", 0.0) if cuda else 0.0
        rows.append({"op": e.key, "calls": e.count, "self_cpu_s": e.self_cpu_time_total / 1e6,
                     "self_device_s": device_us / 1e6 if cuda else None})  # fmt: skip
    rows.sort(key=lambda r: r["self_device_s"] if cuda else r["self_cpu_s"], reverse=True)
    return rows[:top]


def tensor_bytes(obj: Any) -> int:
    """Bytes of all tensors in a (nested) state dict: a posterior's persistent memory."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def ratio(numerator: Mapping | None, denominator: Mapping | None) -> float | None:
    """``numerator.median_s / denominator.median_s`` (None if either is missing or failed)."""
    if not numerator or not denominator or "median_s" not in numerator or "median_s" not in denominator:
        return None
    return numerator["median_s"] / denominator["median_s"]


def target(name: str, value: float | None, bound: float, *, at_least: bool = False) -> dict[str, Any]:
    """A target entry ``{name, value, target, met}`` (``met`` is None when the value is missing)."""
    met = None if value is None else (value >= bound if at_least else value <= bound)
    return {"name": name, "value": value, "target": f"{'>=' if at_least else '<='} {bound:g}", "met": met}


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware, for the JSON header."""
    versions = {}
    for dist in ("torch", "transformers", "peft", "pyro-ppl", "laplace-torch", "bayesian-lora", "bayeslora"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(device),
        "gpu": gpu,
        "cpu_threads": torch.get_num_threads(),
        "versions": versions,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "memory_note": MEMORY_NOTE,
    }
