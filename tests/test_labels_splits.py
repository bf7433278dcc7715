from __future__ import annotations

import pytest

from dicomfl.common.errors import ConfigError
from dicomfl.common.labels import load_labels
from dicomfl.common.splits import TEST, TRAIN, VAL, assign


def test_missing_key_column_is_a_clear_error(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("accession,label\nA1,1\n")
    with pytest.raises(ConfigError, match="no 'accession_number' column"):
        load_labels(p, "accession_number", lambda v: v)


def test_bad_rows_are_reported_by_row_never_by_key(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text(
        "accession_number,label\nSECRET-A,1\nSECRET-B,yes\nSECRET-C,0\nSECRET-C,1\nSECRET-D,1\nSECRET-D,1\n,1\nSECRET-E,0.5\n"
    )
    labels = load_labels(p, "accession_number", lambda v: "h:" + v)
    assert labels.by_key == {"h:SECRET-A": 1, "h:SECRET-D": 1}
    assert labels.rows == 8
    text = "\n".join(labels.problems)
    assert "row 3: label is not an integer" in text
    assert "row 5: same key as row 4 with a different label; both dropped" in text
    assert "row 7: duplicate of row 6 with the same label; kept once" in text
    assert "row 8: empty" in text
    assert "row 9: label is not an integer" in text
    assert "SECRET" not in text


def test_splits_are_deterministic_patient_level_and_stable():
    patients = [f"p{i:04d}" for i in range(2000)]
    a = {p: assign(p, 0.15, 0.15, seed=0) for p in patients}
    b = {p: assign(p, 0.15, 0.15, seed=0) for p in patients}
    assert a == b
    counts = {s: sum(v == s for v in a.values()) for s in (TRAIN, VAL, TEST)}
    assert 0.6 < counts[TRAIN] / 2000 < 0.8 and 0.1 < counts[VAL] / 2000 < 0.2
    # a patient keeps its split whatever other patients exist
    assert all(assign(p, 0.15, 0.15, 0) == a[p] for p in patients[:100])
    assert any(assign(p, 0.15, 0.15, seed=1) != a[p] for p in patients)
