"""Find DICOM files under a folder by content, never by extension.

A file is DICOM when it has the Part 10 preamble (``DICM`` at byte 128), or when it starts like a
raw little-endian dataset without file meta (a group 0002/0008 element first). Everything else is
counted as not DICOM, which is not an error.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_RAW_START_GROUPS = {0x0002, 0x0008}


@dataclass(frozen=True)
class FoundFile:
    path: Path
    rel: str  # path relative to the scanned root, with '/' separators
    size: int
    mtime_ns: int


def walk(root: Path) -> Iterator[FoundFile]:
    """All regular files below ``root`` in a stable (sorted) order; hidden entries are skipped."""
    root = Path(root)
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name, reverse=True)
        except OSError:
            continue
        subdirs = []
        for entry in reversed(entries):
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(Path(entry.path))
                elif entry.is_file():
                    st = entry.stat()
                    p = Path(entry.path)
                    yield FoundFile(p, p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns)
            except OSError:
                continue
        stack.extend(reversed(subdirs))


def looks_like_dicom(head: bytes) -> bool:
    """True for a Part 10 file or a raw little-endian dataset (from the first 132 bytes)."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if len(head) < 8:
        return False
    group = int.from_bytes(head[0:2], "little")
    if group not in _RAW_START_GROUPS:
        return False
    vr = head[4:6]
    explicit = vr.isalpha() and vr.isupper()
    implicit_len = int.from_bytes(head[4:8], "little")
    return explicit or implicit_len < 0x10000
