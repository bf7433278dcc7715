"""Crash-isolated worker processes: a dead, hung or oversized worker costs only its one item.

Native DICOM decoders (GDCM, OpenJPEG, pylibjpeg-rle, libjpeg) fail hard on crafted or corrupt
files: ``std::terminate`` (SIGABRT), SIGSEGV, a pyo3 ``PanicException`` (a ``BaseException``),
an endless loop, or an allocation of many GB for a file of a few hundred bytes. None of that can
be caught in-process, so each item (typically one file) is processed in a worker process:

* a worker that dies on a signal yields ``WorkerFailure("decoder-crash", "SIGSEGV")`` for its item
  (``worker-memory`` for SIGKILL, which on Linux is what the kernel's OOM killer sends;
  ``WorkerFailure("deferred", "interrupted")`` for a signal that only an operator or a
  supervisor sends, SIGTERM, SIGINT, SIGHUP or SIGQUIT: not a verdict on the item);
* an item that runs past ``timeout_s`` has its worker killed and yields ``timeout``;
* ``MemoryError`` -- including an allocation refused by the worker's address-space limit
  (``RLIMIT_AS``, see ``memory_bytes``) -- yields ``worker-memory``. A native decoder that
  handles a refused allocation itself raises its own error instead (OpenJPEG's shows up as
  pydicom's ``RuntimeError``: ``worker-error``); either way the memory was never taken;
* a ``BaseException`` raised by native bindings (``PanicException``) is caught in the worker and
  yields ``decoder-crash`` with the exception's *type name*; only ``KeyboardInterrupt`` and
  ``SystemExit`` propagate (and then end that worker, which the pool reports and replaces);
* a :class:`~dicomfl.common.errors.RejectedFile` raised by ``fn`` yields its own reason and
  detail (PHI-free by that class's contract); any other ``Exception`` yields ``worker-error``
  with the exception's type name. Exception *text* never leaves the worker (it may quote PHI).

Dead or killed workers are replaced and the run goes on. Workers write nothing to the parent's
terminal or logs: each one points its file descriptors 1 and 2 at ``/dev/null`` before it does
anything else, since a native decoder may print anything, header values included. The outcome
travels only as a reason code.

Library or own supervisor
-------------------------
This is a small supervisor of its own (stdlib ``multiprocessing``: one ``Process`` and one
``Pipe`` per worker, waited on with ``multiprocessing.connection.wait``), not a library:

* ``concurrent.futures.ProcessPoolExecutor`` and ``loky`` treat a worker's death as fatal to the
  whole pool (``BrokenProcessPool``: every pending future fails and the pool must be rebuilt),
  cannot kill one task on a timeout, and do not tell which signal killed the worker.
* ``pebble`` does survive a worker's death (``ProcessExpired`` with the exit code) and has
  per-task timeouts, but it is LGPL-3.0 while dicomfl is Apache-2.0 -- a licence review for every
  hospital that redistributes the package -- and the parts it would save us (a death, a timeout)
  are the easy ones; the stderr silencing, the address-space limit, the type-name-only error
  reports and the bounded streaming would still be ours.
* What remains is a few hundred lines of code on documented stdlib APIs,
  with no dependency, that we can read end to end.

Processes are started with the ``spawn`` method, never plain ``fork`` (the parent may have torch
and its threads loaded; a forked child of a threaded parent can deadlock). As with any ``spawn``
pool, a worker re-imports the parent's ``__main__`` script (not a ``python -m`` module): keep the
entry point's module-level imports light (import torch inside functions), or every worker pays
for them. A replacement worker costs one interpreter start plus ``initializer`` (with pydicom and
its decoders to import, that is the bulk of a worker's start); it is paid per crash, not per item.

Per-worker state
----------------
A task that needs state in each worker (a config, a key, decoders imported, a reply-slot file)
is a :class:`WorkerTask`: the object itself is sent to each worker once, when the worker is
spawned, and its :meth:`~WorkerTask.start` runs there before the first item. Each worker holds
its own copy, so no module global is needed and two pools with different settings do not share
anything.

Reply slots
-----------
A large result (an image) need not travel through the pipe: a worker can write it into its own
:class:`ReplySlots` file, a few image-sized slots mapped by the worker and the parent, and reply
with a :class:`SlotRef` of a few bytes; the parent copies the image out (:class:`SlotReader`).

Memory
------
Results stream: each worker holds at most ``prefetch`` items (default 2: the one it works on
and the next, waiting in its pipe), so at most ``prefetch * workers`` items are in flight and at
most that many results wait in the parent. The caller can write each result to disk (an on-disk
array) as it arrives and keep the parent's memory flat. Results may come back out of order; each
carries its item's index in ``items``.

Why a second item in the pipe: with one, a worker that has replied waits for the parent to wake
up, read the reply and hand it the next item. When there are as many workers as cores, the parent
is one more process competing for them, and each worker would sit idle for that wait once per
item. A worker works on its items in the order it got them, so the parent always knows which
one it is on (the first not yet answered), and the guarantees stay per item (a busy worker gets
its next item only if it is small, :data:`PREFETCH_MAX_BYTES`, so the hand-over never blocks):

* the per-item timeout runs from when the worker could start the item (its hand-over, or the
  moment it sent its reply to the item before it, whichever is later);
* a death or a timeout costs exactly the item the worker was on; the item waiting behind it was
  never started, and goes to another worker;
* an item is charged with a death only when its worker dies on it twice: the first death may
  belong to the end of the item before it, so the item runs once more as the *first* item of a
  fresh worker (an idle worker is stopped to make room when none is fresh), where nothing came
  before it.

Shutdown
--------
:class:`IsolatedPool` is a context manager; :func:`imap_isolated` is a generator that owns its
pool and closes it in a ``finally`` -- when it is exhausted, closed, garbage-collected after the
caller stopped iterating, or an exception passes through it. Closing stops idle workers with a
message and kills busy ones by their own pid, then joins them all (bounded waits). Workers also
ask Linux to SIGKILL them if the parent dies (``PR_SET_PDEATHSIG``). Drive a pool from one thread:
that signal is tied to the thread that started the worker.

Example
-------
>>> from dicomfl.common.workers import WorkerFailure, imap_isolated
>>> for index, outcome in imap_isolated(decode_one, paths, workers=4, timeout_s=60,
...                                     memory_bytes=4 << 30):  # doctest: +SKIP
...     if isinstance(outcome, WorkerFailure):
...         log.warning("rejected %s: %s (%s)", rel[index], outcome.reason, outcome.detail)
...     else:
...         store[index] = outcome
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from typing import Any, Generic, NamedTuple, TypeVar

import numpy as np

from .errors import DECODER_CRASH, DEFERRED, INTERRUPTED, TIMEOUT, WORKER_ERROR, WORKER_MEMORY, RejectedFile

__all__ = [
    "DECODER_CRASH",
    "DEFERRED",
    "TIMEOUT",
    "WORKER_MEMORY",
    "WORKER_ERROR",
    "PREFETCH",
    "IsolatedPool",
    "PoolStartError",
    "ReplySlots",
    "SlotReader",
    "SlotRef",
    "WorkerFailure",
    "WorkerTask",
    "default_workers",
    "imap_isolated",
]

# The reason codes (DECODER_CRASH, TIMEOUT, WORKER_MEMORY, WORKER_ERROR) live in errors.py with
# the others and are re-exported here.

T = TypeVar("T")
R = TypeVar("R")

#: How long a worker may take to start (interpreter, imports, ``initializer``) before it is killed.
START_TIMEOUT_S = 120.0
#: Consecutive workers that may die or hang during start-up before the pool gives up.
MAX_START_FAILURES = 3
#: Bounded waits for a process to exit after it was asked to, or killed.
_JOIN_S = 5.0
#: Items a worker holds at most by default: the one it works on and the next (see the module notes).
PREFETCH = 2


@dataclass(frozen=True, slots=True)
class WorkerFailure:
    """Why one item produced no result.

    Attributes
    ----------
    reason : str
        A stable reason code: ``decoder-crash``, ``timeout``, ``worker-memory``,
        ``worker-error``, or the ``reason`` of a ``RejectedFile`` raised by ``fn``.
    detail : str
        PHI-free detail: a signal name (``"SIGSEGV"``), an exception *type* name
        (``"PanicException"``), an exit code, the timeout, or a ``RejectedFile``'s detail.
        Never exception text.
    """

    reason: str
    detail: str = ""


class PoolStartError(RuntimeError):
    """Workers cannot start: they die or hang during start-up, or ``initializer`` raised."""


class WorkerTask:
    """Per-item work that keeps state in each worker process.

    Pass an instance as a pool's ``fn``: it is pickled once per worker when the worker is spawned
    (so it holds only picklable settings until started), :meth:`start` runs in the worker before
    its first item (after its output is silenced, before the memory limit, under the same rules
    as ``initializer``), and the object is then called once per item. The state :meth:`start`
    builds lives in that worker's copy of the object and nowhere else.
    """

    def start(self) -> None:
        """Set up this worker (import decoders, open files); the default does nothing."""

    def __call__(self, item: Any) -> Any:
        raise NotImplementedError


def default_workers() -> int:
    """Number of CPUs this process may run on (its affinity mask), else ``os.cpu_count()``.

    Returns
    -------
    int
        At least 1.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------
