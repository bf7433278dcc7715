"""Logging set-up: the site's own log file under its state dir, and short lines on the console.

Log records are made by dicomfl code from codes, site-local references and counts. A process
that lets libraries log (``setup(..., libraries=True)``: the intake, whose pydicom and pynetdicom
warn about what a sender sent) routes their warnings, their loggers and uncaught thread
exceptions through :class:`LibraryRedactor`, which removes every quoted string, UID-like token
and digit run from a library's message before any handler writes it (a pydicom warning quotes the
invalid value it found, e.g. a SOP Instance UID that embeds a record number). Every message is
written as one line with control characters escaped (:func:`~dicomfl.common.errors.printable`): a
file or folder name holding a newline or a terminal escape sequence cannot forge log lines or
reach a terminal that displays the log.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import warnings
from pathlib import Path

from .errors import printable


class OneLineFormatter(logging.Formatter):
    """A formatter that escapes newlines and control characters in the message (not in a
    traceback appended after it, which stays readable)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


class SiteFileHandler(logging.FileHandler):
    """A log file that cannot be written (a full disk: ENOSPC; EIO) drops the record quietly.

    :class:`logging.Handler`'s own ``handleError`` prints a traceback to stderr for every record
    it could not write: on a full disk that is one traceback per log line, burying the one line
    that says what happened. The records written before the disk filled stay in the file.
    """

    def handleError(self, record: logging.LogRecord) -> None:
        import sys

        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handleError(record)


REDACTED = "<redacted>"
# A quoted string (a value as repr() or a library prints it), a UID-like token, and any token
# holding a run of 5 or more digits (record numbers, dates, a UID a sender mangled).
_QUOTED = re.compile(r"""b?'[^']*'?|b?"[^"]*"?""")
_UID_LIKE = re.compile(r"\d+(?:\.\d+){3,}")
_DIGIT_RUN = re.compile(r"[^\s<>()\[\],;]*\d{5,}[^\s<>()\[\],;]*")
LIBRARY_LOGGERS = ("py.warnings", "pydicom", "pynetdicom")


def redact(text: str) -> str:
    """``text`` with every quoted string, UID-like token and long digit run replaced by
    ``<redacted>``."""
    text = _QUOTED.sub(REDACTED, text)
    text = _UID_LIKE.sub(REDACTED, text)
    return _DIGIT_RUN.sub(REDACTED, text)


class LibraryRedactor(logging.Filter):
    """A handler filter: a record from outside dicomfl (pydicom, pynetdicom, a captured warning)
    is reduced to its redacted message, with no traceback (an exception's text may quote a
    value; its type is kept), and the same redacted message is written at most once a minute
    (a sender cannot grow the log by repeating one malformed value). dicomfl's own records pass
    unchanged."""

    def __init__(self, repeat_s: float = 60.0) -> None:
        super().__init__()
        self.repeat_s = repeat_s
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "dicomfl" or record.name.startswith("dicomfl."):
            return True
        if hasattr(record, "_dicomfl_keep"):  # already reduced for another handler
            return bool(record._dicomfl_keep)
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a message that cannot be formatted says nothing
            text = "(unformattable message)"
        if record.exc_info and record.exc_info[0] is not None:
            text += f" ({record.exc_info[0].__name__})"
        record.msg, record.args = redact(text), None
        record.exc_info = record.exc_text = record.stack_info = None
        record._dicomfl_keep = self._fresh(record.msg)  # type: ignore[attr-defined]
        return bool(record._dicomfl_keep)

    def _fresh(self, text: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._seen.get(text, -1e18) < self.repeat_s:
                return False
            if len(self._seen) > 1024:
                self._seen.clear()
            self._seen[text] = now
            return True


def _thread_exception(args: threading.ExceptHookArgs) -> None:
    """Uncaught exception in a thread: one line with its type and where it was raised (the
    default hook prints the exception's text, which may quote a value, to stderr)."""
    if args.exc_type is SystemExit:
        return
    where = ""
    tb = args.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        where = f" at {os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("dicomfl.thread").error(
        "uncaught %s in thread %s%s", getattr(args.exc_type, "__name__", "exception"), name, where
    )


def _route_libraries(handlers: list[logging.Handler]) -> None:
    logging.captureWarnings(True)
    # "always", not the default "default": that one remembers every distinct message text it
    # showed (a warning that quotes each sender's value would grow the registry with every
    # instance); repeats are bounded by LibraryRedactor instead.
    warnings.simplefilter("always")
    for lib in LIBRARY_LOGGERS:
        lg = logging.getLogger(lib)
        for h in list(lg.handlers):
            if getattr(h, "_dicomfl_handler", False):
                lg.removeHandler(h)
        for h in handlers:
            lg.addHandler(h)
        lg.propagate = False  # never to the root logger's last-resort stderr handler
    threading.excepthook = _thread_exception


def setup(
    state_dir: Path | None, name: str, console_level: int = logging.WARNING, libraries: bool = False
) -> Path | None:
    """Send dicomfl's log records to the console (at ``console_level``) and, with a
    ``state_dir``, to ``<state_dir>/logs/<name>.log`` (mode 0600, folder 0700).

    With ``libraries``, also pydicom's and pynetdicom's loggers, Python warnings and uncaught
    thread exceptions, each redacted by :class:`LibraryRedactor` (see the module docstring).
    Returns the log file's path (None without a ``state_dir``).
    """
    root = logging.getLogger("dicomfl")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    console = logging.StreamHandler()
    console.setLevel(console_level)
    console.setFormatter(OneLineFormatter("dicomfl: %(message)s"))
    redactor = LibraryRedactor()
    console.addFilter(redactor)
    console._dicomfl_handler = True  # type: ignore[attr-defined]
    root.addHandler(console)
    root.propagate = False
    if state_dir is None:
        if libraries:
            _route_libraries([console])
        return None
    logdir = Path(state_dir) / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    os.chmod(logdir, 0o700)
    path = logdir / f"{name}.log"
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    os.chmod(path, 0o600)  # a log is the site's own file, as private as its data
    fh = SiteFileHandler(path)
    fh.setLevel(logging.INFO)
    fh.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    fh.addFilter(redactor)
    fh._dicomfl_handler = True  # type: ignore[attr-defined]
    root.addHandler(fh)
    if libraries:
        _route_libraries([console, fh])
    return path


def site_logger(state_dir: Path, site: str) -> logging.Logger:
    """The logger of one site, writing to ``<state_dir>/logs/site.log`` (several sites can share a
    process, as in the benchmark, without their logs mixing)."""
    lg = logging.getLogger(f"dicomfl.site.{site}")
    lg.setLevel(logging.INFO)
    lg.propagate = False  # the site's file is its log; nothing of it reaches a shared console
    logdir = Path(state_dir) / "logs"
    path = (logdir / "site.log").resolve()
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == str(path) for h in lg.handlers):
        logdir.mkdir(parents=True, exist_ok=True)
        os.chmod(logdir, 0o700)
        fh = SiteFileHandler(path)
        fh.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        lg.addHandler(fh)
    return lg
