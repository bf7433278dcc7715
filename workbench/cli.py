"""The ``dicomfl`` command line: a thin shell over the library.

User errors (bad config, bad labels file) print one line and exit 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from dicomfl.common.errors import DicomflError

app = typer.Typer(
    name="dicomfl",
    help="Federated learning across hospital sites on native DICOM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # -h as well as --help, on every command (click hands these to each sub-command's context)
    context_settings={"help_option_names": ["-h", "--help"]},
)


class ExportFormat(str, Enum):
    """``dicomfl export --format``: shown as a choice in ``--help``."""

    torchscript = "torchscript"
    onnx = "onnx"


class Accountant(str, Enum):
    """``dicomfl privacy epsilon --accountant``: the Opacus accountants."""

    rdp = "rdp"
    prv = "prv"


def _version() -> str:
    """The installed package's version (its metadata), not a constant that could drift from it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dicomfl")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        print(f"dicomfl {_version()}")
        raise typer.Exit(0)


def _console(stderr: bool = False) -> Console:
    """A console that wraps only for a person: piped or redirected, each line stays whole."""
    tty = (sys.stderr if stderr else sys.stdout).isatty()
    return Console(stderr=stderr, soft_wrap=not tty, width=None if tty else 100_000)


err = _console(stderr=True)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print dicomfl's version and exit."),
) -> None:
    """Federated learning across hospital sites on native DICOM."""

out = _console()


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fail(msg: str, code: int = 2) -> None:
    err.print(f"dicomfl: error: {msg}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def progress_bar(label: str) -> Progress:
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )


def _report_table(rep) -> Table:
    t = Table(title=f"ingest: {rep.site}", show_header=True)
    t.add_column("what")
    t.add_column("count", justify="right")
    t.add_row("files seen", str(rep.seen))
    t.add_row("accepted", str(rep.accepted))
    t.add_row("rejected", str(rep.rejected))
    for reason, n in rep.rejected_by_reason.items():
        t.add_row(f"  rejected: {reason}", str(n))
    for why, n in rep.deferred_by_reason.items():
        t.add_row(f"  deferred ({why}): retried at the next ingest", str(n))
    for mod, n in rep.by_modality.items():
        t.add_row(f"  modality: {mod}", str(n))
    t.add_row("labelled images", str(rep.labelled))
    t.add_row("unlabelled images", str(rep.unlabelled))
    for name in ("train", "val", "test"):
        t.add_row(f"  {name} (images / patients)", f"{rep.splits.get(name, 0)} / {rep.split_patients.get(name, 0)}")
    t.add_row("label rows with problems", str(len(rep.label_problems)))
    t.add_row("label rows matching no image", str(rep.label_rows_unmatched))
    t.add_row("from cache / decoded", f"{rep.cache_hits} / {rep.decoded}")
    t.add_row("worker processes", str(rep.workers))
    t.add_row("seconds (files/s)", f"{rep.elapsed_s} ({rep.files_per_s})")
    return t


