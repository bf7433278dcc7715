"""Ingestion at hospital scale: crash isolation, no bombs, memory flat in N, nothing identifying.

* A folder of good files and files that crash, hang or over-allocate the native decoders (each
  first shown to do so to a bare decode, in a subprocess): the ingestion ends normally, every
  bad file is rejected with a reason and named by its site-local reference, every good one is
  accepted, the cache and the report are written.
* A JPEG 2000 bomb is rejected without a large allocation, under an address-space limit that a
  decode of it would exceed.
* Peak memory of ingestion and of a training epoch does not grow with the number of images.
* A patient-like folder name and header values that used to reach reject details never show up
  in the report, the logs, the cache or the console.
* The on-disk store and the loader: rows read back exactly, warm runs write nothing, robust
  scaling from cached statistics equals the reference bit for bit.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomfl.common import errors as E
from dicomfl.common.cache import ChunkStore, StoreRows
from dicomfl.common.config import load_site_config
from dicomfl.common.ingest import SiteData, ingest, read_rejects_map

from . import crashers as C
from .conftest import write_site
from .phi import found_in
from .test_workers import BARE_EXPECTED

ROOT = Path(__file__).resolve().parents[1]
DICOMFL = [sys.executable, "-m", "dicomfl.workbench.cli"]

#: Planted values that must never leave the rejects map: the folder, and header values that
#: reject details used to quote (a Modality, an unregistered transfer syntax UID, a frame count,
#: a Photometric Interpretation).
FOLDER_PHI = ("DOE^JOHN", "DOE", "19620703")
HEADER_PHI = ("ZQXJOHNMOD", "9999.77777", "987654", "ZQXPHOTO")


def _cli(*args, **kw):
    return subprocess.run([*DICOMFL, *args], capture_output=True, text=True, timeout=600, cwd=ROOT, **kw)


def _blobs(state: Path) -> list[bytes]:
    """Everything ingestion wrote at the site except the operator's rejects map."""
    out = []
    for p in state.rglob("*"):
        if p.is_file() and p.name != "rejects-map.tsv":
            out.append(p.read_bytes())
    return out


@pytest.fixture(scope="module")
def crash_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("src")
    return C.all_crashers(d)


#: How ingestion rejects each crasher: the codestream check stops those with a header tell before
#: any decoder runs; the rest kill or panic their worker.
EXPECTED = {
    "j2k_rgb": E.CODESTREAM_MISMATCH,
    "j2k_ybr_full_422": E.CODESTREAM_MISMATCH,
    "jpeg_sof_p255": E.CODESTREAM_MISMATCH,
    "j2k_bomb": E.CODESTREAM_MISMATCH,
    "jp2_zero_box": E.CODESTREAM_MISMATCH,
    "jpeg_lossless_bs7": E.DECODER_CRASH,
    "rle_offset": E.DECODER_CRASH,
    "rle_rows": E.DECODER_CRASH,
}


def _planted(d: Path) -> dict[str, str]:
    """Files whose headers hold values reject details used to quote; name -> expected reason."""
    mr = pydicom.dcmread(C.testfile("MR_small.dcm"))
    mr.Modality = "ZQXJOHNMOD"  # accepted, counted as modality "other"
    mr.save_as(d / "planted_modality.dcm")
    ts = pydicom.dcmread(C.testfile("MR_small.dcm"))
    ts.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.2.9999.77777"
    ts.save_as(d / "planted_syntax.dcm", enforce_file_format=False)
    frames = pydicom.dcmread(C.testfile("MR_small.dcm"))
    frames.NumberOfFrames = 987654
    frames.save_as(d / "planted_frames.dcm")
    rgb = pydicom.dcmread(C.testfile("SC_rgb.dcm"))
    rgb.PhotometricInterpretation = "ZQXPHOTO"
    rgb.save_as(d / "planted_photometric.dcm")
    return {"planted_modality.dcm": "accepted", "planted_syntax.dcm": E.NO_DECODER,
            "planted_frames.dcm": E.TOO_LARGE, "planted_photometric.dcm": "rejected"}


