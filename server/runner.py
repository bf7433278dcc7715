"""``dicomfl run``: submit a run to the coordinator's SuperLink and stream its progress.

The submitted Flower app bundle holds only a pyproject naming the installed ServerApp and
ClientApp. Progress lines from the ServerApp (prefixed ``[dicomfl]``) and Flower's errors are
streamed to the terminal; everything else Flower prints goes to ``<out_dir>/flwr-run.log``.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from dicomfl.common.config import CoordinatorConfig, RunConfig

from . import flwrcli
from .flwrapp import CLIENTAPP, write_app


def submit(run: RunConfig, coord: CoordinatorConfig, *, resume: bool = False, evaluate_only: Path | None = None,
           echo: Callable[[str], None] = print, timeout: float | None = None, clientapp: str = CLIENTAPP) -> int:
    """Submit ``run`` to the coordinator's SuperLink and stream its progress to ``echo``.

    Returns 0 when the run finished (all its rounds, or the evaluation), 1 when it did not, 124 on
    ``timeout``. ``clientapp`` names the ClientApp the sites run (default: dicomfl's).
    """
    out = run.out_dir
    out.mkdir(parents=True, exist_ok=True)
    if not resume and evaluate_only is None and (out / "metrics.json").exists():
        (out / "metrics.json").unlink()  # a stale result must not pass for this run's
    with tempfile.TemporaryDirectory(prefix="dicomfl-run-") as tmp:
        tmp = Path(tmp)
        app = write_app(tmp / "app", clientapp)
        home = flwrcli.write_home(tmp / "home", coord)
        overrides = [f'run-yaml="{Path(run.source).resolve()}"', f"resume={'true' if resume else 'false'}"]
        if coord.source is not None:  # the ServerApp maps authenticated keys to sites with its PKI
            overrides.append(f'coordinator-yaml="{Path(coord.source).resolve()}"')
        if evaluate_only is not None:
            overrides.append(f'evaluate-only="{Path(evaluate_only).resolve()}"')
        cmd = [flwrcli.flwr_bin(), "run", str(app), flwrcli.CONNECTION, "--stream"]
        for o in overrides:
            cmd += ["--run-config", o]
        with open(out / "flwr-run.log", "a") as logf:
            proc = subprocess.Popen(cmd, env=flwrcli.env_with_home(home), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)
            try:
                assert proc.stdout is not None
                for line in proc.stdout:
                    logf.write(line)
                    logf.flush()
                    s = line.rstrip("\n")
                    if s.startswith("[dicomfl]"):
                        echo(s[len("[dicomfl] "):])
                    elif "ERROR" in s or "Traceback" in s or "Successfully started run" in s:
                        echo(s.replace("\x1b[91m", "").replace("\x1b[0m", "").strip())
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                return 124
            finally:
                if proc.poll() is None:
                    proc.kill()
    return 0 if finished(run, evaluate_only) else 1


def finished(run: RunConfig, evaluate_only: Path | None = None) -> bool:
    out = run.out_dir
    if evaluate_only is not None:
        return (out / f"evaluate-{Path(evaluate_only).stem}.json").is_file()
    m = out / "metrics.json"
    if not m.is_file():
        return False
    try:
        return int(json.loads(m.read_text()).get("rounds", -1)) == run.run.rounds
    except (ValueError, OSError):
        return False
