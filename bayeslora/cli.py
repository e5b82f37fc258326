"""The console scripts ``bayeslora-run`` and ``bayeslora-tables``: their help answers without importing torch.

``bayeslora-run --help`` lists the config groups and their options, the methods, the tasks and the metrics from
the config directory alone; any other call hands over to :func:`bayeslora.run.main` (Hydra). ``bayeslora-tables``
parses its arguments first (``--help`` exits there) and imports the table code only to build tables.
"""

from __future__ import annotations

import sys
from pathlib import Path

METRIC_NAMES = (  # = bayeslora.tables.METRICS
    "acc", "ece", "nll", "brier", "aurc", "auroc_entropy", "auroc_mi", "rmse", "cov50", "cov90", "cov95", "rce",
    "map_acc", "err_auroc_votes", "err_auroc_entropy", "err_auroc_mi", "err_auroc_map", "map_aurc", "map_ece",
)  # fmt: skip
GROUPS = ("model", "lora", "data", "method", "train", "experiment", "debug", "logger")
HELP_FLAGS = ("--help", "-h")


def config_dir() -> Path:
    """The Hydra config directory: the repository's ``configs/`` or the copy installed with the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "configs", here / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"config.yaml not found next to {here}; reinstall bayeslora (its configs/ are missing).")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def run_help() -> str:
    """The text of ``bayeslora-run --help``."""
    groups = "\n".join(f"  {g:<11} {', '.join(_options(g))}" for g in GROUPS)
    return f"""bayeslora-run: fine-tune a model with LoRA, fit a posterior over the adapter, and score its predictive
(ACC / ECE / NLL / Brier / AURC, OOD detection; a regression: NLL / RMSE / interval coverage / calibration error)
into results_dir/<data>/<model>/<method>/<setting id>/seed_<k>/.

usage: bayeslora-run [GROUP=OPTION ...] [KEY=VALUE ...]          one run
       bayeslora-run -m [GROUP=A,B ...] [KEY=V1,V2 ...]           a sweep (resumable; hydra/launcher=parallel)

config groups (GROUP=OPTION; configs/ in the package):
{groups}

methods (method=):  {", ".join(_options("method"))}
tasks (data=):      {", ".join(_options("data"))}
metrics:            {", ".join(METRIC_NAMES)}

examples:
  bayeslora-run                                       the demo: MiniLM on the packaged SST-2 subset
  bayeslora-run experiment=smoke                      a tiny random model, seconds on CPU
  bayeslora-run data=rte method=kfac_laplace seed=1   BAYESLORA_DATA=/path/to/data for local copies
  bayeslora-run debug=default method=vi_blob          any config in seconds, for a quick check
  bayeslora-run -m data=rte,boolq method=map,kfac_laplace seed=0,1,2

more: --cfg job (print the composed config), --hydra-help (Hydra's own options), README.md and docs/.
"""


def run_main() -> None:
    """Console script ``bayeslora-run``."""
    if any(flag in sys.argv[1:] for flag in HELP_FLAGS):
        sys.stdout.write(run_help())
        return
    from .run import main

    main()


def tables_parser():
    """The argument parser of ``bayeslora-tables`` (no torch needed to build it)."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="bayeslora-tables",
        description="Results directory -> calibration tables (Markdown, LaTeX, CSV), mean ± std over seeds.",
        epilog=f"metrics: {', '.join(METRIC_NAMES)}. Example: bayeslora-tables results/minilm_calibration --ts "
        "--out paper/tables --name minilm_calibration --figures",
    )
    ap.add_argument("results_dir")
    ap.add_argument("--out", default=None, help="directory for <name>.md/.tex/.csv (default: print only)")
    ap.add_argument("--name", default="table")
    ap.add_argument("--split", default="test")
    ap.add_argument(
        "--metrics", nargs="+", default=None, choices=METRIC_NAMES, help="metric blocks (default: the layout's)"
    )
    ap.add_argument("--layout", choices=("datasets", "ood"), default="datasets", help="columns: datasets or OOD sets")
    ap.add_argument("--ts", action="store_true", help="add a '<method> + TS' row (temperature fit on validation)")
    ap.add_argument("--ece-bins", type=int, default=None, help="recompute ECE from predictions.pt with N bins")
    ap.add_argument("--model", default=None, help="only runs of this model")
    ap.add_argument("--data", default=None, help="only runs trained on this dataset")
    ap.add_argument("--rows", nargs="+", default=None, help="only these method labels (+ TS rows too), in order")
    ap.add_argument("--columns", nargs="+", default=None, help="only these columns (datasets / OOD sets), in order")
    ap.add_argument("--figures", action="store_true", help="also write reliability / risk-coverage figures to --out")
    return ap


def tables_main(argv=None) -> None:
    """Console script ``bayeslora-tables``."""
    args = tables_parser().parse_args(argv)
    from .tables import main

    main(args=args)
