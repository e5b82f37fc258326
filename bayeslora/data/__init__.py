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

from .collate import PadCollator, make_loader
from .encode import FORMATS, PADDING_SIDE
from .normalize import Record
from .prompts import LETTERS, mc_prompt
from .registry import TASKS, TaskSpec
from .sources import DEMO_ROOT, ENV_VAR, data_root
from .tasks import TaskData, build_task

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
    "make_loader",
    "mc_prompt",
]
