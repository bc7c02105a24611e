"""What a failed multi-rank run reports: the cause first, its consequences folded.

:class:`RankError` is raised by :class:`dsp.launch.RankPool`; :func:`first_line` and
:data:`SECONDARY` (phrases of errors that follow from another rank's failure) are shared with
the torchrun path of the ``dsp`` commands.
"""

from __future__ import annotations

import re
from typing import Optional

__all__ = ["RankError", "SECONDARY", "first_line", "split_causes"]


class RankError(RuntimeError):
    """One or more ranks failed. The message names the cause first.

    Attributes:
        errors: rank -> formatted traceback (raised) or one line (died, stopped answering).
        causes: rank -> one line, for the ranks that failed first: a rank that died
            (``"rank 1 (pid 123) died: SIGKILL"``) or stopped answering, else the ranks
            whose errors are not a consequence of another rank's failure.
        secondary: rank -> one line, errors that follow from the causes (a survivor's
            "Connection reset by peer" or timeout), folded under them.
    """

    def __init__(
        self, errors: dict, causes: Optional[dict] = None, secondary: Optional[dict] = None
    ):
        self.errors = errors
        if causes is None:
            causes, secondary = split_causes({r: first_line(e) for r, e in errors.items()})
        self.causes = causes
        self.secondary = secondary or {}
        super().__init__(self.summary())

    def summary(self) -> str:
        """The causes, one per line, then the folded secondary errors."""
        lines, same = [], {}  # the same error raised on several ranks: one line
        for r in sorted(self.causes):
            text = self.causes[r]
            prefix = f"rank {r}: "
            if text.startswith(prefix):
                same.setdefault(text[len(prefix) :], []).append(r)
            else:
                lines.append(text)
        for text, ranks in same.items():
            who = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {_ranges(ranks)}"
            lines.append(f"{who}: {text}")
        if self.secondary:
            lines.append(
                "then "
                + "; ".join(f"rank {r}: {self.secondary[r]}" for r in sorted(self.secondary))
            )
        return "\n".join(lines)

    def __str__(self) -> str:  # the summary, then the first cause's traceback when it raised
        first = min(self.causes) if self.causes else min(self.errors)
        text = self.errors.get(first, "")
        detail = f"\nrank {first}:\n{text}" if "Traceback" in text else ""
        return self.summary() + detail


#: Phrases of errors that follow from another rank's failure (a peer gone or too slow).
SECONDARY = (
    "Timed out",
    "timed out",
    "Connection reset",
    "Connection closed",
    "connection closed",
    "Broken pipe",
    "failed on another rank",
    "ECONNRESET",
    "EPIPE",
)


def _ranges(ranks: list) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ", ".join(out)


def first_line(text: str) -> str:
    """The first line of an error, without gloo's source location and its chatty advice."""
    line = text.strip().splitlines()[0] if text.strip() else text
    line = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\] ", "", line)
    return line.split(". This is typically caused", 1)[0]


def split_causes(lines: dict) -> tuple:
    secondary = {r: t for r, t in lines.items() if any(p in t for p in SECONDARY)}
    causes = {r: f"rank {r}: {t}" for r, t in lines.items() if r not in secondary}
    if not causes:  # every error looks secondary: report them all as causes
        return {r: f"rank {r}: {t}" for r, t in lines.items()}, {}
    return causes, secondary
