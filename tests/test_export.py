"""``dicomfl export``: a real (tiny, one-round) federated run exported to TorchScript and ONNX,
loaded by a process that never imports dicomfl, and its model card checked against the run's
metrics.json and report.md."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from dicomfl.common.config import ModelConfig
from dicomfl.common.errors import DicomflError
from dicomfl.common.features import N_FEATURES, SCHEMA_VERSION, feature_names
from dicomfl.common.model import build_model, get_weights, load_weights
from dicomfl.common.normalize import robust_scale
from dicomfl.common.pixels import resize
from dicomfl.server.checkpoint import read_npz, write_npz
from dicomfl.workbench.export import RobustScale, export_model, hanley_mcneil, reference_probabilities

from .conftest import TRAINED_MODEL as MODEL
from .phi import identifying_values

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit:DeprecationWarning")  # torch 2.13 deprecates TorchScript

SITES = ("site-a", "site-b", "site-c")
DICOMFL = [sys.executable, "-m", "dicomfl.workbench.cli"]


def _has(*mods: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in mods)


ONNX = _has("onnx", "onnxscript", "onnxruntime")


@pytest.fixture(scope="module")
def run_dir(trained_run) -> Path:
    return trained_run


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export-out") / "model"
    formats = ["torchscript", "onnx"] if ONNX else ["torchscript"]
    return export_model(run_dir / "checkpoints" / "round-0001" / "global.npz", out, formats=formats)


def _dicomfl_model(weights_path: Path, run_dir: Path | None = None):
    """dicomfl's network with these weights; with ``run_dir``, behind that run's feature transform
    (the standardization its sites applied), as predict and the exported files apply it."""
    net = build_model(ModelConfig(**MODEL))
    load_weights(net, read_npz(weights_path))
    if run_dir is not None:
        from dicomfl.common.featurenet import with_transform
        from dicomfl.workbench.export import load_run

        net = with_transform(net.eval(), load_run(run_dir).features)
    return net.eval()


CONSUMER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import torch
    d = np.load("inputs.npz")
    extra = {"model_card.json": ""}
    model = torch.jit.load("model/model.pt", _extra_files=extra)
    pre = torch.jit.load("model/preprocess.pt")
    out, info = {}, {"card": json.loads(extra["model_card.json"])}
    with torch.no_grad():
        out["ts"] = model(torch.from_numpy(d["images"]), torch.from_numpy(d["features"])).numpy()
        out["scaled"] = pre(torch.from_numpy(d["raw"])).numpy()
        out["ts_end_to_end"] = model(pre(torch.from_numpy(d["raw"])), torch.from_numpy(d["features"])).numpy()
        try:
            model(torch.zeros(2, 1, 31, 31), torch.zeros(2, d["features"].shape[1]))
            info["wrong_size"] = "accepted"
        except Exception as e:
            info["wrong_size"] = type(e).__name__
    try:
        import onnxruntime as ort
        import onnx
    except ImportError:
        pass
    else:
        import os
        if os.path.exists("model/model.onnx"):
            sess = ort.InferenceSession("model/model.onnx", providers=["CPUExecutionProvider"])
            out["onnx"] = sess.run(["probabilities"], {"images": d["images"], "features": d["features"]})[0]
            meta = {p.key: p.value for p in onnx.load("model/model.onnx").metadata_props}
            info["onnx_card"] = json.loads(meta["model_card"])
    info["dicomfl_imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "dicomfl")
    np.savez("outputs.npz", **out)
    with open("info.json", "w") as fh:
        json.dump(info, fh)
""")