@pytest.fixture(scope="module")
def bare(crash_files) -> dict[str, C.Bare]:
    jobs = {n: C.BareJob(crash_files[n], alarm_s=3 if n == "jp2_zero_box" else 0) for n in BARE_EXPECTED}
    return C.run_bare(jobs)


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, crash_files, bare):
    """Good files, the crashers and the planted files in ``DOE^JOHN/19620703/``, ingested by the
    command line with two workers."""
    for name, expected in BARE_EXPECTED.items():  # each crasher really crashes, hangs or panics
        got = bare[name].signal or bare[name].result.get("type")
        assert got == expected, f"{name} no longer reproduces with the installed decoders: {bare[name]}"
    tmp = tmp_path_factory.mktemp("site")
    folder = tmp / "export" / C.PATIENT_FOLDER
    folder.mkdir(parents=True)
    goods = [p.rename(folder / p.name) for p in C.good_files(folder.parent)]
    for name, path in crash_files.items():
        (folder / f"{name}.dcm").write_bytes(path.read_bytes())
    planted = _planted(folder)
    site = write_site(tmp, tmp / "export", preprocess={"image_size": 32}, ingest={"workers": 2})
    report = tmp / "report.json"
    r = _cli("ingest", str(site), "--report", str(report))
    return tmp, goods, planted, r, json.loads(report.read_text()) if report.exists() else None


def test_crashers_cost_only_their_file(mixed_run):
    tmp, goods, planted, r, rep = mixed_run
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    refs = {rel.rsplit("/", 1)[-1]: ref for ref, rel in read_rejects_map(tmp / "state").items()}
    rejected = {x["file"]: x for x in rep["rejects"]}
    for name, reason in EXPECTED.items():
        ref = refs[f"{name}.dcm"]
        assert ref.startswith("file:") and rejected[ref]["reason"] == reason, (name, rejected.get(ref))
        assert f"rejected {ref}: {reason}" in r.stderr
    for good in goods:
        assert good.name not in refs, good.name
    assert rep["accepted"] == len(goods) + 1  # + the planted Modality
    assert rep["rejected"] == len(EXPECTED) + 3
    assert rep["by_modality"].get("other") == 1
    assert rep["workers"] == 2
    assert (tmp / "state" / "reports" / "ingest.json").is_file()
    cache = tmp / "state" / "cache"
    assert (cache / "CURRENT").is_file() and list((cache / "chunks").glob("*.images.npy"))
    assert not list(cache.glob(".slots-*"))  # the workers' reply slots (crashed ones' too) are gone
    # The crashes are remembered (same file, same crash); nothing is decoded again.
    cfg = load_site_config(tmp / "site.yaml")
    again = ingest(cfg)
    assert again.report.decoded == 0 and again.report.cache_hits == rep["seen"]
    assert again.report.rejected_by_reason == rep["rejected_by_reason"]


def test_nothing_identifying_leaves_the_rejects_map(mixed_run):
    tmp, _goods, planted, r, rep = mixed_run
    state = tmp / "state"
    texts = [r.stdout, r.stderr, json.dumps(rep)]
    blobs = [t.encode() for t in texts] + _blobs(state)
    for value in FOLDER_PHI + HEADER_PHI:
        hits = [i for i, b in enumerate(blobs) if found_in(value, b)]
        assert not hits, (value, hits)
    for x in rep["rejects"]:
        assert x["file"].startswith("file:") and "/" not in x["file"]
    # The operator's map holds the paths, private to the site's operator.
    tsv = state / "reports" / "rejects-map.tsv"
    assert "DOE^JOHN/19620703/" in tsv.read_text()
    assert stat.S_IMODE(tsv.stat().st_mode) == 0o600
    for sub in ("reports", "logs", "cache"):
        assert stat.S_IMODE((state / sub).stat().st_mode) == 0o700, sub
    reasons = {rel.rsplit("/", 1)[-1]: x["reason"] for ref, rel in read_rejects_map(state).items()
               for x in rep["rejects"] if x["file"] == ref}
    for name, expected in planted.items():
        if expected == "accepted":
            assert name not in reasons
        elif expected != "rejected":
            assert reasons[name] == expected, (name, reasons.get(name))
        else:
            assert name in reasons