@app.command()
def ingest(
    site_yaml: Path = typer.Argument(..., help="The site's config (site.yaml)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the report as JSON to this file."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Decode everything again; do not read or write the cache."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON instead of a table."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Worker processes (default: ingest.workers, else the CPUs)."),
) -> None:
    """Discover, de-identify and cache a site's DICOM files; print a report.

    Files are found by content (any nesting, any names), and each is read, checked and decoded
    in a worker process: a file that crashes or hangs a decoder is rejected and the rest goes on.
    Rejected files are named by a site-local reference (file:...), never by their path; the
    operator's map from references to paths is <state_dir>/reports/rejects-map.tsv (mode 0600).
    Each rejected file is listed with its reason in the site log (<state_dir>/logs/ingest.log)
    and in the report, written to <state_dir>/reports/ingest.json.
    """
    import os

    from dicomfl.common.config import load_site_config
    from dicomfl.common.errors import printable
    from dicomfl.common.ingest import ingest as run_ingest
    from dicomfl.common.ingest import prepare_state_dir
    from dicomfl.common.logs import setup

    def say(line: str) -> None:
        err.print(printable(line), markup=False, highlight=False, soft_wrap=True)

    def write_private(path: Path, text: str) -> None:
        # mode 0600: the report names files only by reference, but it is the site's own document
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w", encoding="utf-8") as fh:
            fh.write(text)

    if report is not None and report.is_dir():
        _fail(f"--report: {printable(str(report))} is a folder; give a file name")
    try:
        cfg = load_site_config(site_yaml)
        prepare_state_dir(cfg)
        logpath = setup(cfg.site.state_dir, "ingest", console_level=logging.ERROR)
        with progress_bar("ingest") as bar:
            task = bar.add_task("ingest", total=None)
            result = run_ingest(cfg, use_cache=not no_cache, workers=workers,
                                progress=lambda i, n: bar.update(task, completed=i, total=n))
    except DicomflError as exc:
        _fail(printable(str(exc)))
    rep = result.report
    if json_out:
        out.print_json(json.dumps(rep.to_json()))
    else:
        out.print(_report_table(rep))
    from dicomfl.common.errors import NOT_DICOM

    if rep.seen - rep.rejected_by_reason.get(NOT_DICOM, 0) <= 0:  # an empty or wrong folder: say so (exit 0)
        say(f"dicomfl: warning: {printable(str(site_yaml))}: site.dicom_dir: no DICOM files found under "
            f"{printable(str(cfg.site.dicom_dir))}")
    shown = 0
    for r in rep.rejects:
        if r["reason"] == "not-dicom":
            continue
        if shown < 20:
            say(f"rejected {r['file']}: {r['reason']}" + (f" ({r['detail']})" if r["detail"] else ""))
        shown += 1
    if shown > 20:
        say(f"... and {shown - 20} more rejected files: see {logpath}")
    if rep.rejects:
        say(f"file references -> paths: {cfg.site.state_dir / 'reports' / 'rejects-map.tsv'} (for this site's operator only)")
    for p in rep.label_problems[:20]:
        say(f"labels: {p}")
    if report is not None:  # <state_dir>/reports/ingest.json is written by the ingestion itself
        try:
            report.parent.mkdir(parents=True, exist_ok=True)
            write_private(report, json.dumps(rep.to_json(), indent=2))
        except OSError as exc:
            _fail(f"cannot write the report {printable(str(report))} ({type(exc).__name__})")


@app.command()
def synth(
    out_dir: Path = typer.Argument(..., help="Folder to write the cohort into."),
    sites: int = typer.Option(3, "--sites", min=1, max=4, help="Number of sites (each has its own profile)."),
    per_site: int = typer.Option(120, "--per-site", min=2, help="Good images per site."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same pixel data and labels."),
    image_size: int = typer.Option(64, "--image-size", min=8, help="preprocess.image_size written to each site.yaml."),
    test_fraction: Optional[float] = typer.Option(None, "--test-fraction", min=0.01, max=0.8,
                                                  help="splits.test written to each site.yaml (default: the site default, 0.15); "
                                                       "a benchmark cohort wants big test splits."),
    shortcut: Optional[str] = typer.Option(None, "--shortcut", metavar="FIELD:SIGNS",
                                           help="Plant an acquisition-field shortcut: FIELD (kvp or exposure) goes with "
                                                "the label with one sign per site, + - or 0 (e.g. exposure:+,-,0)."),
) -> None:
    """Generate a multicenter DICOM cohort with fake PHI, labels, site keys and configs.

    Writes OUT_DIR/<site>/{dicom/, labels.csv, site.key, site.yaml}, OUT_DIR/run.yaml,
    OUT_DIR/coordinator.yaml and OUT_DIR/README.md (each site's profile in a table).
    """
    from .synth import parse_shortcut, synth as run_synth

    try:
        planted = parse_shortcut(shortcut, sites) if shortcut is not None else None
    except ValueError as exc:
        _fail(str(exc))
    with progress_bar("synth") as bar:
        task = bar.add_task("synth", total=None)
        result = run_synth(out_dir, sites=sites, per_site=per_site, seed=seed, image_size=image_size,
                           progress=lambda i, n: bar.update(task, completed=i, total=n), test_fraction=test_fraction,
                           shortcut=planted)
    t = Table(title=f"cohort: {out_dir}")
    for col in ("site", "manufacturer", "syntax", "photometric", "images", "patients", "positives", "confounder"):
        t.add_column(col)
    for s in result.sites:
        t.add_row(s["name"], s["manufacturer"], s["syntax"], s["photometric"], str(s["images"]), str(s["patients"]),
                  str(s["positives"]), s["confounder"])
    out.print(t)
    from .synth import pki_command

    out.print(f"{result.files_written} files written; next: dicomfl ingest {out_dir}/{result.sites[0]['name']}/site.yaml",
              markup=False, highlight=False)
    out.print(f"to run it as a federation, make its keys: {pki_command(out_dir, [s['name'] for s in result.sites])}",
              markup=False, highlight=False)


privacy_app = typer.Typer(help="Privacy budget arithmetic for privacy officers (DP-SGD, Opacus accountants).",
                          no_args_is_help=True)
app.add_typer(privacy_app, name="privacy")


@privacy_app.command("epsilon")
def privacy_epsilon(
    sample_rate: float = typer.Option(..., "--sample-rate", min=0.0, max=1.0, help="Poisson sampling rate q (batch / train size)."),
    noise_multiplier: float = typer.Option(..., "--noise-multiplier", min=0.0, help="Gaussian noise std / clipping norm (sigma)."),
    steps: int = typer.Option(..., "--steps", min=1, help="Number of DP-SGD steps over the whole federation."),
    delta: float = typer.Option(1e-5, "--delta", min=0.0, max=1.0, help="Target delta."),
    accountant_choice: Accountant = typer.Option(Accountant.rdp, "--accountant", help="The Opacus accountant."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a sentence."),
) -> None:
    """Print the epsilon a site would spend for the given DP-SGD settings."""
    from dicomfl.client.privacy import epsilon

    accountant = accountant_choice.value
    if noise_multiplier <= 0:
        _fail("--noise-multiplier: must be above 0 (no noise means no differential privacy)")
    eps = epsilon([[noise_multiplier, sample_rate, steps]], delta, accountant)
    if json_out:
        out.print_json(json.dumps({"epsilon": eps, "delta": delta, "accountant": accountant, "sample_rate": sample_rate,
                                   "noise_multiplier": noise_multiplier, "steps": steps}))
    else:
        out.print(f"epsilon = {eps:.4f} at delta = {delta:g} ({accountant}; q = {sample_rate:g}, sigma = {noise_multiplier:g}, "
                  f"{steps} steps)", markup=False, highlight=False)


@privacy_app.command("plan")
def privacy_plan(
    site_yaml: Path = typer.Argument(..., help="The site's config (site.yaml): its data size, batch size and budget."),
    run_yaml: Path = typer.Argument(..., help="The run config (run.yaml): rounds and local epochs."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Print the noise multiplier the site's target epsilon needs over the planned run.

    The site's training-set size comes from its cache (ingesting first if needed). Steps =
    rounds x local epochs x ceil(N / batch) (or rounds x local_steps), at sample rate 1/ceil(N / batch).
    """
    from dicomfl.client.privacy import plan_for_site
    from dicomfl.common.config import load_run_config, load_site_config

    try:
        site = load_site_config(site_yaml)
        run = load_run_config(run_yaml, check_files=False)
        from dicomfl.common.logs import setup

        setup(site.site.state_dir, "privacy", console_level=logging.ERROR)
        from dicomfl.common.ingest import ingest as run_ingest
        from dicomfl.common.splits import TRAIN

        plan = plan_for_site(site, run, len(run_ingest(site).data.subset(TRAIN)))
    except DicomflError as exc:
        _fail(str(exc))
    if json_out:
        out.print_json(json.dumps(plan))
        return
    t = Table(title=f"privacy plan: {plan['site']} in run {plan['run']}")
    t.add_column("what")
    t.add_column("value", justify="right")
    for k, v in plan.items():
        t.add_row(k.replace("_", " "), f"{v:.6g}" if isinstance(v, float) else str(v))
    out.print(t)


@privacy_app.command("status")
def privacy_status(
    site_yaml: Path = typer.Argument(..., help="The site's config (site.yaml)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Print what the site has spent of its privacy budget, by run and in total.

    The budget belongs to the site's data: every release (the global model's training, the local
    baseline, the personalized model, the label counts and feature statistics) is charged to one
    account, <state_dir>/privacy/ledger.json (signed under the site's key, and verified here), each
    model's spend held to privacy.run_epsilon and the total of all of it to privacy.lifetime_epsilon.
    """
    from dicomfl.client.privacy import site_spend
    from dicomfl.common.config import load_site_config

    try:
        site = load_site_config(site_yaml, check_files=False)
        p = site.privacy
        spend = site_spend(site.site.state_dir, p.accountant, p.delta, key=site.secret_key)
    except DicomflError as exc:
        _fail(str(exc))
    except (OSError, ValueError):
        _fail(f"{site_yaml}: the privacy ledger in its state_dir cannot be read")
    budget = p.lifetime_epsilon
    spend.update({"site": site.site.name, "budget": budget, "run_cap": p.run_epsilon})
    if json_out:
        out.print_json(json.dumps(spend))
        return
    t = Table(title=f"privacy spent: {site.site.name} ({p.accountant}, delta {p.delta:g})")
    for col in ("run", "epsilon", "rounds trained", "rounds declined", "noise multiplier", "label counts released"):
        t.add_column(col, justify="left" if col == "run" else "right")
    for name, r in spend["runs"].items():
        nm = r["noise_multiplier"]
        t.add_row(name, f"{r['epsilon']:.4f}", str(r["rounds_trained"]), str(r["rounds_declined"]),
                  "-" if nm is None else f"{nm:.4g}", "yes" if r["label_counts_released"] else "no")
    out.print(t)
    out.print(f"total epsilon {spend['epsilon_total']:.4f} (all runs composed) of a budget of "
              f"{'none set' if budget is None else f'{budget:g}'}", markup=False, highlight=False)
    for r in spend["not_private"]:
        out.print(f"not private (no DP, epsilon infinite): run {r['run']}, {r['kind']}: {r['releases']} release(s)",
                  markup=False, highlight=False)


@privacy_app.command("reseal")
def privacy_reseal(
    site_yaml: Path = typer.Argument(..., help="The site's config (site.yaml); its site.secret_file holds the new key."),
    old_key_file: Path = typer.Option(..., "--old-key-file", help="The key the ledger is signed with now."),
) -> None:
    """Re-sign the site's privacy ledger after a key rotation: verify it (and its seal) with the
    old key, then sign both with the key in site.secret_file. A ledger that does not verify under
    the old key is refused (exit 2), and nothing is written."""
    from dicomfl.client.privacy import reseal
    from dicomfl.common.config import load_site_config, read_site_key

    try:
        site = load_site_config(site_yaml, check_files=False)
        seq = reseal(site.site.state_dir, read_site_key(old_key_file), site.secret_key)
    except DicomflError as exc:
        _fail(str(exc))
    out.print(f"resealed {site.site.state_dir}/privacy/ledger.json under the key in {site.site.secret_file} "
              f"(write {seq})", markup=False, highlight=False)


@app.command()
def export(
    model_npz: Path = typer.Argument(..., metavar="MODEL", help="Weights (.npz): a run's checkpoints/round-NNNN/global.npz or local-<site>.npz."),
    formats: Optional[list[ExportFormat]] = typer.Option(None, "--format", help="The model file's format (default: torchscript); repeat for both."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the model files and the model card."),
    run_dir: Optional[Path] = typer.Option(None, "--run", help="The run's folder (default: the nearest folder above MODEL with run_config.json)."),
    site_yamls: Optional[list[Path]] = typer.Option(None, "--site", help="A site config (repeatable) whose files, DICOM folder and state folder --out must not touch."),
    json_out: bool = typer.Option(False, "--json", help="Print what was written (files, model id, sha256) as JSON."),
) -> None:
    """Export a trained model to run without dicomfl (TorchScript, ONNX) with its preprocessing and a
    model card (model_card.json/.md: features, preprocessing, sites, rounds, epsilon, cross-site AUROC
    with 95% intervals, intended use, limits). Each file is checked against dicomfl's model. --out is
    refused (exit 2) if a link is on its path or at a file it writes, or if it would touch the model
    or, with --site, a site's files or folders."""
    from dicomfl.common.config import load_site_config
    from dicomfl.common.errors import printable

    if not model_npz.is_file():  # before torch is imported: a typo fails at once
        _fail(f"{printable(str(model_npz))}: model file not found")
    try:
        sites = [load_site_config(p, check_files=False) for p in site_yamls or []]
    except DicomflError as exc:
        _fail(str(exc))
    from .export import export_model

    try:
        res = export_model(model_npz, out_dir, formats=[f.value for f in formats or [ExportFormat.torchscript]],
                           run_dir=run_dir, sites=sites)
    except DicomflError as exc:
        _fail(str(exc))
    if json_out:
        model = res.card.get("model", {})
        out.print_json(json.dumps({"out_dir": str(res.out_dir), "model": model.get("id"),
                                   "weights_sha256": model.get("weights_sha256"),
                                   "files": {kind: {"path": str(path), "sha256": _sha256(path)}
                                             for kind, path in res.files.items()},
                                   "notes": res.notes}))
        return
    for kind, path in res.files.items():
        out.print(f"{kind}: {path}", markup=False, highlight=False)
    for note in res.notes:
        err.print(f"dicomfl: note: {note}", markup=False, highlight=False)


@app.command()
def model(
    run_yaml: Optional[Path] = typer.Argument(None, help="A run config; its model: section is described (default model if absent)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Describe the model a run trains: mode, sizes, parameter counts, Opacus compatibility."""
    from dicomfl.common.config import ModelConfig, load_run_config
    from dicomfl.common.model import describe

    try:
        cfg = load_run_config(run_yaml, check_files=False).model if run_yaml else ModelConfig()
    except DicomflError as exc:
        _fail(str(exc))
    info = describe(cfg)
    if json_out:
        out.print_json(json.dumps(info))
        return
    t = Table(title=f"model: {info['mode']}")
    t.add_column("what")
    t.add_column("value", justify="right")
    for k in ("mode", "image_size", "width", "depth", "n_features", "feature_schema", "n_classes"):
        t.add_row(k.replace("_", " "), "each site's preprocess.image_size" if info[k] is None else str(info[k]))
    for k, v in info["parameters"].items():
        t.add_row(f"parameters: {k}", f"{v:,}")
    t.add_row("Opacus validator", "ok" if not info["opacus_errors"] else "; ".join(info["opacus_errors"]))
    out.print(t)


site_app = typer.Typer(help="The site daemon (a Flower SuperNode with the dicomfl ClientApp).", no_args_is_help=True)
coordinator_app = typer.Typer(help="The coordinator (a Flower SuperLink).", no_args_is_help=True)
app.add_typer(site_app, name="site")
app.add_typer(coordinator_app, name="coordinator")


@site_app.command("start")
def site_start(site_yaml: Path = typer.Argument(..., help="The site's config (site.yaml) with a federation: section.")) -> None:
    """Run the site daemon until SIGTERM: ingests/caches on demand, trains and evaluates when the
    coordinator asks; only weights and numbers leave. Logs: <state_dir>/logs/{site,supernode}.log."""
    from dicomfl.client.daemon import lock_state_dir, start

    from dicomfl.common.config import load_site_config
    from dicomfl.common.logs import setup

    try:
        cfg = load_site_config(site_yaml)
        lock_state_dir(cfg.site.state_dir)  # one daemon per site: before anything is written there
        setup(cfg.site.state_dir, "daemon", console_level=logging.INFO)
        code = start(cfg)
    except DicomflError as exc:
        _fail(str(exc))
    raise typer.Exit(code)


@site_app.command("status")
def site_status(
    site_yaml: Path = typer.Argument(..., help="The site's config (site.yaml)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of lines."),
) -> None:
    """What the site has received over DICOM (intake), its last ingestion, and the privacy budget
    spent. Counts and timestamps only: no patient, key or path appears."""
    from dicomfl.client.status import site_status as status_of
    from dicomfl.common.config import load_site_config

    try:
        cfg = load_site_config(site_yaml, check_files=False)
    except DicomflError as exc:
        _fail(str(exc))
    st = status_of(cfg)
    if json_out:
        out.print_json(json.dumps(st))
        return
    say = lambda line: out.print(line, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    say(f"site {st['site']}")
    i = st["intake"]
    if i is None:
        say("intake: off (no site.intake in the config)")
    else:
        say(f"intake: {i['ae_title']} on port {i['port']}{' (TLS)' if i['tls'] else ''}: received {i['received']}, "
            f"written {i['written']}, duplicates {i['duplicates']}, rejected {i['rejected']}, failed {i['failed']}; "
            f"associations accepted {i['associations_accepted']}, refused {i['associations_refused']}; "
            f"last received {i['last_received_at'] or 'never'}")
    g = st["ingest"]
    if g is None:
        say("ingest: never run (dicomfl ingest SITE_YAML, or the first round, does it)")
    else:
        say(f"ingest: {g.get('at')}: {g.get('seen', 0)} files, {g.get('accepted', 0)} accepted, "
            f"{g.get('rejected', 0)} rejected, {g.get('labelled', 0)} labelled"
            + (f", {g['deferred']} deferred to the next ingest" if g.get("deferred") else ""))
    p = st["privacy"]
    budget = "none set" if p["budget"] is None else format(p["budget"], "g")
    if p.get("error"):
        say(f"privacy: {p['error']} (budget {budget})")
    else:
        say(f"privacy: epsilon {p['epsilon_total']:.4f} spent over {p['runs']} run(s) of a budget of {budget}"
            + ("" if p.get("verified") else " (ledger not verified: the site key cannot be read)"))
        for r in p.get("not_private") or []:
            say(f"privacy: not private (no DP, epsilon infinite): run {r['run']}, {r['kind']}: {r['releases']} release(s)")
    r = st["releases"]
    say(f"opt-in releases: local-only model {'shared' if r['local_model'] else 'kept at the site'} "
        f"(privacy.share_local_model); replicate AUROCs "
        f"{'up to ' + str(r['eval_replicates']) + ' per evaluated model' if r['eval_replicates'] else 'none'} "
        f"(privacy.eval_replicates)")


@app.command()
def predict(
    model_npz: Path = typer.Argument(..., metavar="MODEL", help="Weights (.npz) of a run: checkpoints/round-NNNN/global.npz or local-<site>.npz."),
    site_yaml: Path = typer.Argument(..., help="The site's config (site.yaml): key, secret, preprocessing, validation split."),
    out_csv: Path = typer.Option(..., "--out", help="The predictions file to write (CSV, mode 0600)."),
    input_dir: Optional[Path] = typer.Option(None, "--input", help="A folder of new studies (default: the site's DICOM folder)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", min=0.0, max=1.0, help="Decision threshold (default: the one the run's cross-site validation used for this model at this site, else Youden's J on the site's validation split)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Worker processes (default: ingest.workers, else the CPUs)."),
    run_dir: Optional[Path] = typer.Option(None, "--run", help="The run's folder (default: the nearest folder above MODEL with run_config.json)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Apply a trained model to the site's images, or to a folder of new studies.

    Each image gets a row keyed by the site's own key (site.label_key: accession number, Study
    Instance UID, ...): probability, decision at the site's threshold, and the model's identity.
    The file is the site's own data: written only to --out, mode 0600, never sent anywhere.
    Rejected files are listed beside it (<out>.rejected.tsv, 0600) and named by reference here.
    """
    from dicomfl.common.config import load_site_config
    from dicomfl.common.errors import printable

    if not model_npz.is_file():  # before torch is imported: a typo fails at once
        _fail(f"{printable(str(model_npz))}: model file not found")
    if input_dir is not None and not input_dir.is_dir():
        _fail(f"--input: {printable(str(input_dir))} is not a folder")
    from dicomfl.client.predict import check_output, predict_files, rejects_path
    from dicomfl.common.logs import setup

    try:
        cfg = load_site_config(site_yaml)
        check_output(out_csv, cfg, (model_npz,))
    except DicomflError as exc:
        _fail(printable(str(exc)))
    from .export import evaluated_threshold, load_trained

    try:
        setup(cfg.site.state_dir, "predict", console_level=logging.ERROR)
        trained = load_trained(model_npz, run_dir, image_size=cfg.preprocess.image_size, batch_size=cfg.train.batch_size,
                               max_parameters=cfg.train.max_model_parameters, max_memory_mb=cfg.train.max_model_memory_mb)
        source = "given"
        if threshold is None and trained.net.cfg.n_classes == 2:
            threshold, source = evaluated_threshold(trained, model_npz, cfg.site.name)
        with progress_bar("predict") as bar:
            task = bar.add_task("predict", total=None)
            rep = predict_files(trained.net, cfg, out_csv, model_id=trained.model_id, model_sha256=trained.sha256,
                                input_dir=input_dir, threshold=threshold, threshold_source=source or "given",
                                workers=workers, progress=lambda i, n: bar.update(task, completed=i, total=n))
    except DicomflError as exc:
        _fail(printable(str(exc)))
    if json_out:
        out.print_json(json.dumps(rep.to_json()))
        return
    for r in rep.rejects[:20]:
        err.print(f"rejected {r['file']}: {r['reason']}" + (f" ({r['detail']})" if r["detail"] else ""),
                  markup=False, highlight=False, soft_wrap=True)
    thr = "argmax" if rep.threshold is None else f"{rep.threshold:.4f} ({rep.threshold_source})"
    out.print(f"{rep.predicted} images predicted with {rep.model} (sha256 {rep.model_sha256[:12]}), threshold {thr}; "
              f"{rep.rejected} files rejected; {rep.images_per_s} images/s\n"
              f"predictions: {printable(str(out_csv))}" + (f"\nrejected files: {printable(str(rejects_path(out_csv)))}"
                                                          if rep.rejects else ""),
              markup=False, highlight=False, soft_wrap=True)


@coordinator_app.command("start")
def coordinator_start(coord_yaml: Path = typer.Argument(..., help="The coordinator config (coordinator.yaml).")) -> None:
    """Run the SuperLink until SIGTERM (TLS, SuperNode authentication, state in <state_dir>/superlink.db);
    registers the public keys of coordinator.authorized_sites at every start."""
    from dicomfl.server.coordinator import start

    from dicomfl.common.config import load_coordinator_config
    from dicomfl.common.logs import setup

    try:
        cfg = load_coordinator_config(coord_yaml)
        setup(cfg.coordinator.state_dir, "coordinator", console_level=logging.INFO)
        code = start(cfg)
    except DicomflError as exc:
        _fail(str(exc))
    raise typer.Exit(code)


def _coordinator_for(run_yaml: Path, cfg, explicit: Optional[Path]):
    from dicomfl.common.config import load_coordinator_config

    path = explicit or cfg.coordinator or (Path(run_yaml).resolve().parent / "coordinator.yaml")
    if not Path(path).is_file():
        raise DicomflError(f"{run_yaml}: no coordinator config (give --coordinator, or coordinator: in the run config)")
    return load_coordinator_config(path)


@app.command()
def run(
    run_yaml: Path = typer.Argument(..., help="The run config (run.yaml)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint."),
    evaluate_only: Optional[Path] = typer.Option(None, "--evaluate-only", help="Cross-site validation of this model (.npz) only; no training."),
    coordinator: Optional[Path] = typer.Option(None, "--coordinator", help="The coordinator config (default: run.yaml's coordinator:, else coordinator.yaml beside it)."),
    json_out: bool = typer.Option(False, "--json", help="Print the final summary as one JSON object on stdout (progress goes to stderr)."),
) -> None:
    """Submit a training run to the coordinator and stream its progress (rounds, per-site metrics).

    Writes <out_dir>/report.md, metrics.json, cross-site matrices (CSV, JSON, PNG) and checkpoints.
    With --json, stdout holds only the summary: the run's name, the rounds completed, out_dir, the
    report and each model's mean AUROC over the sites (cross-site validation).
    """
    from dicomfl.server.runner import submit

    from dicomfl.common.config import load_run_config

    try:
        cfg = load_run_config(run_yaml)
        coord = _coordinator_for(run_yaml, cfg, coordinator)
        if evaluate_only is not None and not evaluate_only.is_file():
            raise DicomflError(f"--evaluate-only: model file not found: {evaluate_only}")
    except DicomflError as exc:
        _fail(str(exc))
    shown = err if json_out else out  # --json: stdout is the summary alone
    code = submit(cfg, coord, resume=resume, evaluate_only=evaluate_only,
                  echo=lambda s: shown.print(s, markup=False, highlight=False, soft_wrap=True))
    if code != 0:
        _fail(f"run {cfg.run.name} did not finish; see {cfg.out_dir}/flwr-run.log and the coordinator's logs", code=1)
    if json_out:
        print(json.dumps(run_summary(cfg.run.name, cfg.out_dir)))
        return
    out.print(f"report: {cfg.out_dir / 'report.md'}", markup=False, highlight=False)


def run_summary(name: str, out_dir: Path) -> dict:
    """What ``dicomfl run --json`` prints: the run, the rounds its metrics.json says were done,
    where its files are, and each model's mean cross-site AUROC (the report's "mean" column)."""
    import math

    try:
        metrics = json.loads((Path(out_dir) / "metrics.json").read_text())
    except (OSError, ValueError):
        metrics = {}
    cross = metrics.get("cross_site") or {}
    gaps = (cross.get("gaps") or {}).get("auroc") or {}
    mean_auroc = {}
    for model, cells in (cross.get("matrix") or {}).items():
        if isinstance(gaps.get(model), dict) and gaps[model].get("mean") is not None:
            mean_auroc[model] = gaps[model]["mean"]
            continue
        vals = [c.get("auroc") for c in cells.values() if isinstance(c, dict)]
        vals = [float(v) for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
        mean_auroc[model] = sum(vals) / len(vals) if vals else None
    return {"run": name, "rounds_completed": metrics.get("rounds"), "out_dir": str(Path(out_dir).resolve()),
            "report": str(Path(out_dir).resolve() / "report.md"), "mean_auroc": mean_auroc,
            "selected": metrics.get("selected")}


# The demo's cohort and budget: the benchmark's model and image size (README: "Multicenter
# benchmark"), test splits big enough for intervals that separate the models.
DEMO_IMAGE_SIZE = 32
DEMO_TEST_FRACTION = 0.4


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("runs/demo"), "--out", help="Where the cohort, the federation's files and the report go."),
    sites: int = typer.Option(3, "--sites", min=2, max=4, help="Number of generated sites."),
    per_site: int = typer.Option(600, "--per-site", min=20, help="Images per site (40% of the patients are in the test split)."),
    rounds: int = typer.Option(20, "--rounds", min=1, help="FedAvg rounds."),
    local_epochs: int = typer.Option(1, "--local-epochs", min=1, help="Local epochs per round."),
    dp: bool = typer.Option(False, "--dp", help="Train with DP-SGD (target epsilon 8 per site)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """The whole thing on one machine: generate a cohort, start a SuperLink and site daemons on
    loopback with TLS and authentication, run FedAvg with cross-site validation, stop everything,
    and write <out>/report.md with plots."""
    import time as _time

    import yaml as _yaml

    from dicomfl.common.config import run_config_dict
    from dicomfl.workbench.launcher import LocalFederation

    from .synth import synth as run_synth

    t0 = _time.perf_counter()
    out_dir = out_dir.resolve()
    cohort = out_dir / "cohort"
    out.print(f"1/4 generating a {sites}-site cohort in {cohort}", markup=False, highlight=False)
    made = {"sites": sites, "per_site": per_site, "seed": seed, "image_size": DEMO_IMAGE_SIZE,
            "test_fraction": DEMO_TEST_FRACTION}
    marker = cohort / "demo-cohort.json"
    if (cohort / "run.yaml").exists() and (not marker.is_file() or marker.read_text() != json.dumps(made)):
        shutil.rmtree(cohort)  # made by another version or other options of the demo: make it again
    if not (cohort / "run.yaml").exists():
        with progress_bar("synth") as bar:
            task = bar.add_task("synth", total=None)
            run_synth(cohort, sites=sites, per_site=per_site, seed=seed, image_size=DEMO_IMAGE_SIZE,
                      test_fraction=DEMO_TEST_FRACTION, progress=lambda i, n: bar.update(task, completed=i, total=n))
        marker.write_text(json.dumps(made))
    names = sorted(p.parent.name for p in cohort.glob("site-*/site.yaml"))[:sites]
    run_cfg = run_config_dict("demo", rounds=rounds, local_epochs=local_epochs, out_dir=out_dir, seed=seed, dp=dp,
                              model={"mode": "fused", "image_size": DEMO_IMAGE_SIZE, "width": 16, "depth": 3},
                              sites=[cohort / n / "site.yaml" for n in names])
    if not dp:  # each site's fine-tuned global model, next to global and local (under DP the
        run_cfg["run"]["personalize"] = {}  # training spends the sites' whole budget: nothing is left for it)
    run_yaml = out_dir / "run.yaml"
    run_yaml.write_text(_yaml.safe_dump(run_cfg, sort_keys=False))
    out.print(f"2/4 starting a SuperLink and {len(names)} site daemons on loopback (TLS, SuperNode authentication)",
              markup=False, highlight=False)
    fed = LocalFederation(out_dir / "federation", [cohort / n / "site.yaml" for n in names])
    try:
        fed.start()
        out.print(f"3/4 running {rounds} rounds of FedAvg, then cross-site validation", markup=False, highlight=False)
        code = fed.run(run_yaml, echo=lambda s: out.print("    " + s, markup=False, highlight=False, soft_wrap=True))
    except (RuntimeError, DicomflError) as exc:
        fed.close()
        _fail(str(exc), code=1)
    finally:
        fed.close()
    out.print("4/4 stopped the SuperLink and the site daemons", markup=False, highlight=False)
    if code != 0:
        _fail(f"the demo run did not finish; logs in {out_dir}/federation/logs and {out_dir}/flwr-run.log", code=1)
    out.print(f"done in {_time.perf_counter() - t0:.0f} s: {out_dir / 'report.md'}", markup=False, highlight=False)


@app.command()
def bench(
    bench_yaml: Path = typer.Argument(..., help="The benchmark config (bench.yaml)."),
    only: Optional[str] = typer.Option(None, "--only", help="Run one configuration (e.g. fedavg, 'fedprox(mu=0.1)')."),
    deployment: bool = typer.Option(False, "--deployment", help="Also run FedAvg (first seed) through a real SuperLink and SuperNodes on loopback and compare with the in-process result."),
) -> None:
    """Local-only vs pooled vs FedAvg/FedProx/FedAdam (± DP-SGD), leave-one-site-out, ablation and a
    many-site scale run, over several seeds. Writes <out_dir>/results.md, results.json and PNG plots;
    results are saved per configuration as they finish, so a re-run resumes."""
    from dicomfl.workbench.bench import Bench, load_bench_config

    logging.getLogger("flwr").setLevel(logging.WARNING)  # per-round chatter; the progress bar says where it is
    try:
        cfg = load_bench_config(bench_yaml)
        with progress_bar("bench") as bar:
            task = bar.add_task("bench", total=None)

            def progress(i: int, n: int, what: str) -> None:
                bar.update(task, completed=i, total=n, description=what)
                if not err.is_terminal and what != "done":
                    err.print(f"[{i + 1}/{n}] {what}", markup=False, highlight=False)

            b = Bench(cfg, on_progress=progress)
            b.run(only=only)
            if deployment:
                from dicomfl.workbench.benchdeploy import compare

                out.print(compare(b, only), markup=False, highlight=False)
    except DicomflError as exc:
        _fail(str(exc))
    out.print((cfg.out_dir / "results.md").read_text(), markup=False, highlight=False)


def main() -> None:
    """The ``dicomfl`` entry point. A wrong option or value (click's usage errors) is one line that
    names the command and the option, exit 2, like a bad config; a bare group prints its help."""
    import click

    try:
        code = app(standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "dicomfl"
        msg = " ".join(exc.format_message().split())
        err.print(f"{where}: error: {msg} (see {where} --help)", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        err.print("dicomfl: interrupted", markup=False, highlight=False)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
