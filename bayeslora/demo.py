"""``make demo``: the MAP → Bayesian correction on a real model and real data, in a few minutes on a CPU.

Runs the ``stages`` of ``configs/experiment/demo.yaml`` in order (MiniLM fine-tuned with LoRA on the packaged
SST-2 subset until it is overconfident; then temperature scaling, K-FAC Laplace with a validation-NLL prior and
the low-rank VI guide on the same cached MAP), then writes one table and one reliability figure with every method
to ``results/demo/tables``. Completed runs are reused (same identity), so a second ``make demo`` only prints.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> str:
    """Run the demo (extra Hydra overrides in ``argv`` apply to every run); returns the Markdown table."""
    from .figures import make_figures
    from .run import _report, compose, run, study_stages
    from .tables import make_tables

    extra = list(sys.argv[1:] if argv is None else argv)
    base = ["experiment=demo", *extra]
    t0 = time.perf_counter()
    results_dir = None
    for stage in study_stages(base):
        result = run(compose([*base, *stage]))
        _report(result)
        results_dir = Path(result["config"]["results_dir"])
    out = results_dir / "tables"
    rows = ["map", "kfac_laplace", "vi_lowrank"]
    texts = make_tables(results_dir, out, ts_rows=True, name="demo", rows=rows, metrics=["acc", "ece", "nll", "brier"])
    figures = make_figures(results_dir, out, ts_rows=True, prefix="demo")
    print("\n" + texts["md"])
    for path in figures:
        print(f"figure: {path}")
    print(f"demo wall time: {time.perf_counter() - t0:.0f} s")
    return texts["md"]


if __name__ == "__main__":
    main()
