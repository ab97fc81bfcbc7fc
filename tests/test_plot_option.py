"""`overlap` / `search` write a plot only where asked (`--plot PATH`), and say which extra to install up front."""

from __future__ import annotations

import importlib
import sys

import pytest
from test_overlap_and_search import toy_target

from fx_indexcache.tools import cli


def _never_built(args):
    raise AssertionError("the tool started its work although it cannot write the plot it was asked for")


@pytest.mark.parametrize("tool", ["overlap", "search"])
def test_missing_matplotlib_is_reported_before_any_work(tool, monkeypatch, capsys, tmp_path):
    module = importlib.import_module(cli.SUBCOMMANDS[tool][0])
    monkeypatch.setattr(module, "build_target", _never_built)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert cli.main([tool, "--plot", str(tmp_path / "p.png")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "--plot needs matplotlib" in captured.err and "fx-indexcache[plots]" in captured.err
    assert not (tmp_path / "p.png").exists()


def _run_search(monkeypatch, argv):
    import fx_indexcache.tools.pattern_search as search

    monkeypatch.setattr(search, "build_target", lambda args: toy_target(4, copies=(2,)))
    return cli.main(["search", "--target", "0.5", *argv])


def test_search_without_plot_writes_nothing(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert _run_search(monkeypatch, []) == 0
    text = capsys.readouterr().out
    assert "best pattern" in text and "plot saved" not in text
    assert list(tmp_path.iterdir()) == []  # the checkout (here: the working directory) is left as it was


def test_search_writes_the_plot_where_asked(monkeypatch, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    plot = tmp_path / "out" / "search.png"
    plot.parent.mkdir()
    assert _run_search(monkeypatch, ["--plot", str(plot)]) == 0
    assert f"plot saved to {plot}" in capsys.readouterr().out
    assert plot.stat().st_size > 1000 and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
