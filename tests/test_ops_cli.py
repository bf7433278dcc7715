"""Operating the federation from the command line (issue "Operate the federation"): --version, -h,
choices in --help, one-line usage errors, --json on run and export, the empty dicom_dir warning,
log files without colour codes, make_pki.py without an activated venv, and synth configs that
join a federation as they are. Real processes throughout: the CLI as a subprocess, a real
SuperLink and site daemons on loopback, the system Python for make_pki.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from dicomfl.common.config import load_coordinator_config, load_site_config

ROOT = Path(__file__).resolve().parents[1]
DICOMFL = [sys.executable, "-m", "dicomfl.workbench.cli"]
ESC = "\x1b["


def _cli(*args, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", **kw.pop("env", {})}
    return subprocess.run([*DICOMFL, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, **kw)


# ------------------------------------------------------------------------------ --version, -h


def test_version_prints_the_package_version():
    r = _cli("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"dicomfl {version('dicomfl')}"


@pytest.mark.parametrize("command", [[], ["run"], ["export"], ["site", "start"], ["site", "status"],
                                     ["coordinator", "start"], ["privacy", "epsilon"], ["privacy"], ["predict"]])
def test_h_is_help_on_every_command(command):
    short, long = _cli(*command, "-h"), _cli(*command, "--help")
    assert short.returncode == 0 and long.returncode == 0, short.stderr
    assert "Usage:" in short.stdout and short.stdout == long.stdout


def test_choices_are_shown_in_help_and_a_wrong_one_is_one_line():
    assert "torchscript|onnx" in _cli("export", "-h").stdout
    assert "rdp|prv" in _cli("privacy", "epsilon", "-h").stdout
    r = _cli("export", "model.npz", "--out", "o", "--format", "pickle")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "--format" in r.stderr and "torchscript" in r.stderr
    r = _cli("nosuchcommand")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "nosuchcommand" in r.stderr


def test_export_json_names_the_files_model_and_sha256(trained_run, tmp_path):
    import hashlib

    model = trained_run / "checkpoints" / "round-0001" / "global.npz"
    r = _cli("export", model, "--out", tmp_path / "model", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["model"] == "global" and res["weights_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert {"torchscript", "card_json", "card_md"} <= set(res["files"])
    for f in res["files"].values():
        assert hashlib.sha256(Path(f["path"]).read_bytes()).hexdigest() == f["sha256"]


# ------------------------------------------------------------------------------ empty dicom_dir


def _site(tmp_path: Path) -> Path:
    (tmp_path / "dicom").mkdir()
    (tmp_path / "site.key").write_text(os.urandom(32).hex())
    (tmp_path / "site.key").chmod(0o600)
    (tmp_path / "site.yaml").write_text("site: {name: s1, dicom_dir: dicom, secret_file: site.key, state_dir: state}\n")
    return tmp_path / "site.yaml"


@pytest.mark.parametrize("content", [None, "notes.txt"])
def test_an_empty_dicom_dir_is_a_warning_naming_the_key(tmp_path, content):
    site = _site(tmp_path)
    if content:
        (tmp_path / "dicom" / content).write_text("not an image\n")
    r = _cli("ingest", site)
    assert r.returncode == 0, r.stderr
    warn = [line for line in r.stderr.splitlines() if "warning" in line]
    assert warn == [f"dicomfl: warning: {site}: site.dicom_dir: no DICOM files found under {tmp_path / 'dicom'}"]


def test_a_dicom_dir_with_images_has_no_warning(cohort):
    r = _cli("ingest", cohort / "site-a" / "site.yaml")
    assert r.returncode == 0 and "no DICOM files found" not in r.stderr, r.stderr[-2000:]


# ------------------------------------------------------------------------------ log files


def test_a_supervised_childs_log_has_no_colour_codes(tmp_path):
    """Flower's own logger (it colours every level name, with no switch) in a child started as
    the daemons start theirs: the log file has the lines, without escape sequences."""
    from dicomfl.common.supervise import start_group, stop_group

    code = "import logging; from flwr.common.logger import log; log(logging.INFO, 'hello'); log(logging.ERROR, 'bad')"
    proc = start_group([sys.executable, "-c", code], dict(os.environ), tmp_path / "logs" / "child.log")
    proc.wait(timeout=120)
    stop_group(proc)
    text = (tmp_path / "logs" / "child.log").read_text()
    assert "INFO" in text and "hello" in text and "ERROR" in text and "bad" in text
    assert ESC not in text


def test_a_real_run_with_json_and_logs_without_colour(tmp_path_factory):
    """A 2-site federation on loopback (TLS, SuperNode authentication): ``dicomfl run --json``
    prints one JSON object on stdout (progress on stderr), and no log file the coordinator, the
    sites or the run wrote holds a colour code."""
    from dicomfl.workbench.launcher import LocalFederation
    from dicomfl.workbench.synth import synth

    work = tmp_path_factory.mktemp("ops-fed")
    synth(work / "cohort", sites=2, per_site=24, seed=3, image_size=16, test_fraction=0.4)
    sites = [work / "cohort" / s / "site.yaml" for s in ("site-a", "site-b")]
    run = {"run": {"name": "ops-json", "rounds": 1, "strategy": "fedavg", "min_sites": 2, "local_epochs": 1,
                   "round_timeout_s": 180, "out_dir": str(work / "run")},
           "cross_site": {"every": 0, "local_baseline": False},
           "model": {"mode": "fused", "image_size": 16, "width": 8, "depth": 1}}
    (work / "run.yaml").write_text(yaml.safe_dump(run))
    with LocalFederation(work / "federation", sites) as fed:
        r = _cli("run", work / "run.yaml", "--coordinator", fed.coordinator_yaml, "--json", timeout=900)
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
        summary = json.loads(r.stdout)  # the whole of stdout is one JSON object
        assert summary["run"] == "ops-json" and summary["rounds_completed"] == 1
        assert Path(summary["out_dir"]) == (work / "run").resolve() and Path(summary["report"]).is_file()
        assert "global" in summary["mean_auroc"] and 0.0 <= summary["mean_auroc"]["global"] <= 1.0
        assert "round 1" in r.stderr  # progress went to stderr
    logs = sorted(work.rglob("*.log"))  # the federation's, each site's state_dir/logs, the run's flwr-run.log
    names = {p.name for p in logs}
    assert {"superlink.log", "supernode.log", "flwr-run.log"} <= names, names
    coloured = [str(p) for p in logs if ESC in p.read_text(errors="replace")]
    assert not coloured, coloured


# ------------------------------------------------------------------------------ make_pki.py


def _system_python() -> str | None:
    for p in ("/usr/bin/python3", shutil.which("python3")):
        if p and Path(p).is_file():
            r = subprocess.run([p, "-c", "import dicomfl"], capture_output=True, env=_bare_env())
            if r.returncode != 0:
                return p
    return None


def _bare_env() -> dict[str, str]:
    """No venv activated: the venv's bin not on PATH, no VIRTUAL_ENV or PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = "/usr/bin:/bin"
    return env


