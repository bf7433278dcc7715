"""``dicomfl coordinator start``: the SuperLink, supervised, and runs that resume by themselves.

TLS and SuperNode authentication on (unless the config says otherwise), runtime dependency
installation off (sites and coordinator are offline). The SuperLink keeps its state in memory
(Flower's ``:flwr-in-memory:``): with a database file each of the many HTTP requests of a round
(every array of every message is an object pushed and pulled on its own) also goes through
SQLite, which costs the SuperLink far more CPU time and makes rounds longer. What a restart loses
is rebuilt: the site keys are registered at every start, the SuperNodes (their node ids unknown
to the new SuperLink) exit and their daemons start them again, and interrupted runs resume from
dicomfl's own checkpoints (below); Flower's own run history (``flwr ls``) does not survive. ``coordinator.superlink_state: file`` in
coordinator.yaml keeps it in ``<state_dir>/superlink.db`` instead. After each start the sites listed in
``authorized_sites`` are registered (already-registered keys are fine) and ``ready.json`` is
written. Then every training run recorded as still running (``<state_dir>/runs/``, see
:mod:`dicomfl.server.runner`) — its ServerApp died with the previous SuperLink — is submitted
again with ``resume``: it continues from its last checkpoint, once the sites it had are back online
(at most :data:`RESUME_WAIT_S` seconds of waiting). A run that makes no progress over
:data:`MAX_IDLE_RESUMES` automatic resumes in a row is marked failed. The SuperLink's SuperExec
starts a submitted ServerApp within 0.25 s (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``; Flower's default
is 1 s).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

from dicomfl.common import files
from dicomfl.common.config import CoordinatorConfig, load_run_config
from dicomfl.common.errors import DicomflError
from dicomfl.common.supervise import pid_alive, supervise, wait_port

from . import flwrcli, runner

log = logging.getLogger("dicomfl.coordinator")


IN_MEMORY = ":flwr-in-memory:"  # Flower's name for its in-memory state


def superlink_database(cfg: CoordinatorConfig) -> str:
    """What the SuperLink's ``--database`` is: in memory unless ``coordinator.superlink_state: file``."""
    if cfg.coordinator.superlink_state == "file":
        return str(cfg.coordinator.state_dir / "superlink.db")
    return IN_MEMORY


def superlink_command(cfg: CoordinatorConfig) -> list[str]:
    c = cfg.coordinator
    exe = Path(sys.executable).with_name("flower-superlink")
    cmd = [str(exe) if exe.exists() else "flower-superlink", "--host", c.address, "--port", str(c.port),
           "--database", superlink_database(cfg), "--disable-runtime-dependency-installation"]
    if c.tls:
        cmd += ["--ssl-ca-certfile", str(c.pki_dir / "ca.crt"), "--ssl-certfile", str(c.pki_dir / "superlink.crt"),
                "--ssl-keyfile", str(c.pki_dir / "superlink.key")]
    else:
        cmd += ["--insecure"]
    if c.supernode_auth:
        cmd += ["--enable-supernode-auth"]
    return cmd


def home(cfg: CoordinatorConfig) -> Path:
    return flwrcli.write_home(cfg.coordinator.state_dir / "flwr-home", cfg)


def register_sites(cfg: CoordinatorConfig) -> None:
    c = cfg.coordinator
    h = home(cfg)
    for site in c.authorized_sites:
        ok, msg = flwrcli.register(h, c.pki_dir / "sites" / f"{site}.pub")
        (log.info if ok else log.error)("site %s: %s", site, msg)


def ready_file(cfg: CoordinatorConfig) -> Path:
    """``<state_dir>/ready.json``: written each time the SuperLink is up and the sites registered."""
    return cfg.coordinator.state_dir / "ready.json"


def write_ready(cfg: CoordinatorConfig, superlink_pid: int) -> None:
    path = ready_file(cfg)
    files.write_json(path, {"superlink_pid": superlink_pid, "service_pid": os.getpid(), "target": cfg.target,
                            "time": time.time()}, mode=0o666)  # umask-masked, as it always was


def read_ready(cfg: CoordinatorConfig) -> dict | None:
    """The last ready record, or None while the coordinator has not (re)started."""
    try:
        return json.loads(ready_file(cfg).read_text())
    except (OSError, ValueError):
        return None


RESUME_WAIT_S = 60.0  # how long a resume waits for the run's sites to be back online
MAX_IDLE_RESUMES = 3  # automatic resumes in a row without a new checkpoint before a run is given up
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


