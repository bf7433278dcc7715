"""``dicomfl run``: submit a run to the coordinator's SuperLink and stream its progress.

The submitted Flower app bundle holds only a pyproject naming the installed ServerApp and
ClientApp. Progress lines from the ServerApp (prefixed ``[dicomfl]``) and Flower's errors are
streamed to the terminal; everything else Flower prints goes to ``<out_dir>/flwr-run.log``.

Runs that resume by themselves: a training run is recorded in the coordinator's state dir
(``<state_dir>/runs/<id>.json``: the run config's path, the ClientApp, the status) when it is
submitted. If the SuperLink goes away mid-run, the record stays ``running``; the coordinator
service (:mod:`dicomfl.server.coordinator`), each time it has (re)started the SuperLink, submits
every such run again with ``resume`` (from its last checkpoint) and the record becomes ``finished``
when ``metrics.json`` says all rounds are done. Meanwhile ``dicomfl run`` keeps following the
run's progress (the resumed run's lines land in the same ``flwr-run.log``) while the service is
alive. A run that ended for another reason (the SuperLink stayed up) is ``failed`` and is not
resumed; ``dicomfl run --resume`` stays for that, by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dicomfl.common import files
from dicomfl.common.config import CoordinatorConfig, RunConfig
from dicomfl.common.supervise import pid_alive, strip_colours

from . import flwrcli
from .flwrapp import CLIENTAPP, write_app


RUNNING, FINISHED, FAILED = "running", "finished", "failed"


def submit(run: RunConfig, coord: CoordinatorConfig, *, resume: bool = False, evaluate_only: Path | None = None,
           echo: Callable[[str], None] = print, timeout: float | None = None, clientapp: str = CLIENTAPP,
           follow: bool = True) -> int:
    """Submit ``run`` to the coordinator's SuperLink and stream its progress to ``echo``.

    Returns 0 when the run finished (all its rounds, or the evaluation), 1 when it did not, 124 on
    ``timeout``. ``clientapp`` names the ClientApp the sites run (default: dicomfl's). A training
    run is recorded for the coordinator service; if the SuperLink goes away mid-run and the service
    is alive, ``follow`` keeps streaming the run's progress while the service resumes it.
    """
    t0 = time.monotonic()
    training = evaluate_only is None
    rec = record_path(coord, run) if training else None
    superlink = _superlink_pid(coord)
    if rec is not None:
        _update_record(rec, echo, status=RUNNING, run_yaml=str(Path(run.source).resolve()), clientapp=clientapp,
                       name=run.run.name, rounds=run.run.rounds, out_dir=str(Path(run.out_dir).resolve()),
                       superlink_pid=superlink, submitted_by=os.getpid(), updated=time.time())
    code = _stream(run, coord, resume=resume, evaluate_only=evaluate_only, echo=echo, timeout=timeout,
                   clientapp=clientapp)
    if code == 0 and finished(run, evaluate_only):
        if rec is not None:
            _update_record(rec, echo, status=FINISHED, updated=time.time())
        return 0
    if rec is None:
        return code or 1
    if code == 124 or not _superlink_gone(coord, superlink):
        _update_record(rec, echo, status=FAILED, updated=time.time(),
                       why="timed out" if code == 124 else "the run ended unfinished while the SuperLink stayed up")
        return code or 1
    # The SuperLink went away mid-run: the record stays "running" for the coordinator service.
    done = checkpoint_round(run.out_dir)
    if not follow or not service_alive(coord):
        echo(f"the SuperLink stopped after round {done}; the run resumes from its last checkpoint when "
             "`dicomfl coordinator start` runs again (or by hand: dicomfl run --resume)")
        return 1
    echo(f"the SuperLink stopped after round {done}; the coordinator service restarts it and resumes the run")
    left = None if timeout is None else max(1.0, timeout - (time.monotonic() - t0))
    return follow_run(run, coord, echo=echo, timeout=left)


def _stream(run: RunConfig, coord: CoordinatorConfig, *, resume: bool, evaluate_only: Path | None,
            echo: Callable[[str], None], timeout: float | None, clientapp: str) -> int:
    """``flwr run --stream``: 0 when it ended by itself, 124 on ``timeout``."""
    out = run.out_dir
    out.mkdir(parents=True, exist_ok=True)
    if not resume and evaluate_only is None and (out / "metrics.json").exists():
        (out / "metrics.json").unlink()  # a stale result must not pass for this run's
    with tempfile.TemporaryDirectory(prefix="dicomfl-run-") as tmp:
        tmp = Path(tmp)
        app = write_app(tmp / "app", clientapp)
        home = flwrcli.write_home(tmp / "home", coord)
        overrides = [f'run-yaml="{Path(run.source).resolve()}"', f"resume={'true' if resume else 'false'}"]
        if coord.source is not None:  # the ServerApp maps authenticated keys to sites with its PKI
            overrides.append(f'coordinator-yaml="{Path(coord.source).resolve()}"')
        if evaluate_only is not None:
            overrides.append(f'evaluate-only="{Path(evaluate_only).resolve()}"')
        cmd = [flwrcli.flwr_bin(), "run", str(app), flwrcli.CONNECTION, "--stream"]
        for o in overrides:
            cmd += ["--run-config", o]
        with open(out / "flwr-run.log", "a") as logf:
            proc = subprocess.Popen(cmd, env=flwrcli.env_with_home(home), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)
            seen = {"started": False, "tail": []}

            def pump() -> None:  # in a thread, so that ``timeout`` bounds a `flwr run` that hangs
                assert proc.stdout is not None
                for line in proc.stdout:
                    logf.write(strip_colours(line))  # Flower colours its level names; a file has none
                    logf.flush()
                    s = line.rstrip("\n")
                    if s.strip():
                        seen["tail"] = (seen["tail"] + [s.strip()])[-5:]
                    if s.startswith("[dicomfl]"):
                        _echo_progress(s, echo)
                    elif "ERROR" in s or "Traceback" in s or "Successfully started run" in s:
                        seen["started"] = seen["started"] or "Successfully started run" in s
                        echo(s.replace("\x1b[91m", "").replace("\x1b[0m", "").strip())

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return 124
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                reader.join(timeout=10)
            if proc.returncode != 0 and not seen["started"]:
                # `flwr run` failed before the run started (e.g. it could not import the ClientApp
                # it was given): say why, not just "did not finish".
                echo(f"flwr run failed (status {proc.returncode}) before the run started; its last lines "
                     f"(all in {out / 'flwr-run.log'}):")
                for line in seen["tail"]:
                    echo("  " + line.replace("\x1b[91m", "").replace("\x1b[0m", "").replace("\x1b[92m", "")
                         .replace("\x1b[93m", ""))
    return 0


def _echo_progress(line: str, echo: Callable[[str], None]) -> None:
    s = line.rstrip("\n")
    if s.startswith("[dicomfl]"):
        echo(s[len("[dicomfl] "):])


def finished(run: RunConfig, evaluate_only: Path | None = None) -> bool:
    out = run.out_dir
    if evaluate_only is not None:
        return (out / f"evaluate-{Path(evaluate_only).stem}.json").is_file()
    m = out / "metrics.json"
    if not m.is_file():
        return False
    try:
        return int(json.loads(m.read_text()).get("rounds", -1)) == run.run.rounds
    except (ValueError, OSError):
        return False


# ------------------------------------------------------------------------- run records
def runs_dir(coord: CoordinatorConfig) -> Path:
    return coord.coordinator.state_dir / "runs"


def record_path(coord: CoordinatorConfig, run: RunConfig) -> Path:
    """The record of ``run`` (one per output folder: that is where its checkpoints are)."""
    key = hashlib.sha256(str(Path(run.out_dir).resolve()).encode()).hexdigest()[:16]
    return runs_dir(coord) / f"{key}.json"


def read_record(path: Path) -> dict | None:
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def update_record(path: Path, **fields) -> dict:
    """Merge ``fields`` into the record at ``path`` (atomically) and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = read_record(path) or {}
    rec.update(fields)
    files.write_json(path, rec, mode=0o666, indent=2)  # umask-masked, as it always was
    return rec


def _update_record(path: Path, echo: Callable[[str], None], **fields) -> None:
    try:
        update_record(path, **fields)
    except OSError as exc:  # e.g. submitted from a host without the coordinator's state dir
        echo(f"note: could not record the run for automatic resume ({path.parent}: {type(exc).__name__})")


def pending_runs(coord: CoordinatorConfig) -> list[Path]:
    """Records of training runs that were submitted and have not finished or failed."""
    d = runs_dir(coord)
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob("*.json") if (read_record(p) or {}).get("status") == RUNNING)