def test_control_characters_in_names_are_escaped(tmp_path):
    export = tmp_path / "export" / "DOE^JOHN\n\x1b[2J"
    export.mkdir(parents=True)
    (export / "bad\x1b]0;owned\x07.dcm").write_bytes(C.testfile("CT_small.dcm").read_bytes()[:300])
    (export / "ok.dcm").write_bytes(C.testfile("CT_small.dcm").read_bytes())
    site = write_site(tmp_path, tmp_path / "export", preprocess={"image_size": 16}, ingest={"workers": 1})
    r = _cli("ingest", str(site))
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout + r.stderr and "DOE" not in r.stdout + r.stderr
    tsv = (tmp_path / "state" / "reports" / "rejects-map.tsv").read_text()
    assert "\x1b" not in tsv and "\\x1b" in tsv and tsv.count("\n") == 2  # header + one reject, one line each
    log = (tmp_path / "state" / "logs" / "ingest.log").read_text()
    assert "rejected file:" in log and "\x1b" not in log and "DOE" not in log


def test_log_messages_are_one_line_with_control_characters_escaped(tmp_path):
    """A message quoting a name with a newline or a terminal escape cannot forge a log line; a
    traceback logged with it stays readable."""
    import logging

    from dicomfl.common.logs import setup, site_logger

    path = setup(tmp_path, "t")
    site = site_logger(tmp_path, "escape-test")
    try:
        for lg in (logging.getLogger("dicomfl.test"), site):
            lg.warning("file %s", "DOE\n2026-01-01 INFO forged\x1b[2J")
            try:
                raise ValueError("boom")
            except ValueError:
                lg.error("failed", exc_info=True)
    finally:
        setup(None, "t")
        for h in list(site.handlers):
            site.removeHandler(h)
            h.close()
    for text in (path.read_text(), (tmp_path / "logs" / "site.log").read_text()):
        assert "\x1b" not in text and "DOE\\x0a2026-01-01 INFO forged\\x1b[2J" in text
        assert not any(line.startswith("2026-01-01 INFO forged") for line in text.splitlines())
        assert "Traceback (most recent call last):\n" in text and "ValueError: boom" in text


# ------------------------------------------------------------------------------------ the bomb

_UNDER_LIMIT = r"""
import json, resource, subprocess, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
r = subprocess.run(sys.argv[2:], capture_output=True, text=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"rc": r.returncode, "stderr": r.stderr[-2000:], "peak": peak}))
"""


