"""The ``recache`` command line: one module per subcommand, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import os
import sys

from recache.errors import RecacheError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line (no usage dump) and exits with status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from recache._version import __version__
    from recache.cli import align, calibrate, demo, evaluate, pretrain, sample, search, train

    parser = _Parser(prog="recache", description="Budgeted caching schedules for diffusion transformers.")
    parser.add_argument("--version", action="version", version=f"recache {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in (sample, evaluate, train, search, align, calibrate, demo, pretrain):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    from recache import distributed

    under_torchrun = "LOCAL_RANK" in os.environ
    try:
        if getattr(args, "nproc", 1) > 1 and not under_torchrun:
            distributed.check_nproc(args.nproc)
            return distributed.launch(args.nproc, argv, args.command)
        if under_torchrun and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            if not getattr(args, "data_parallel", False):
                raise RecacheError("only train, search and eval run on several ranks; "
                                   "start this command without torchrun")
            distributed.init()
        status = args.run(args) or 0
        distributed.close()
        return status
    except distributed.RankLost as e:
        print(f"recache {args.command} [rank {distributed.rank()}]: {e}", file=sys.stderr)
        return _leave(1)
    except RecacheError as e:
        if not getattr(e, "shown_by_main", False):
            where = f" [rank {distributed.rank()}]" if distributed.is_distributed() else ""
            print(f"recache {args.command}{where}: error: {e}", file=sys.stderr)
        return _leave(2)
    except KeyboardInterrupt as e:
        print(f"recache {args.command}: interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        return _leave(130)


def _leave(status: int) -> int:
    """The exit status; a rank that stops on an error leaves at once: its process group may be broken, and the
    other ranks may be inside a collective it will never join (its teardown would abort or wait)."""
    from recache import distributed

    if distributed.is_distributed():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status
