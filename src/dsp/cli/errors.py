"""How the ``dsp`` commands fail: one clear line, the right exit code, a traceback on demand.

* user errors (bad flags, directories, checkpoints, links) -> ``dsp CMD: error: ...``, exit 2;
* a failed rank -> the cause first (``rank 1 (pid 123) died: SIGKILL``), then the other
  ranks' errors that follow from it, folded; exit 1;
* Ctrl-C -> ``dsp CMD: interrupted ...`` (train: which checkpoint is intact), exit 130;
* anything else -> one line and a hint; ``--debug`` (or ``DSP_DEBUG=1``) adds the traceback.

Also the flags every job command shares: ``--timeout`` (and ``DSP_TIMEOUT``), ``--debug``,
``--force``.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

__all__ = ["CommandError", "add_job_flags", "apply_timeout", "report"]

#: Errors that are the user's to fix: their message is the whole story.
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


class CommandError(Exception):
    """An error whose message is already the line to print; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def add_job_flags(p, *, timeout: float, what: str, force: bool = True) -> None:
    """``--timeout`` (default ``timeout``, or ``DSP_TIMEOUT``), ``--debug`` and ``--force``."""
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"collective timeout of every process group (default {timeout:g} s, or "
        f"DSP_TIMEOUT); a rank that stops answering ends the {what} within timeout + 30 s",
    )
    if force:
        p.add_argument(
            "--force",
            action="store_true",
            help="start more local ranks than this machine's cores and memory allow",
        )
    # SUPPRESS: `dsp --debug train` keeps the top-level flag (a subparser default would reset it)
    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="print error tracebacks"
    )
    p.set_defaults(default_timeout=timeout)


def apply_timeout(args) -> float:
    """The job's timeout: ``--timeout``, else ``DSP_TIMEOUT``, else the command's default.

    Exported as ``DSP_TIMEOUT`` so that every group and rank pool of this process and of the
    processes it starts uses it.
    """
    from dsp.mesh import TIMEOUT_ENV, parse_timeout

    if getattr(args, "timeout", None) is not None:
        seconds = parse_timeout(args.timeout, "--timeout")
    elif os.environ.get(TIMEOUT_ENV):
        seconds = parse_timeout(os.environ[TIMEOUT_ENV], TIMEOUT_ENV)
    else:
        seconds = float(getattr(args, "default_timeout", 300.0))
    os.environ[TIMEOUT_ENV] = f"{seconds:g}"
    return seconds


def _debug(args) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("DSP_DEBUG", "") not in ("", "0")


def report(args, exc: BaseException) -> int:
    """Print ``exc`` for the user (stderr) and return the exit status."""
    from dsp.launch import RankError

    prog = f"dsp {getattr(args, 'command', None) or ''}".strip()
    debug = _debug(args)
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    if isinstance(exc, CommandError):
        text, code = str(exc), exc.code
    elif isinstance(exc, KeyboardInterrupt):
        text, code = "interrupted", 130
    elif isinstance(exc, RankError):
        text, code = exc.summary(), 1
    elif isinstance(exc, _USER_ERRORS) or _is_link_error(exc):
        text, code = str(exc), 2
    else:
        hint = "" if debug else " (rerun with --debug for the traceback)"
        text, code = f"{type(exc).__name__}: {exc}{hint}", 1
    label = "" if code == 130 else "error: "
    lines = text.splitlines() or [""]
    print(f"{prog}: {label}{lines[0]}", file=sys.stderr)
    for line in lines[1:]:
        print(f"  {line}", file=sys.stderr)
    return code


def _is_link_error(exc: BaseException) -> bool:
    try:
        from dsp.bench.link import LinkError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, LinkError)
