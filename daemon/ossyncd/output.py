"""Everything the CLI prints goes through here.

The consoles never parse rich markup (markup=False, emoji=False, highlight=False): paths,
keys, URLs and error texts are user data, and "a[draft].txt", "[[watch]]" or "[/b]" must
print as written. Colour comes only from the `style` arguments below, never from text.
"""

from __future__ import annotations

from typing import Sequence

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table
from rich.text import Text

err = Console(stderr=True, soft_wrap=True, markup=False, emoji=False, highlight=False)
out = Console(soft_wrap=True, markup=False, emoji=False, highlight=False)
if not out.is_terminal:   # piped: rich would cut tables to 80 columns; keep every value whole
    out.width = 100_000


def styled(*parts: str | tuple[str, str]) -> Text:
    """Plain strings, or (text, style) pairs, joined as they are: nothing is read as markup."""
    return Text.assemble(*parts)


def report(label: str, message: str, *, style: str = "red") -> None:
    """`label message` on stderr, the label coloured: "config error: ...", "a.txt: ..."."""
    err.print(styled((label, style), " ", message))


def note(message: str) -> None:
    err.print(Text(message))


def progress() -> Progress:
    """Progress bars on stderr; task descriptions (file names) are plain text too."""
    return Progress(TextColumn("{task.description}", justify="left", markup=False), BarColumn(),
                    DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(), console=err,
                    transient=False)


def tsv_field(value) -> str:
    """One field of piped output. Tabs and line breaks in a name are written as \\t, \\n, \\r
    so every row stays one line with the same number of fields."""
    s = "" if value is None else str(value)
    return s.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def tsv(rows, console: Console = out) -> None:
    """Rows (the first one the header) as tab-separated lines with whole values, for cut/grep."""
    for row in rows:
        console.file.write("\t".join(tsv_field(v) for v in row) + "\n")


def table(columns: Sequence[str], rows: Sequence[Sequence[str]], console: Console = out) -> None:
    """A table on a terminal; piped, whole values as tab-separated lines under a header."""
    if not console.is_terminal:
        tsv([tuple(columns), *rows], console)
        return
    t = Table(*columns, box=None)
    for row in rows:
        t.add_row(*row)
    console.print(t)