# Worker side


def _silence_output() -> None:
    """Point fds 1 and 2 at /dev/null: native decoders print text that may quote header values."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    finally:
        os.close(devnull)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this worker when the parent dies; exit if it already has."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


def _address_space() -> int:
    """This process's current virtual size in bytes (Linux ``VmSize``); 0 where unknown."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _limit_address_space(extra_bytes: int) -> None:
    """Cap the address space (RLIMIT_AS) at the current size plus ``extra_bytes``."""
    limit = _address_space() + extra_bytes
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _run_one(fn: Callable[[Any], Any], index: int, item: Any) -> tuple:
    """Call ``fn(item)`` and build the reply; never lets exception text out."""
    try:
        return ("ok", index, fn(item))
    except (KeyboardInterrupt, SystemExit):
        raise
    except RejectedFile as exc:
        return ("fail", index, exc.reason, exc.detail)
    except MemoryError:
        return ("fail", index, WORKER_MEMORY, "MemoryError")
    except Exception as exc:
        return ("fail", index, WORKER_ERROR, type(exc).__name__)
    except BaseException as exc:  # pyo3 PanicException and the like, from native bindings
        return ("fail", index, DECODER_CRASH, type(exc).__name__)


def _send_reply(conn: Connection, reply: tuple) -> None:
    """Send a reply, stamped with when it was sent (``time.monotonic()``, the same clock in every
    process on Linux: the moment this worker can start its next item); a result that cannot be
    pickled becomes a failure (nothing is half-sent)."""
    try:
        conn.send((*reply, time.monotonic()))
    except (KeyboardInterrupt, SystemExit, OSError):
        raise
    except MemoryError:
        conn.send(("fail", reply[1], WORKER_MEMORY, "MemoryError", time.monotonic()))
    except Exception as exc:  # pickling the result failed before anything was written
        conn.send(("fail", reply[1], WORKER_ERROR, f"result not picklable ({type(exc).__name__})", time.monotonic()))


