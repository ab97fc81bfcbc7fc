"""Plots of the pattern tools: optional, behind the ``plots`` extra, and written only where the user asks.

A command asked for a plot checks for matplotlib before it does any work, so a missing extra is one clear
line at the start, not a traceback after minutes of results.
"""

from __future__ import annotations

import argparse

PLOTS_EXTRA_HINT = "pip install 'fx-indexcache[plots]' (from a clone: pip install '.[plots]')"


def add_plot_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--plot PATH``: write ``what`` as a PNG there. No plot unless asked; nothing is written into the checkout."""
    # --out is the option's earlier name, kept so that existing command lines go on working
    parser.add_argument("--plot", "--out", dest="plot", metavar="PATH", default=None,
                        help=f"write {what} as a PNG to PATH (needs the plots extra: {PLOTS_EXTRA_HINT})")


def missing_plot_support(option: str = "--plot") -> str | None:
    """Why ``option`` cannot be honoured here (matplotlib missing), naming the extra to install; None when it can."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        return f"{option} needs matplotlib, which the 'plots' extra installs: {PLOTS_EXTRA_HINT} ({error})"
    return None


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
