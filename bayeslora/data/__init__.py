"""Task data: real benchmarks (local copies or the Hugging Face hub) -> tokenized splits + the task's Readout.

Example::

    from bayeslora.data import build_task, make_loader

    task = build_task("arc_easy", tokenizer, format="mc", root="path/to/data")   # root=None: $BAYESLORA_DATA/hub
    train = make_loader(task.train, tokenizer, batch_size=8, shuffle=True, seed=0)
    task.readout, task.num_classes, task.info["splits"]

Modules: :mod:`.sources` (files / hub via ``datasets.load_dataset``), :mod:`.normalize` (one record type for
every schema), :mod:`.registry` (the tasks and their splits), :mod:`.prompts` (the two formats),
:mod:`.splits` (seeded splitting), :mod:`.encode` (tokenizing), :mod:`.tasks` (``build_task``),
:mod:`.collate` (``make_loader``), :mod:`.generic` (user jsonl/csv files).
"""

from ..lazy import exports

# Submodules load on first use (PEP 562): ``bayeslora.data.collate`` needs neither ``datasets`` nor the tokenizers.
_WHERE = {
    "PadCollator": "collate",
    "make_loader": "collate",
    "dataset_size": "collate",
    "Record": "normalize",
    "LETTERS": "prompts",
    "mc_prompt": "prompts",
    "TASKS": "registry",
    "TaskSpec": "registry",
    "DEMO_ROOT": "sources",
    "ENV_VAR": "sources",
    "data_root": "sources",
    "TaskData": "tasks",
    "build_task": "tasks",
}
from ..formats import FORMATS, PADDING_SIDE  # noqa: E402

__getattr__ = exports(__name__, _WHERE)


__all__ = [
    "DEMO_ROOT",
    "ENV_VAR",
    "FORMATS",
    "LETTERS",
    "PADDING_SIDE",
    "TASKS",
    "PadCollator",
    "Record",
    "TaskData",
    "TaskSpec",
    "build_task",
    "data_root",
    "dataset_size",
    "make_loader",
    "mc_prompt",
]