def _worker_main(
    conn: Connection,
    fn: Callable[[Any], Any],
    initializer: Callable[..., object] | None,
    initargs: tuple,
    memory_bytes: int | None,
    parent_pid: int,
) -> None:
    """A worker's life: silence output, start up, then serve items until told to stop."""
    _silence_output()
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if initializer is not None or isinstance(fn, WorkerTask):
        try:
            if initializer is not None:
                initializer(*initargs)
            if isinstance(fn, WorkerTask):
                fn.start()
        except BaseException as exc:
            conn.send(("init-failed", type(exc).__name__))
            return
    if memory_bytes is not None:
        _limit_address_space(memory_bytes)
    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        index, item = msg
        reply = _run_one(fn, index, item)
        del item, msg
        try:
            _send_reply(conn, reply)
        except OSError:
            return


# --------------------------------------------------------------------------------------------
# Parent side

#: The largest pickled item handed to a worker that is still busy with another (the next item
#: waits in its pipe). A pipe holds 64 KiB or more on Linux; a bigger item would block the send.
PREFETCH_MAX_BYTES = 32 << 10


def _pickled(item: tuple, cache: dict[int, bytes]) -> bytes:
    """``(index, item)`` pickled as ``Connection.send`` would, once per item."""
    index = item[0]
    if index not in cache:
        cache.clear()
        cache[index] = bytes(ForkingPickler.dumps(item))
    return cache[index]