def test_jpeg2000_bomb_is_rejected_without_a_large_allocation(tmp_path, crash_files):
    """The whole ingestion (the command and its workers) runs under RLIMIT_AS = 3 GiB; decoding
    the bomb would take 8.7 GB (tests/test_workers.py shows a bare decode over-allocating). It is
    rejected from its codestream header, and no process of the ingestion grows past a few hundred
    MB."""
    export = tmp_path / "export"
    export.mkdir()
    (export / "bomb.dcm").write_bytes(crash_files["j2k_bomb"].read_bytes())
    (export / "ok.dcm").write_bytes(C.testfile("MR_small_jp2klossless.dcm").read_bytes())
    site = write_site(tmp_path, export, preprocess={"image_size": 32},
                      ingest={"workers": 1, "worker_memory_mb": None})  # no cap of our own: only the limit
    limit = 3 << 30
    r = subprocess.run([sys.executable, "-c", _UNDER_LIMIT, str(limit), *DICOMFL, "ingest", str(site), "--json"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["rc"] == 0, out["stderr"]
    rep = json.loads((tmp_path / "state" / "reports" / "ingest.json").read_text())
    assert rep["accepted"] == 1 and rep["rejected_by_reason"] == {E.CODESTREAM_MISMATCH: 1}
    assert out["peak"] < 600 * 2**20, out["peak"]  # the decode alone would need 8.7 GB


# ------------------------------------------------------------------------------ memory flat in N

_MEASURE = r"""
import json, resource, sys
from pathlib import Path
site = Path(sys.argv[1])
from dicomfl.common.config import load_site_config
from dicomfl.common.ingest import ingest
def peaks():
    # This process's own high-water mark: VmHWM starts afresh at exec, while RUSAGE_SELF keeps
    # the peak of the pytest process this one was forked from.
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024
    return hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
cfg = load_site_config(site)
res = ingest(cfg)  # cold: the state dir is empty
assert "torch" not in sys.modules
out = {"accepted": res.report.accepted, "decoded": res.report.decoded}
out["ingest"], out["worker"] = peaks()
from dicomfl.common.model import ModelConfig, build_model
from dicomfl.common.splits import TEST, TRAIN, VAL
from dicomfl.common.train import TrainSettings, evaluate, load_split, train_local
mc = ModelConfig(image_size=cfg.preprocess.image_size, width=4, depth=1, meta_hidden=8, head_hidden=8)
tr = load_split(res.data, TRAIN, mc.image_size)
r = train_local(build_model(mc), tr, TrainSettings(epochs=1, batch_size=32))
evaluate(build_model(mc), load_split(res.data, TEST, mc.image_size), load_split(res.data, VAL, mc.image_size))
out.update(steps=r.steps, n_train=len(tr))
out["train"] = peaks()[0]
print("RESULT " + json.dumps(out))
"""


def _measure(site: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(site)], capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.split("RESULT ", 1)[1])


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict[int, Path]:
    """The same generated cohort at N and 4N images (256 x 256, 12-bit), ingested at 256 px."""
    out = {}
    for n in (100, 400):
        tmp = tmp_path_factory.mktemp(f"n{n}")
        rows = C.plain_cohort(tmp / "export", n, 256, 256, per_folder=100)
        labels = tmp / "labels.csv"
        labels.write_text("path,label\n" + "".join(f"{rel},{y}\n" for rel, y in rows))
        out[n] = write_site(tmp, tmp / "export", site={"labels": str(labels)}, preprocess={"image_size": 256},
                            ingest={"workers": 2})
    return out


def test_peak_memory_is_flat_in_the_number_of_images(cohorts):
    """A cold ingestion (the parent, and its largest worker), then one training epoch and an
    evaluation read from the cache, at N and 4N images of 256 px (256 KB each as float32): the
    3N extra images are 75 MB, so holding them once, as the old pipeline did several times over,
    would show. Peak RSS at 4N stays within 1.3x of N; ingestion's (parent and worker) also grows
    by less than a third of the extra images' bytes. (Training's peak is set by its batches: the
    evaluation batch is still filling up at N, so its growth is held to the ratio only.)"""
    small, big = _measure(cohorts[100]), _measure(cohorts[400])
    assert small["accepted"] == small["decoded"] == 100 and big["accepted"] == big["decoded"] == 400
    assert big["steps"] > 3 * small["steps"] - 3
    extra = 300 * 256 * 256 * 4
    print({k: (small[k] >> 20, big[k] >> 20) for k in ("ingest", "worker", "train")}, "MiB at N, 4N")
    for k in ("ingest", "worker", "train"):
        assert big[k] / small[k] < 1.3, (k, small[k], big[k])
    for k in ("ingest", "worker"):
        assert big[k] - small[k] < extra / 3, (k, small[k], big[k])


# ------------------------------------------------------------------------------ cache and loader


def test_warm_reingest_writes_nothing_and_a_new_file_one_row(tmp_path):
    rows = C.plain_cohort(tmp_path / "export", 40, 64, 64, per_folder=25)
    cfg = load_site_config(write_site(tmp_path, tmp_path / "export", preprocess={"image_size": 32},
                                      ingest={"workers": 2}))
    cold = ingest(cfg)
    assert cold.report.decoded == 40 and cold.report.cache_rows_written == 40
    cache = tmp_path / "state" / "cache"
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in cache.rglob("*") if p.is_file()}
    warm = ingest(cfg)
    after = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in cache.rglob("*") if p.is_file()}
    assert warm.report.decoded == 0 and warm.report.cache_rows_written == 0 and warm.report.workers == 0
    assert before == after  # not one byte of the cache rewritten
    np.testing.assert_array_equal(np.asarray(cold.data.images), np.asarray(warm.data.images))
    # One more file: one row appended, a new index; the old rows stay where they were.
    C.plain_writer(64, 64)(tmp_path / "export" / "new.dcm", 999)
    grown = ingest(cfg)
    assert grown.report.decoded == 1 and grown.report.cache_rows_written == 1 and grown.report.accepted == 41
    # A moved file is recognised by its content: not decoded again.
    src = tmp_path / "export" / rows[0][0]
    src.rename(tmp_path / "export" / "moved.dcm")
    moved = ingest(cfg)
    assert moved.report.decoded == 0 and moved.report.cache_rows_written == 0 and moved.report.accepted == 41


