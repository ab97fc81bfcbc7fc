"""README's main command (`./run demo`) shows the pass at work every time it runs, not only on a cold cache."""

from __future__ import annotations

import argparse
import re

from fx_indexcache.tools import demo


def run_demo(capsys) -> str:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert demo.main(parser.parse_args(["--layers", "3", "--decode-steps", "1"])) == 0  # 0: EQUAL to the oracle
    return capsys.readouterr().out


def test_a_second_demo_run_still_shows_the_rewrite(capsys):
    # the second run finds the first one's graphs in Inductor's FX graph cache; served from there, the pass would
    # not run and the per-layer table would be empty
    for out in (run_demo(capsys), run_demo(capsys)):
        removed = re.search(r"indexers removed: (\d+) of (\d+)", out)
        assert removed and int(removed.group(1)) > 0, out
        assert "FX graph cache" not in out
        assert out.rstrip().endswith("-> EQUAL")