@dataclass(slots=True)
class _Worker:
    process: Any  # multiprocessing.context.SpawnProcess
    conn: Connection
    start_deadline: float
    ready: bool = False
    #: The items handed to this worker and not yet answered, in the order it works on them:
    #: ``(index, item)``; the first is the one it is on.
    tasks: deque = field(default_factory=deque)
    deadline: float = 0.0  # for the first of ``tasks``
    handed: int = 0  # items ever handed to this worker (0: fresh)

    @property
    def task(self) -> int | None:
        """The index of the item this worker is on, if any."""
        return self.tasks[0][0] if self.tasks else None


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    """Set ``env`` in ``os.environ`` for the duration of the block (a spawned child copies it)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


#: Signals that only ever come from outside the worker: an operator's ``kill``, a supervisor
#: stopping a process group, a closed terminal. A decoder that faults raises SIGSEGV, SIGBUS,
#: SIGILL, SIGFPE or (``abort``, ``std::terminate``) SIGABRT, never these; and the worker
#: ignores SIGINT, so SIGINT cannot end it at all. SIGKILL is ambiguous (the kernel's OOM killer
#: sends it too) and stays ``worker-memory``, which is not a verdict either.
OPERATOR_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT})


def _death_failure(exitcode: int | None) -> WorkerFailure:
    """The failure for an item whose worker exited with ``exitcode`` (negative: a signal).

    A death by one of :data:`OPERATOR_SIGNALS` says nothing about the item: it is
    ``deferred`` (``interrupted``), which callers must not cache as a verdict."""
    if exitcode is None:
        return WorkerFailure(DECODER_CRASH, "worker lost")
    if exitcode < 0:
        if -exitcode in OPERATOR_SIGNALS:
            return WorkerFailure(DEFERRED, INTERRUPTED)
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return WorkerFailure(WORKER_MEMORY if -exitcode == signal.SIGKILL else DECODER_CRASH, name)
    return WorkerFailure(DECODER_CRASH, f"exit {exitcode}")


class IsolatedPool(Generic[T, R]):
    """A pool of spawned worker processes that each run ``fn`` on one item at a time.

    Parameters
    ----------
    fn : callable or WorkerTask
        ``fn(item) -> result``. A module-level function (picklable by reference), or a
        :class:`WorkerTask` instance (sent to each worker once, started there). Items and
        results must be picklable. Raise :class:`~dicomfl.common.errors.RejectedFile` for a
        known rejection.
    workers : int, optional
        Number of worker processes; default :func:`default_workers` (the CPUs this process may
        use). ``workers=1`` still runs every item in a separate process. Callers expose this
        as their own setting (a config key or CLI option) and pass it here.
    timeout_s : float
        Wall-clock limit per item, counted from when the worker could start it: when it was
        handed over, or when the worker sent its reply to the item before it, whichever is later.
        Start-up (``initializer``) is not counted; lazy imports inside ``fn`` on the first
        item are, so warm them up in ``initializer``.
    memory_bytes : int, optional
        Address space each worker may *add* after start-up (after its imports and
        ``initializer``): the worker sets ``RLIMIT_AS`` to its start-up size plus this. A
        start-up relative limit keeps the same meaning whatever the worker imported (numpy,
        torch and thread stacks reserve hundreds of MB of address space without using it).
        ``None``: no limit.
    initializer : callable, optional
        Called once in each worker as ``initializer(*initargs)`` before its first item (and
        before the memory limit is set): import decoders there. If it raises, the pool raises
        :class:`PoolStartError` (with only the exception type's name).
    initargs : tuple
        Arguments for ``initializer``.
    start_timeout_s : float
        How long a worker may take to start before it is killed.
    env : dict, optional
        Environment variables set for the workers only (e.g. ``OMP_NUM_THREADS=1``, so that N
        workers do not each start a thread per core): the parent's environment is changed
        only while a worker process starts, and restored at once.
    prefetch : int
        Items a worker holds at most: the one it is on and ``prefetch - 1`` waiting in its pipe
        (see the module's notes). 1: a worker gets its next item only after its reply was read.

    Notes
    -----
    Use as a context manager, or call :meth:`close`. One :meth:`imap` at a time per pool;
    workers are kept between :meth:`imap` calls.
    """

    def __init__(
        self,
        fn: Callable[[T], R],
        *,
        workers: int | None = None,
        timeout_s: float,
        memory_bytes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple = (),
        start_timeout_s: float = START_TIMEOUT_S,
        env: dict[str, str] | None = None,
        prefetch: int = PREFETCH,
    ) -> None:
        n = default_workers() if workers is None else int(workers)
        if n < 1:
            raise ValueError("workers must be at least 1")
        if int(prefetch) < 1:
            raise ValueError("prefetch must be at least 1")
        if not timeout_s > 0:
            raise ValueError("timeout_s must be positive")
        if memory_bytes is not None and memory_bytes <= 0:
            raise ValueError("memory_bytes must be positive (or None for no limit)")
        self._fn = fn
        self._n = n
        self._timeout_s = float(timeout_s)
        self._memory_bytes = memory_bytes
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._start_timeout_s = float(start_timeout_s)
        self._env = dict(env or {})
        self._prefetch = int(prefetch)
        #: Items handed to a worker that died or timed out while it was on an earlier item:
        #: never started, they go to the next free worker before any new item.
        self._requeued: deque = deque()
        #: Items whose worker died while on them once already (see :meth:`_reap`), and those of
        #: them waiting to run again: each goes to a fresh worker as its first item.
        self._died_on: set[int] = set()
        self._retries: deque = deque()
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._start_failures = 0
        self._active = False
        self._closed = False
        #: Every worker pid this pool ever started (for callers and tests that audit cleanup).
        self.spawned_pids: list[int] = []

    # -- public ------------------------------------------------------------------------------

    @property
    def workers(self) -> int:
        """The number of worker processes the pool runs at most."""
        return self._n

    @property
    def pids(self) -> list[int]:
        """Pids of the workers now running."""
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def __enter__(self) -> IsolatedPool[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def imap(self, items: Iterable[T]) -> Iterator[tuple[int, R | WorkerFailure]]:
        """Run ``fn`` over ``items``, yielding ``(index, result or WorkerFailure)`` as they finish.

        Parameters
        ----------
        items : iterable
            Consumed lazily; at most ``prefetch * workers`` items are in flight.

        Yields
        ------
        tuple of (int, result or WorkerFailure)
            The item's position in ``items`` and its outcome; in completion order.

        Raises
        ------
        PoolStartError
            Workers cannot start.
        """
        if self._closed:
            raise ValueError("the pool is closed")
        if self._active:
            raise RuntimeError("one imap at a time per pool")
        self._active = True
        target = max(1, min(self._n, len(items))) if isinstance(items, Sized) else self._n
        source = enumerate(items)
        pending: tuple[int, T] | None = None
        exhausted = False
        payloads: dict[int, bytes] = {}  # the pickled form of the item being handed out

        def fill() -> None:
            """Hand items to the workers with room (the least busy first; starting workers up
            to ``target``)."""
            nonlocal pending, exhausted
            while self._retries:  # first: items to run again, each the first item of a fresh worker
                self._top_up(target)
                fresh = [w for w in self._workers if w.handed == 0]
                if not fresh:
                    idle = [w for w in self._workers if w.ready and not w.tasks]
                    if not idle:
                        break  # the next worker to finish is replaced by a fresh one
                    self._kill(idle[0])  # an idle worker makes way for a fresh one
                    continue
                ready = [w for w in fresh if w.ready]
                if not ready:
                    break  # still starting
                if not self._dispatch(ready[0], *self._retries[0], _pickled(self._retries[0], payloads)):
                    payloads.clear()
                    break
                payloads.clear()
                self._retries.popleft()
            while True:
                requeued = bool(self._requeued)  # items that were never started go first
                if not requeued and pending is None and not exhausted:
                    pending = next(source, None)
                    exhausted = pending is None
                item = self._requeued[0] if requeued else pending
                if item is None:
                    return
                self._top_up(target)
                payload = _pickled(item, payloads)
                # A busy worker gets a next item only if it fits in the pipe: a bigger one would
                # block this send (and every timeout) until the worker has finished its item.
                room = [w for w in self._workers if w.ready and len(w.tasks) < self._prefetch
                        and (not w.tasks or len(payload) <= PREFETCH_MAX_BYTES)]
                if not room:
                    return
                if not self._dispatch(min(room, key=lambda w: len(w.tasks)), *item, payload):
                    return  # that worker died since it last answered; _wait reaps it, the item waits
                payloads.clear()
                if requeued:
                    self._requeued.popleft()
                else:
                    pending = None

        try:
            while True:
                fill()
                if pending is None and exhausted and not self._requeued and not self._retries \
                        and not any(w.tasks for w in self._workers):
                    return
                outcomes = self._wait()
                # Workers that just finished get their next item before the caller sees the
                # results, so they work while the caller handles them.
                fill()
                yield from outcomes
        finally:
            self._active = False
            self._requeued.clear()
            self._died_on.clear()
            self._retries.clear()
            # Items abandoned by an early exit: their workers are killed so that no stale
            # result reaches a later imap.
            for w in [w for w in self._workers if w.tasks]:
                self._kill(w)

    def close(self) -> None:
        """Stop every worker: idle ones by message, busy or starting ones by SIGKILL; join all."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            if w.ready and not w.tasks:
                try:
                    w.conn.send(None)
                except OSError:
                    w.process.kill()
            else:
                w.process.kill()
        deadline = time.monotonic() + _JOIN_S
        for w in self._workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.exitcode is None:
                w.process.kill()
                w.process.join(_JOIN_S)
            w.conn.close()
        self._workers.clear()

    # -- internals ----------------------------------------------------------------------------

    def _top_up(self, target: int) -> None:
        while len(self._workers) < target:
            self._spawn()

    def _spawn(self) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, self._fn, self._initializer, self._initargs, self._memory_bytes, os.getpid()),
            name="dicomfl-worker",
            daemon=True,
        )
        with _environ(self._env):
            process.start()
        child_conn.close()  # the worker's end lives in the worker only, so its death reads as EOF
        self.spawned_pids.append(process.pid)
        self._workers.append(_Worker(process, parent_conn, time.monotonic() + self._start_timeout_s))

    def _dispatch(self, w: _Worker, index: int, item: T, payload: bytes) -> bool:
        """Hand ``item`` (pickled: ``payload``) to ``w``; False (nothing handed) if ``w``'s pipe is
        closed: it died."""
        try:
            w.conn.send_bytes(payload)
        except OSError:
            return False
        if not w.tasks:  # it starts on this one now; a later one starts when the one before is answered
            w.deadline = time.monotonic() + self._timeout_s
        w.tasks.append((index, item))
        w.handed += 1
        return True

    def _answered(self, w: _Worker, sent_at: float) -> int:
        """The worker answered the item it was on at ``sent_at`` (its own clock reading, the
        moment it could start the next item): forget the item, start the clock of the next."""
        index, _item = w.tasks.popleft()
        now = time.monotonic()
        at = sent_at if isinstance(sent_at, float) and sent_at <= now else now
        w.deadline = at + self._timeout_s
        return index

    def _requeue_waiting(self, w: _Worker) -> None:
        """The items waiting behind the one ``w`` was on (never started) go to another worker."""
        while len(w.tasks) > 1:
            self._requeued.appendleft(w.tasks.pop())

    def _wait(self) -> list[tuple[int, R | WorkerFailure]]:
        """Wait for the next replies, deaths, timeouts; return the finished items' outcomes."""
        now = time.monotonic()
        deadlines = [w.deadline if w.tasks else w.start_deadline
                     for w in self._workers if w.tasks or not w.ready]
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        handles: list[Any] = []
        for w in self._workers:
            handles += [w.conn, w.process.sentinel]
        fired = set(wait(handles, timeout))
        out: list[tuple[int, R | WorkerFailure]] = []
        for w in list(self._workers):
            if w.conn in fired or w.process.sentinel in fired:
                self._service(w, out)
        now = time.monotonic()
        for w in list(self._workers):
            if w.tasks and now >= w.deadline:
                self._service(w, out)  # a reply that came in at the last moment still counts
                if w in self._workers and w.tasks and time.monotonic() >= w.deadline:
                    index = w.task
                    self._requeue_waiting(w)
                    self._kill(w)
                    out.append((index, WorkerFailure(TIMEOUT, f"over {self._timeout_s:g} s")))
            elif not w.ready and now >= w.start_deadline:
                self._kill(w)
                self._start_failed("start-up timed out")
        return out

    def _service(self, w: _Worker, out: list[tuple[int, R | WorkerFailure]]) -> None:
        """Read every reply waiting on ``w``'s pipe; reap ``w`` if it has died."""
        dead = False
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                kind = msg[0]
                if kind == "ready":
                    w.ready = True
                    self._start_failures = 0
                elif kind == "ok" and msg[1] == w.task:
                    out.append((self._answered(w, msg[3]), msg[2]))
                elif kind == "fail" and msg[1] == w.task:
                    out.append((self._answered(w, msg[4]), WorkerFailure(msg[2], msg[3])))
                elif kind == "init-failed":
                    self._kill(w)
                    raise PoolStartError(f"worker initializer raised {msg[1]}")
        except (EOFError, OSError):
            dead = True
        if dead or not w.process.is_alive():
            self._reap(w, out)

    def _reap(self, w: _Worker, out: list[tuple[int, R | WorkerFailure]]) -> None:
        """Collect a worker that exited by itself; its item (if any) fails with the cause."""
        w.process.join(_JOIN_S)
        if w.process.exitcode is None:  # pipe closed but still running: should not happen
            w.process.kill()
            w.process.join(_JOIN_S)
        exitcode = w.process.exitcode
        self._forget(w)
        if w.tasks:
            self._requeue_waiting(w)
            # The parent cannot tell a death on an item from one just after the reply to the item
            # before (tearing down its objects, a late signal): the first death on an item runs it
            # once more as the first item of a fresh worker, where a death can only be its own.
            # A file that crashes costs two workers, and a good file is never charged with the
            # death of the one before it (its failure would be cached as its own).
            if w.task not in self._died_on:
                self._died_on.add(w.task)
                self._retries.append(w.tasks[0])
            else:
                out.append((w.task, _death_failure(exitcode)))
        elif not w.ready:
            self._start_failed(_death_failure(exitcode).detail)

    def _kill(self, w: _Worker) -> None:
        """SIGKILL one worker by its own pid and join it."""
        w.process.kill()
        w.process.join(_JOIN_S)
        self._forget(w)

    def _forget(self, w: _Worker) -> None:
        w.conn.close()
        if w in self._workers:
            self._workers.remove(w)

    def _start_failed(self, why: str) -> None:
        self._start_failures += 1
        if self._start_failures >= MAX_START_FAILURES:
            raise PoolStartError(f"{self._start_failures} workers in a row failed to start ({why})")


