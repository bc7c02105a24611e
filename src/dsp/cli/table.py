"""Print a table with rich when it is installed, as plain aligned text otherwise."""

from __future__ import annotations

from typing import Sequence


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is optional (the `bench` extra)
        cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
        print(title)
        for i, r in enumerate(cells):
            print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
            if i == 0:
                print("  ".join("-" * w for w in widths))
        return
    table = Table(title=title)
    for h in header:
        table.add_column(str(h), justify="right")
    for r in rows:
        table.add_row(*[str(c) for c in r])
    console = Console()
    console.width = max(console.width, 120)  # keep rows on one line in narrow pipes
    console.print(table)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
