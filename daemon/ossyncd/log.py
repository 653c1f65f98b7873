"""structlog setup: JSON lines for journald/pipes, console for a TTY; secrets redacted.

structlog is imported when a command configures it or a module first logs (`get_logger`):
it costs about 0.1 s of start-up, which `status` and `list` do without (README "Quick start").
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Iterable, MutableMapping

_secrets: set[str] = set()
_configured = False
_level = logging.CRITICAL   # the configured threshold (level_enabled)


class _LazyLogger:
    """structlog.get_logger(name), resolved at the first log call; a process that never
    configured logging gets the quiet default (`critical`, to stderr) then."""

    def __init__(self, name: str):
        self._name = name
        self._log: Any = None

    def __getattr__(self, attr: str) -> Any:
        if self._log is None:
            import structlog
            if not _configured:
                configure("critical", "auto", stream=sys.stderr)
            self._log = structlog.get_logger(self._name)
        return getattr(self._log, attr)


def get_logger(name: str) -> Any:
    return _LazyLogger(name)


def level_enabled(level: str) -> bool:
    """Would a line at `level` be written? Lets a hot path skip building one that is dropped."""
    return getattr(logging, level.upper()) >= _level


def register_secrets(values: Iterable[str | None]) -> None:
    """Values that must never reach a log line (keys, tokens), however they got there."""
    _secrets.update(v for v in values if v and len(v) >= 6)


def _redact(_, __, event: MutableMapping) -> MutableMapping:
    if not _secrets:
        return event
    for k, v in event.items():
        if isinstance(v, str):
            for s in _secrets:
                if s in v:
                    v = v.replace(s, "***")
            event[k] = v
    return event


def configure(level: str = "info", fmt: str = "auto", stream=None) -> None:
    global _configured, _level
    import structlog
    _configured = True
    _level = getattr(logging, level.upper())
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        # a line and its newline in one write(): a kill -9 never leaves half a line that the
        # next process's first line would continue (print() writes them apart)
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries log through stdlib logging: render their records the same way (one JSON line each
    # for journald), redacted too. The STS SDK's own error lines repeat what we report ourselves.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processor=renderer,
        foreign_pre_chain=[structlog.stdlib.add_logger_name, structlog.processors.add_log_level,
                           structlog.processors.TimeStamper(fmt="iso", utc=True), _redact]))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
    for noisy in ("oss2", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logging.getLogger("aliyunsdkcore").setLevel(logging.CRITICAL)
