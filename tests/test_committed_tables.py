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


def test_every_committed_table_has_its_store_in_the_manifest():
    """A table in paper/tables/ whose store is not committed could not be checked or resumed: none is committed."""
    tables = sorted(p.stem for p in (ROOT / "paper" / "tables").glob("*.md"))
    assert tables == sorted(MANIFEST), f"tables without a manifest entry: {sorted(set(tables) - set(MANIFEST))}"


def test_a_pending_table_is_not_committed_before_its_store():
    pending = json.loads((ROOT / "paper" / "tables" / "manifest.json").read_text()).get("pending", {})
    for name, argv in pending.items():
        assert name not in MANIFEST and not (ROOT / "paper" / "tables" / f"{name}.md").exists(), name
        assert argv[argv.index("--name") + 1] == name
