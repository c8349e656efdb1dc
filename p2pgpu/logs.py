"""The daemon's logs: text lines for a person at a terminal, JSON lines for journald and log shippers.

``node run --log-format text`` writes ``TIME LEVEL LOGGER: MESSAGE`` lines on
stderr (the format the node always had).  ``--log-format json`` writes one
JSON object per line on **stdout**: ``ts`` (UTC, ISO 8601 with milliseconds),
``level``, ``logger``, ``msg``, ``pid``, then any ``extra={...}`` fields the
call passed, and ``exc`` (the traceback) when there is one.  The default is
``text`` when stderr is a terminal, else ``json`` (under systemd, docker or a
pipe nobody reads by eye).

Under systemd, ``$JOURNAL_STREAM`` names the device and inode of the stream
journald reads; when it is our stdout, each JSON line starts with the syslog
priority prefix ``<N>`` that journald strips and stores as ``PRIORITY``, so
``journalctl -p warning`` filters by level and ``journalctl -o cat`` shows the
bare JSON.  Anywhere else the lines are bare JSON.  Nothing here reads the
clock except through the ``logging`` record's own ``created``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import IO, Any

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Longest message kept in one JSON line (a runaway repr must not make a 100 MB line).
message_chars_max = 16_384

# The attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
# syslog priorities (sd-daemon(3)): what journald makes of a "<N>" prefix.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class LogSetupError(ValueError):
    """A bad ``--log-level`` or ``--log-format``; the message lists the good ones."""


class JsonFormatter(logging.Formatter):
    """One JSON object per record, one line, keys in a fixed order."""

    def __init__(self, *, priority_prefix: bool = False) -> None:
        super().__init__()
        self.priority_prefix = priority_prefix

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        doc: dict[str, Any] = {"ts": ts, "level": record.levelname.lower(), "logger": record.name,
                               "msg": record.getMessage()[:message_chars_max], "pid": record.process}
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_") and key not in doc:
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)[-message_chars_max:]
        line = json.dumps(doc, default=str, ensure_ascii=False)
        if self.priority_prefix:
            return f"<{_priority(record.levelno)}>{line}"
        return line


def _priority(levelno: int) -> int:
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


def journald_reads(stream: IO[str], journal_stream: str | None) -> bool:
    """Whether ``stream`` is the one journald connected (``$JOURNAL_STREAM`` is
    ``DEVICE:INODE`` of it, see systemd.exec(5))."""
    if not journal_stream:
        return False
    try:
        dev, ino = (int(x) for x in journal_stream.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def default_log_format(stderr: IO[str]) -> str:
    """``text`` for a person at a terminal, ``json`` for everything else."""
    try:
        return "text" if stderr.isatty() else "json"
    except (ValueError, AttributeError):
        return "json"


def setup_logging(level: str, fmt: str | None, *, stdout: IO[str] | None = None,
                  stderr: IO[str] | None = None, environ: dict[str, str] | None = None) -> str:
    """Configure the root logger for the daemon; returns the format used.

    Replaces any handler set before (``logging.basicConfig`` would silently
    keep the first), so calling it twice is harmless."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    environ = dict(os.environ) if environ is None else environ
    name = str(level).upper()
    if name not in LOG_LEVELS:
        raise LogSetupError(f"--log-level {level!r}: use one of {', '.join(LOG_LEVELS)}")
    fmt = fmt or default_log_format(stderr)
    if fmt not in LOG_FORMATS:
        raise LogSetupError(f"--log-format {fmt!r}: use one of {', '.join(LOG_FORMATS)}")
    if fmt == "json":
        handler = logging.StreamHandler(stdout)
        handler.setFormatter(JsonFormatter(priority_prefix=journald_reads(stdout, environ.get("JOURNAL_STREAM"))))
    else:
        handler = logging.StreamHandler(stderr)
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, name))
    return fmt


def announce(logger: logging.Logger, msg: str, **fields: Any) -> None:
    """Log ``msg`` at INFO whatever the level: lifecycle lines (ready, stopping)
    an operator always needs, even at the default ``--log-level WARNING``."""
    logger.handle(logger.makeRecord(logger.name, logging.INFO, "(p2pgpu)", 0, msg, (), None, extra=fields))


__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "JsonFormatter",
    "LogSetupError",
    "announce",
    "default_log_format",
    "journald_reads",
    "setup_logging",
]
