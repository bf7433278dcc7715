from __future__ import annotations

import pytest

from dicomfl.common.errors import ConfigError
from dicomfl.common.labels import load_labels
from dicomfl.common.splits import TEST, TRAIN, VAL, assign


def test_missing_key_column_is_a_clear_error(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("accession,label\nA1,1\n")
    with pytest.raises(ConfigError, match="no 'accession_number' or 'AccessionNumber' column") as info:
        load_labels(p, "accession_number", lambda v: v)
    assert "accession," not in str(info.value) and "'accession'" not in str(info.value)  # no header cell quoted
    # A file without a header row: its first data row is never quoted either.
    p.write_text("DOE^JOHN/19620703/IM1,1\n")
    with pytest.raises(ConfigError) as info:
        load_labels(p, "path", lambda v: v)
    assert "DOE" not in str(info.value) and "19620703" not in str(info.value)


def test_key_column_by_dicom_keyword_or_named_explicitly(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("StudyInstanceUID,label\n1.2.3,1\n1.2.4,0\n")
    assert load_labels(p, "study_instance_uid", lambda v: "h:" + v).by_key == {"h:1.2.3": 1, "h:1.2.4": 0}
    p.write_text("accessionnumber,LABEL\nA1,1\n")  # case does not matter
    assert load_labels(p, "accession_number", lambda v: v).by_key == {"A1": 1}
    p.write_text("Accession #,Finding,label\nA1,1,0\nA2,0,0\n")
    got = load_labels(p, "accession_number", lambda v: v, key_column="Accession #", value_column="Finding")
    assert got.by_key == {"A1": 1, "A2": 0}
    with pytest.raises(ConfigError, match="no 'Finding2' column"):
        load_labels(p, "accession_number", lambda v: v, key_column="Accession #", value_column="Finding2")


@pytest.mark.parametrize("label", ["7", "-1", "2", "99999999999999999999", "1e400", "-1e400", "inf", "3.0"])
def test_labels_outside_the_classes_stop_ingestion_by_row(tmp_path, label):
    p = tmp_path / "labels.csv"
    p.write_text(f"accession_number,label\nSECRET-A,1\nSECRET-B,{label}\nSECRET-C,0\n")
    with pytest.raises(ConfigError) as info:
        load_labels(p, "accession_number", lambda v: v)
    text = str(info.value)
    assert "row 3: label outside 0..1" in text and "site.n_classes" in text
    assert "SECRET" not in text
    if len(label) >= 3:
        assert label not in text  # the value itself is never quoted
    # with more classes configured, 2 and 7 are fine
    if label in ("2", "7", "3.0"):
        assert load_labels(p, "accession_number", lambda v: v, n_classes=8).by_key["SECRET-B"] == int(float(label))


def test_many_out_of_range_rows_are_one_line(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("accession_number,label\n" + "".join(f"K{i},{i % 5}\n" for i in range(40)))
    with pytest.raises(ConfigError) as info:
        load_labels(p, "accession_number", lambda v: v)
    text = str(info.value)
    assert "\n" not in text and "row 4: label outside 0..1" in text and "and 23 more rows" in text


def test_unreadable_labels_files_name_the_file_and_row(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_bytes("accession_number,label\nA1,1\nJOS\u00c9,0\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"labels.csv: line 3: labels file is not UTF-8") as info:
        load_labels(p, "accession_number", lambda v: v)
    assert "JOS" not in str(info.value)
    p.write_text("accession_number,label\nA1,1\n" + "A2," + "x" * (129 * 1024) + "\n")
    with pytest.raises(ConfigError, match=r"labels.csv: row 3: not a readable CSV row \(a field over 128 KiB") as info:
        load_labels(p, "accession_number", lambda v: v)
    assert "xxx" not in str(info.value)


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


@pytest.mark.parametrize("header,column", [
    ("accession_number,label,label", "'label'"),
    ("accession_number,label,LABEL", "'label'"),
    ("accession_number,AccessionNumber,label", "'accession_number' or 'AccessionNumber'"),
    ("accession_number,label,accession_number", "'accession_number' or 'AccessionNumber'"),
])
def test_a_duplicate_labels_column_is_refused_by_name_never_by_value(tmp_path, header, column):
    p = tmp_path / "labels.csv"
    p.write_text(f"{header}\nSECRET-A,1,0\nSECRET-B,0,1\n")
    with pytest.raises(ConfigError) as info:
        load_labels(p, "accession_number", lambda v: v)
    msg = str(info.value)
    assert msg.startswith(f"{p}: ") and f"more than one {column} column" in msg and "\n" not in msg
    assert "SECRET" not in msg
    # Explicitly named columns are checked the same way.
    p.write_text("Accession #,Finding,Finding\nSECRET-A,1,0\n")
    with pytest.raises(ConfigError, match=r"more than one 'Finding' column in its first row \(columns 2, 3\)"):
        load_labels(p, "accession_number", lambda v: v, key_column="Accession #", value_column="Finding")


@pytest.mark.parametrize("sep,name", [(";", "';'"), ("\t", "tab")])
def test_a_semicolon_or_tab_separated_labels_file_is_named_as_such(tmp_path, sep, name):
    p = tmp_path / "labels.csv"
    p.write_text(f"accession_number{sep}label\nSECRET-A{sep}1\n")
    with pytest.raises(ConfigError) as info:
        load_labels(p, "accession_number", lambda v: v)
    msg = str(info.value)
    assert f"labels file looks {name}-separated; use ','" in msg and "no 'accession_number'" not in msg
    assert "SECRET" not in msg and "\n" not in msg
    # A comma-separated file whose cells hold a ';' is read as before.
    p.write_text("accession_number,label,note\nA;1,1,x;y\n")
    assert load_labels(p, "accession_number", lambda v: v).by_key == {"A;1": 1}