def test_make_pki_runs_with_a_python_that_lacks_dicomfl(tmp_path):
    py = _system_python()
    if py is None:
        pytest.skip("no Python 3 without dicomfl on this machine")
    if not (ROOT / ".venv" / "bin" / "python").is_file():
        pytest.skip("no .venv in this checkout")
    r = subprocess.run([py, str(ROOT / "deployments" / "make_pki.py"), str(tmp_path / "pki"), "--site", "hospital-a"],
                       capture_output=True, text=True, timeout=300, env=_bare_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "pki" / "ca.crt").is_file() and (tmp_path / "pki" / "sites" / "hospital-a.key").is_file()
    # without a venv beside the script: one line saying how to run it
    shutil.copy(ROOT / "deployments" / "make_pki.py", tmp_path / "make_pki.py")
    r = subprocess.run([py, str(tmp_path / "make_pki.py"), str(tmp_path / "pki2"), "--site", "x"],
                       capture_output=True, text=True, timeout=300, env=_bare_env(), cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert ".venv/bin/python deployments/make_pki.py" in r.stderr and not (tmp_path / "pki2").exists()


# ------------------------------------------------------------------------------ synth configs


def test_synth_configs_join_a_federation_with_make_pkis_keys(tmp_path):
    """The cohort's coordinator.yaml and site.yaml files name the files make_pki.py makes for the
    cohort's site names (the command synth prints), and every site points at the coordinator."""
    out = tmp_path / "cohort"
    r = _cli("synth", out, "--sites", "3", "--per-site", "4", "--image-size", "16")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if "make_pki.py" in x)
    cmd = line.split("make its keys: ", 1)[1].split()
    assert cmd[:2] == ["python3", "deployments/make_pki.py"]
    pki = subprocess.run([sys.executable, str(ROOT / cmd[1]), *cmd[2:]], capture_output=True, text=True, timeout=300)
    assert pki.returncode == 0, pki.stderr
    coord = load_coordinator_config(out / "coordinator.yaml")  # checks pki_dir and each authorized site's key
    c = coord.coordinator
    assert c.tls and c.supernode_auth and c.authorized_sites == ["site-a", "site-b", "site-c"]
    ports = set()
    for name in c.authorized_sites:
        site = load_site_config(out / name / "site.yaml")
        f = site.federation
        assert site.site.name == name and f.superlink == coord.target and not f.insecure
        assert f.root_certificates == c.pki_dir / "ca.crt" and f.root_certificates.is_file()
        assert f.auth_private_key == c.pki_dir / "sites" / f"{name}.key" and f.auth_private_key.is_file()
        ports.add(f.port)
    assert len(ports) == 3  # the sites' SuperNodes can run side by side on this machine
