"""A local federation on loopback: a real SuperLink and N site daemons as separate processes,
with TLS and SuperNode authentication, for the demo and the tests.

    with LocalFederation(workdir, site_yamls) as fed:   # makes PKI, configs; starts everything
        fed.run(run_yaml)                                # dicomfl run, streamed
        fed.kill_site("site-b"); fed.kill_worker("site-a"); fed.kill_superlink()

Every process it starts is in its own process group (its own session) and is stopped by pid on
exit; the workers and the SuperLink it kills for fault tests are children of the daemons it
started, found by the pids those daemons write (``worker.json``, ``ready.json``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from dicomfl.common.config import load_coordinator_config, load_run_config, load_site_config
from dicomfl.common.supervise import child_env, free_port, kill_session, pid_alive, stop_group

from dicomfl.client.transport.warm import read_worker_status
from dicomfl.server import flwrcli, runner
from dicomfl.server.coordinator import read_ready, ready_file
from dicomfl.server.pki import make_all


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dicomfl.workbench.cli", *args]


class LocalFederation:
    def __init__(self, workdir: Path, site_yamls: list[Path], *, tls: bool = True, auth: bool = True,
                 port: int | None = None, extra_sites: list[str] | None = None,
                 site_federation: dict | None = None, coordinator: dict | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.tls, self.auth = tls, auth and tls
        self.site_federation = dict(site_federation or {})  # extra federation: keys of every site (e.g. warm_worker)
        self.sites: dict[str, Path] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        names = []
        for y in site_yamls:
            names.append(load_site_config(y).site.name)
        self.pki = make_all(self.workdir / "pki", names + list(extra_sites or []))
        coord = {"coordinator": {"address": "127.0.0.1", "port": self.port, "state_dir": str(self.workdir / "coordinator"),
                                 "tls": self.tls, "supernode_auth": self.auth, "pki_dir": str(self.pki.folder),
                                 "authorized_sites": names if self.auth else [], **(coordinator or {})}}
        self.coordinator_yaml = self.workdir / "coordinator.yaml"
        self.coordinator_yaml.write_text(yaml.safe_dump(coord, sort_keys=False))
        for y, name in zip(site_yamls, names):
            self.sites[name] = self.site_yaml(Path(y), name)

    def site_yaml(self, src: Path, name: str, key_of: str | None = None, **federation) -> Path:
        """The site's own config plus a ``federation:`` section pointing at this coordinator."""
        cfg = load_site_config(src)
        raw = yaml.safe_load(src.read_text())
        s = cfg.site
        raw["site"].update({"dicom_dir": str(s.dicom_dir), "secret_file": str(s.secret_file), "state_dir": str(s.state_dir)})
        if s.labels is not None:
            raw["site"]["labels"] = str(s.labels)
        fed = {"superlink": f"127.0.0.1:{self.port}", "port": free_port(), "restart_backoff_s": 1.0}
        if self.tls:
            fed["root_certificates"] = str(self.pki.ca_cert)
            if self.auth:
                fed["auth_private_key"] = str(self.pki.site_key(key_of or name))
        else:
            fed["insecure"] = True
        raw["federation"] = {**fed, **self.site_federation, **federation}
        out = self.workdir / "sites" / f"{name}.yaml"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(yaml.safe_dump(raw, sort_keys=False))
        return out

    # ------------------------------------------------------------------ processes
    def _spawn(self, key: str, args: list[str], log: Path, env_extra: dict | None = None) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        # N sites share this machine's cores: one math thread each (torch and BLAS read these at start).
        env = child_env({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                         "FLWR_HOME": str(self.workdir / "flwr-home" / key), **(env_extra or {})})
        with open(log, "ab") as fh:
            p = subprocess.Popen(_cli(*args), env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, cwd=self.workdir)
        self.procs[key] = p
        return p

    def start_coordinator(self, timeout: float = 90) -> None:
        coord = load_coordinator_config(self.coordinator_yaml)
        ready_file(coord).unlink(missing_ok=True)
        p = self._spawn("coordinator", ["coordinator", "start", str(self.coordinator_yaml)],
                        self.workdir / "logs" / "coordinator.log")
        # Ready: the SuperLink is up and the sites are registered (the service writes ready.json).
        deadline = time.monotonic() + timeout
        while read_ready(coord) is None:
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"SuperLink did not start; see {self.workdir}/coordinator/logs/superlink.log")
            time.sleep(0.2)

    def start_site(self, name: str, yaml_path: Path | None = None, env_extra: dict | None = None) -> subprocess.Popen:
        return self._spawn(f"site:{name}", ["site", "start", str(yaml_path or self.sites[name])],
                           self.workdir / "logs" / f"site-{name}.log", env_extra)

    def start(self, timeout: float = 120, site_env: dict | None = None) -> "LocalFederation":
        """Start the coordinator and every site; ``site_env`` maps a site name to extra environment."""
        self.start_coordinator()
        for name in self.sites:
            self.start_site(name, env_extra=(site_env or {}).get(name))
        self.wait_online(len(self.sites), timeout)
        return self

    def home(self) -> Path:
        return flwrcli.write_home(self.workdir / "cli-home", load_coordinator_config(self.coordinator_yaml))

    def online(self) -> int:
        return flwrcli.online_count(self.home())

    def wait_online(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.online() >= n:
                return
            time.sleep(1)
        raise RuntimeError(f"only {self.online()} of {n} sites online after {timeout:.0f} s; see {self.workdir}/logs")

    def stop(self, key: str, sig: int = signal.SIGTERM) -> None:
        p = self.procs.pop(key, None)
        if p is None:
            return
        if sig == signal.SIGKILL:
            kill_session(p.pid)  # the process and everything it started (its own session)
        stop_group(p, timeout=15)
        kill_session(p.pid)  # anything that outlived a clean stop

    def kill_site(self, name: str) -> None:
        self.stop(f"site:{name}", signal.SIGKILL)

    def state_dir(self, name: str) -> Path:
        return load_site_config(self.sites[name], check_files=False).site.state_dir

    def worker_pid(self, name: str) -> int | None:
        """The pid of the site's running warm worker (from its ``worker.json``), or None."""
        st = read_worker_status(self.state_dir(name))
        pid = st.get("pid") if st else None
        return pid if isinstance(pid, int) and pid_alive(pid) else None

    def wait_worker(self, name: str, timeout: float = 60, other_than: int | None = None) -> int:
        """Wait for the site's worker to be ready (a new one, if ``other_than`` is given)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self.worker_pid(name)
            if pid is not None and pid != other_than:
                return pid
            time.sleep(0.1)
        raise RuntimeError(f"the worker of {name} was not ready within {timeout:.0f} s; see {self.state_dir(name)}/logs")

    def kill_worker(self, name: str) -> int:
        """SIGKILL the site's worker (its daemon starts a new one); returns the killed pid."""
        pid = self.worker_pid(name)
        if pid is None:
            raise RuntimeError(f"{name} has no running worker")
        os.kill(pid, signal.SIGKILL)
        return pid

    def superlink_pid(self) -> int | None:
        r = read_ready(load_coordinator_config(self.coordinator_yaml))
        pid = r.get("superlink_pid") if r else None
        return pid if isinstance(pid, int) and pid_alive(pid) else None

    def kill_superlink(self) -> int:
        """SIGKILL the SuperLink only (the coordinator service restarts it); returns its pid."""
        pid = self.superlink_pid()
        if pid is None:
            raise RuntimeError("no SuperLink is running")
        os.killpg(pid, signal.SIGKILL)  # it leads its own process group (with its SuperExec and ServerApps)
        return pid

    def stop_coordinator(self, hard: bool = False) -> None:
        self.stop("coordinator", signal.SIGKILL if hard else signal.SIGTERM)

    def close(self) -> None:
        for key in list(self.procs):
            self.stop(key)

    def __enter__(self) -> "LocalFederation":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ runs
    def run(self, run_yaml: Path, *, resume: bool = False, evaluate_only: Path | None = None, echo=print,
            timeout: float | None = None, **submit_options) -> int:
        return runner.submit(load_run_config(run_yaml, check_files=False), load_coordinator_config(self.coordinator_yaml),
                             resume=resume, evaluate_only=evaluate_only, echo=echo, timeout=timeout, **submit_options)

    def run_async(self, run_yaml: Path, *, resume: bool = False, log: Path | None = None) -> subprocess.Popen:
        """``dicomfl run`` as a separate process (for fault tests that stop things mid-run)."""
        log = log or self.workdir / "logs" / "run.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        args = ["run", str(run_yaml), "--coordinator", str(self.coordinator_yaml)] + (["--resume"] if resume else [])
        with open(log, "ab") as fh:
            p = subprocess.Popen(_cli(*args), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, env=child_env())
        self.procs[f"run:{len(self.procs)}"] = p
        return p