def test_compaction_drops_rows_no_file_uses(tmp_path):
    C.plain_cohort(tmp_path / "export", 150, 32, 32, per_folder=200)
    cfg = load_site_config(write_site(tmp_path, tmp_path / "export", preprocess={"image_size": 8},
                                      ingest={"workers": 1}))
    cold = ingest(cfg)
    expected = np.asarray(cold.data.images)[:20]
    for p in sorted((tmp_path / "export").rglob("IM*"))[20:]:
        p.unlink()
    small = ingest(cfg)
    assert small.report.accepted == 20
    np.testing.assert_array_equal(np.asarray(small.data.images), expected)
    index = json.loads((tmp_path / "state" / "cache" / (tmp_path / "state" / "cache" / "CURRENT").read_text()).read_text())
    assert sum(u for _c, u in index["chunks"]) == 20  # compacted: 130 dead rows of 150 dropped
    assert len(list((tmp_path / "state" / "cache" / "chunks").iterdir())) == 3 * len(index["chunks"])


def test_retry_failures_are_not_cached(tmp_path):
    """A timeout or a worker over its memory depends on the machine, not the file: not cached."""
    export = tmp_path / "export"
    C.plain_cohort(export, 2, 64, 64)
    C.plain_writer(4096, 4096)(export / "big.dcm", 7)  # 32 MB: its decode needs far more than 64 MB
    with open(export / "sparse.dcm", "wb") as fh:  # 200 MB (sparse): even its mapping is over the cap
        fh.write(b"\0" * 128 + b"DICM")
        fh.truncate(200 << 20)
    cfg = load_site_config(write_site(tmp_path, export, preprocess={"image_size": 16},
                                      ingest={"workers": 1, "worker_memory_mb": 64}))
    first = ingest(cfg)
    assert first.report.rejected_by_reason == {E.WORKER_MEMORY: 2} and first.report.accepted == 2
    cfg.ingest.worker_memory_mb = 2048
    cfg.ingest.max_file_bytes = 100 << 20  # the zeros of sparse.dcm would take pydicom minutes to parse
    second = ingest(cfg)
    assert second.report.decoded == 1 and second.report.accepted == 3
    assert second.report.rejected_by_reason == {E.TOO_LARGE: 1}