def checkpoint_round(out_dir: Path) -> int:
    """The last round checkpointed in ``out_dir`` (0 when none)."""
    try:
        return int(json.loads((Path(out_dir) / "checkpoints" / "latest.json").read_text())["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


# ------------------------------------------------------------------- the SuperLink's state
def _ready(coord: CoordinatorConfig) -> dict | None:
    from .coordinator import read_ready

    return read_ready(coord)


def _superlink_pid(coord: CoordinatorConfig) -> int | None:
    r = _ready(coord)
    return r.get("superlink_pid") if r else None


def service_alive(coord: CoordinatorConfig) -> bool:
    """Whether a ``dicomfl coordinator start`` service for this coordinator runs on this host."""
    r = _ready(coord)
    return bool(r) and pid_alive(r.get("service_pid"))


def _superlink_gone(coord: CoordinatorConfig, pid: int | None, wait_s: float = 5.0) -> bool:
    """Whether the SuperLink the run was submitted to has gone away (waiting up to ``wait_s`` for it)."""
    from dicomfl.common.supervise import port_open

    host, port = coord.coordinator.address, coord.coordinator.port
    deadline = time.monotonic() + wait_s
    while True:
        if pid is not None:
            if not pid_alive(pid) or _superlink_pid(coord) != pid:
                return True
        elif not port_open(host, port):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def follow_run(run: RunConfig, coord: CoordinatorConfig, *, echo: Callable[[str], None] = print,
               timeout: float | None = None, poll_s: float = 0.5) -> int:
    """Follow a run the coordinator service is resuming: echo its progress lines (from
    ``flwr-run.log``) until its record says finished (0) or failed (1), the service is gone (1),
    or ``timeout`` (124)."""
    rec = record_path(coord, run)
    logf = Path(run.out_dir) / "flwr-run.log"
    pos = logf.stat().st_size if logf.exists() else 0
    deadline = None if timeout is None else time.monotonic() + timeout
    buf = ""
    while True:
        if logf.exists():
            with open(logf, "rb") as fh:
                fh.seek(pos)
                data = fh.read()
            pos += len(data)
            buf += data.decode("utf-8", "replace")
            *lines, buf = buf.split("\n")
            for line in lines:
                _echo_progress(line, echo)
        status = (read_record(rec) or {}).get("status")
        if status == FINISHED:
            return 0 if finished(run) else 1
        if status == FAILED:
            echo(f"the run did not finish: {(read_record(rec) or {}).get('why', 'see the coordinator log')}")
            return 1
        if not service_alive(coord):
            echo("the coordinator service stopped; the run resumes when it starts again")
            return 1
        if deadline is not None and time.monotonic() > deadline:
            return 124
        time.sleep(poll_s)
