"""Deterministic patient-level splits.

Each pseudonymous patient id is hashed with the split seed to a number in [0, 1): below ``test`` it
is a test patient, below ``test + val`` a validation patient, else training. Every image of a
patient lands in the same split, and a patient never moves when other patients are added (so a
re-ingest of a grown folder never leaks test patients into training).
"""

from __future__ import annotations

import hashlib

TRAIN, VAL, TEST = 0, 1, 2
NAMES = {TRAIN: "train", VAL: "val", TEST: "test"}


def assign(patient: str, val: float, test: float, seed: int = 0) -> int:
    h = hashlib.sha256(f"dicomfl-split:{seed}:{patient}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    if u < test:
        return TEST
    if u < test + val:
        return VAL
    return TRAIN
