"""The ``recache`` command line: one module per subcommand, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import sys

from recache.errors import RecacheError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line (no usage dump) and exits with status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from recache import __version__
    from recache.cli import align, calibrate, demo, evaluate, pretrain, sample, search, train

    parser = _Parser(prog="recache", description="Budgeted caching schedules for diffusion transformers.")
    parser.add_argument("--version", action="version", version=f"recache {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in (sample, evaluate, train, search, align, calibrate, demo, pretrain):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except RecacheError as e:
        print(f"recache {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"recache {args.command}: interrupted", file=sys.stderr)
        return 130