def imap_isolated(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int | None = None,
    timeout_s: float,
    memory_bytes: int | None = None,
    initializer: Callable[..., object] | None = None,
    initargs: tuple = (),
    env: dict[str, str] | None = None,
    prefetch: int = PREFETCH,
) -> Iterator[tuple[int, R | WorkerFailure]]:
    """Run ``fn`` over ``items`` in crash-isolated worker processes, streaming the outcomes.

    A generator that owns an :class:`IsolatedPool` for its lifetime: the workers are stopped
    when it is exhausted, closed, or collected, or when an exception passes through it.

    Parameters
    ----------
    fn, workers, timeout_s, memory_bytes, initializer, initargs, env, prefetch
        As for :class:`IsolatedPool`.
    items : iterable
        Consumed lazily.

    Yields
    ------
    tuple of (int, result or WorkerFailure)
        ``(index in items, fn(item) or the WorkerFailure that replaced it)``, in completion
        order.
    """
    with IsolatedPool(fn, workers=workers, timeout_s=timeout_s, memory_bytes=memory_bytes,
                      initializer=initializer, initargs=initargs, env=env, prefetch=prefetch) as pool:
        yield from pool.imap(items)


# --------------------------------------------------------------------------------------------
# Reply slots: large results handed over through a shared file instead of the pipe


