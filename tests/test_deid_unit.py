"""De-identification rules on small, hand-made datasets."""

from __future__ import annotations

import time

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomfl.common.config import DeidSection
from dicomfl.common.deid import Deidentifier
from dicomfl.common.deid_profile import (
    OPTION_TOKENS,
    REMOVE,
    SHIFT_DATE,
    TABLE_EDITION,
    TABLE_ROWS,
    action_table,
    load_rows,
    table_header,
)


def _ds() -> Dataset:
    ds = Dataset()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "MRN-998877"
    ds.PatientBirthDate = "19600102"
    ds.PatientSex = "F"
    ds.PatientAge = "063Y"
    ds.StudyDate = "20230405"
    ds.AccessionNumber = "ACC-123456"
    ds.InstitutionName = "Saint Example Hospital"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1234567890"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # DX image storage
    ds.Modality = "DX"
    ds.KVP = "120"
    ds.InstanceCreationDate = "20230405"  # X/D in the table
    ds.DateOfGainCalibration = "20230401"  # a DA the table does not name: caught by the DA rule
    ds.SourceStartDateTime = "20230405101500"  # a 2024b row (D; full=K mod=C)
    ds.AcquisitionTime = "101500"  # X/Z; full=K mod=C
    ds.add_new(0x00091010, "LO", "Doe^Jane in a private tag")
    ds.add_new(0x60003000, "OW", b"\x00\x01" * 8)
    item = Dataset()
    item.PersonName = "Smith^Bob"
    item.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.999"
    item.CodeMeaning = "kept"
    ds.ReferencedImageSequence = Sequence([item])
    inner = Dataset()
    inner.ReferringPhysicianName = "Who^Dr"
    inner.AnatomicRegionSequence = Sequence([Dataset()])
    ds.ProcedureCodeSequence = Sequence([inner])  # not in the table: walked recursively
    return ds


def test_table_is_data_and_complete_for_this_edition():
    rows = load_rows()
    header = table_header()
    assert f"edition {TABLE_EDITION}." in header and f"# {TABLE_ROWS} rows" in header
    assert len(rows) == TABLE_ROWS == 621 and TABLE_EDITION == "2024b"
    tags = [r.tag for r in rows]
    assert len(set(tags)) == len(tags), "a tag appears twice"
    assert all(len(t) == 8 and all(c in "0123456789abcdefx" for c in t) or t == "oddxxxxx" for t in tags)
    assert {"50xxxxxx", "60xx3000", "60xx4000", "oddxxxxx"} <= set(tags)  # curves, overlays, private
    assert {r.basic for r in rows} == {"D", "U", "X", "Z", "X/D", "X/Z", "X/Z/D", "X/Z/U*", "Z/D"}
    option_codes = {code for r in rows for code in r.options.values()}
    assert option_codes <= {"K", "C", "X", "D", "Z", "U"}, option_codes
    used = {opt for r in rows for opt in r.options}
    assert used == set(OPTION_TOKENS.values())  # every option column of the table is present
    by_tag = {r.tag: r for r in rows}
    # Spot checks against the 2024b edition of the table.
    assert by_tag["00100020"].basic == "Z/D"  # Patient ID
    assert by_tag["00189369"].basic == "D"  # Source Start DateTime (added after 2019)
    assert by_tag["00189369"].options == {"retain_longitudinal_full_dates": "K", "retain_longitudinal_modified_dates": "C"}
    assert by_tag["00081140"].basic == "X/Z/U*"  # Referenced Image Sequence
    assert by_tag["00101010"].options["retain_patient_characteristics"] == "K"  # Patient's Age
    assert by_tag["oddxxxxx"].options == {"retain_safe_private": "C"}
    table = action_table(frozenset())
    assert table[0x00100010] == "Z"  # Patient's Name
    assert table[0x04000561] == REMOVE  # Original Attributes Sequence
    assert table[0x00101010] == REMOVE  # Patient's Age (X in the basic profile)
    assert action_table(frozenset({"retain_patient_characteristics"}))[0x00101010] == "K"
    assert action_table(frozenset({"retain_longitudinal_modified_dates"}))[0x00189369] == SHIFT_DATE


