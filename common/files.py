"""Atomic file writes: the one way dicomfl replaces a file.

A new file is written under a fresh hidden name in the same folder (``O_CREAT | O_EXCL |
O_NOFOLLOW``, the caller's mode, masked by the umask as ``open(2)`` does), synced, renamed over
the final name with ``os.replace`` and the folder synced. A reader sees the old file or the new
one, never half of either, and a crash leaves at most a hidden ``.<name>.<random>.tmp`` beside
it. A symbolic link at the final name is refused (:class:`SymlinkTarget`), never written through
or replaced: whoever planted it meant something by it.

All file operations run against a file descriptor of the folder, so the folder that was checked
is the folder written: :mod:`dicomfl.common.outputs` opens an output's folder component by
component without following links and passes that descriptor here.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from pathlib import Path
from typing import IO, Any

from .errors import DicomflError, printable

#: The mode of a file dicomfl writes unless the caller says otherwise (the site's files are its own).
PRIVATE = 0o600


class SymlinkTarget(DicomflError, OSError):
    """The final name of an atomic write is a symbolic link. Also an ``OSError``, so code that
    treats an unwritable file as a transient failure keeps doing so."""


def _open_dir(folder: Path) -> int:
    return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def sync_dir(folder: Path | int) -> None:
    """fsync a folder (by path, or an open descriptor of it), so a rename in it is durable."""
    if isinstance(folder, int):
        os.fsync(folder)
        return
    fd = _open_dir(Path(folder))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """A file being written atomically to ``path``: write to :attr:`fh`, then :meth:`commit`
    (sync, rename into place, sync the folder) or :meth:`discard`. Also a context manager that
    commits on success and discards on an exception.

    ``mode``: the new file's permission bits (umask applies). ``text``: :attr:`fh` is a text file
    (``encoding``, ``newline`` as for ``open``). ``dir_fd``: an open descriptor of the folder
    (not closed here); by default the folder of ``path`` is opened. ``sync_dir``: false leaves the
    folder's sync to the caller (one that orders several renames).
    """

    def __init__(self, path: Path | str, *, mode: int = PRIVATE, text: bool = False, encoding: str = "utf-8",
                 newline: str | None = None, dir_fd: int | None = None, sync_dir: bool = True) -> None:
        self.path = Path(path)
        self._name = self.path.name
        self._sync_dir = sync_dir
        self._own_fd = dir_fd is None
        self._dir_fd = _open_dir(self.path.parent) if dir_fd is None else dir_fd
        self._tmp: str | None = None
        try:
            self._refuse_link()
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            for _ in range(100):
                tmp = f".{self._name}.{secrets.token_hex(6)}.tmp"
                try:
                    fd = os.open(tmp, flags, mode, dir_fd=self._dir_fd)
                except FileExistsError:
                    continue
                self._tmp = tmp
                break
            else:
                raise FileExistsError(f"{printable(str(self.path))}: no free temporary name")
            try:
                self.fh: IO[Any] = (open(fd, "w", encoding=encoding, newline=newline) if text else open(fd, "wb"))
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            if self._tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self._tmp, dir_fd=self._dir_fd)
            self._close_dir()
            raise

    def _refuse_link(self) -> None:
        try:
            st = os.lstat(self._name, dir_fd=self._dir_fd)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise SymlinkTarget(f"{printable(str(self.path))} is a symbolic link; not written through")

    def _close_dir(self) -> None:
        if self._own_fd and self._dir_fd is not None:
            os.close(self._dir_fd)
        self._dir_fd = None

    def commit(self) -> None:
        """Sync the file, rename it over ``path``, sync the folder. On an error before the rename
        the temporary file is removed and ``path`` is unchanged."""
        try:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            self._refuse_link()
            os.replace(self._tmp, self._name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
            self._tmp = None
            if self._sync_dir:
                os.fsync(self._dir_fd)
        finally:
            self.discard()

    def discard(self) -> None:
        """Close and remove the temporary file (``path`` untouched); safe to call twice."""
        with contextlib.suppress(OSError):
            self.fh.close()
        if self._tmp is not None and self._dir_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp, dir_fd=self._dir_fd)
            self._tmp = None
        self._close_dir()

    def __enter__(self) -> IO[Any]:
        return self.fh

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def write_bytes(path: Path | str, data: bytes, *, mode: int = PRIVATE, dir_fd: int | None = None,
                sync_dir: bool = True) -> None:
    """Replace ``path`` atomically with ``data`` (see the module doc)."""
    with AtomicFile(path, mode=mode, dir_fd=dir_fd, sync_dir=sync_dir) as fh:
        fh.write(data)


def write_text(path: Path | str, text: str, *, mode: int = PRIVATE, encoding: str = "utf-8",
               dir_fd: int | None = None) -> None:
    """Replace ``path`` atomically with ``text``."""
    write_bytes(path, text.encode(encoding), mode=mode, dir_fd=dir_fd)


def write_json(path: Path | str, obj: Any, *, mode: int = PRIVATE, dir_fd: int | None = None, **dump: Any) -> None:
    """Replace ``path`` atomically with ``obj`` as JSON (``dump``: ``json.dumps`` options)."""
    write_text(path, json.dumps(obj, **dump), mode=mode, dir_fd=dir_fd)


__all__ = ["PRIVATE", "AtomicFile", "SymlinkTarget", "sync_dir", "write_bytes", "write_json", "write_text"]