@pytest.fixture(scope="module")
def consumer(exported, run_dir, tmp_path_factory):
    """Fixed inputs, dicomfl's own answers, and what a process without dicomfl computes from the files."""
    work = tmp_path_factory.mktemp("consumer")
    shutil.copytree(exported.out_dir, work / "model")
    rng = np.random.default_rng(7)
    # full-depth "pixels" at another size than the model's: 12-bit-like values with an offset
    raw = (rng.gamma(2.0, 300.0, (5, 40, 40)) - 1024.0).astype(np.float32)
    images = robust_scale(np.stack([resize(r, MODEL["image_size"]) for r in raw]))[:, None]
    features = (rng.uniform(size=(5, N_FEATURES)) < 0.3).astype(np.float32)
    np.savez(work / "inputs.npz", raw=raw, images=images, features=features)
    r = subprocess.run([sys.executable, "-I", "-c", CONSUMER], cwd=work, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = reference_probabilities(_dicomfl_model(run_dir / "checkpoints" / "round-0001" / "global.npz", run_dir),
                                       images, features)
    with np.load(work / "outputs.npz") as z:
        outputs = {k: z[k] for k in z.files}
    return {"images": images, "expected": expected, "outputs": outputs,
            "info": json.loads((work / "info.json").read_text())}


# ----------------------------------------------------------------------------- the model files
def test_torchscript_runs_without_dicomfl_and_matches(consumer, exported):
    info, out, expected = consumer["info"], consumer["outputs"], consumer["expected"]
    assert info["dicomfl_imported"] == []
    assert out["ts"].shape == (5, 2)
    np.testing.assert_allclose(out["ts"].sum(axis=1), 1.0, atol=1e-6)
    assert np.max(np.abs(out["ts"] - expected)) <= 1e-5
    # the preprocessing file reproduces dicomfl's resize + robust scaling
    assert out["scaled"].shape == consumer["images"].shape
    assert np.max(np.abs(out["scaled"] - consumer["images"])) <= 1e-5
    assert np.max(np.abs(out["ts_end_to_end"] - expected)) <= 1e-5
    assert info["wrong_size"] != "accepted"  # the image size is part of the contract
    assert info["card"] == exported.card  # the card travels inside model.pt


@pytest.mark.skipif(not ONNX, reason="onnx, onnxscript and onnxruntime are not installed")
def test_onnx_runs_in_onnxruntime_and_matches(consumer, exported):
    out, expected = consumer["outputs"], consumer["expected"]
    assert np.max(np.abs(out["onnx"] - expected)) <= 1e-5
    assert consumer["info"]["onnx_card"] == exported.card
    assert exported.card["verification"]["max_abs_difference"]["onnx"] <= 1e-5


def test_preprocess_module_equals_robust_scale_bit_for_bit_at_the_model_size():
    pre = torch.jit.script(RobustScale(32))
    rng = np.random.default_rng(3)
    for scale, offset in ((1.0, 0.0), (4095.0, -1024.0), (0.0, 7.0), (3e4, -3e4)):  # incl. a flat image
        x = (rng.gamma(2.0, 1.0, (3, 32, 32)) * scale + offset).astype(np.float32)
        np.testing.assert_array_equal(pre(torch.from_numpy(x))[:, 0].numpy(), robust_scale(x))
    x = (rng.uniform(0, 16383, (61, 45))).astype(np.float32)  # resized first, as at ingest
    assert np.max(np.abs(pre(torch.from_numpy(x))[0, 0].numpy() - robust_scale(resize(x, 32)))) <= 1e-5


# ----------------------------------------------------------------------------- the model card
def _report_rows(report: str) -> dict[str, list[str]]:
    """The cross-site table of report.md: model -> cells (sites..., mean, gap)."""
    section = report.split("## Cross-site validation", 1)[1]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 2 and (cells[0] == "global" or cells[0].startswith("local:")):
            rows[cells[0]] = cells[1:]
    return rows


def test_card_holds_the_runs_numbers(exported, run_dir):
    card = exported.card
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert json.loads((exported.out_dir / "model_card.json").read_text()) == card
    t = card["training"]
    assert t["strategy"] == metrics["strategy"] == "fedavg" and t["rounds_completed"] == metrics["rounds"] == 1
    assert [s["name"] for s in t["sites"]] == metrics["sites"] == list(SITES)
    last = {s: m for h in metrics["history"] for s, m in h["sites"].items()}
    for s in t["sites"]:
        assert s["train_images"] == int(last[s["name"]]["num-examples"]) > 0
        assert s["privacy"] == "no DP" and s["epsilon"] is None
    assert t["model_trained_on"] == list(SITES)
    assert card["model"]["id"] == "global" and card["model"]["round"] == 1
    assert card["features"] == {"schema_version": SCHEMA_VERSION, "n_features": N_FEATURES, "names": feature_names(),
                                "standardized": True, "dropped": []}
    assert card["preprocessing"]["image_size"] == 32 and card["preprocessing"]["scaling"]["clip"] == 3.0
    assert "not a medical device" in card["intended_use"]
    # the cross-site matrix: the very numbers of metrics.json, with intervals from n and prevalence
    cs, mine = metrics["cross_site"], card["evaluation"]["run_cross_site"]
    assert mine["models"] == cs["models"] and mine["sites"] == cs["sites"]
    assert cs["models"] == ["global"] + [f"local:{s}" for s in SITES]
    for m in cs["models"]:
        assert mine["auroc"][m]["mean"] == cs["gaps"]["auroc"][m]["mean"]
        for s in cs["sites"]:
            src, cell = cs["matrix"][m][s], mine["auroc"][m]["sites"][s]
            assert cell["auroc"] == src["auroc"]
            assert cell["n"] == src["n"] and cell["n_pos"] == round(src["n"] * src["prevalence"])
            if src["auroc"] is not None and 0 < cell["n_pos"] < cell["n"]:
                lo, hi = cell["ci95"]
                assert 0 <= lo <= src["auroc"] <= hi <= 1
                # the site's own bootstrap interval, as it sent it; Hanley-McNeil's only without one
                assert cell["ci95"] == [src["auroc_lo"], src["auroc_hi"]] and cell["ci_method"] == "bootstrap"
                assert cell["se"] == hanley_mcneil(src["auroc"], cell["n_pos"], cell["n"] - cell["n_pos"])["se"]
    this = card["evaluation"]["this_model"]["auroc_by_site"]
    assert {s: c["auroc"] for s, c in this.items()} == {s: v["auroc"] for s, v in cs["matrix"]["global"].items()}
    # ... and the same numbers as the run's report.md, as it prints them, in the card's markdown too
    report = _report_rows((run_dir / "report.md").read_text())
    card_md = _report_rows((exported.out_dir / "model_card.md").read_text().replace("## Evaluation", "## Cross-site validation"))
    assert set(report) == set(cs["models"]) == set(card_md)
    for m, cells in report.items():
        assert [c.split(" ")[0] for c in card_md[m]] == [c.split(" ")[0] for c in cells]
    md = (exported.out_dir / "model_card.md").read_text()
    assert "fedavg" in md and "1 of 1 rounds" in md and all(s in md for s in SITES)


def test_a_local_model_and_a_copied_file_are_identified(run_dir, tmp_path):
    local = export_model(run_dir / "checkpoints" / "round-0001" / "local-site-b.npz", tmp_path / "local")
    assert local.card["model"]["id"] == "local:site-b"
    assert local.card["training"]["model_trained_on"] == ["site-b"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {s: c["auroc"] for s, c in local.card["evaluation"]["this_model"]["auroc_by_site"].items()} == \
        {s: v["auroc"] for s, v in metrics["cross_site"]["matrix"]["local:site-b"].items()}
    # a copy elsewhere, with --run: known by its content
    copy = tmp_path / "final.npz"
    shutil.copy(run_dir / "checkpoints" / "round-0001" / "global.npz", copy)
    res = export_model(copy, tmp_path / "copy", run_dir=run_dir)
    assert (res.card["model"]["id"], res.card["model"]["round"]) == ("global", 1)
    assert res.card["evaluation"]["this_model"]["auroc_by_site"] is not None


def test_an_unfinished_run_and_other_model_modes(run_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial, ignore=shutil.ignore_patterns("metrics.json", "cross_site_*", "report.md"))
    res = export_model(partial / "checkpoints" / "round-0001" / "global.npz", tmp_path / "p")
    assert res.card["training"]["finished"] is False
    assert [s["name"] for s in res.card["training"]["sites"]] == list(SITES)
    assert res.card["evaluation"]["run_cross_site"] is None
    assert res.card["evaluation"]["this_model"]["auroc_by_site"] is None
    # a metadata-only model whose run fixed no image size: any image size goes in
    cfg = ModelConfig(mode="metadata", width=4, depth=1, meta_hidden=8, head_hidden=8, standardize_features=False)
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "run_config.json").write_text(json.dumps({"run": {"name": "m"}, "model": cfg.model_dump(mode="json")}))
    write_npz(fake / "w.npz", get_weights(build_model(cfg, seed=3)))
    res = export_model(fake / "w.npz", tmp_path / "m")
    m = torch.jit.load(str(res.files["torchscript"]))
    f = torch.rand(2, N_FEATURES)
    p48, p16 = m(torch.zeros(2, 1, 48, 48), f), m(torch.ones(2, 1, 16, 16), f)
    assert torch.allclose(p48, p16)  # metadata mode ignores the images
    assert res.card["model"]["id"] == "unknown" and res.card["preprocessing"]["image_size"] is None


def test_dp_epsilon_per_site_as_the_report_shows_it(tmp_path):
    """A DP run's numbers (made up here; the report is written from them by the server's own
    writer): each site's cumulative epsilon, delta and budget, and "no DP" for a site without."""
    from dicomfl.common.config import RunConfig
    from dicomfl.server.report import write_report

    cfg = RunConfig.model_validate({"run": {"name": "dp", "rounds": 2, "strategy": "fedprox", "proximal_mu": 0.1},
                                    "model": MODEL, "privacy": {"dp": True}})
    site = lambda n, eps: {"num-examples": n, "train-loss": 0.6, **({"epsilon": eps, "delta": 1e-5,
                                                                     "target-epsilon": 8.0} if eps else {})}
    history = [{"round": r, "sites": {"a": site(40, 1.5 * r), "b": site(30, None)}, "aggregated": ["a", "b"]}
               for r in (1, 2)]
    cell = {"n": 20.0, "prevalence": 0.4, "auroc": 0.75}
    cs = {"sites": ["a", "b"], "models": ["global"], "matrix": {"global": {"a": cell, "b": {**cell, "auroc": 0.6}}},
          "gaps": {"auroc": {"global": {"mean": 0.675, "min": 0.6}}}}
    summary = {"run": "dp", "rounds": 2, "strategy": "fedprox", "history": history, "cross_site": cs, "sites": ["a", "b"]}
    run = tmp_path / "run"
    (run / "checkpoints" / "round-0002").mkdir(parents=True)
    (run / "run_config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    (run / "metrics.json").write_text(json.dumps(summary))
    from dicomfl.common.fedstats import global_standardization

    mean, std = global_standardization({})  # what a run whose sites reported no statistics sends
    (run / "feature_stats.json").write_text(json.dumps({"mean": mean, "std": std}))
    write_report(run, cfg, summary)
    weights = run / "checkpoints" / "round-0002" / "global.npz"
    write_npz(weights, get_weights(build_model(ModelConfig(**MODEL))))
    card = export_model(weights, tmp_path / "out").card
    a, b = card["training"]["sites"]
    assert (a["privacy"], a["epsilon"], a["delta"], a["site_budget"], a["train_images"]) == ("DP-SGD", 3.0, 1e-5, 8.0, 40)
    assert (b["privacy"], b["epsilon"]) == ("no DP", None)
    assert card["training"]["strategy"] == "fedprox" and card["training"]["proximal_mu"] == 0.1
    assert card["training"]["dp_requested_by_run"] is True
    report = (run / "report.md").read_text()
    assert "| a | 3.000 | 1e-05 | 8.00 |" in report  # the report's privacy table ...
    assert "| a | 40 | 1, 2 | DP-SGD | 3.000 | 1e-05 | 8.00 |" in (tmp_path / "out" / "model_card.md").read_text()
    got = card["evaluation"]["this_model"]["auroc_by_site"]["a"]
    assert (got["n_pos"], got["n_neg"]) == (8, 12)
    assert got["ci95"] == hanley_mcneil(0.75, 8, 12)["ci95"]


def test_hanley_mcneil():
    # Hanley & McNeil's variance assumes exponential score distributions: there it is the
    # sampling SD of the Mann-Whitney AUROC (simulated).
    rng = np.random.default_rng(0)
    n_pos, n_neg, reps = 40, 60, 3000
    neg = rng.exponential(1.0, (reps, n_neg))
    pos = rng.exponential(4.0, (reps, n_pos))  # P(pos > neg) = 4 / 5
    auc = (pos[:, :, None] > neg[:, None, :]).mean(axis=(1, 2))
    hm = hanley_mcneil(0.8, n_pos, n_neg)
    assert abs(hm["se"] - auc.std()) / auc.std() < 0.08
    assert hm["ci95"] == pytest.approx([0.8 - 1.959964 * hm["se"], 0.8 + 1.959964 * hm["se"]])
    # a hand-computed case: A = 0.893, 58 positives, 51 negatives
    assert hanley_mcneil(0.893, 58, 51)["se"] == pytest.approx(0.03118, abs=1e-5)
    assert hanley_mcneil(None, 5, 5) is None and hanley_mcneil(0.7, 0, 5) is None
    assert hanley_mcneil(float("nan"), 5, 5) is None
    assert hanley_mcneil(1.0, 5, 5)["ci95"] == [1.0, 1.0]


# ----------------------------------------------------------------------------- nothing of the sites
def _texts(out_dir: Path) -> dict[str, bytes]:
    """Every exported file's bytes; for the zip archives (TorchScript), each member's bytes."""
    out = {}
    for f in sorted(out_dir.iterdir()):
        if zipfile.is_zipfile(f):
            with zipfile.ZipFile(f) as z:
                out.update({f"{f.name}:{n}": z.read(n) for n in z.namelist()})
        else:
            out[f.name] = f.read_bytes()
    return out


def test_exported_files_hold_no_site_data_or_header_strings(exported, cohort, run_dir):
    secrets: set[str] = set()
    for s in SITES:
        for f in sorted((cohort / s / "dicom").rglob("*"))[:20]:
            if f.is_file():
                try:
                    secrets |= identifying_values(pydicom.dcmread(f, stop_before_pixels=True, force=True))
                except Exception:  # noqa: BLE001 - not a DICOM file: nothing to collect
                    continue
        secrets |= {row.split(",")[0] for row in (cohort / s / "labels.csv").read_text().splitlines()[1:]}
    secrets = {v for v in secrets if len(v) >= 6}
    assert len(secrets) > 50
    paths = {str(cohort), str(run_dir.resolve()), str(cohort.resolve())}
    for name, data in _texts(exported.out_dir).items():
        text = data.decode("latin-1")
        assert not [v for v in secrets if v in text], name
        assert not [p for p in paths if p in text], name
    files = {f.name for f in exported.out_dir.iterdir()}
    assert {"model.pt", "preprocess.pt", "model_card.json", "model_card.md"} <= files


# ----------------------------------------------------------------------------- the command line
def test_cli_exports_and_fails_in_one_line(run_dir, tmp_path):
    model = run_dir / "checkpoints" / "round-0001" / "global.npz"
    r = subprocess.run([*DICOMFL, "export", str(model), "--format", "torchscript", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for f in ("model.pt", "preprocess.pt", "model_card.json", "model_card.md"):
        assert (tmp_path / "o" / f).stat().st_size > 0
    assert not (tmp_path / "o" / "model.onnx").exists()
    r = subprocess.run([*DICOMFL, "export", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "model file not found" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


def test_bad_inputs_are_user_errors(run_dir, tmp_path):
    model = run_dir / "checkpoints" / "round-0001" / "global.npz"
    with pytest.raises(DicomflError, match="unknown format"):
        export_model(model, tmp_path / "a", formats=["tflite"])
    with pytest.raises(DicomflError, match="not a weights file"):
        export_model(run_dir / "metrics.json", tmp_path / "b")
    other = tmp_path / "other.npz"  # weights of another architecture
    write_npz(other, get_weights(build_model(ModelConfig(width=8, depth=2))))
    with pytest.raises(DicomflError, match="do not match"):
        export_model(other, tmp_path / "c", run_dir=run_dir)
    lonely = tmp_path / "lonely" / "w.npz"
    lonely.parent.mkdir()
    shutil.copy(model, lonely)
    with pytest.raises(DicomflError, match="--run"):
        export_model(lonely, tmp_path / "d")


def test_card_says_what_the_update_screening_could_defend(exported):
    """The model card carries the run report's robustness paragraph for the sites that trained it
    (issue: with two sites, say what can and cannot be defended)."""
    lines = exported.card["robustness"]
    assert lines and any("free-rider" in x or "free rider" in x for x in lines)
    n = len(exported.card["training"]["model_trained_on"])
    assert (("cannot be told from an honest one" in lines[0]) == (n <= 2))
    md = (exported.out_dir / "model_card.md").read_text()
    assert "## Robustness to a malicious site" in md