def test_basic_profile_rules():
    d = Deidentifier(b"k" * 32, DeidSection(retain_patient_characteristics=False))
    ds = _ds()
    d.apply(ds, "p123")
    assert "PatientName" in ds and not ds.PatientName
    assert ds.PatientID == "p123"
    assert "PatientBirthDate" not in ds or not ds.PatientBirthDate
    assert "PatientAge" not in ds and not ds.get("PatientSex")
    assert "StudyDate" not in ds or not ds.StudyDate
    assert "InstanceCreationDate" not in ds and "DateOfGainCalibration" not in ds
    assert "AcquisitionTime" not in ds
    assert ds.SourceStartDateTime != "20230405101500"  # D: a dummy value
    assert not ds.AccessionNumber
    assert "InstitutionName" not in ds
    assert "ReferencedImageSequence" not in ds  # X/Z/U* -> removed whole
    assert 0x00091010 not in ds and 0x60003000 not in ds
    assert not ds.ProcedureCodeSequence[0].get("ReferringPhysicianName")  # Z: emptied, inside a sequence
    assert ds.StudyInstanceUID.startswith("2.25.")
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"  # a standard UID is kept
    assert ds.Modality == "DX" and ds.KVP == "120"
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"
    assert [i.CodeValue for i in ds.DeidentificationMethodCodeSequence] == ["113100"]


def test_retain_patient_characteristics_and_shifted_dates():
    opts = DeidSection(retain_patient_characteristics=True, retain_longitudinal_modified_dates=True)
    d = Deidentifier(b"k" * 32, opts)
    ds = _ds()
    d.apply(ds, "p123")
    assert ds.PatientAge == "063Y" and ds.PatientSex == "F"
    assert ds.StudyDate and ds.StudyDate != "20230405"
    shift = d.date_shift_days("p123")
    assert 1 <= shift <= 3650
    import datetime as dt

    expected = (dt.date(2023, 4, 5) - dt.timedelta(days=shift)).strftime("%Y%m%d")
    assert ds.StudyDate == expected
    assert ds.SourceStartDateTime == expected + "101500"  # DT: date shifted, time of day kept
    assert ds.AcquisitionTime == "101500"  # TM under a whole-day shift: kept
    assert ds.DateOfGainCalibration == (dt.date(2023, 4, 1) - dt.timedelta(days=shift)).strftime("%Y%m%d")
    ds2 = _ds()
    ds2.StudyDate = "20230410"
    d.apply(ds2, "p123")
    gap = dt.datetime.strptime(ds2.StudyDate, "%Y%m%d") - dt.datetime.strptime(ds.StudyDate, "%Y%m%d")
    assert gap.days == 5  # intervals within a patient are kept
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    codes = {i.CodeValue for i in ds.DeidentificationMethodCodeSequence}
    assert codes == {"113100", "113107", "113108"}


def test_uid_remap_stable_within_key_differs_across_keys():
    a1, a2, b = Deidentifier(b"a" * 32), Deidentifier(b"a" * 32), Deidentifier(b"b" * 32)
    uid = "1.2.826.0.1.3680043.8.498.1234567890"
    assert a1.remap_uid(uid) == a2.remap_uid(uid)
    assert a1.remap_uid(uid) != b.remap_uid(uid)
    assert a1.remap_uid(uid) != a1.remap_uid(uid + "1")
    out = a1.remap_uid(uid)
    assert out.startswith("2.25.") and len(out) <= 64 and out[5:].isdigit()
    assert a1.patient_pseudonym(_ds(), "f") == a2.patient_pseudonym(_ds(), "f") != b.patient_pseudonym(_ds(), "f")


def test_one_pass_is_cheap_compared_with_reading():
    """Not a timing assertion on wall-clock budgets: a relative sanity check that the lookup is by
    tag (a table walk per element would be ~100x slower than this bound)."""
    path = get_testdata_file("CT_small.dcm")
    d = Deidentifier(b"k" * 32)
    n = 50
    t0 = time.perf_counter()
    for _ in range(n):
        ds = pydicom.dcmread(path)
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n):
        ds = pydicom.dcmread(path)
        d.apply(ds, "p1")
    t_both = time.perf_counter() - t0
    assert t_both < 10 * t_read
