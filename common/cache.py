"""The per-site cache: tensors, features, labels' key HMACs and pseudonymous patient ids.

Layout under ``<state_dir>/cache/``: a ``CURRENT`` file naming the live generation folder, which
holds ``index.json`` (per-file records, no identifying value: file paths, content and label keys
are HMACs under the site key), ``images.npy`` (N x S x S float32) and ``features.npy``. A new
generation is written next to the old one and ``CURRENT`` is swapped atomically, so an interrupted
ingest never leaves a half-written cache.

Entries are keyed by an HMAC of the file's content; a file whose path, size and mtime are
unchanged is matched without reading it again (as make and git do). The fingerprint of the whole
pipeline (code version, feature schema, preprocessing, de-identification options, profile table,
site key) guards the cache: any change starts a fresh one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Record:
    status: str  # "accepted" | "rejected"
    reason: str = ""
    detail: str = ""
    modality: str = ""
    label_key: str = ""  # HMAC of the label join key ("" when the image has none)
    patient: str = ""  # pseudonymous patient id
    row: int = -1  # row in images/features for accepted records


@dataclass
class FileEntry:
    size: int
    mtime_ns: int
    content: str


@dataclass
class CacheState:
    fingerprint: str
    files: dict[str, FileEntry] = field(default_factory=dict)
    records: dict[str, Record] = field(default_factory=dict)
    images: np.ndarray | None = None
    features: np.ndarray | None = None


class SiteCache:
    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / "cache"

    def _current(self) -> Path | None:
        try:
            name = (self.root / "CURRENT").read_text().strip()
        except OSError:
            return None
        gen = self.root / name
        return gen if gen.is_dir() else None

    def load(self, fingerprint: str) -> CacheState | None:
        gen = self._current()
        if gen is None:
            return None
        try:
            index = json.loads((gen / "index.json").read_text())
            if index.get("fingerprint") != fingerprint:
                return None
            state = CacheState(
                fingerprint=fingerprint,
                files={k: FileEntry(**v) for k, v in index["files"].items()},
                records={k: Record(**v) for k, v in index["records"].items()},
                images=np.load(gen / "images.npy", mmap_mode="r"),
                features=np.load(gen / "features.npy", mmap_mode="r"),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        n = state.images.shape[0]
        if any(r.row >= n for r in state.records.values()):
            return None
        return state

    def save(self, state: CacheState) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        old = self._current()
        gen = self.root / f"gen-{uuid.uuid4().hex[:12]}"
        gen.mkdir()
        np.save(gen / "images.npy", np.ascontiguousarray(state.images, dtype=np.float32))
        np.save(gen / "features.npy", np.ascontiguousarray(state.features, dtype=np.float32))
        index = {
            "fingerprint": state.fingerprint,
            "files": {k: asdict(v) for k, v in state.files.items()},
            "records": {k: asdict(v) for k, v in state.records.items()},
        }
        (gen / "index.json").write_text(json.dumps(index, separators=(",", ":")))
        tmp = self.root / "CURRENT.tmp"
        tmp.write_text(gen.name)
        os.replace(tmp, self.root / "CURRENT")
        if old is not None and old != gen:
            shutil.rmtree(old, ignore_errors=True)
        return gen
