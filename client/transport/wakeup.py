"""The wake-up: the SuperNode tells the warm worker that a message has arrived.

The SuperNode (through :mod:`dicomfl.client.transport.supernode`, started by the daemon with
``--wake``) sends one datagram with :func:`wake` to the worker's wake-up socket (``wake.sock``
next to the worker's socket: the same private directory, mode 0700, the socket itself 0600;
``federation.wake_worker``) each time a message and all its objects are in its memory. The
worker's end is :class:`Wakeup`; its task loop (:mod:`dicomfl.client.transport.tasks`) then asks
for the task at once. A datagram carries nothing: its bytes are read and dropped.
"""

from __future__ import annotations

import errno
import math
import os
import select
import socket
import time
from pathlib import Path

WAKE_NAME = "wake.sock"
_WAKE_DRAIN = 64  # datagrams read per wake-up at most (the socket's queue is short; the rest wait)


class Wakeup:
    """The worker's end of the SuperNode's wake-up: a Unix datagram socket bound at ``path`` (mode
    0600; its directory is the worker's private run directory). A stale socket file of an earlier
    worker is replaced; a socket another process is bound to, or anything that is not a socket,
    is not (``OSError``: the worker then finds its tasks by asking)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            if self.path.is_socket():
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as probe:
                    try:
                        probe.connect(str(self.path))
                    except ConnectionRefusedError:  # nobody bound there: an earlier worker's leftover
                        self.path.unlink()
                    else:
                        raise OSError(errno.EADDRINUSE, "another process is bound to the wake-up socket")
            old = os.umask(0o177)
            try:
                self.sock.bind(str(self.path))
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
            st = os.stat(self.path)
            self._id = (st.st_dev, st.st_ino)
            self._poll = select.poll()  # poll, not select: any descriptor number
            self._poll.register(self.sock, select.POLLIN)
        except BaseException:
            self.sock.close()
            raise

    def intact(self) -> bool:
        """The socket file at ``path`` is still this one (not removed or replaced)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._id

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a wake-up; True if one (or more) came. Every datagram
        waiting is read and dropped, so a burst wakes the worker once."""
        try:
            ready = self._poll.poll(max(0, math.ceil(timeout * 1000)))
        except (OSError, ValueError):  # closed under us: behave as a plain wait
            time.sleep(max(0.0, timeout))
            return False
        if not ready:
            return False
        for _ in range(_WAKE_DRAIN):
            try:
                self.sock.recv(64)
            except OSError:  # BlockingIOError: nothing more waiting
                break
        return True

    def close(self) -> None:
        try:  # only our own socket file, while it is still bound (its inode cannot be reused yet)
            if self.intact():
                self.path.unlink()
        except OSError:
            pass
        self.sock.close()


def wake(path: str | os.PathLike) -> bool:
    """Send one wake-up to the worker at ``path`` (the SuperNode's side). Never blocks or raises:
    no worker there (starting, restarting) or a full queue just means no wake-up (the worker's
    backstop ask finds the task)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK) as s:
            s.sendto(b"w", os.fspath(path))
        return True
    except OSError:
        return False

