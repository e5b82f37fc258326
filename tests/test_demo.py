"""make demo's code path at tiny size: every stage of the demo experiment, one table, one reliability figure."""

from bayeslora.demo import main


def test_the_demo_runs_its_stages_and_writes_one_table_and_figure(tmp_path, capsys):
    overrides = ["model=tiny_bert", "data.max_train=32", "data.max_eval=32", "train.epochs=1"]
    overrides.append(f"results_dir={tmp_path}")
    md = main(overrides)
    for row in ("| map |", "| map + TS |", "| kfac_laplace |", "| vi_lowrank |"):
        assert row in md
    assert (tmp_path / "tables" / "demo.md").read_text() == md
    assert (tmp_path / "tables" / "demo_reliability_sst2_demo.png").stat().st_size > 5000
    assert "demo wall time" in capsys.readouterr().out
    again = main(overrides)  # completed runs are reused, the table is the same
    assert again == md and "skipped" in capsys.readouterr().out
