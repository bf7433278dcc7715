"""Shared fixtures: the real DICOM corpora (pydicom's test files, pydicom-data, deid-data)."""

from __future__ import annotations

import hashlib

import os
import shutil
from pathlib import Path

import pytest
import yaml


def corpus_files() -> list[Path]:
    """Every file of pydicom's shipped test data (incl. pydicom-data) and of deid-data."""
    from pydicom.data import get_testdata_files

    files = [Path(f) for f in get_testdata_files() if os.path.isfile(f)]
    import deid_data

    base = Path(deid_data.__file__).parent
    files += sorted(p for p in base.rglob("*") if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts)
    return files


def write_site(tmp: Path, dicom_dir: Path, **sections) -> Path:
    key = tmp / "site.key"
    if not key.exists():
        key.write_bytes(os.urandom(32).hex().encode())
        key.chmod(0o600)  # a key others may read is refused, as ssh refuses one
    site = {"name": "test-site", "dicom_dir": str(dicom_dir), "label_key": "path",
            "secret_file": str(key), "state_dir": str(tmp / "state")}
    site.update(sections.pop("site", {}))
    cfg = {"site": site, **sections}
    path = tmp / "site.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """The corpus copied flat into one folder (names prefixed to keep them unique)."""
    d = tmp_path_factory.mktemp("corpus") / "dicom"
    d.mkdir()
    for i, f in enumerate(corpus_files()):
        shutil.copy(f, d / f"{i:04d}_{f.name}")
    return d


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """A small generated 3-site cohort (32x32 training images), shared by the training tests."""
    from dicomfl.workbench.synth import synth

    out = tmp_path_factory.mktemp("cohort")
    synth(out, sites=3, per_site=60, seed=0, image_size=32)
    # synth draws each site key from OS entropy (as a real site must); the splits are keyed by it.
    # Fixed keys here make every test session see the same splits, so a test's outcome does not
    # depend on the draw.
    for name in ("site-a", "site-b", "site-c"):
        (out / name / "site.key").write_text(hashlib.sha256(f"dicomfl-test-key/{name}".encode()).hexdigest())
        (out / name / "site.key").chmod(0o600)
    return out


@pytest.fixture(scope="session")
def site_data(cohort):
    """Ingested data of each cohort site: {name: (SiteConfig, SiteData)}."""
    from dicomfl.common.config import load_site_config
    from dicomfl.common.ingest import ingest

    out = {}
    for name in ("site-a", "site-b", "site-c"):
        cfg = load_site_config(cohort / name / "site.yaml")
        out[name] = (cfg, ingest(cfg).data)
    return out


#: The model of ``trained_run`` (tiny, so the run takes seconds).
TRAINED_MODEL = {"mode": "fused", "image_size": 32, "width": 4, "depth": 1, "meta_hidden": 8, "head_hidden": 8}


@pytest.fixture(scope="session")
def trained_run(cohort, tmp_path_factory) -> Path:
    """A real one-round FedAvg run over the cohort (in-process grid) with local baselines and
    cross-site validation; its out_dir. Shared by the export and predict tests."""
    import yaml

    from dicomfl.common.config import load_run_config
    from dicomfl.server.federation import Federation
    from dicomfl.workbench.inprocess import InProcessGrid

    tmp = tmp_path_factory.mktemp("trained-run")
    cfg = {"run": {"name": "export", "rounds": 1, "strategy": "fedavg", "min_sites": 2, "local_epochs": 1,
                   "out_dir": str(tmp / "run")},
           "cross_site": {"every": 0, "local_baseline": True}, "model": TRAINED_MODEL,
           "sites": [str(cohort / s / "site.yaml") for s in ("site-a", "site-b", "site-c")]}
    (tmp / "run.yaml").write_text(yaml.safe_dump(cfg))
    rc = load_run_config(tmp / "run.yaml")
    Federation(rc, InProcessGrid(rc.sites)).run()
    return rc.out_dir


@pytest.fixture
def one_thread():
    """Bit-for-bit comparisons of two training runs: one intra-op thread (no parallel reductions)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# The longest test files first (measured with `make test`: the deployment module about 340 s, the
# benchmark's 70-90, privacy and predict about 80). With `--dist loadfile` and two workers, a file
# handed out near the end runs alone on one worker while the other is idle: the deployment module
# started after 300 s made the suite 100 s longer than its two halves. The Makefile turns off
# xdist's own order (most tests first), so this order is the one the workers get.
SLOWEST_FIRST = ("test_deployment.py", "test_bench.py", "test_privacy.py", "test_predict.py",
                 "test_ingest_scale.py", "test_personal.py", "test_synth.py", "test_federation.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
