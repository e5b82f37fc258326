"""The task registry: where each task's data lives, how it is read, split and prompted.

Splits (local files under the data root -> train / validation / test; in brackets the hub dataset used when no
data root is set, with its split mapping):

* sst2, rte: ``train`` -> train + a validation carved from it; GLUE ``dev`` -> test
  [``nyu-mll/glue`` ``sst2`` / ``rte``: train; validation -> test].
* boolq: only ``dev`` exists locally: a fixed 1000-row test split, the rest train + carved validation
  [``google/boolq``: train; validation -> test, as in the papers].
* arc_easy, arc_challenge: ``train`` / ``dev`` / ``test``, 4-option items only
  [``allenai/ai2_arc`` ``ARC-Easy`` / ``ARC-Challenge``].
* openbookqa: ``train`` / ``dev`` / ``test`` [``allenai/openbookqa`` ``main``].
* winogrande_s, winogrande_m: ``winogrande/train_s`` / ``train_m`` -> train + carved validation; ``dev`` -> test
  [``allenai/winogrande`` ``winogrande_s`` / ``winogrande_m``: train; validation -> test].
* mmlu: ``dev`` -> train, ``val`` -> validation, ``test`` -> test [``cais/mmlu`` ``all``].
* jsonl, csv: the user's files ``paths={"train", "validation" (optional: carved), "test"}``.

GLUE and WinoGrande test splits are unlabeled, so their dev splits are the test sets. A carved validation split
uses the run seed; the BoolQ test split uses a fixed seed, so every run seed shares one test set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from . import normalize as N
from .normalize import Normalizer
from .sources import HubSource

ALL = "all"  # role of a single file that is split three ways (BoolQ dev)
GENERIC_OPTIONS = (
    "paths", "text_fields", "label_field", "label_names", "choices_field", "task_type", "noise_std", "noise",
    "target_field",
)  # fmt: skip

GLUE = "Wang et al., 2019, GLUE: A Multi-Task Benchmark and Analysis Platform for NLU (ICLR)"
GLUE_TEST_NOTE = "The GLUE test split is unlabeled, so the GLUE dev (validation) split is the test set."
ARC = "Clark et al., 2018, Think you have Solved Question Answering? Try ARC, the AI2 Reasoning Challenge"
ARC_NOTE = "Only items with exactly four options are kept, as in the Laplace-LoRA and BLoB papers."
WINOGRANDE = "Sakaguchi et al., 2020, WinoGrande: An Adversarial Winograd Schema Challenge at Scale (AAAI)"
WINOGRANDE_NOTE = "The WinoGrande test split is unlabeled, so the dev split is the test set."


@dataclass(frozen=True)
class TaskSpec:
    """How to find, read, split and prompt one task.

    Attributes:
        name: the registry name.
        template: the ``mc`` prompt template (see :data:`bayeslora.data.prompts.TEMPLATES`).
        num_classes: C (None: ``len(label_names)`` of a generic task).
        normalize: raw row -> :class:`~bayeslora.data.normalize.Record` (None: built from generic options).
        directory: folder under the data root (None: user files).
        local: ``{role: file stem}`` under ``directory``; role ``"all"`` is one file split three ways.
        hub: the hub dataset used when no data root is set.
        label_names: ``seq_cls`` class names (None: the answer letters A, B, ...).
        option_words: ``mc`` options of a classification task, in label order (None: each row's choices).
        options: the task's extra keyword arguments for :func:`~bayeslora.data.build_task`.
        file_kind: ``"json"`` / ``"csv"`` for the generic tasks.
        note: how the splits relate to the official ones (copied into ``TaskData.info``).
        license: the data license.
        citation: the dataset paper(s) to cite.
    """

    name: str
    template: str
    num_classes: int | None = None
    normalize: Normalizer | None = None
    directory: str | None = None
    local: Mapping[str, str] = field(default_factory=dict)
    hub: HubSource | None = None
    label_names: tuple[str, ...] | None = None
    option_words: tuple[str, ...] | None = None
    options: tuple[str, ...] = ()
    file_kind: str | None = None
    note: str = ""
    license: str = ""
    citation: str = ""

    @property
    def generic(self) -> bool:
        """True for the user-file tasks ``jsonl`` and ``csv``."""
        return self.file_kind is not None


def _glue(name: str, normalize: Normalizer, template: str, label_names, option_words, citation: str) -> TaskSpec:
    return TaskSpec(
        name,
        template,
        num_classes=2,
        normalize=normalize,
        directory=name,
        local={"train": "train", "test": "dev"},
        hub=HubSource("nyu-mll/glue", name, {"train": "train", "test": "validation"}),
        label_names=label_names,
        option_words=option_words,
        note=GLUE_TEST_NOTE,
        license="as distributed in GLUE" + (" (PASCAL RTE, research use)" if name == "rte" else ""),
        citation=f"{citation}; {GLUE}",
    )


def _ai2(name: str, hub: HubSource, note: str, license: str, citation: str) -> TaskSpec:
    return TaskSpec(
        name,
        "question",
        num_classes=4,
        normalize=N.four_choice,
        directory=name,
        local={"train": "train", "validation": "dev", "test": "test"},
        hub=hub,
        note=note,
        license=license,
        citation=citation,
    )


def _winogrande(size: str) -> TaskSpec:
    return TaskSpec(
        f"winogrande_{size}",
        "winogrande",
        num_classes=2,
        normalize=N.winogrande,
        directory="winogrande",
        local={"train": f"train_{size}", "test": "dev"},
        hub=HubSource("allenai/winogrande", f"winogrande_{size}", {"train": "train", "test": "validation"}),
        note=WINOGRANDE_NOTE,
        license="CC-BY (AI2)",
        citation=WINOGRANDE,
    )


def _generic(name: str, kind: str) -> TaskSpec:
    return TaskSpec(
        name,
        "generic",
        options=GENERIC_OPTIONS,
        file_kind=kind,
        note="User data: paths={'train', 'validation' (optional: carved from train), 'test'}.",
    )


def _arc_hub(config: str) -> HubSource:
    return HubSource("allenai/ai2_arc", config, {"train": "train", "validation": "validation", "test": "test"})


TASKS: dict[str, TaskSpec] = {
    "sst2": _glue(
        "sst2",
        N.sst2,
        "sentiment",
        ("negative", "positive"),
        ("negative", "positive"),
        "Socher et al., 2013, Recursive Deep Models for Semantic Compositionality Over a Sentiment Treebank (EMNLP)",
    ),
    "rte": _glue(
        "rte",
        N.rte,
        "entailment",
        N.RTE_LABELS,
        ("yes", "no"),
        "Dagan et al., 2006; Bar-Haim et al., 2006; Giampiccolo et al., 2007; Bentivogli et al., 2009 (PASCAL RTE)",
    ),
    "boolq": TaskSpec(
        "boolq",
        "boolq",
        num_classes=2,
        normalize=N.boolq,
        directory="boolq",
        local={ALL: "dev"},
        hub=HubSource("google/boolq", None, {"train": "train", "test": "validation"}),
        label_names=("false", "true"),
        option_words=("no", "yes"),
        note=(
            "Local copies hold only the BoolQ dev split (3270 rows): it is split three ways, test = 1000 rows drawn "
            "with a fixed seed (shared by every run seed), the rest train + a validation carved with the run seed. "
            "This differs from the papers, which train on BoolQ train (9427 rows); the hub path follows the papers "
            "(train -> train + carved validation, validation -> test)."
        ),
        license="CC BY-SA 3.0",
        citation="Clark et al., 2019, BoolQ: Exploring the Surprising Difficulty of Natural Yes/No Questions (NAACL)",
    ),
    "arc_easy": _ai2("arc_easy", _arc_hub("ARC-Easy"), ARC_NOTE, "CC BY-SA 4.0", ARC),
    "arc_challenge": _ai2("arc_challenge", _arc_hub("ARC-Challenge"), ARC_NOTE, "CC BY-SA 4.0", ARC),
    "openbookqa": _ai2(
        "openbookqa",
        HubSource("allenai/openbookqa", "main", {"train": "train", "validation": "validation", "test": "test"}),
        "The main (4-option) OpenBookQA split.",
        "Apache-2.0",
        "Mihaylov et al., 2018, Can a Suit of Armor Conduct Electricity? A New Dataset for Open Book QA (EMNLP)",
    ),
    "winogrande_s": _winogrande("s"),
    "winogrande_m": _winogrande("m"),
    "mmlu": TaskSpec(
        "mmlu",
        "question",
        num_classes=4,
        normalize=N.mmlu,
        directory="mmlu",
        local={"train": "dev", "validation": "val", "test": "test"},
        hub=HubSource("cais/mmlu", "all", {"train": "dev", "validation": "validation", "test": "test"}),
        options=("subjects",),
        note="MMLU dev (5 per subject) -> train, val -> validation, test -> test; subjects=[...] filters subjects.",
        license="MIT",
        citation="Hendrycks et al., 2021, Measuring Massive Multitask Language Understanding (ICLR)",
    ),
    "jsonl": _generic("jsonl", "json"),
    "csv": _generic("csv", "csv"),
}
