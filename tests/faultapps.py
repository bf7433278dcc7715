"""Test-side ClientApps that misbehave on purpose (fault injection lives here, not in dicomfl).

``tests.faultapps:app`` is dicomfl's ClientApp (the forwarder to the site's warm worker) behind a
Flower mod. A site misbehaves only while a fault file sits next to the site config its SuperNode
was started with (``<site.yaml>.fault``, see :func:`fault_file`), so the tests switch faults on and
off without restarting a site. The file holds one fault per line:

* ``nan-weights``: every train reply's weights become NaN;
* ``claim:<name>``: every reply claims to come from site ``<name>``;
* ``kill-worker:<round>``: the train message of that round finds the site's warm worker stopped
  (SIGSTOP) and is handed to it; once the forwarder is connected, the worker is SIGKILLed while
  the message waits at it, so the worker dies in the middle of that round whatever the machine's
  load. Once only (the line is marked done in the file).

The site daemons need this repository on their PYTHONPATH, and so does the process that submits
the run (``flwr run`` checks that it can import the named ClientApp).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from dicomfl.client import app as dicomfl_app
from dicomfl.common import protocol as P
from dicomfl.common import wire

FAULTY_CLIENTAPP = "tests.faultapps:app"


def fault_file(site_yaml: str | Path) -> Path:
    return Path(f"{site_yaml}.fault")


def _faults(context: Context) -> list[str]:
    path = context.node_config.get("site-config")
    try:
        return [line.strip() for line in fault_file(str(path)).read_text().splitlines() if line.strip()]
    except OSError:
        return []


def _worker_pid(context: Context) -> int | None:
    from dicomfl.common.config import load_site_config

    state = load_site_config(str(context.node_config["site-config"]), check_files=False).site.state_dir
    try:
        pid = json.loads((state / "worker.json").read_text()).get("pid")
    except (OSError, ValueError):
        return None
    return pid if isinstance(pid, int) else None


def _kill_worker_while_it_holds(msg: Message, context: Context, call_next) -> Message:
    """Stop the worker, hand it the message, SIGKILL it once the forwarder is connected to it."""
    from dicomfl.client.transport import forwarder

    pid = _worker_pid(context)
    if pid is None:
        return call_next(msg, context)
    os.kill(pid, signal.SIGSTOP)
    connected = threading.Event()
    real_connect = forwarder.connect

    def connect(path: str, wait_s: float):
        sock = real_connect(path, wait_s)  # a stopped listener still completes the connection (backlog)
        connected.set()
        return sock

    def kill_when_connected() -> None:
        connected.wait(60)
        time.sleep(0.2)  # the hello and the message are written into the socket's buffer meanwhile
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    forwarder.connect = connect
    threading.Thread(target=kill_when_connected, daemon=True).start()
    try:
        return call_next(msg, context)
    finally:
        forwarder.connect = real_connect


def faulty(msg: Message, context: Context, call_next) -> Message:
    faults = _faults(context)
    rnd = None
    content = wire.unpack(msg.content) if wire.is_packed(msg.content) else msg.content  # as the site reads it
    if P.CONFIG in content and isinstance(content[P.CONFIG], ConfigRecord):
        rnd = content[P.CONFIG].get("server-round")
    kill = f"kill-worker:{rnd}"
    if msg.metadata.message_type == "train" and kill in faults:
        path = fault_file(str(context.node_config["site-config"]))
        path.write_text("\n".join(f"done:{f}" if f == kill else f for f in faults) + "\n")
        reply = _kill_worker_while_it_holds(msg, context, call_next)
    else:
        reply = call_next(msg, context)
    if not reply.has_content():
        return reply
    packed = wire.is_packed(reply.content)
    content = wire.unpack(reply.content) if packed else reply.content  # the faults change what the site says
    if "nan-weights" in faults and P.ARRAYS in content:
        weights = P.from_record(content[P.ARRAYS])
        content[P.ARRAYS] = P.to_record({k: np.full_like(v, np.nan) for k, v in weights.items()})
    for f in faults:
        if f.startswith("claim:"):
            content[P.SITE] = ConfigRecord({"name": f[len("claim:"):]})
    reply.content = wire.pack(content) if packed else content  # and the reply goes in the form it was in
    return reply


app = ClientApp(mods=[faulty])
app.train()(dicomfl_app.train)
app.train(P.PERSONALIZE)(dicomfl_app.personalize)
app.evaluate()(dicomfl_app.evaluate)
app.query(P.FEDSTATS)(dicomfl_app.fedstats)
app.query()(dicomfl_app.query)
