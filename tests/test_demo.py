"""README's main command (`./run demo`) shows the pass at work every time it runs, not only on a cold cache."""

from __future__ import annotations

import argparse
import re

from fx_indexcache.tools import demo


def run_demo(capsys, decode_steps: int) -> str:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = ["--layers", "2", "--pattern", "FS", "--decode-steps", str(decode_steps)]  # small: it compiles 3 graphs
    assert demo.main(parser.parse_args(args)) == 0  # 0: EQUAL to the oracle
    return capsys.readouterr().out


def test_a_second_demo_run_still_shows_the_rewrite(capsys):
    # the second run finds the first one's prefill graph in Inductor's FX graph cache; served from there, the pass
    # would not run and the per-layer table would be empty (the second run stops after the prefill: that graph is
    # the one a warm cache would serve)
    first, second = run_demo(capsys, decode_steps=1), run_demo(capsys, decode_steps=0)
    for out in (first, second):
        removed = re.search(r"indexers removed: (\d+) of (\d+)", out)
        assert removed and int(removed.group(1)) > 0, out
        assert "FX graph cache" not in out
        assert out.rstrip().endswith("-> EQUAL")
    _assert_followable(first)


def _assert_followable(out: str) -> None:
    """Before the silent compile it says what it compiles and how long that takes; each report names its graph."""
    announce = out.index("Compiling it with torch.compile")
    first_report = out.index("IndexCache report")
    assert announce < first_report
    assert re.search(r"\d+-\d+ (s|min) for 2 layers on 2 CPU cores", out[announce:first_report])
    labels = re.findall(r"== (prefill|decode) graph ==\nIndexCache report", out)
    assert labels == ["prefill", "decode"], out


def test_compile_time_estimate_grows_with_the_layers():
    assert demo.compile_time_estimate(2) == "1-4 min" and demo.compile_time_estimate(6) == "2-7 min"
    assert demo.compile_time_estimate(16) == "5-14 min"
    assert demo.label(0, prefill_reports=1) == "prefill graph" and demo.label(1, prefill_reports=1) == "decode graph"
