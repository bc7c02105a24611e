"""Argument parsing for the ``dsp`` command. Each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    from dsp.cli import bench, demo, plan, sample, simulate, train

    parser = argparse.ArgumentParser(
        prog="dsp",
        description="Dynamic Sequence Parallelism for multi-dimensional transformers.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="print tracebacks of errors (also DSP_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo.add_parser(sub)
    bench.add_parser(sub)
    train.add_parser(sub)
    sample.add_parser(sub)
    plan.add_parser(sub)
    simulate.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from dsp.cli.errors import report
    from dsp.mesh import TIMEOUT_ENV

    saved = os.environ.get(TIMEOUT_ENV)  # the command exports its --timeout; callers keep theirs
    try:
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as e:  # one clear line; a traceback with --debug
        return report(args, e)
    finally:
        if saved is None:
            os.environ.pop(TIMEOUT_ENV, None)
        else:
            os.environ[TIMEOUT_ENV] = saved


if __name__ == "__main__":
    sys.exit(main())
