"""Logging set-up: the site's own log file under its state dir, and short lines on the console.

Log records are made by dicomfl code from codes, site-local references and counts; pydicom's
warnings (which can quote header values) are never routed here. Every message is written as one
line with control characters escaped (:func:`~dicomfl.common.errors.printable`): a file or folder
name holding a newline or a terminal escape sequence cannot forge log lines or reach a terminal
that displays the log.
"""

from __future__ import annotations

import logging
import os
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


def setup(state_dir: Path | None, name: str, console_level: int = logging.WARNING) -> Path | None:
    root = logging.getLogger("dicomfl")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    console = logging.StreamHandler()
    console.setLevel(console_level)
    console.setFormatter(OneLineFormatter("dicomfl: %(message)s"))
    root.addHandler(console)
    root.propagate = False
    if state_dir is None:
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
    root.addHandler(fh)
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
