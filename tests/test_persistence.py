"""Loading what was saved: the format version, the base-model fingerprint and the posterior state are checked."""

import json

import pytest
import torch
from helpers import TokenDataset, tiny_fn

from bayeslora import BayesianLoRA
from bayeslora.fingerprint import base_fingerprint
from bayeslora.models import load_model
from bayeslora.wrapper import FORMAT_VERSION


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    fn, _ = tiny_fn("bert", r=2)
    bl = BayesianLoRA(fn.model, fn.readout, "kfac_laplace", prior_precision=1.0, prior_fit="none")
    ds = TokenDataset(32, seed=2)
    bl.fit_map(ds.loader(8), {"lr": 1e-2, "max_steps": 4, "progress": False})
    bl.fit(ds.loader(8))
    path = tmp_path_factory.mktemp("saved") / "kfac"
    bl.save(path)
    return path, bl.predictions(ds.loader(16)).log_probs, ds


def _base(seed=0):
    return load_model("tiny-bert", device="cpu", seed=seed)[0]


def test_the_same_base_loads_and_predicts_identically(saved):
    path, before, ds = saved
    meta = json.loads((path / "bayeslora.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and len(meta["base_model"]["tensors"]) == 4
    loaded = BayesianLoRA.load(_base(), path)
    torch.testing.assert_close(loaded.predictions(ds.loader(16)).log_probs, before)


def test_a_base_with_other_weights_of_the_same_architecture_is_refused(saved):
    path, _, _ = saved
    with pytest.raises(ValueError, match=r"bayeslora.json: field 'base_model': the weights .* differ"):
        BayesianLoRA.load(_base(seed=1), path)


def test_the_fingerprint_skips_what_the_adapter_restores_and_sees_one_changed_weight():
    fn, _ = tiny_fn("bert", r=2)
    fp = base_fingerprint(fn.model)
    assert not any("lora_" in n or "classifier" in n for n in fp["tensors"])
    base = _base()
    assert base_fingerprint(base, list(fp["tensors"])) == fp  # plain names: the peft wrapping is mapped back
    name = list(fp["tensors"])[-1]
    with torch.no_grad():
        dict(base.named_parameters())[name].view(-1)[0] += 1e-3
    assert base_fingerprint(base, list(fp["tensors"])) != fp


def _edit(saved, tmp_path, edit_meta=None, edit_state=None):
    import shutil

    path, _, _ = saved
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    if edit_meta:
        meta = json.loads((copy / "bayeslora.json").read_text())
        edit_meta(meta)
        (copy / "bayeslora.json").write_text(json.dumps(meta))
    if edit_state:
        state = torch.load(copy / "posterior.pt", weights_only=True)
        edit_state(state)
        torch.save(state, copy / "posterior.pt")
    return copy


def test_another_format_version_is_refused(saved, tmp_path):
    copy = _edit(saved, tmp_path, edit_meta=lambda m: m.update(format_version=0))
    with pytest.raises(ValueError, match=r"bayeslora.json: field 'format_version' is 0.*Re-save"):
        BayesianLoRA.load(_base(), copy)


def test_a_non_positive_num_data_is_refused(saved, tmp_path):
    copy = _edit(saved, tmp_path, edit_state=lambda s: s.update(num_data=0))
    with pytest.raises(ValueError, match=r"posterior.pt: state\['num_data'\]: expected the training-set size N >= 1"):
        BayesianLoRA.load(_base(), copy)


def test_non_orthonormal_eigenvectors_are_refused(saved, tmp_path):
    def scale(state):
        state["factors"][0]["a_vecs"] = 2.0 * state["factors"][0]["a_vecs"]

    copy = _edit(saved, tmp_path, edit_state=scale)
    with pytest.raises(ValueError, match=r"posterior.pt: state\['factors'\]\[0\]: .* not orthonormal"):
        BayesianLoRA.load(_base(), copy)


def test_stored_map_values_that_differ_from_the_adapter_are_refused(saved, tmp_path):
    def shift(state):
        name = next(iter(state["values"]))
        state["values"][name] = state["values"][name] + 0.5

    copy = _edit(saved, tmp_path, edit_state=shift)
    with pytest.raises(ValueError, match=r"posterior.pt: field 'values' .* differs from the saved adapter"):
        BayesianLoRA.load(_base(), copy)