def test_files_over_the_cap_are_not_read(tmp_path):
    export = tmp_path / "export"
    C.plain_cohort(export, 2, 64, 64)
    with open(export / "huge.dcm", "wb") as fh:  # 64 GiB, sparse: reading it would take minutes
        fh.truncate(64 << 30)
    cfg = load_site_config(write_site(tmp_path, export, preprocess={"image_size": 16}, ingest={"workers": 1}))
    res = ingest(cfg)
    assert res.report.rejected_by_reason == {E.TOO_LARGE: 1} and res.report.accepted == 2
    assert res.report.decoded == 2  # the large one never went to a worker
    assert res.report.rejects[0]["detail"] == "file size over ingest.max_file_bytes"


def test_chunk_store_rows_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    n = 700
    imgs, feats, stats = (rng.random(s, dtype=np.float32) for s in ((n, 6, 6), (n, 5), (n, 2)))
    store = ChunkStore(tmp_path, 6, 5, chunk_rows=200)
    assert [store.append(imgs[i], feats[i], stats[i]) for i in range(n)] == list(range(n))
    assert [u for _c, u in store.chunks] == [64, 128, 200, 200, 108]  # capacities double up to 200
    for idx in (rng.integers(0, n, 100), np.arange(n), np.array([699, 0, 0, 5]), np.array([], dtype=int)):
        np.testing.assert_array_equal(store.read("images", idx), imgs[idx])
        np.testing.assert_array_equal(store.read("features", idx), feats[idx])
    store.sync()
    again = ChunkStore.open(tmp_path, 6, 5, 200, store.chunks)
    view = StoreRows(again, "stats", np.arange(n)[::-1])
    np.testing.assert_array_equal(view[3:10], stats[::-1][3:10])
    np.testing.assert_array_equal(np.asarray(view), stats[::-1])
    assert view[5].shape == (2,) and view.shape == (n, 2)
    with pytest.raises(IndexError):
        view[n]
    # plain .npy files: numpy reads them
    first = np.load(tmp_path / f"{store.chunks[0][0]}.images.npy", mmap_mode="r")
    np.testing.assert_array_equal(first[:64], imgs[:64])


def test_reply_slots_hand_images_over_and_refuse_an_overwritten_one(tmp_path):
    """A worker's reply slots (two per file it may hold): what it puts is what the parent reads;
    a slot written again before its image was read is refused (the parent rejects that file),
    never misread."""
    from dicomfl.common.workers import PREFETCH, ReplySlots

    assert ReplySlots.SLOTS == 2 * PREFETCH
    rng = np.random.default_rng(1)
    imgs = rng.normal(1000, 300, (ReplySlots.SLOTS + 1, 16, 16)).astype(np.float32)
    worker = ReplySlots.create(str(tmp_path), 16)
    name, seq0 = worker.put(imgs[0])
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o600
    parent = ReplySlots.attach(str(tmp_path / name), 16)
    seqs = [seq0] + [worker.put(img)[1] for img in imgs[1:ReplySlots.SLOTS]]
    for seq, img in zip(seqs, imgs):
        np.testing.assert_array_equal(parent.read(seq), img)
    worker.put(imgs[-1])  # into seq0's slot
    with pytest.raises(RuntimeError):
        parent.read(seq0)
    np.testing.assert_array_equal(parent.read(seqs[1]), imgs[1])  # the others are untouched
    with pytest.raises(ValueError):
        worker.put(imgs[0][:8])
    parent.close()
    worker.close()


