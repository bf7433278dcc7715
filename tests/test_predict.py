"""``dicomfl predict``: a trained model applied to a site's images and to a folder of new studies,
through the real CLI, checked against the run's own cross-site validation and against the
exported TorchScript model run in a process that never imports dicomfl."""

from __future__ import annotations

import csv
import json
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sklearn.metrics import roc_auc_score

from dicomfl.common.config import load_site_config
from dicomfl.common.deid import Deidentifier
from dicomfl.common.ingest import process_file

from .phi import identifying_values

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit:DeprecationWarning")

DICOMFL = [sys.executable, "-m", "dicomfl.workbench.cli"]
SITE = "site-b"


def _predict(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*DICOMFL, "predict", *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _labels(cohort: Path) -> dict[str, int]:
    with open(cohort / SITE / "labels.csv", newline="") as fh:
        return {r["accession_number"]: int(r["label"]) for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def site_predictions(trained_run, cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "site-b.csv"
    r = _predict(trained_run / "checkpoints" / "round-0001" / "global.npz", cohort / SITE / "site.yaml",
                 "--out", out, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads(r.stdout), r


def test_predictions_reproduce_the_cross_site_auroc_at_the_site(site_predictions, trained_run, cohort):
    out, summary, _ = site_predictions
    rows = _rows(out)
    assert summary["predicted"] == len(rows) > 0 and summary["model"] == "global"
    assert summary["threshold_source"].startswith("the run's cross-site validation of global at site-b")
    labels = _labels(cohort)
    # one row per distinct image (a file copied under two paths counts once in evaluation too)
    test = {(r["key"], r["probability"]): r for r in rows if r["site_split"] == "test" and r["key"] in labels}
    y = np.array([labels[k] for k, _ in test])
    p = np.array([float(v["probability"]) for v in test.values()])
    cell = json.loads((trained_run / "metrics.json").read_text())["cross_site"]["matrix"]["global"][SITE]
    assert len(np.unique(y)) == 2
    assert roc_auc_score(y, p) == pytest.approx(cell["auroc"], abs=1e-6)
    # the decision is the probability at the threshold evaluation used; the model is named in every row
    thr = summary["threshold"]
    assert thr == cell["threshold"]
    assert all(int(r["decision"]) == int(float(r["probability"]) >= thr) for r in rows)
    assert {r["model"] for r in rows} == {"global"} and {r["model_sha256"] for r in rows} == {summary["model_sha256"]}


def test_without_the_run_the_site_chooses_the_same_threshold(trained_run, cohort):
    """The fallback (no evaluation of this model at this site in the run folder): Youden's J on
    the site's validation split, computed at the site, is the threshold evaluation chose."""
    from dicomfl.client.predict import site_threshold
    from dicomfl.workbench.export import load_trained

    trained = load_trained(trained_run / "checkpoints" / "round-0001" / "global.npz")
    cfg = load_site_config(cohort / SITE / "site.yaml")
    thr, source = site_threshold(trained.net, cfg, cfg.preprocess.image_size, 2)
    cell = json.loads((trained_run / "metrics.json").read_text())["cross_site"]["matrix"]["global"][SITE]
    assert source.startswith("site validation split") and thr == pytest.approx(cell["threshold"], abs=1e-6)


def test_the_predictions_file_is_the_operators_alone(site_predictions):
    out, _, r = site_predictions
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    keys = {row["key"] for row in _rows(out)}
    # the key is in the file the operator asked for, and nowhere in what was printed
    assert keys and not any(k in r.stdout or k in r.stderr for k in keys)


CONSUMER = textwrap.dedent("""
    import sys, numpy as np, torch
    d = np.load("inputs.npz")
    model, pre = torch.jit.load("model/model.pt"), torch.jit.load("model/preprocess.pt")
    with torch.no_grad():
        p = model(pre(torch.from_numpy(d["raw"])), torch.from_numpy(d["features"])).numpy()
    np.save("probs.npy", p)
    assert not [m for m in sys.modules if m.split(".")[0] == "dicomfl"]
""")


def test_the_exported_model_gives_the_same_probabilities_as_predict(site_predictions, trained_run, cohort, tmp_path):
    out, _, _ = site_predictions
    export = subprocess.run([*DICOMFL, "export", str(trained_run / "checkpoints" / "round-0001" / "global.npz"),
                             "--out", str(tmp_path / "model")], capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stderr[-3000:]
    cfg = load_site_config(cohort / SITE / "site.yaml")
    deid = Deidentifier(cfg.secret_key, cfg.deid)
    rows = {r["file"]: r for r in _rows(out)}
    files = sorted(rows)[:8]
    raw, feats = [], []
    for rel in files:
        rec, img, f = process_file((cfg.site.dicom_dir / rel).read_bytes(), rel, "k", cfg, deid)
        assert rec.status == "accepted"
        raw.append(img)
        feats.append(f)
    np.savez(tmp_path / "inputs.npz", raw=np.stack(raw).astype(np.float32), features=np.stack(feats).astype(np.float32))
    r = subprocess.run([sys.executable, "-I", "-c", CONSUMER], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    exported = np.load(tmp_path / "probs.npy")[:, 1]
    ours = np.array([float(rows[f]["probability"]) for f in files])
    np.testing.assert_allclose(exported, ours, atol=1e-5)


def test_new_studies_from_a_hostile_folder(site_predictions, trained_run, cohort, tmp_path):
    """A folder of new studies under a patient-like name, with a corrupt file, a truncated one and
    a non-DICOM file: the good images are predicted, the bad ones rejected with a reason, and
    nothing identifying is printed or logged."""
    src = load_site_config(cohort / SITE / "site.yaml").site.dicom_dir
    good = [src / f for f in sorted({r["file"] for r in _rows(site_predictions[0])})[:6]]  # images the site accepts
    inbox = tmp_path / "inbox" / "DOE^JOHN" / "19620703"
    inbox.mkdir(parents=True)
    planted: set[str] = {"DOE^JOHN", "19620703"}
    for i, p in enumerate(good):
        shutil.copy(p, inbox / f"new{i}.dcm")
        planted |= identifying_values(pydicom.dcmread(p, force=True))
    data = good[0].read_bytes()
    (inbox / "truncated.dcm").write_bytes(data[: len(data) // 3])
    corrupt = bytearray(data)
    corrupt[len(corrupt) // 2:] = b"\xff" * (len(corrupt) - len(corrupt) // 2)
    (inbox / "corrupt.dcm").write_bytes(bytes(corrupt))
    (inbox / "notes.txt").write_text("not an image\n")
    out = tmp_path / "out" / "new.csv"
    r = _predict(trained_run / "checkpoints" / "round-0001" / "local-site-b.npz", cohort / SITE / "site.yaml",
                 "--input", tmp_path / "inbox", "--out", out, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    rows = _rows(out)
    assert summary["model"] == "local:site-b" and summary["threshold_source"].startswith("the run's cross-site")
    assert summary["seen"] == 9 and summary["rejected"] >= 2 and summary["rejected"] + summary["predicted"] == 9
    assert {row["file"] for row in rows} >= {f"DOE^JOHN/19620703/new{i}.dcm" for i in range(len(good))}
    assert all(rej["file"].startswith("file:") and rej["reason"] for rej in summary["rejects"])
    rej_file = out.with_name(out.name + ".rejected.tsv")
    assert stat.S_IMODE(rej_file.stat().st_mode) == 0o600 and "truncated.dcm" in rej_file.read_text()
    # printed summary and the site's logs: references and reason codes only
    logs = "".join(p.read_text(errors="replace") for p in (cohort / SITE / "state" / "logs").glob("*.log"))
    for text in (r.stdout, r.stderr, logs):
        leaked = sorted(v for v in planted if v in text)
        assert not leaked, leaked


def test_a_patient_the_site_never_ingested_is_new(site_predictions, trained_run, cohort, tmp_path):
    """site_split says train / val / test only for a patient the site's cache held (README: "train
    means the model saw that patient"). Through --input: a copy of a cached study keeps its
    patient's split; the same images under patients the site never ingested are all ``new``,
    whichever split their pseudonyms hash to; the site's own images are never ``new``."""
    import warnings

    site_rows = _rows(site_predictions[0])
    assert site_rows and {r["site_split"] for r in site_rows} <= {"train", "val", "test"}
    src = load_site_config(cohort / SITE / "site.yaml").site.dicom_dir
    by_file = {r["file"]: r for r in site_rows}
    picked = sorted(by_file)[:12]
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(src / picked[0], inbox / "known.dcm")
    for i, rel in enumerate(picked):
        ds = pydicom.dcmread(src / rel)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.PatientID, ds.PatientName = f"NEVERSEEN{i:04d}", f"STRANGER^{i}"
        ds.save_as(inbox / f"stranger{i}.dcm")
    out = tmp_path / "out" / "new.csv"
    r = _predict(trained_run / "checkpoints" / "round-0001" / "global.npz", cohort / SITE / "site.yaml",
                 "--input", inbox, "--out", out, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["file"]: row for row in _rows(out)}
    assert rows["known.dcm"]["site_split"] == by_file[picked[0]]["site_split"] != "new"
    strangers = [rows[f"stranger{i}.dcm"]["site_split"] for i in range(len(picked))]
    assert strangers == ["new"] * len(picked)
    # the pseudonyms alone would have put some of them in train: the cache, not the hash, decides
    from dicomfl.client.predict import cached_patients
    from dicomfl.common.splits import NAMES, assign

    cfg = load_site_config(cohort / SITE / "site.yaml")
    deid = Deidentifier(cfg.secret_key, cfg.deid)
    pseudonyms = [deid.patient_pseudonym(pydicom.dcmread(inbox / f"stranger{i}.dcm"), fallback="x")
                  for i in range(len(picked))]
    assert "train" in [NAMES[assign(p, cfg.splits.val, cfg.splits.test, cfg.splits.seed)] for p in pseudonyms]
    known = cached_patients(cfg, deid)
    assert known and not known & set(pseudonyms)


@pytest.mark.parametrize("args, says", [
    (["missing.npz"], "model file not found"),
    (["{run}/checkpoints/round-0001/global.npz", "--input", "{tmp}/nowhere"], "is not a folder"),
    (["{run}/checkpoints/round-0001/global.npz", "--out", "{tmp}"], "is a folder"),
    (["{tmp}/garbage.npz"], "not a weights file"),
    (["{run}/checkpoints/round-0001/global.npz", "--out", "{tmp}/link.csv"], "symbolic link"),
    (["{run}/checkpoints/round-0001/global.npz", "--out", "{cohort}/site-b/state/p.csv"], "inside site.state_dir"),
    (["{run}/checkpoints/round-0001/global.npz", "--out", "{cohort}/site-b/site.key"], "own files"),
])
def test_bad_arguments_fail_in_one_line(args, says, trained_run, cohort, tmp_path):
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "victim.txt").write_text("precious")
    (tmp_path / "link.csv").symlink_to(tmp_path / "victim.txt")
    key_before = (cohort / SITE / "site.key").read_bytes()
    args = [a.format(run=trained_run, tmp=tmp_path, cohort=cohort) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "p.csv")]
    r = _predict(args[0], cohort / SITE / "site.yaml", *args[1:])
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / "victim.txt").read_text() == "precious" and (cohort / SITE / "site.key").read_bytes() == key_before


def test_site_status_reads_what_the_site_wrote_and_survives_damaged_files(cohort, tmp_path):
    """dicomfl site status: counts from the site's own files; a damaged ledger or report is named,
    not a traceback, and no text from those files reaches the terminal."""
    import yaml

    site = tmp_path / "site"
    shutil.copytree(cohort / SITE, site, ignore=shutil.ignore_patterns("state"))
    cfg = yaml.safe_load((site / "site.yaml").read_text())
    cfg["site"]["intake"] = {"port": 11112, "ae_title": "DICOMFL", "allowed": [{"ae_title": "PACS", "host": "127.0.0.1"}]}
    (site / "site.yaml").write_text(yaml.safe_dump(cfg))
    state = site / "state"
    (state / "reports").mkdir(parents=True)
    (state / "privacy").mkdir()
    (state / "intake").mkdir()
    (state / "intake" / "status.json").write_text(json.dumps({"received": 7, "written": 6, "duplicates": 1}))
    (state / "reports" / "ingest.json").write_text(json.dumps({"seen": 12, "accepted": "\x1b[31mDOE^JOHN", "rejected": 2}))
    (state / "privacy" / "ledger.json").write_text("{not json")
    r = subprocess.run([*DICOMFL, "site", "status", str(site / "site.yaml")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "received 7, written 6, duplicates 1" in r.stdout and "12 files" in r.stdout
    assert "ledger.json cannot be read" in r.stdout
    assert "replicate AUROCs none (privacy.eval_replicates)" in r.stdout  # off unless the site's config says so
    assert "DOE^JOHN" not in r.stdout and "\x1b" not in r.stdout and "Traceback" not in r.stderr


@pytest.mark.parametrize("damage", ["run-list", "privacy-str", "latest-escape", "history-str", "stats-nan", "stats-gone"])
def test_a_hostile_run_folder_is_one_line(damage, trained_run, cohort, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    cfg = json.loads((run / "run_config.json").read_text())
    if damage == "run-list":
        cfg["run"] = [1]
    elif damage == "privacy-str":
        cfg["privacy"] = "ab"
    (run / "run_config.json").write_text(json.dumps(cfg))
    if damage == "latest-escape":
        (run / "metrics.json").unlink()
        (run / "checkpoints" / "latest.json").write_text(json.dumps({"path": "../../../../etc", "round": "x"}))
    if damage == "stats-nan":  # the run's feature standardization, checked as a site checks the coordinator's
        st = json.loads((run / "feature_stats.json").read_text())
        st["std"][3] = float("nan")
        (run / "feature_stats.json").write_text(json.dumps(st))
    if damage == "stats-gone":
        (run / "feature_stats.json").unlink()
    if damage == "history-str":
        m = json.loads((run / "metrics.json").read_text())
        m["history"] = "oops"
        (run / "metrics.json").write_text(json.dumps(m))
    r = _predict(run / "checkpoints" / "round-0001" / "global.npz", cohort / SITE / "site.yaml",
                 "--out", tmp_path / "p.csv", "--threshold", "0.5")
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    if damage == "latest-escape":  # an unfinished run: predicts, with the model known by its place
        assert r.returncode == 0, r.stderr[-2000:]
    else:
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def _hostile_model(kind: str, run: Path) -> Path:
    """A copy of the run's global model under the run, damaged as ``kind`` says."""
    src = run / "checkpoints" / "round-0001" / "global.npz"
    with np.load(src) as z:
        w = {k: z[k] for k in z.files}
    first = next(iter(w))
    if kind == "nan":
        w[first] = np.full_like(w[first], np.nan)
    elif kind == "huge":
        w[first] = np.full_like(w[first], 3e38)
    elif kind == "int":
        w = {k: v.astype(np.int64) for k, v in w.items()}
    elif kind == "complex":
        w = {k: v.astype(np.complex64) for k, v in w.items()}
    elif kind == "object":
        w[first] = np.array([object()] * 3, dtype=object)
    out = run / "checkpoints" / "round-0001" / f"hostile-{kind}.npz"
    np.savez(out, **w)
    return out


@pytest.mark.parametrize("kind, says", [("nan", "NaN or infinite"), ("huge", "above"), ("int", "not a real float"),
                                        ("complex", "not a real float"), ("object", "pickled")])
def test_a_broken_model_is_refused_before_predicting(kind, says, trained_run, cohort, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    model = _hostile_model(kind, run)
    r = _predict(model, cohort / SITE / "site.yaml", "--out", tmp_path / "p.csv", "--threshold", "0.5")
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and "hostile-" in r.stderr
    assert not (tmp_path / "p.csv").exists()


def test_a_deeply_nested_run_config_is_one_line(trained_run, cohort, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "run_config.json").write_text("[" * 200_000 + "]" * 200_000)
    r = _predict(run / "checkpoints" / "round-0001" / "global.npz", cohort / SITE / "site.yaml",
                 "--out", tmp_path / "p.csv", "--threshold", "0.5")
    assert r.returncode == 2 and "run_config.json" in r.stderr and "nested deeper" in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1


MEASURED = """
import runpy, sys
sys.argv = ["dicomfl"] + sys.argv[1:]
try:
    runpy.run_module("dicomfl.workbench.cli", run_name="__main__")
except SystemExit as e:
    code = e.code
peak = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
sys.stderr.write(f"\\nPEAK_KB {peak} CODE {code}\\n")
"""


@pytest.mark.parametrize("hostile", ["bomb", "huge-model"])
def test_hostile_sizes_are_refused_before_they_are_allocated(hostile, trained_run, cohort, tmp_path):
    """A 3 MB npz whose member inflates to 3 GiB, and a run_config.json describing a width-256,
    depth-6 model (5 GB to build): refused from headers and description, the process stays small."""
    import zipfile

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    model = run / "checkpoints" / "round-0001" / "global.npz"
    if hostile == "bomb":
        first = np.load(model).files[0]
        header = io_header = __import__("io").BytesIO()
        np.lib.format.write_array_header_1_0(io_header, {"descr": "<f4", "fortran_order": False,
                                                         "shape": (3 << 28,)})
        with zipfile.ZipFile(model, "w", zipfile.ZIP_DEFLATED) as zf:
            with zf.open(first + ".npy", "w", force_zip64=True) as fh:
                fh.write(header.getvalue())
                chunk = bytes(64 << 20)
                for _ in range(48):
                    fh.write(chunk)
        assert model.stat().st_size < 8 << 20
    else:
        cfg = json.loads((run / "run_config.json").read_text())
        cfg["model"].update(width=256, depth=6)
        (run / "run_config.json").write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "-c", MEASURED, "predict", str(model), str(cohort / SITE / "site.yaml"),
                        "--out", str(tmp_path / "p.csv"), "--threshold", "0.5"],
                       capture_output=True, text=True, timeout=600)
    peak = int(r.stderr.split("PEAK_KB ")[1].split()[0])
    assert "CODE 2" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert peak < 1_500_000, peak  # inflating or building would take over 3,000,000 kB


def test_predictions_never_replace_the_sites_labels(trained_run, cohort, tmp_path):
    labels = cohort / SITE / "labels.csv"
    before = labels.read_bytes()
    r = _predict(trained_run / "checkpoints" / "round-0001" / "global.npz", cohort / SITE / "site.yaml",
                 "--out", labels, "--threshold", "0.5")
    assert r.returncode == 2 and "own files" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert labels.read_bytes() == before


def test_export_never_writes_through_a_planted_link(trained_run, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / "model_card.json").symlink_to(victim)
    r = subprocess.run([*DICOMFL, "export", str(trained_run / "checkpoints" / "round-0001" / "global.npz"),
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "symbolic link" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert victim.read_text() == "precious" and not (out / "model.pt").exists()
