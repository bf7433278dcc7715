"""Outputs never overwrite the site's inputs (issue 26, finding 7), and the one atomic writer.

``dicomfl predict --out`` and ``dicomfl export --out`` are run as commands against a real site
config naming every kind of file (labels, key, federation CA and SuperNode key, intake TLS files)
and a real trained run; each refusal is one line, exit 2, and the file it pointed at is unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dicomfl.common import files
from dicomfl.common.config import load_site_config
from dicomfl.common.outputs import UnsafeOutput, check_output, open_folder

DICOMFL = [sys.executable, "-m", "dicomfl.workbench.cli"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def site(tmp_path) -> Path:
    """A site.yaml naming every kind of file a site has, each file holding something to lose."""
    d = tmp_path / "site"
    (d / "dicom").mkdir(parents=True)
    (d / "state").mkdir()
    (d / "state" / "ledger.json").write_text("{}")
    (d / "dicom" / "a.dcm").write_bytes(b"not really dicom")
    key = d / "site.key"
    key.write_bytes(os.urandom(32).hex().encode())
    key.chmod(0o600)
    (d / "labels.csv").write_text("path,label\na.dcm,1\n")
    for name in ("ca.crt", "supernode.key", "supernode.key.pub", "intake.crt", "intake.key", "intake-ca.crt"):
        (d / name).write_text(f"-----BEGIN {name}-----\n")
    cfg = {"site": {"name": "s", "dicom_dir": "dicom", "labels": "labels.csv", "label_key": "path",
                    "secret_file": "site.key", "state_dir": "state",
                    "intake": {"port": 0, "tls": {"cert_file": "intake.crt", "key_file": "intake.key",
                                                  "ca_file": "intake-ca.crt"}}},
           "federation": {"root_certificates": "ca.crt", "auth_private_key": "supernode.key"}}
    (d / "site.yaml").write_text(yaml.safe_dump(cfg))
    return d / "site.yaml"


def _predict(model: Path, site_yaml: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*DICOMFL, "predict", str(model), str(site_yaml), "--out", str(out), "--threshold", "0.5"],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("target, says", [
    ("labels.csv", "own files (site.labels)"),
    ("site.key", "own files (site.secret_file)"),
    ("state/ledger.json", "inside site.state_dir"),
    ("state/new.csv", "inside site.state_dir"),
    ("dicom/p.csv", "inside site.dicom_dir"),
    ("site.yaml", "own files (site.yaml)"),
    ("ca.crt", "own files (federation.root_certificates)"),
    ("supernode.key", "own files (federation.auth_private_key)"),
    ("supernode.key.pub", "own files (federation.auth_private_key (.pub))"),
    ("intake.key", "own files (site.intake.tls.key_file)"),
    ("intake-ca.crt", "own files (site.intake.tls.ca_file)"),
])
def test_predict_refuses_the_sites_own_files_and_folders(site, tmp_path, target, says):
    """The check runs before the model is read: a placeholder weights file is enough to reach it."""
    model = tmp_path / "model.npz"
    model.write_bytes(b"PK\x03\x04")
    folder = site.parent
    before = {p: _digest(p) for p in folder.rglob("*") if p.is_file()}
    r = _predict(model, site, folder / target)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert {p: _digest(p) for p in folder.rglob("*") if p.is_file()} == before


def test_predict_refuses_the_same_file_by_another_name(site, tmp_path):
    """A relative path with .. and a hard link to the labels are the labels too."""
    cfg = load_site_config(site)
    os.link(cfg.site.labels, tmp_path / "hard.csv")
    for out in (site.parent / "dicom" / ".." / "labels.csv", tmp_path / "hard.csv"):
        with pytest.raises(UnsafeOutput, match="own files"):
            check_output(out, cfg)


def test_a_link_anywhere_on_the_path_is_refused(site, tmp_path):
    cfg = load_site_config(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "via").symlink_to(elsewhere)
    for out in (tmp_path / "via" / "p.csv", tmp_path / "via" / "new" / "p.csv"):
        with pytest.raises(UnsafeOutput, match="symbolic link"):
            check_output(out, cfg)
    with pytest.raises(UnsafeOutput, match="symbolic link"):
        open_folder(tmp_path / "via" / "new")
    assert not (elsewhere / "new").exists()
    fd = open_folder(tmp_path / "fresh" / "deeper")  # missing folders are made, without links
    os.close(fd)
    assert (tmp_path / "fresh" / "deeper").is_dir()


def test_export_refuses_a_planted_link_and_the_state_dir(trained_run, site, tmp_path):
    model = trained_run / "checkpoints" / "round-0001" / "global.npz"
    out = tmp_path / "export"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / "model.pt").symlink_to(victim)
    r = subprocess.run([*DICOMFL, "export", str(model), "--out", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 2 and "symbolic link" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert victim.read_text() == "precious" and (out / "model.pt").is_symlink()
    assert sorted(p.name for p in out.iterdir()) == ["model.pt"]

    state = site.parent / "state"
    before = sorted(p.name for p in state.iterdir())
    r = subprocess.run([*DICOMFL, "export", str(model), "--site", str(site), "--out", str(state / "model")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "inside site.state_dir" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert sorted(p.name for p in state.iterdir()) == before

    run = shutil.copytree(trained_run, tmp_path / "run")
    model = run / "checkpoints" / "round-0001" / "global.npz"
    weights = _digest(model)
    r = subprocess.run([*DICOMFL, "export", str(model), "--out", str(model.parent)], capture_output=True,
                       text=True, timeout=600)  # the model's own folder is fine: no file of the run is replaced
    assert r.returncode == 0, r.stderr[-2000:]
    assert (model.parent / "model_card.json").is_file() and _digest(model) == weights


# ----------------------------------------------------------------------------- the atomic writer
def test_atomic_writer_modes_and_no_leftovers(tmp_path):
    old = os.umask(0o022)
    try:
        files.write_text(tmp_path / "a.txt", "one")
        files.write_json(tmp_path / "b.json", {"x": 1}, mode=0o666, indent=2)
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").read_text() == "one"
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o644
    files.write_text(tmp_path / "a.txt", "two")
    assert (tmp_path / "a.txt").read_text() == "two"
    with pytest.raises(RuntimeError):
        with files.AtomicFile(tmp_path / "a.txt", text=True) as fh:
            fh.write("half")
            raise RuntimeError("stop")
    assert (tmp_path / "a.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json"]


def test_atomic_writer_refuses_a_link_at_the_target(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "out.txt").symlink_to(victim)
    with pytest.raises(files.SymlinkTarget, match="symbolic link"):
        files.write_text(tmp_path / "out.txt", "overwritten")
    assert victim.read_text() == "precious" and (tmp_path / "out.txt").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt", "victim.txt"]