def test_loader_scales_from_cached_statistics_exactly(tmp_path):
    import torch

    from dicomfl.common.normalize import robust_scale
    from dicomfl.common.pixels import robust_stats
    from dicomfl.common.train import SplitDataset, _loader, load_split

    rng = np.random.default_rng(1)
    n = 90
    imgs = (rng.normal(1000, 300, (n, 16, 16)) * rng.uniform(0.5, 3, (n, 1, 1))).astype(np.float32)
    imgs[7] = 5.0  # flat: scales to zeros
    feats = rng.random((n, 4), dtype=np.float32)
    store = ChunkStore(tmp_path, 16, 4, 64)
    for i in range(n):
        store.append(imgs[i], feats[i], robust_stats(imgs[i]))
    rows = np.arange(n)
    split = np.where(rows % 3 == 0, 1, 0).astype(np.int8)
    data = SiteData(StoreRows(store, "images", rows), StoreRows(store, "features", rows),
                    (rows % 2).astype(np.int64), split, [f"p{i}" for i in rows], StoreRows(store, "stats", rows))
    tr = load_split(data, 0, 16)
    idx = data.subset(0)
    np.testing.assert_array_equal(np.asarray(tr.images), robust_scale(imgs[idx]))  # bit for bit
    in_memory = load_split(SiteData(imgs, feats, data.labels, split, data.patients), 0, 16)  # no stats: computed
    np.testing.assert_array_equal(np.asarray(in_memory.images), robust_scale(imgs[idx]))
    ds = SplitDataset(tr)
    x, f, y = ds[4]
    assert x.shape == (1, 16, 16) and f.shape == (4,) and y.dtype == torch.int64
    loader = _loader(tr, 8, True, torch.Generator().manual_seed(0), torch.device("cpu"))
    seen = torch.cat([b[2] for b in loader])
    assert len(seen) == len(tr) and not loader.pin_memory
    assert _loader(tr, 8, True, torch.Generator(), torch.device("cuda")).pin_memory  # pinned for a GPU


def test_labels_beyond_the_model_classes_are_a_model_mismatch(tmp_path):
    from dicomfl.common.errors import ModelMismatch
    from dicomfl.common.train import TrainSettings, load_split, train_local

    n = 12
    data = SiteData(np.zeros((n, 8, 8), np.float32), np.zeros((n, 3), np.float32), np.full(n, 2, np.int64),
                    np.zeros(n, np.int8), ["p"] * n)
    with pytest.raises(ModelMismatch, match="site.n_classes"):
        load_split(data, 0, 8, n_classes=2)
    with pytest.raises(ModelMismatch, match="0..1"):
        train_local(_Tiny(), load_split(data, 0, 8), TrainSettings(max_steps=1))


class _Tiny:
    """Just enough of a model for train_local to reach its label check."""

    def __init__(self):
        import torch

        self.cfg = type("cfg", (), {"n_classes": 2})()
        self._m = torch.nn.Linear(1, 2)

    def __deepcopy__(self, memo):
        return self

    def parameters(self):
        return self._m.parameters()

    def to(self, *_a):
        return self

    def train(self):
        return self


def test_no_whole_site_array_in_the_site_data(tmp_path):
    C.plain_cohort(tmp_path / "export", 10, 32, 32)
    res = ingest(load_site_config(write_site(tmp_path, tmp_path / "export", preprocess={"image_size": 16},
                                             ingest={"workers": 1})))
    for arr in (res.data.images, res.data.features, res.data.stats):
        assert isinstance(arr, StoreRows)
    assert res.data.images.shape == (10, 16, 16) and res.data.images[2:4].shape == (2, 16, 16)


