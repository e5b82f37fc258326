"""One source of defaults: the Hydra method configs are the Python defaults; config() rebuilds every method."""

import pytest
from helpers import options_of
from omegaconf import OmegaConf

from bayeslora.cli import GROUPS
from bayeslora.config_check import check_run_config
from bayeslora.posteriors import METHODS, Posterior, accepts, make_posterior, method_defaults
from bayeslora.run import _instantiate, _run_level_options, compose, config_dir

METHOD_FILES = sorted(p.stem for p in (config_dir() / "method").glob("*.yaml"))


def _wired(node, key) -> bool:
    """An option wired to the run's top-level settings (``${seed}``, or a dict of such: the ensemble's train)."""
    if OmegaConf.is_interpolation(node, key):
        return True
    return OmegaConf.is_dict(node[key]) and all(_wired(node[key], k) for k in node[key])


def test_every_registered_method_has_a_config_and_back():
    assert sorted(METHODS) == METHOD_FILES


@pytest.mark.parametrize("method", METHOD_FILES)
def test_method_config_equals_the_python_defaults(method):
    cfg = compose(["experiment=smoke", f"method={method}"])
    node = cfg.method
    defaults = method_defaults(method)
    assert node.name == method
    assert node._target_ == "bayeslora.posteriors.build"  # the group instantiates the posterior
    extra = sorted(set(node) - set(defaults) - {"name", "_target_"})
    assert not extra, f"configs/method/{method}.yaml sets {extra}, which {method} does not take"
    for key, default in defaults.items():
        assert key in node, f"{method}: option {key} is missing from its config"
        if _wired(node, key):
            continue  # wired to the run's top-level settings (seed, progress, the MAP training options)
        value = OmegaConf.to_container(node, resolve=True)[key]
        assert value == default, f"{method}.{key}: the config says {value!r}, the Python default is {default!r}"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_library_and_the_app_build_the_same_method(method):
    cfg = OmegaConf.to_container(compose(["experiment=smoke", f"method={method}"]), resolve=True)
    from_app = _instantiate(cfg["method"], **_run_level_options(cfg))  # what bayeslora-run builds
    from_python = make_posterior(method, **({"prior_precision": 1.0} if accepts(method, "prior_precision") else {}))
    node = compose([f"method={method}"]).method
    wired = {k for k in node if _wired(node, k)}
    a = {k: v for k, v in from_app.config().items() if k not in wired}
    b = {k: v for k, v in from_python.config().items() if k not in wired}
    assert a == b


@pytest.mark.parametrize("method", sorted(METHODS))
def test_config_rebuilds_an_equal_posterior(method):
    options = options_of(method)["non_default"]  # every option changed from its default (its test file's)
    p = make_posterior(method, **options)
    config = p.config()
    missing = sorted(set(method_defaults(method)) - set(config))
    assert not missing, f"{method}.config() drops {missing}: a saved posterior would forget them"
    for key, value in options.items():
        assert config[key] == value, f"{method}.config()[{key!r}] = {config[key]!r}, built with {value!r}"
    assert make_posterior(method, **config).config() == config


OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((config_dir() / g).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_of_every_group_composes_checks_and_instantiates(
    group, option, shared_data, minilm_tokenizer, tmp_path
):
    from bayeslora.models import LoraSpec

    overrides = [f"{group}={option}", "data.max_train=8", "data.max_eval=8"]
    if group != "data" or option != "sst2_demo":
        overrides.append(f"data.root={shared_data}")
    if group == "data" and option in ("jsonl", "csv"):  # a user's own files
        overrides += _user_files(option, shared_data, tmp_path)
    plain = OmegaConf.to_container(compose(overrides), resolve=True)
    check_run_config(plain)
    assert isinstance(_instantiate(plain["lora"], seed=0), LoraSpec)
    assert isinstance(_instantiate(plain["method"], **_run_level_options(plain)), Posterior)
    if group in ("data", "debug"):
        task = _instantiate(plain["data"], minilm_tokenizer, format="seq_cls", seed=0)
        assert task.name == plain["data"]["task"] and len(task.train) >= 1 and len(task.test) >= 1


def _user_files(kind: str, shared_data, tmp_path) -> list[str]:
    """The documented command line of configs/data/<kind>.yaml, on SST-2 rows written as the user's files."""
    import csv
    import json

    rows = [json.loads(line) for line in (shared_data / "sst2" / "train.jsonl").read_text().splitlines()[:40]]
    for split, part in (("train", rows[:30]), ("test", rows[30:])):
        path = tmp_path / f"{split}.{kind}"
        if kind == "jsonl":
            path.write_text("".join(json.dumps({"text": r["sentence"], "label": r["label"]}) + "\n" for r in part))
        else:
            with path.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["text", "label"])
                w.writerows([r["sentence"], ["negative", "positive"][r["label"]]] for r in part)
    return [f"data.options.paths.train={tmp_path}/train.{kind}", f"data.options.paths.test={tmp_path}/test.{kind}",
            "data.options.label_names=[negative,positive]"]  # fmt: skip


def test_a_users_jsonl_through_the_app(shared_data, tmp_path):
    from bayeslora.run import run

    overrides = [
        "experiment=smoke",
        "data=jsonl",
        f"results_dir={tmp_path}/r",
        *_user_files("jsonl", shared_data, tmp_path),
    ]
    result = run(compose(overrides))
    assert (
        result["data"] == "jsonl" and result["num_test"] == 10 and result["num_train"] + result["num_validation"] == 30
    )
    with pytest.raises(Exception, match="data.options.paths.train"):  # a missing mandatory key names itself
        run(compose(["experiment=smoke", "data=jsonl", f"results_dir={tmp_path}/r"]))
