"""The task loop: the warm worker takes the SuperNode's ClientApp tasks itself, no process per message.

With ``federation.message_path: direct`` (the default) the site daemon starts the SuperNode with
``--isolation process``: the SuperNode then starts no SuperExec and no ``flwr-clientapp``
process. The warm worker (:mod:`dicomfl.client.transport.warm`) runs :class:`TaskLoop` instead. It asks
the SuperNode's Runtime API (HTTP on loopback, the site's ``federation.port``) for a ClientApp
task every ``federation.task_poll_s`` seconds, and for each task it:

1. pulls the message and the run's context with the task's token (what Flower's
   ``pull_task_input`` does, with a short back-off, see below);
2. hands the message to the worker's handler, the same call the forwarder path and the
   in-process path make (:class:`dicomfl.client.handler.SiteHandler`), one message at a time;
3. pushes the reply and the task's status (Flower's own ``push_message`` / ``push_task_output``).

So a message costs what the handler costs, plus a few local HTTP calls; Flower's per-message
process start (the import of Flower itself, the FAB's installation, the ClientApp's loading) is
gone. The Runtime API calls themselves are Flower's (:mod:`.flower_adapter`).

What this does not change: the reply is built by the same handler and audited by the same
checks; nothing else crosses the site boundary. What it does change, for the better: the
coordinator's FAB is never installed or imported at the site. The site runs the ClientApp of
the dicomfl it has installed, whatever code the FAB carries.

The Runtime API's ``AcquireTask`` call is signed with a secret the daemon writes at each start
(:mod:`.secret`: ``<state_dir>/run/superexec.secret``, mode 0600) and passes to the SuperNode
with ``--superexec-auth-secret-file``: another local user who can reach the port cannot take the
site's tasks. (In Flower's default ``subprocess`` isolation that check is off.)

The SuperNode offers a task as soon as it has a message's head, and only then pulls the
message's objects from the SuperLink. Flower's ``pull_task_input`` waits for objects that are not
there yet with a back-off that starts at 1 s and doubles (``PULL_INITIAL_BACKOFF``; no option),
so the worker would wait seconds for objects that arrive milliseconds later on the same host.
The loop makes the same calls (:func:`.flower_adapter.pull_task_message`) with a back-off that
starts at 0.05 s (or ``federation.task_poll_s`` if less) and stops growing at
:data:`PULL_BACKOFF_CAP_S`.

**Woken, not polling.** The SuperNode (through :mod:`dicomfl.client.transport.supernode`, started
by the daemon with ``--wake``) sends one datagram to the worker's wake-up socket each time a
message and all its objects are in its memory (:mod:`.wakeup`; ``federation.wake_worker``). The
worker then asks for the task at once. Until the first wake-up arrives it asks every
``federation.task_poll_s`` (a SuperNode that cannot wake it, e.g. another Flower's loop, costs
nothing but that); afterwards only every :data:`WOKEN_POLL_S` when idle, as a backstop, so an
idle worker no longer asks its SuperNode several times a second. A datagram carries nothing: its
bytes are read and dropped, so whoever else of the site's user might write to the socket can only
make the worker ask sooner, at most once per :data:`WOKEN_MIN_GAP_S` (each ask is signed with the
SuperExec secret). If a backstop ask finds a task waiting (the wake-up was lost: the socket file
removed or replaced, a SuperNode that does not wake), the worker asks every
``federation.task_poll_s`` again until the next wake-up, and binds its socket again if the file
is no longer its own.

A failure of the Runtime API (the SuperNode restarting) is logged and retried with a back-off;
it never ends the worker. A message whose handling fails is answered by the handler's own error
reply; a task whose reply cannot be pushed is reported to the SuperNode as failed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from flwr.app import Context, Message

from . import flower_adapter as flower
from .wakeup import Wakeup

_HEARTBEAT_S = 20.0  # Flower's own task heartbeat interval is 30 s less the call timeout, with jitter
_MAX_BACKOFF_S = 5.0
PULL_FIRST_BACKOFF_S = 0.05
PULL_BACKOFF_CAP_S = 0.25  # the longest wait between two asks for a message object not yet at the SuperNode
#: How often an idle worker asks anyway once its SuperNode has woken it (a missed datagram costs at most this).
WOKEN_POLL_S = 1.0
#: The shortest time between two asks that wake-ups cause (a flood of datagrams cannot make the
#: worker ask more often than this).
WOKEN_MIN_GAP_S = 0.02
_STOP_CHECK_S = 0.1  # how promptly a wait for a wake-up notices that the loop is to stop


Handle = Callable[[Message, Context], Message]


class TaskLoop:
    """Take ClientApp tasks from a SuperNode's Runtime API and answer them in this process.

    Parameters
    ----------
    address : str
        The Runtime API's ``host:port`` (loopback).
    handle : callable
        ``handle(message, context) -> reply``; must not raise (the worker's handler returns an
        error reply instead). Called from this loop's thread, one task at a time.
    secret : bytes
        The SuperExec secret the SuperNode was started with.
    poll_s : float
        How long to wait between two ``AcquireTask`` calls that found nothing.
    logger : logging.Logger
        The site log.
    wakeup : Wakeup, optional
        Where the SuperNode wakes this loop when a message has arrived (see the module doc).
    """

    def __init__(self, address: str, handle: Handle, secret: bytes, poll_s: float, logger: logging.Logger,
                 wakeup: Wakeup | None = None) -> None:
        self.address = address
        self.handle = handle
        self.secret = secret
        self.poll_s = float(poll_s)
        self.log = logger
        self.wakeup = wakeup
        self.handled = 0
        self.wakes = 0  # wake-ups received since the loop last found a task without one
        self.woken = False  # the task being handled was asked for after a wake-up
        self._last_ask = 0.0
        self._announced = False  # the first wake-up was logged

    def _idle(self, stop: threading.Event) -> bool:
        """Wait before the next ask: for a wake-up, or ``poll_s`` (:data:`WOKEN_POLL_S` once the
        SuperNode has woken this loop). True if woken. Returns early (False) if ``stop`` is set."""
        if self.wakeup is None:
            stop.wait(self.poll_s)
            return False
        deadline = time.monotonic() + (max(self.poll_s, WOKEN_POLL_S) if self.wakes else self.poll_s)
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.wakeup.wait(min(left, _STOP_CHECK_S)):
                gap = self._last_ask + WOKEN_MIN_GAP_S - time.monotonic()
                if gap > 0:
                    stop.wait(gap)
                if not self._announced:
                    self._announced = True
                    self.log.info("worker: woken by the SuperNode; asking for tasks every %.2f s when idle from now on",
                                  max(self.poll_s, WOKEN_POLL_S))
                self.wakes += 1
                return True
        return False

    def _missed_wakeup(self) -> None:
        """A task was waiting when an ask that no wake-up caused found it: back to asking every
        ``poll_s`` until the SuperNode wakes this loop again; if the socket file was removed or
        replaced, bind a new one. (A backstop ask that comes while the SuperNode is still pulling
        the message's objects also finds the task first; its wake-up follows.)"""
        self.wakes = 0
        if self.wakeup.intact():  # most often the ask came while the SuperNode was still pulling the objects
            self.log.debug("worker: a task was waiting without a wake-up; asking every %.2f s until woken again",
                           self.poll_s)
            return
        path = self.wakeup.path
        self.wakeup.close()
        try:
            self.wakeup = Wakeup(path)
        except OSError as exc:
            self.wakeup = None
            self.log.warning("worker: the wake-up socket %s was removed or replaced and cannot be bound again (%s); "
                             "asking for tasks every %.2f s", path, exc.strerror or type(exc).__name__, self.poll_s)
        else:
            self.log.warning("worker: the wake-up socket %s was removed or replaced; bound it again", path)

    def _client(self, interceptors: list):
        # No Flower retry invoker (see flower_adapter.runtime_client): a failed call raises; this
        # loop retries AcquireTask with its own back-off, and a failed task is reported as failed.
        return flower.runtime_client(self.address, interceptors)

    def serve_forever(self, stop: threading.Event) -> None:
        """Poll for tasks until ``stop`` is set. Never raises."""
        client = self._client([flower.acquire_auth(self.secret)])
        request = flower.acquire_request()
        backoff, down_since = self.poll_s, None
        try:
            timed_out = False  # the last wait ended without a wake-up
            while not stop.is_set():
                try:
                    self._last_ask = time.monotonic()
                    token = flower.acquire_task(client, request)
                except Exception as exc:  # noqa: BLE001 - the SuperNode may be restarting
                    if down_since is None:
                        down_since = time.monotonic()
                        status = getattr(getattr(exc, "response", None), "status_code", None)
                        why = f"HTTP {status}" if status else type(exc).__name__
                        self.log.warning("worker: the SuperNode's Runtime API at %s gives no task (%s); retrying",
                                         self.address, why)
                    backoff = min(_MAX_BACKOFF_S, backoff * 2)
                    stop.wait(backoff)
                    continue
                if down_since is not None:
                    self.log.info("worker: the SuperNode's Runtime API answers again after %.1f s",
                                  time.monotonic() - down_since)
                    down_since, backoff = None, self.poll_s
                if token is not None:
                    if timed_out and self.wakeup is not None and self.wakes:
                        self._missed_wakeup()
                    self.run_task(token)
                    self.woken = timed_out = False
                else:
                    self.woken = self._idle(stop)
                    timed_out = not self.woken
        finally:
            client.close()

    def run_task(self, token: str) -> None:
        """Pull one task's message, answer it, push the reply and the task's status. Never raises."""
        client = self._client([flower.token_auth(token)])
        beat = _Heartbeat(client, self.log)
        context = None
        completed, details = False, "dicomfl worker: task failed"
        try:
            beat.start()
            message, context = flower.pull_task_message(client, min(PULL_FIRST_BACKOFF_S, self.poll_s),
                                                        PULL_BACKOFF_CAP_S)
            reply = self.handle(message, context)
            flower.push_reply(client, reply, context)
            completed, details = True, ""
            self.handled += 1
        except Exception as exc:  # noqa: BLE001 - one task's failure must not end the worker
            self.log.error("worker: a ClientApp task failed in the Runtime API exchange: %s: %s",
                           type(exc).__name__, exc)
        finally:
            beat.stop()
            try:
                flower.report_task(client, context, completed, details)
            except Exception as exc:  # noqa: BLE001
                self.log.warning("worker: could not report a task's status: %s", type(exc).__name__)
            client.close()


class _Heartbeat:
    """The task's heartbeat while the handler works (Flower's own sender raises SIGINT in its
    process when the SuperNode says the task is gone, which would stop the whole worker)."""

    def __init__(self, client, logger: logging.Logger) -> None:
        self.client = client
        self.log = logger
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="task-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while True:
            try:
                if not flower.send_heartbeat(self.client):
                    self.log.warning("worker: the SuperNode no longer knows the task being handled")
                    return
            except Exception:  # noqa: BLE001 - a missed beat is retried at the next interval
                pass
            if self._stop.wait(_HEARTBEAT_S):
                return
