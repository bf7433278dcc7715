"""Collect the identifying values of an original dataset, to prove they never leak."""

from __future__ import annotations

import re

from pydicom.dataset import Dataset

from dicomfl.common.deid import _is_standard_uid

IDENTIFYING_KEYWORDS = {
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate",
    "PatientBirthName", "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers",
    "AccessionNumber", "StudyID", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "ReferringPhysicianName", "ReferringPhysicianAddress", "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord", "OperatorsName", "RequestingPhysician",
    "StationName", "DeviceSerialNumber", "IssuerOfPatientID", "AdmissionID", "MedicalRecordLocator",
}


BENIGN_KEYWORDS = ("Manufacturer", "ManufacturerModelName", "SoftwareVersions", "BodyPartExamined", "Modality")


def _strings(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        out = []
        for v in value:
            out += _strings(v)
        return out
    return [str(value)]


def identifying_values(ds: Dataset, min_len: int = 6) -> set[str]:
    """Names (every PN), IDs, birth date, dates, accession, institution/physician fields, instance UIDs."""
    found: set[str] = set()

    def visit(d: Dataset) -> None:
        for elem in d:
            try:
                vr, value, kw = elem.VR, elem.value, elem.keyword
            except Exception:  # noqa: BLE001 - unreadable values cannot leak through us either
                continue
            if vr == "SQ":
                for item in value or []:
                    visit(item)
                continue
            if vr in ("PN", "DA", "DT") or kw in IDENTIFYING_KEYWORDS:
                for s in _strings(value):
                    found.add(s.strip())
                    if vr == "PN":
                        found.update(p.strip() for p in s.replace("=", "^").split("^"))
            elif vr == "UI":
                for s in _strings(value):
                    if not _is_standard_uid(s.strip().rstrip("\x00")):
                        found.add(s.strip().rstrip("\x00"))
    visit(ds)
    if hasattr(ds, "file_meta"):
        ms = ds.file_meta.get("MediaStorageSOPInstanceUID")
        if ms:
            found.add(str(ms))
    # A value that the original also carries in an attribute that is legitimately kept (e.g. an
    # InstitutionName of "TOSHIBA" equal to the Manufacturer) is not evidence of a leak.
    benign = set()
    for kw in BENIGN_KEYWORDS:
        try:
            benign.update(s.strip() for s in _strings(ds.get(kw)))
        except Exception:  # noqa: BLE001
            pass
    return {v for v in found if len(v) >= min_len and len(set(v)) > 2 and not any(v in b for b in benign)}


def dataset_text(ds: Dataset) -> str:
    """Every non-binary value of a dataset (recursively) as text."""
    parts: list[str] = []

    def visit(d: Dataset) -> None:
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value or []:
                    visit(item)
            elif elem.VR not in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
                parts.append(str(elem.value))
    visit(ds)
    if hasattr(ds, "file_meta"):
        visit(ds.file_meta)
    return "\n".join(parts)


def found_in(value: str, blob: bytes) -> bool:
    """``value`` occurs in ``blob``. A value of ASCII digits only (a date, a numeric ID) counts only
    where no other digit touches it: a leaked value is written as itself, while a birth date that
    turns up inside a longer run of digits (a file's mtime in nanoseconds in the cache index, the
    digits of a float) is a coincidence. CI once failed on ``19510329`` inside
    ``1795461951032...``, an mtime written at 19:25:51 that day."""
    v = value.encode()
    if not (v.isdigit() and v.isascii()):
        return v in blob
    return re.search(rb"(?<![0-9])" + re.escape(v) + rb"(?![0-9])", blob) is not None