class SlotRef(NamedTuple):
    """Where a worker left one image: its slot file's name and the image's sequence number."""

    name: str
    seq: int


class ReplySlots:
    """Where a worker leaves its images for the parent: :data:`SLOTS` image-sized slots in a file
    of its own (mode 0600, in a 0700 scratch folder that the caller creates and removes), used
    in turn.

    Sent through the worker's pipe, an image is pickled, cut into pipe-sized writes that each
    wait for the parent to read, and unpickled into a new array: CPU for the worker and the
    parent per file, and a worker held back from its next file until the parent has read it all.
    Written to a mapped slot, the reply is a few hundred bytes and the parent copies the image
    from the slot straight to where it goes (e.g. one ``pwrite`` into a cache chunk).

    ``2 * PREFETCH`` slots are enough. A worker holds at most :data:`PREFETCH` items, and the
    pool hands it a new one only after reading a reply; it reads at most ``PREFETCH`` replies of
    one worker before the caller has copied their images (the caller copies each image before
    it asks the pool for the next outcome). So at most ``PREFETCH`` images read but not yet
    copied plus ``PREFETCH`` new ones are in a worker's slots at once, and by the time it writes
    its result ``k + SLOTS`` into the slot of result ``k``, that one has been copied. Each slot
    starts with the sequence number of the image in it; the reference carries it too, and the
    parent checks it before and after copying, so a broken promise raises (the caller rejects
    that item), never returns a wrong image.
    """

    HEADER = 16  # bytes before each slot's image: the sequence number (8 bytes) and padding
    SLOTS = 2 * PREFETCH

    def __init__(self, path: str, image_size: int, mm: mmap.mmap) -> None:
        self.path, self.image_size, self._mm = path, int(image_size), mm
        self.image_bytes = self.image_size * self.image_size * 4
        self.slot_bytes = self.HEADER + self.image_bytes
        self._seq = 0

    @classmethod
    def file_bytes(cls, image_size: int) -> int:
        """The size of one worker's slot file for ``image_size`` x ``image_size`` float32 images."""
        return cls.SLOTS * (cls.HEADER + int(image_size) * int(image_size) * 4)

    @classmethod
    def create(cls, folder: str, image_size: int) -> ReplySlots:
        """A new slot file in ``folder`` for this process (worker side).

        Its blocks are allocated now (``posix_fallocate``), not on the first write: a write to
        a mapped page that a full file system cannot back kills the writer with SIGBUS, which
        would read as a decoder crash on a good file. Allocated up front, a full disk is an
        ``OSError`` (ENOSPC) here instead, and the worker sends its images in its replies.

        Raises
        ------
        OSError
            The file cannot be created or its space allocated (the file is removed).
        """
        path = os.path.join(folder, f"w{os.getpid()}.slots")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            size = cls.file_bytes(image_size)
            os.posix_fallocate(fd, 0, size)
            mm = mmap.mmap(fd, size, access=mmap.ACCESS_WRITE)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(path, image_size, mm)

    @classmethod
    def attach(cls, path: str, image_size: int) -> ReplySlots:
        """Map a worker's slot file read-only (parent side)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = cls.file_bytes(image_size)
            if os.fstat(fd).st_size != size:
                raise ValueError("reply slot file size")
            mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        return cls(path, image_size, mm)

    def put(self, img: np.ndarray) -> SlotRef:
        """Write ``img`` (float32, image_size x image_size) into the next slot; returns the
        reference ``(file name, sequence number)`` for the reply."""
        seq = self._seq
        self._seq += 1
        at = (seq % self.SLOTS) * self.slot_bytes
        arr = np.ascontiguousarray(img, dtype=np.float32)
        if arr.shape != (self.image_size, self.image_size):
            raise ValueError("image shape")
        self._mm[at:at + 8] = seq.to_bytes(8, "little")
        np.frombuffer(self._mm, np.float32, self.image_size * self.image_size, at + self.HEADER)[:] = arr.reshape(-1)
        return SlotRef(os.path.basename(self.path), seq)

    def read(self, seq: int) -> np.ndarray:
        """A copy of the image of reference ``seq`` (parent side); the slot's sequence number is
        checked before and after the copy."""
        at = (seq % self.SLOTS) * self.slot_bytes
        self._check(seq, at)
        with memoryview(self._mm) as view:
            out = np.frombuffer(view[at + self.HEADER:at + self.slot_bytes], np.float32).copy()
        self._check(seq, at)
        return out.reshape(self.image_size, self.image_size)

    def _check(self, seq: int, at: int) -> None:
        if int.from_bytes(self._mm[at:at + 8], "little") != seq:
            raise RuntimeError("a worker's reply slot was overwritten before it was read")

    def close(self) -> None:
        self._mm.close()


class SlotReader:
    """The parent's side of its workers' reply slots in ``folder``: each worker's file is mapped
    on its first reply and kept for the ``keep`` workers that replied last. A crashed worker's
    replacement writes to a new file, and the parent's memory must not grow with the crashes: a
    file is unmapped when it falls out, and removed once its worker is gone (the folder itself
    is the caller's to remove)."""

    def __init__(self, folder: str, image_size: int, keep: int) -> None:
        self.folder, self.image_size, self.keep = folder, int(image_size), int(keep)
        self._attached: dict[str, ReplySlots] = {}  # the most recent last

    def read(self, ref: SlotRef) -> np.ndarray:
        """A copy of the image ``ref`` points at.

        Raises
        ------
        OSError, ValueError, RuntimeError
            The slot file is gone or not a slot file, or the slot was overwritten.
        """
        name, seq = ref
        slots = self._attached.pop(name, None)
        if slots is None:
            if os.path.basename(name) != name or not (name.startswith("w") and name.endswith(".slots")):
                raise ValueError("reply slot name")
            slots = ReplySlots.attach(os.path.join(self.folder, name), self.image_size)
            while len(self._attached) >= self.keep:
                old_name = next(iter(self._attached))
                self._attached.pop(old_name).close()
                with contextlib.suppress(ValueError, OSError):
                    os.kill(int(old_name[1:-len(".slots")]), 0)  # still running: keep its file
                    continue
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.folder, old_name))
        self._attached[name] = slots
        return slots.read(seq)

    def close(self) -> None:
        for slots in self._attached.values():
            slots.close()
        self._attached.clear()
