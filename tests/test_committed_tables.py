"""Every committed table with a committed results store regenerates byte for byte from that store
(paper/tables/manifest.json lists the bayeslora-tables arguments of each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bayeslora.tables import main

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = json.loads((ROOT / "paper" / "tables" / "manifest.json").read_text())["tables"]


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_committed_table_regenerates_from_its_store(name, tmp_path, monkeypatch, capsys):
    argv = MANIFEST[name]
    store = ROOT / argv[0]
    committed = [ROOT / "paper" / "tables" / f"{name}.{ext}" for ext in ("md", "tex", "csv")]
    assert store.is_dir(), f"{name}: the results store {argv[0]} is not committed"
    assert all(p.is_file() for p in committed), f"{name}: the table is not committed"
    monkeypatch.chdir(ROOT)  # the store paths in the manifest are relative to the repository root
    main([*argv, "--out", str(tmp_path)])
    capsys.readouterr()
    for path in committed:
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), f"{path.name} differs from its store"
