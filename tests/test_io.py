"""Atomic writes: complete or absent, with the permissions an ordinary write would give."""

import json
import os

import pytest
import torch

from bayeslora.io import atomic_write, load_torch, save_json, save_torch


def test_saved_files_get_the_mode_of_an_ordinary_write_and_no_temporaries_remain(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    save_json({"a": 1, "t": torch.tensor([1.0, 2.0])}, tmp_path / "m.json")
    save_torch({"v": torch.arange(3)}, tmp_path / "p.pt")
    for name in ("m.json", "p.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1, "t": [1.0, 2.0]}
    assert torch.equal(load_torch(tmp_path / "p.pt")["v"], torch.arange(3))
    assert sorted(os.listdir(tmp_path)) == ["m.json", "p.pt", "plain.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = save_json({"old": True}, tmp_path / "m.json")

    def fail(path):
        path.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, fail)
    assert json.loads(target.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["m.json"]