def test_cli_ingest_problems_are_one_line_exit_2(tmp_path):
    """Each problem: one line naming the file and the key (or row), exit code 2, no traceback."""
    export = tmp_path / "export"
    C.plain_cohort(export, 2, 32, 32)
    cases: dict[str, tuple[list[str], str]] = {}

    def site(name: str, text: str | bytes | None = None, **sections) -> Path:
        d = tmp_path / name
        d.mkdir()
        path = write_site(d, export, **sections)
        if text is not None:
            path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    latin = site("latin1")
    latin.write_bytes(latin.read_bytes() + "# Gesch\u00e4ftsstelle\n".encode("latin-1"))
    cases["yaml-not-utf8"] = ([str(latin)], f"{latin}: not UTF-8 text")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cases["state-dir-is-file"] = ([str(site("sd1", site={"state_dir": str(blocker)}))], "site.state_dir: cannot create")
    cases["state-dir-uncreatable"] = ([str(site("sd2", site={"state_dir": str(blocker / "sub")}))],
                                      "site.state_dir: cannot create")

    def with_labels(name: str, body: bytes) -> Path:
        p = tmp_path / f"{name}.csv"
        p.write_bytes(body)
        return site(name, site={"labels": str(p)})

    rel = f"{C.PATIENT_FOLDER}/0000/IM0000000"
    cases["labels-latin1"] = ([str(with_labels("l1", f"path,label\n{rel},1\nJOS\u00c9,0\n".encode("latin-1")))],
                              "l1.csv: line 3: labels file is not UTF-8")
    cases["labels-big-field"] = ([str(with_labels("l2", f"path,label\n{rel},1\nx,{'9' * 140000}\n".encode()))],
                                 "l2.csv: row 3: not a readable CSV row")
    cases["label-1e400"] = ([str(with_labels("l3", f"path,label\n{rel},1e400\n".encode()))],
                            "l3.csv: row 2: label outside 0..1")
    cases["label-huge"] = ([str(with_labels("l4", f"path,label\n{rel},99999999999999999999\n".encode()))],
                           "l4.csv: row 2: label outside 0..1")
    cases["label-7"] = ([str(with_labels("l5", f"path,label\n{rel},0\n{rel[:-1]}1,7\n".encode()))],
                        "l5.csv: row 3: label outside 0..1")
    folder = tmp_path / "report-folder"
    folder.mkdir()
    cases["report-is-folder"] = ([str(site("rp")), "--report", str(folder)], "--report:")
    procs = {k: subprocess.Popen([*DICOMFL, "ingest", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, cwd=ROOT) for k, (args, _m) in cases.items()}
    for k, p in procs.items():
        out, err = p.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert p.returncode == 2, (k, p.returncode, err[-2000:])
        assert len(lines) == 1 and "Traceback" not in err, (k, err[-2000:])
        assert cases[k][1] in lines[0], (k, lines[0])
        assert "99999" not in lines[0] and "1e400" not in lines[0] and "JOS" not in lines[0], (k, lines[0])


def test_ingest_settings_are_config_keys(tmp_path):
    from dicomfl.common.errors import ConfigError

    bad = write_site(tmp_path, tmp_path, ingest={"workers": 0})
    with pytest.raises(ConfigError, match="ingest.workers"):
        load_site_config(bad)
    ok = write_site(tmp_path, tmp_path, ingest={"workers": 3, "file_timeout_s": 9.5, "worker_memory_mb": 512,
                                                "max_file_bytes": 4096},
                    site={"labels_key_column": "Accession #", "labels_value_column": "y", "n_classes": 3})
    cfg = load_site_config(ok)
    assert (cfg.ingest.workers, cfg.ingest.file_timeout_s, cfg.ingest.worker_memory_mb, cfg.ingest.max_file_bytes) == \
        (3, 9.5, 512, 4096)
    assert (cfg.site.labels_key_column, cfg.site.labels_value_column, cfg.site.n_classes) == ("Accession #", "y", 3)


def test_the_worker_module_stays_light():
    """Workers import the ingestion module: it must not import torch (≈230 MB and seconds each)."""
    code = textwrap.dedent("""
        import sys
        import dicomfl.common.ingest
        print('torch' in sys.modules)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr


def test_os_environment_is_left_alone():
    before = dict(os.environ)
    from dicomfl.common.workers import imap_isolated

    assert dict(imap_isolated(C.behave, [("ok", 1)], workers=1, timeout_s=60, env={"OMP_NUM_THREADS": "1"})) == {0: 1}
    assert dict(os.environ) == before