class Resumer:
    """Submits the interrupted runs again after each SuperLink start, each in its own thread."""

    def __init__(self, cfg: CoordinatorConfig) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        self._in_flight: set[Path] = set()

    def resume_all(self) -> None:
        for path in runner.pending_runs(self.cfg):
            with self._lock:
                if path in self._in_flight:
                    continue
                self._in_flight.add(path)
            threading.Thread(target=self._resume, args=(path,), daemon=True, name=f"resume-{path.stem}").start()

    def _resume(self, path: Path) -> None:
        superlink = runner._superlink_pid(self.cfg)
        try:
            self.resume_one(path)
        except Exception as exc:  # noqa: BLE001 - the service stays up; the log says why
            log.error("automatic resume of %s failed: %s: %s", path.name, type(exc).__name__, exc)
        finally:
            with self._lock:
                self._in_flight.discard(path)
        # The SuperLink may have restarted while this run was being resumed (its start then skipped
        # the run, which was in flight): go again if so.
        now = runner._superlink_pid(self.cfg)
        if now is not None and now != superlink and pid_alive(now):
            self.resume_all()

    def resume_one(self, path: Path) -> int:
        rec = runner.read_record(path) or {}
        if rec.get("status") != runner.RUNNING:
            return 0
        try:
            run = load_run_config(Path(rec["run_yaml"]), check_files=False)
        except (KeyError, TypeError, DicomflError) as exc:
            runner.update_record(path, status=runner.FAILED, why=f"cannot resume: run config: {exc}", updated=time.time())
            log.error("run record %s: cannot resume: %s", path.name, exc)
            return 1
        done = runner.checkpoint_round(run.out_dir)
        resumes = list(rec.get("resumes", []))
        recent = [r.get("after_round") for r in resumes[-MAX_IDLE_RESUMES:]]
        if len(recent) == MAX_IDLE_RESUMES and all(r == done for r in recent):
            runner.update_record(path, status=runner.FAILED, updated=time.time(),
                                 why=f"no progress after {MAX_IDLE_RESUMES} automatic resumes (round {done})")
            log.error("run %s: no progress after %d automatic resumes; given up (dicomfl run --resume to try by hand)",
                      run.run.name, MAX_IDLE_RESUMES)
            return 1
        expected = self._expected_sites(run.out_dir, run.run.min_sites)
        online = self._wait_for_sites(expected)
        resumes.append({"after_round": done, "time": time.time(), "sites_online": online})
        runner.update_record(path, resumes=resumes)
        log.info("run %s: the SuperLink restarted; resuming after round %d (%d of %d site(s) online)",
                 run.run.name, done, online, expected)
        code = runner.submit(run, self.cfg, resume=True, clientapp=str(rec.get("clientapp") or runner.CLIENTAPP),
                             echo=lambda line: log.info("run %s: %s", run.run.name, line), follow=False)
        log.info("run %s: resumed run ended (%s)", run.run.name,
                 (runner.read_record(path) or {}).get("status", "?") if code else "finished")
        return code

    @staticmethod
    def _expected_sites(out_dir: Path, min_sites: int) -> int:
        """How many sites the run had: those that ever replied (from its last checkpoint)."""
        ckpt = Path(out_dir) / "checkpoints"
        try:
            latest = json.loads((ckpt / "latest.json").read_text())
            state = json.loads((ckpt / latest["path"] / "state.json").read_text())
            seen = {s for h in state.get("history", []) for s in (h.get("sites") or {})}
            return max(min_sites, len(seen))
        except (OSError, ValueError, KeyError, TypeError):
            return min_sites

    def _wait_for_sites(self, expected: int) -> int:
        h = home(self.cfg)
        deadline = time.monotonic() + RESUME_WAIT_S
        while True:
            online = flwrcli.online_count(h)
            if online >= expected or time.monotonic() >= deadline:
                return online
            time.sleep(1.0)


def start(cfg: CoordinatorConfig) -> int:
    c = cfg.coordinator
    c.state_dir.mkdir(parents=True, exist_ok=True)
    ready_file(cfg).unlink(missing_ok=True)
    h = home(cfg)

    def after_start(proc) -> None:
        if not wait_port(c.address, c.port, 60):
            log.error("SuperLink did not open %s within 60 s", cfg.target)
            return
        log.info("SuperLink listening on %s (tls=%s, supernode auth=%s)", cfg.target, c.tls, c.supernode_auth)
        if c.supernode_auth:
            register_sites(cfg)
        write_ready(cfg, proc.pid)
        log.info("coordinator ready")
        resumer.resume_all()

    resumer = Resumer(cfg)
    env = flwrcli.env_with_home(h)
    env.setdefault(SUPEREXEC_POLL_ENV, "0.25")
    return supervise(superlink_command(cfg), env, c.state_dir / "logs" / "superlink.log",
                     name="SuperLink", backoff_s=3.0, after_start=after_start)
