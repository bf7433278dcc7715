"""In-memory de-identification following DICOM PS3.15 Annex E (Basic Application Level
Confidentiality Profile), driven by the tag-indexed table in :mod:`deid_profile`.

One pass over the dataset's elements: each element's action is a dict lookup by tag; elements
that are removed are deleted without ever being decoded. Beyond the table, and for the same reason
the table exists, these rules hold for every element the table does not name (defence in depth for
attributes added after the table edition we ship, and for non-conformant files):

* private elements (odd groups), curves (50xx) and overlays (60xx) are removed;
* any other PN (person name) is removed;
* any other DA/DT is removed (or shifted under Retain Longitudinal Modified Dates), TM removed
  unless dates are retained;
* any other UI whose value is not a UID registered by the standard is remapped;
* any element whose VR cannot be known (unknown tag, UN) is removed;
* sequences are walked recursively, and every rule applies inside them.

UIDs become ``2.25.<int>`` from an HMAC-SHA256 of the original under the site's secret key:
stable within a site, unlinkable across sites without the key.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
from dataclasses import dataclass, field

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID_dictionary

from . import __version__
from .config import DeidSection
from .deid_profile import (
    DUMMY,
    EMPTY,
    KEEP,
    REMAP_UID,
    REMOVE,
    SHIFT_DATE,
    TABLE_EDITION,
    action_table,
)

_RECURSE, _CHECK_UID = "R", "C"
_VR_RULES_REMOVE_DATES = {"PN": REMOVE, "DA": REMOVE, "DT": REMOVE, "TM": REMOVE, "UI": _CHECK_UID, "SQ": _RECURSE}
_VR_RULES_SHIFT_DATES = {"PN": REMOVE, "DA": SHIFT_DATE, "DT": SHIFT_DATE, "TM": None, "UI": _CHECK_UID, "SQ": _RECURSE}

_DUMMY = {
    "PN": "ANONYMOUS", "LO": "REMOVED", "SH": "REMOVED", "LT": "REMOVED", "ST": "REMOVED",
    "UT": "REMOVED", "UC": "REMOVED", "CS": "REMOVED", "AE": "REMOVED", "DA": "19000101",
    "DT": "19000101000000", "TM": "000000", "AS": "000Y", "IS": "0", "DS": "0",
    "US": 0, "SS": 0, "UL": 0, "SL": 0, "FL": 0.0, "FD": 0.0,
}

# File meta elements kept (group 0002); the rest (AE titles, private info) is removed.
_META_KEEP = {0x00020000, 0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013}

# CID 7050 (De-identification Method) codes for the profile and the options we implement.
METHOD_CODES = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "retain_longitudinal_modified_dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_institution_identity": ("113112", "Retain Institution Identity Option"),
}

PATIENT_ID = 0x00100020


@dataclass
class DeidStats:
    removed: int = 0
    replaced: int = 0
    uids_remapped: int = 0
    unreadable_elements: int = 0
    tags_touched: set[int] = field(default_factory=set)


def _is_standard_uid(uid: str) -> bool:
    return uid in UID_dictionary or uid.startswith("1.2.840.10008.")


def _element_vr(ds: Dataset, tag: int) -> str | None:
    raw = ds.get_item(tag)
    vr = getattr(raw, "VR", None)
    if vr and vr != "UN":
        return vr
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return None
    if " or " in vr:  # 'US or SS', 'OB or OW': only matters for dummies, which avoid these
        vr = vr.split(" or ")[0]
    return vr


class Deidentifier:
    """Applies the Basic profile plus the options in ``options`` to datasets, in place."""

    def __init__(self, key: bytes, options: DeidSection | None = None) -> None:
        self._key = key
        self.options = options or DeidSection()
        enabled = frozenset(k for k, v in self.options.model_dump().items() if v)
        self._actions = action_table(enabled)
        self._shift = self.options.retain_longitudinal_modified_dates
        self._vr_rules = _VR_RULES_SHIFT_DATES if self._shift else _VR_RULES_REMOVE_DATES

    # -- pseudonyms -------------------------------------------------------------------------
    def digest(self, purpose: str, value: str | bytes) -> bytes:
        data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        return hmac.new(self._key, purpose.encode() + b"\x00" + data, hashlib.sha256).digest()

    def remap_uid(self, uid: str) -> str:
        return "2.25." + str(int.from_bytes(self.digest("uid", uid.strip())[:16], "big"))

    def pseudonym(self, purpose: str, value: str | bytes, n: int = 16) -> str:
        return self.digest(purpose, value).hex()[:n]

    def patient_pseudonym(self, ds: Dataset, fallback: str) -> str:
        """Pseudonymous patient id from Patient ID (or Study Instance UID, or ``fallback``)."""
        for keyword in ("PatientID", "StudyInstanceUID"):
            try:
                value = str(ds.get(keyword, "") or "").strip()
            except Exception:  # noqa: BLE001 - unreadable value: try the next source
                value = ""
            if value:
                return "p" + self.pseudonym(f"patient:{keyword}", value)
        return "p" + self.pseudonym("patient:file", fallback)

    def date_shift_days(self, patient_pseudonym: str) -> int:
        return 1 + int.from_bytes(self.digest("dateshift", patient_pseudonym)[:4], "big") % 3650

    # -- the pass ---------------------------------------------------------------------------
    def apply(self, ds: Dataset, patient_pseudonym: str) -> DeidStats:
        stats = DeidStats()
        shift = self.date_shift_days(patient_pseudonym) if self._shift else 0
        self._walk(ds, stats, shift)
        self._file_meta(ds, stats)
        ds.PatientID = patient_pseudonym
        ds.PatientIdentityRemoved = "YES"
        ds.LongitudinalTemporalInformationModified = "MODIFIED" if self._shift else "REMOVED"
        ds.DeidentificationMethod = f"dicomfl {__version__} PS3.15 {TABLE_EDITION} E.1-1 Basic profile"
        items = []
        for name in ("basic", *[k for k, v in self.options.model_dump().items() if v]):
            value, meaning = METHOD_CODES[name]
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        return stats

    def _walk(self, ds: Dataset, stats: DeidStats, shift: int) -> None:
        actions = self._actions
        for tag in list(ds.keys()):
            t = int(tag)
            action = actions.get(t)
            vr: str | None = None
            if action is None:
                group = t >> 16
                if group & 1 or (group & 0xFF00) in (0x5000, 0x6000):
                    action = REMOVE
                elif t == PATIENT_ID:
                    action = REMOVE  # replaced by the pseudonym after the walk
                else:
                    vr = _element_vr(ds, t)
                    if vr is None:
                        action = REMOVE
                    else:
                        action = self._vr_rules.get(vr)
                        if action is None:
                            continue  # keep, without decoding the value
            if action == KEEP:
                if (vr or _element_vr(ds, t)) == "SQ":
                    action = _RECURSE
                else:
                    continue
            stats.tags_touched.add(t)
            if action == REMOVE:
                del ds[tag]
                stats.removed += 1
            elif action in (EMPTY, DUMMY):
                vr = vr or _element_vr(ds, t)
                if vr is None or (action == DUMMY and vr not in _DUMMY and vr != "SQ"):
                    del ds[tag]
                    stats.removed += 1
                    continue
                value = Sequence([]) if vr == "SQ" else (None if action == EMPTY else _DUMMY[vr])
                ds[tag] = DataElement(t, vr, value)
                stats.replaced += 1
            else:
                elem = self._decoded(ds, tag, stats)
                if elem is None:
                    continue
                if action == _RECURSE:
                    if elem.VR != "SQ":
                        continue
                    for item in elem.value:
                        self._walk(item, stats, shift)
                elif action in (REMAP_UID, _CHECK_UID):
                    self._uids(ds, elem, stats, check=action == _CHECK_UID)
                elif action == SHIFT_DATE:
                    self._shift_date(ds, elem, shift, stats)

    @staticmethod
    def _decoded(ds: Dataset, tag: int, stats: DeidStats) -> DataElement | None:
        """The element with its value decoded, or None after removing it when it cannot be."""
        try:
            elem = ds[tag]
            _ = elem.value
            return elem
        except Exception:  # noqa: BLE001 - broken value (bad VR/length/charset): drop it
            del ds[tag]
            stats.unreadable_elements += 1
            stats.removed += 1
            return None

    def _uids(self, ds: Dataset, elem: DataElement, stats: DeidStats, check: bool) -> None:
        value = elem.value
        if value is None or value == "":
            return
        values = list(value) if not isinstance(value, str) else [value]
        out = []
        for v in values:
            s = str(v).strip().rstrip("\x00")
            if check and _is_standard_uid(s):
                out.append(s)
            else:
                out.append(self.remap_uid(s))
                stats.uids_remapped += 1
        elem.value = out if len(out) > 1 else out[0]

    @staticmethod
    def _shift_date(ds: Dataset, elem: DataElement, days: int, stats: DeidStats) -> None:
        """Shift a DA/DT by ``days``; a TM is kept (the shift is whole days); any other VR, or a
        value that does not parse, is removed."""
        if elem.VR == "TM":
            return
        if elem.VR not in ("DA", "DT"):
            del ds[elem.tag]
            stats.removed += 1
            return
        try:
            values = [elem.value] if isinstance(elem.value, (str, bytes)) or not hasattr(elem.value, "__iter__") else list(elem.value)
            out = []
            for v in values:
                s = str(v)
                d = _dt.datetime.strptime(s[:8], "%Y%m%d").date() - _dt.timedelta(days=days)
                out.append(d.strftime("%Y%m%d") + (s[8:] if elem.VR == "DT" else ""))
            elem.value = out if len(out) > 1 else out[0]
            stats.replaced += 1
        except Exception:  # noqa: BLE001 - unparsable date: remove it
            del ds[elem.tag]
            stats.removed += 1

    def _file_meta(self, ds: Dataset, stats: DeidStats) -> None:
        meta = getattr(ds, "file_meta", None)
        if meta is None:
            return
        for tag in list(meta.keys()):
            if int(tag) not in _META_KEEP:
                del meta[tag]
                stats.removed += 1
        uid = meta.get("MediaStorageSOPInstanceUID")
        if uid:
            meta.MediaStorageSOPInstanceUID = self.remap_uid(str(uid))
            stats.uids_remapped += 1


__all__ = ["Deidentifier", "DeidStats", "METHOD_CODES"]
