"""Ingest the real DICOM corpora shipped with pydicom, pydicom-data and deid-data as one site.

Until the federation lands, this is what `make demo` runs: it copies the corpus into a site
folder under OUT, writes a site.yaml and a fresh site key, and runs `dicomfl ingest` on it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def main(out: Path) -> int:
    from pydicom.data import get_testdata_files
    import deid_data

    files = [Path(f) for f in get_testdata_files() if os.path.isfile(f)]
    files += sorted(p for p in Path(deid_data.__file__).parent.rglob("*") if p.is_file() and p.suffix != ".py")
    site = out / "corpus-site"
    dicom = site / "dicom"
    shutil.rmtree(dicom, ignore_errors=True)
    dicom.mkdir(parents=True)
    for i, f in enumerate(files):
        sub = dicom / f"export{i % 7}"
        sub.mkdir(exist_ok=True)
        shutil.copy(f, sub / f"IM{i:05d}")  # PACS-like: no extensions
    key = site / "site.key"
    if not key.exists():
        key.write_text(os.urandom(32).hex())
        key.chmod(0o600)
    (site / "site.yaml").write_text(
        "site: {name: corpus, dicom_dir: dicom, label_key: path, secret_file: site.key, state_dir: state}\n"
    )
    cmd = [sys.executable, "-m", "dicomfl.common.cli", "ingest", str(site / "site.yaml"), "--report", str(site / "report.json")]
    print("$", " ".join(cmd[2:]), flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/demo")))
