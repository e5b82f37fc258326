"""Scaling curves: time and memory of the hot paths vs sequence length, LoRA rank and adapted modules.

For each axis the other two stay at the run's defaults. Per point: a forward pass, a ``train_map``
step, a K-FAC fit per batch (MC Fisher) and the GLM probit predictive per batch. The base model is
built once; a new LoRA adapter is attached for each rank / module set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io import atomic_write
from ..posteriors import make_posterior
from .common import Setup, attach_lora, detach_lora
from .suites import baseline, timed

OPS = ("forward", "train_map_step", "kfac_fit", "glm_probit")


def point(setup: Setup, opts) -> dict[str, Any]:
    """The four timings at the current set-up."""
    base = baseline(setup, opts)
    fn, batch, loader = setup.fn, setup.batch(), setup.loader(opts.fit_batches)
    fitted = {}

    def fit():
        fitted["p"] = make_posterior("kfac_laplace", fisher="mc", prior_fit="none").fit(fn, loader)

    out = {"forward": base["forward"], "train_map_step": base["train_map_step"]}
    out["kfac_fit"] = timed(setup, opts, fit, per=opts.fit_batches)
    if "p" in fitted:
        out["glm_probit"] = timed(setup, opts, lambda: fitted["p"].predict(fn, batch))
    return out


def scaling(setup: Setup, opts, dtype) -> dict[str, Any]:
    """``{"seq_len": [...], "lora_r": [...], "modules": [...]}``, each a list of ``{"x", <op>: timing}``."""
    curves: dict[str, list[dict[str, Any]]] = {"seq_len": [], "lora_r": [], "modules": []}
    default_len = setup.seq_len
    for length in opts.seq_lens:
        setup.seq_len = length
        curves["seq_len"].append({"x": length, **point(setup, opts)})
    setup.seq_len = default_len
    for key, values in (("lora_r", [(r, opts.targets) for r in opts.ranks]),
                        ("modules", [(opts.lora_r, m) for m in opts.module_sets])):  # fmt: skip
        for r, targets in values:
            setup.fn = attach_lora(detach_lora(setup.fn), r=r, targets=targets, num_classes=setup.num_classes,
                                   dtype=dtype, seed=setup.seed)  # fmt: skip
            x = r if key == "lora_r" else len(targets)
            curves[key].append({"x": x, "targets": list(targets), **point(setup, opts)})
    setup.fn = attach_lora(detach_lora(setup.fn), r=opts.lora_r, targets=opts.targets, num_classes=setup.num_classes,
                           dtype=dtype, seed=setup.seed)  # fmt: skip
    return curves


def plot(curves: dict[str, Any], path: str | Path, title: str) -> Path:
    """Two rows (median ms per call; peak GPU GiB) × three axes (length, rank, modules) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"seq_len": "sequence length", "lora_r": "LoRA rank r", "modules": "adapted module types per layer"}
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), squeeze=False)
    for col, (axis, points) in enumerate(curves.items()):
        xs = [p["x"] for p in points]
        for op in OPS:
            ms = [p.get(op, {}).get("median_s") for p in points]
            gib = [p.get(op, {}).get("peak_bytes") for p in points]
            if any(v is not None for v in ms):
                axes[0][col].plot(xs, [None if v is None else 1e3 * v for v in ms], marker="o", label=op)
            if any(v is not None for v in gib):
                axes[1][col].plot(xs, [None if v is None else v / 2**30 for v in gib], marker="o", label=op)
        axes[0][col].set(xlabel=labels[axis], ylabel="ms per call (median)")
        axes[1][col].set(xlabel=labels[axis], ylabel="peak GPU memory (GiB)")
        if not axes[1][col].lines:
            axes[1][col].text(0.5, 0.5, "no GPU memory statistic on CPU", ha="center", va="center",
                              transform=axes[1][col].transAxes)  # fmt: skip
        for row in axes:
            row[col].grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out = atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return out
