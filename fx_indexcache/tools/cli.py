"""``fx-indexcache``: the command line. Each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: subcommand → (module holding ``add_arguments`` and ``main``, one-line help)
SUBCOMMANDS = {
    "demo": ("fx_indexcache.tools.demo", "compile the built-in reference model with IndexCache and check it"),
    "overlap": ("fx_indexcache.tools.overlap", "record every DSA layer's top-k through the graph; layer x layer overlap heatmap"),
    "search": ("fx_indexcache.tools.pattern_search", "greedy training-free search for the F/S pattern that best keeps the outputs"),
}


def at_least(minimum: int):
    """An argparse type for an int >= ``minimum`` (how many layers, batches, tokens, steps); argparse names the
    option and the value with the message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed; it must be an int >= {minimum}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is not allowed; it must be an int >= {minimum}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


#: how many of something that must exist at least once (layers, batches, tokens)
count = at_least(1)


def version_line() -> str:
    """What ``--version`` prints: this package's version and the torch it runs on (bug reports need both)."""
    import torch

    from .. import __version__

    return f"fx-indexcache {__version__} (torch {torch.__version__})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fx-indexcache", description=__doc__)
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo", *(argv or [])])
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return module.main(args)


if __name__ == "__main__":
    sys.exit(main())
