"""Everything the CLI prints goes through here.

The consoles never parse rich markup (markup=False, emoji=False, highlight=False): paths,
keys, URLs and error texts are user data, and "a[draft].txt", "[[watch]]" or "[/b]" must
print as written. Colour comes only from the `style` arguments below, never from text.

rich is imported only when a console writes to a terminal, or lays out what plain writing
cannot (a table, a tab): piped or journald output of `status`, `list` and the error lines is
the same text written directly, and rich costs about 0.07 s of start-up (docs/architecture.md
§15). Plain writing does what rich does to plain text on a non-terminal: it drops the
control characters rich strips (tests/test_quick_start.py compares the two).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from rich.console import Console as RichConsole
    from rich.progress import Progress

# rich.control.STRIP_CONTROL_CODES: bell, backspace, vertical tab, form feed, carriage return
_STRIP = {c: None for c in (7, 8, 11, 12, 13)}


class Line:
    """Styled text without rich: (text, style) parts, joined as they are; nothing is markup."""

    def __init__(self, *parts: str | tuple[str, str]):
        self.parts: list[tuple[str, str | None]] = [(p, None) if isinstance(p, str) else p for p in parts]

    def append(self, text: str, style: str | None = None) -> Line:
        self.parts.append((text, style))
        return self

    @property
    def plain(self) -> str:
        return "".join(t for t, _ in self.parts)

    def __rich__(self):
        from rich.text import Text
        return Text.assemble(*((t, s) if s else t for t, s in self.parts))


class Console:
    """stdout or stderr, looked up at each write (as rich does); rich only when it is needed."""

    def __init__(self, stderr: bool = False, whole_values: bool = False):
        self.stderr = stderr
        self.whole_values = whole_values
        self._rich: RichConsole | None = None

    @property
    def file(self):
        return sys.stderr if self.stderr else sys.stdout

    @property
    def is_terminal(self) -> bool:
        # rich's own decision (rich.console.Console.is_terminal): these variables override isatty
        if "TTY_COMPATIBLE" in os.environ or "FORCE_COLOR" in os.environ:
            return self.rich().is_terminal
        try:
            return self.file.isatty()
        except (AttributeError, ValueError):   # no isatty, or closed: not a terminal
            return False

    def rich(self) -> RichConsole:
        if self._rich is None:
            from rich.console import Console as RichConsole
            self._rich = RichConsole(stderr=self.stderr, soft_wrap=True, markup=False, emoji=False, highlight=False)
            if self.whole_values and not self._rich.is_terminal:
                self._rich.width = 100_000   # piped: rich would cut tables to 80 columns; keep every value whole
        return self._rich

    def print(self, obj: Any = "") -> None:
        text = obj.plain if isinstance(obj, Line) else obj if isinstance(obj, str) else None
        if text is None or "\t" in text or self.is_terminal:   # rich lays it out (tabs: by cell width)
            self.rich().print(obj)
            return
        self.file.write(text.translate(_STRIP) + "\n")


err = Console(stderr=True)
out = Console(whole_values=True)


def styled(*parts: str | tuple[str, str]) -> Line:
    """Plain strings, or (text, style) pairs, joined as they are: nothing is read as markup."""
    return Line(*parts)


def report(label: str, message: str, *, style: str = "red") -> None:
    """`label message` on stderr, the label coloured: "config error: ...", "a.txt: ..."."""
    err.print(styled((label, style), " ", message))


def note(message: str) -> None:
    err.print(message)


def progress() -> Progress:
    """Progress bars on stderr; task descriptions (file names) are plain text too."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
    return Progress(TextColumn("{task.description}", justify="left", markup=False), BarColumn(),
                    DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(), console=err.rich(),
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
    from rich.table import Table
    t = Table(*columns, box=None)
    for row in rows:
        t.add_row(*row)
    console.print(t)
