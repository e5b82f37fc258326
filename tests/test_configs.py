"""One source of defaults: the Hydra method configs are the Python defaults; config() rebuilds every method."""

import pytest
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


# every option changed from its default, so that config() dropping any of them shows
NON_DEFAULT = {
    "map": {},
    "kfac_laplace": {"backend": "own", "fisher": "mc", "mc_samples": 3, "kfac_approx": "expand", "rank": 4,
                     "lowrank_threshold": 16, "predictive": "sampling", "n_samples": 7, "prior_precision": 2.5,
                     "prior_fit": "val_nll", "prior_per_layer": True, "prior_grid": [1e-2, 1e2, 5], "chunk_size": 3,
                     "seed": 4},
    "vi_meanfield": {"steps": 11, "epochs": 2.0, "lr": 3e-3, "scale_lr": 5e-2, "num_particles": 2, "elbo": "meanfield",
                     "kl_weight": 0.5, "kl_warmup_steps": 3, "rank": 3, "init_scale": 2e-2, "prior_precision": 4.0,
                     "prior_mean": "init", "flipout": False, "n_samples": 5, "likelihood": "gaussian",
                     "noise_std": 0.3, "progress": False, "seed": 9},
    "ensemble": {"k": 3, "train": {"lr": 1e-2}, "seeds": [4, 5, 6], "base_seed": 2, "prior_precision": 3.0,
                 "keep_on_device": False, "include_current": False, "progress": False},
    "mc_dropout": {"n_samples": 4, "p": 0.2, "include_model_dropout": True},
    "temperature": {"base": "mc_dropout", "base_options": {"n_samples": 3}, "n_samples": 3, "prior_precision": 2.0},
    "checkpoint_ensemble": {"m": 2, "checkpoint_dir": "/tmp/ckpts"},
    "ivon": {"lr": 0.2, "epochs": 2.0, "max_steps": 7, "ess": 1e4, "hess_init": 0.3, "beta1": 0.8, "beta2": 0.999,
             "weight_decay": 1e-3, "prior_precision": 2.0, "clip_radius": 0.01, "warmup_ratio": 0.1, "grad_accum": 2,
             "clip": 1.0, "n_samples": 5, "seed": 3, "progress": False},
    "swag": {"n_snapshots": 4, "collect_every": 2, "rank": 3, "lr": 1e-3, "schedule": "cyclic", "optimizer": "sgd",
             "momentum": 0.5, "scale": 1.0, "prior_precision": 2.0, "grad_accum": 2, "clip": None, "n_samples": 5,
             "seed": 3, "progress": False},
    "multiswag": {"k": 2, "train": {"lr": 1e-2}, "seeds": [3, 4], "base_seed": 2, "prior_precision": 3.0,
                  "include_current": False, "swag": {"rank": 3}, "n_samples": 4, "progress": False},
    "tfb": {"metric": "nll", "tolerance": 0.02, "sigma_min": 1e-3, "sigma_max": 0.5, "n_search": 5,
            "n_search_samples": 3, "n_samples": 5, "seed": 2},
}  # fmt: skip
NON_DEFAULT["diag_laplace"] = NON_DEFAULT["last_layer_laplace"] = NON_DEFAULT["kfac_laplace"]
NON_DEFAULT["vi_lowrank"] = NON_DEFAULT["vi_blob"] = NON_DEFAULT["vi_meanfield"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_config_rebuilds_an_equal_posterior(method):
    options = NON_DEFAULT[method]
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
