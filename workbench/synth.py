"""A generated multicenter chest-radiograph cohort with full (fake) PHI: ``dicomfl synth``.

Each site is a documented, seedable :class:`SiteProfile`: vendor names, matrix and pixel spacing,
bits stored, signed pixels with a rescale intercept, MONOCHROME1/2, noise and blur, an intensity
curve, transfer syntax, AP/PA mix, prevalence, age distribution, and a site-specific confounder
correlated with the label *at that site only*. The finding (an opacity in a lung) is in the
pixels; its prevalence rises with age and it looks fainter on AP views, so metadata helps.

Everything here is fake. No real person is described. The PHI exists so privacy tests have
something to catch.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml
from pydicom import config as pydicom_config
from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    PYDICOM_IMPLEMENTATION_UID,
    RLELossless,
    UID,
)

from dicomfl.common.config import run_config_dict

DX_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
CR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")  # Computed Radiography Image Storage
BASIC_TEXT_SR = UID("1.2.840.10008.5.1.4.1.1.88.11")
SYNTAXES = {"explicit": ExplicitVRLittleEndian, "implicit": ImplicitVRLittleEndian, "rle": RLELossless}

FIRST = ["Alma", "Bruno", "Carla", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Keiko", "Lars",
         "Mona", "Nils", "Olga", "Pavel", "Queenie", "Rafael", "Sofia", "Tomas", "Ulla", "Viktor", "Wanda", "Yusuf"]
LAST = ["Abernathy", "Brightwater", "Castellano", "Dunmore", "Eckhart", "Fairweather", "Gallagher", "Holloway",
        "Ingersoll", "Jablonski", "Kowalczyk", "Lindqvist", "Montgomery", "Nakamura", "Oyelaran", "Pemberton",
        "Quintero", "Rasmussen", "Szczepanski", "Thorvaldsen", "Umberton", "Vasquez", "Whitcombe", "Zielinski"]


@dataclass(frozen=True)
class SiteProfile:
    name: str
    institution: str
    manufacturer: str
    model: str
    modality: str
    matrix: int
    pixel_spacing: float
    bits_stored: int
    signed: bool
    intercept: float
    photometric: str
    noise: float
    blur: int
    gamma: float
    syntax: str
    ap_fraction: float
    prevalence: float
    age_mean: float
    age_sd: float
    confounder: str
    confounder_strength: float


PROFILES: tuple[SiteProfile, ...] = (
    SiteProfile("site-a", "Northbrook General Hospital", "Acme Medical", "Aurora DR-1", "DX", 256, 0.70, 12, False, 0.0,
                "MONOCHROME2", 0.03, 0, 1.00, "explicit", 0.3, 0.30, 58, 14, "marker-top-left", 0.9),
    SiteProfile("site-b", "Saint Halvard University Clinic", "Borealis Imaging", "Polaris CR", "CR", 224, 0.80, 16, True, -1024.0,
                "MONOCHROME1", 0.05, 1, 0.80, "implicit", 0.6, 0.50, 66, 11, "collimation", 0.9),
    SiteProfile("site-c", "Riverside Community Hospital", "Cobalt Systems", "Helix 3", "DX", 240, 0.75, 12, False, 0.0,
                "MONOCHROME2", 0.04, 1, 1.25, "rle", 0.5, 0.40, 47, 17, "exposure", 0.9),
    SiteProfile("site-d", "Lakeshore Regional Medical Center", "Delta Radiology", "Vega DX", "DX", 256, 0.65, 16, False, 0.0,
                "MONOCHROME2", 0.035, 0, 0.90, "explicit", 0.4, 0.35, 62, 13, "marker-bottom-right", 0.9),
)


def _uid(*parts) -> str:
    h = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return "2.25." + str(int.from_bytes(h[:16], "big"))


def _smooth(img: np.ndarray, passes: int) -> np.ndarray:
    for _ in range(passes):
        img = (img + np.roll(img, 1, 0) + np.roll(img, -1, 0)) / 3.0
        img = (img + np.roll(img, 1, 1) + np.roll(img, -1, 1)) / 3.0
    return img


@lru_cache(maxsize=16)
def _anatomy(n: int, ap: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The noise-free anatomy of an n x n chest for one view: (image, lung masks, x, y). Cached:
    every image of a site shares it; only the finding, artifacts, blur and noise differ."""
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) / n
    img = np.full((n, n), 0.08, np.float32)
    body = ((x - 0.5) / 0.46) ** 2 + ((y - 0.55) / 0.5) ** 2 < 1
    img[body] = 0.55
    heart_w = 0.13 if not ap else 0.17  # AP magnifies the heart
    lungs = []
    for cx in (0.31, 0.69):
        lung = ((x - cx) / 0.15) ** 2 + ((y - 0.5) / 0.3) ** 2 < 1
        lungs.append(lung)
        img[lung] = 0.2
    ribs = (np.sin((y * 34 + 4 * (x - 0.5) ** 2 * 10) * np.pi) > 0.75) & (lungs[0] | lungs[1])
    img[ribs] += 0.12
    med = np.abs(x - 0.5) < heart_w * (1.0 - 0.5 * np.abs(y - 0.65))
    img[med & body] = 0.7
    for a in (img, lungs[0], lungs[1], x, y):
        a.setflags(write=False)
    return img, lungs[0], lungs[1], x, y


def phantom(rng: np.random.Generator, n: int, positive: bool, ap: bool, profile: SiteProfile,
            confounders: frozenset[str] = frozenset()) -> np.ndarray:
    """A chest-radiograph-like image in [0, 1] (1 = dense/bright), n x n."""
    base, lung0, lung1, x, y = _anatomy(n, bool(ap))
    img = base.copy()
    lungs = (lung0, lung1)
    if positive:
        side = rng.integers(2)
        cx = (0.31, 0.69)[side] + rng.uniform(-0.06, 0.06)
        cy = 0.5 + rng.uniform(-0.15, 0.15)
        r = rng.uniform(0.025, 0.045)
        contrast = rng.uniform(0.05, 0.1) * (0.7 if ap else 1.0)
        blob = np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r)))
        img += contrast * blob * (lungs[side]).astype(np.float32)
    if "marker-top-left" in confounders:
        img[int(0.04 * n):int(0.12 * n), int(0.04 * n):int(0.1 * n)] = 1.0
    if "marker-bottom-right" in confounders:
        img[int(0.86 * n):int(0.95 * n), int(0.88 * n):int(0.95 * n)] = 1.0
    if "collimation" in confounders:
        b = int(0.07 * n)
        img[:b, :] = img[-b:, :] = img[:, :b] = img[:, -b:] = 0.95
    if "exposure" in confounders:
        img = img * 0.8 + 0.12
    img = _smooth(img, profile.blur)
    img = img + rng.normal(0, profile.noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 1) ** profile.gamma


ARTIFACT_BASE_RATE = 0.3


def _confounders(rng: np.random.Generator, p: SiteProfile, label: int) -> frozenset[str]:
    """Every artifact kind occurs at every site (30% of images, whatever the label); only the site's
    own kind is tied to the label there (present in 90% of positives, 10% of negatives)."""
    out = set()
    for kind in sorted({q.confounder for q in PROFILES}):
        if kind == p.confounder:
            present = rng.random() < (p.confounder_strength if label else 1 - p.confounder_strength)
        else:
            present = rng.random() < ARTIFACT_BASE_RATE
        if present:
            out.add(kind)
    return frozenset(out)


def _stored(img: np.ndarray, p: SiteProfile) -> np.ndarray:
    """[0, 1] brightness -> stored values of the site's representation (before MONOCHROME1)."""
    v = img if p.photometric == "MONOCHROME2" else 1.0 - img
    top = (1 << p.bits_stored) - 1
    if p.signed:
        # stored = value - 2^(bits-1) (range signed), with a rescale intercept making it positive
        arr = np.round(v * (top * 0.9)) - (1 << (p.bits_stored - 1))
        return arr.astype(np.int16)
    return np.round(v * top * 0.9).astype(np.uint16)


def _person(rng: np.random.Generator) -> str:
    return f"{LAST[rng.integers(len(LAST))]}^{FIRST[rng.integers(len(FIRST))]}"


def _base_dataset(p: SiteProfile, seed: int, patient: dict, study_no: int, image_no: int, rng) -> Dataset:
    study_date = patient["first_study"] + dt.timedelta(days=90 * study_no)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPInstanceUID = _uid(seed, p.name, "sop", patient["id"], study_no, image_no)
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = f"{8 + image_no % 10:02d}{(7 * image_no) % 60:02d}00"
    acc_src = f"{seed}/{p.name}/{patient['id']}/{study_no}".encode()
    ds.AccessionNumber = "A" + hashlib.sha256(acc_src).hexdigest()[:10].upper()
    ds.InstitutionName = p.institution
    ds.InstitutionAddress = f"{10 + seed % 80} Harbour Road, Example City"
    ds.ReferringPhysicianName = patient["referrer"]
    ds.PerformingPhysicianName = _person(rng)
    ds.OperatorsName = _person(rng)
    ds.StationName = f"{p.name.upper()}-XR{1 + image_no % 3}"
    ds.Manufacturer = p.manufacturer
    ds.ManufacturerModelName = p.model
    ds.DeviceSerialNumber = f"SN{hashlib.sha256(p.name.encode()).hexdigest()[:8].upper()}"
    ds.SoftwareVersions = "4.2.1"
    ds.PatientName = patient["name"]
    ds.PatientID = patient["id"]
    ds.IssuerOfPatientID = f"{p.institution} MRN"
    ds.PatientBirthDate = patient["birth"].strftime("%Y%m%d")
    ds.PatientSex = patient["sex"]
    age = (study_date - patient["birth"]).days // 365
    ds.PatientAge = f"{age:03d}Y"
    ds.PatientAddress = f"{patient['house']} Elm Street, Example City"
    ds.PatientTelephoneNumbers = f"+00 555 {patient['house']:04d}"
    ds.StudyInstanceUID = _uid(seed, p.name, "study", patient["id"], study_no)
    ds.SeriesInstanceUID = _uid(seed, p.name, "series", patient["id"], study_no)
    ds.FrameOfReferenceUID = _uid(seed, p.name, "for", patient["id"], study_no)
    ds.StudyID = f"S{study_no + 1}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = image_no + 1
    ds.StudyDescription = f"CHEST 1 VIEW for {patient['name'].split('^')[0]}"
    ds.BodyPartExamined = "CHEST"
    # Nested identifying data: the request, and other ids of the patient.
    req = Dataset()
    req.AccessionNumber = ds.AccessionNumber
    req.RequestedProcedureID = f"RP{image_no:05d}"
    req.ScheduledProcedureStepID = f"SPS{image_no:05d}"
    req.RequestedProcedureDescription = f"Chest X-ray, ordered by {patient['referrer']}"
    ds.RequestAttributesSequence = Sequence([req])
    other = Dataset()
    other.PatientID = f"OLD-{patient['id']}"
    other.IssuerOfPatientID = "Legacy RIS"
    ds.OtherPatientIDsSequence = Sequence([other])
    # A private block whose value is the patient's name.
    block = ds.private_block(0x0011, "ACME PRIVATE PATIENT", create=True)
    block.add_new(0x10, "LO", patient["name"])
    block.add_new(0x11, "LO", patient["id"])
    return ds


def _image_dataset(p: SiteProfile, ds: Dataset, img01: np.ndarray, view: str) -> Dataset:
    ds.SOPClassUID = DX_STORAGE if p.modality == "DX" else CR_STORAGE
    ds.Modality = p.modality
    ds.ViewPosition = view
    ds.KVP = "110" if view == "PA" else "90"
    ds.Exposure = "4" if view == "PA" else "2"
    ds.ImagerPixelSpacing = [f"{p.pixel_spacing:.3f}", f"{p.pixel_spacing:.3f}"]
    ds.PixelSpacing = ds.ImagerPixelSpacing
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = p.photometric
    ds.Rows = ds.Columns = p.matrix
    ds.BitsAllocated = 16
    ds.BitsStored = p.bits_stored
    ds.HighBit = p.bits_stored - 1
    ds.PixelRepresentation = 1 if p.signed else 0
    ds.RescaleIntercept = f"{p.intercept:g}" if not p.signed else "1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "INVERSE" if p.photometric == "MONOCHROME1" else "IDENTITY"
    ds.BurnedInAnnotation = "NO"
    ds.PixelData = _stored(img01, p).tobytes()
    if p.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
    return ds


#: The acquisition header fields ``--shortcut`` can plant (the schema reads both: ``kvp``, ``exposure_mas``).
SHORTCUT_FIELDS = {"kvp": "KVP", "exposure": "Exposure"}
_SIGNS = {"+": 1, "-": -1, "0": 0}


@dataclass(frozen=True)
class Shortcut:
    """An acquisition-field shortcut: at site ``i`` the field goes with the label with sign
    ``signs[i]`` (+1: high on positives, -1: high on negatives, 0: high or low at random, no
    association). High and low values do not overlap, so the field alone ranks a site's images
    perfectly wherever its sign is not 0."""

    field: str
    signs: tuple[int, ...]


def parse_shortcut(text: str, sites: int) -> Shortcut:
    """``FIELD:SIGNS`` (``exposure:+,-,0``: one sign per site, + - or 0) -> :class:`Shortcut`;
    ValueError with one line otherwise."""
    fld, sep, signs = str(text).partition(":")
    fld = fld.strip().lower()
    if not sep or fld not in SHORTCUT_FIELDS:
        raise ValueError(f"--shortcut must be FIELD:SIGNS with FIELD one of {', '.join(SHORTCUT_FIELDS)} "
                         "(e.g. exposure:+,-,0)")
    parts = [x.strip() for x in signs.split(",")]
    if len(parts) != sites or any(x not in _SIGNS for x in parts):
        raise ValueError(f"--shortcut needs one sign (+, - or 0) per site: {sites} signs, comma-separated")
    return Shortcut(fld, tuple(_SIGNS[x] for x in parts))


def _plant(ds: Dataset, shortcut: Shortcut, site: int, label: int, rng: np.random.Generator) -> None:
    """Set the shortcut's field of one image from its label (its own random stream, so the
    cohort's other draws are the same with and without a shortcut)."""
    sign = shortcut.signs[site]
    high = bool(label) if sign > 0 else (not label if sign < 0 else bool(rng.random() < 0.5))
    if shortcut.field == "exposure":  # IS: whole mAs, high 6-9, low 1-3
        ds.Exposure = str(int(rng.integers(6, 10) if high else rng.integers(1, 4)))
    else:  # DS: kVp, high 115-125, low 75-85
        ds.KVP = f"{rng.uniform(115, 125) if high else rng.uniform(75, 85):.1f}"


def _file_meta(ds: Dataset, syntax: UID, sop_class: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


class _Writer:
    """Writes a site's files with pydicom's element encoder, encoding each repeated element (same
    tag, VR and value: the site's constant header) once per site instead of once per file."""

    _UNCACHED_VRS = {"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"}

    def __init__(self, syntax: UID) -> None:
        self.syntax = syntax
        self.implicit = syntax == ImplicitVRLittleEndian
        self.encodings = convert_encodings(["ISO_IR 100"])
        self.cache: dict[tuple, bytes] = {}

    def _encode(self, elem) -> bytes:
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = self.implicit
        write_data_element(fp, elem, self.encodings)
        return fp.getvalue()

    def _element(self, elem) -> bytes:
        if elem.VR in self._UNCACHED_VRS:
            return self._encode(elem)
        key = (elem.tag, elem.VR, str(elem.value))
        b = self.cache.get(key)
        if b is None:
            b = self.cache[key] = self._encode(elem)
        return b

    def save(self, ds: Dataset, path: Path, sop_class: UID) -> None:
        if self.syntax == RLELossless:
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.compress(RLELossless, generate_instance_uid=False)  # keep the seeded, deterministic UID
        meta = _file_meta(ds, self.syntax, sop_class)
        mfp = DicomBytesIO()
        mfp.is_little_endian = True
        mfp.is_implicit_VR = False
        write_file_meta_info(mfp, meta, enforce_standard=True)
        correct_ambiguous_vr(ds, True)  # as dcmwrite does: OB/OW, US/SS resolved from the dataset
        body = b"".join(self._element(ds[tag]) for tag in sorted(ds.keys()))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x00" * 128 + b"DICM" + mfp.getvalue() + body)


def _save(ds: Dataset, path: Path, syntax: UID, sop_class: UID) -> None:
    """One file with pydicom's own writer (the bad files and the SR)."""
    ds.file_meta = _file_meta(ds, ExplicitVRLittleEndian if syntax == RLELossless else syntax, sop_class)
    if syntax == RLELossless:
        ds.compress(RLELossless, generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True, enforce_file_format=True)


def _sr(p: SiteProfile, base: Dataset) -> Dataset:
    sr = Dataset()
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
               "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID", "SpecificCharacterSet"):
        setattr(sr, kw, base.data_element(kw).value)
    sr.SOPClassUID = BASIC_TEXT_SR
    sr.SOPInstanceUID = base.SOPInstanceUID + "9"
    sr.SeriesInstanceUID = base.SeriesInstanceUID + "9"
    sr.Modality = "SR"
    sr.SeriesNumber = 99
    sr.InstanceNumber = 1
    sr.Manufacturer = p.manufacturer
    sr.ContentDate, sr.ContentTime = base.StudyDate, base.StudyTime
    sr.ValueType = "CONTAINER"
    sr.ContinuityOfContent = "SEPARATE"
    sr.CompletionFlag = "COMPLETE"
    sr.VerificationFlag = "UNVERIFIED"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "18748-4", "LN", "Diagnostic imaging report"
    sr.ConceptNameCodeSequence = Sequence([concept])
    return sr


@dataclass
class SynthResult:
    out_dir: Path
    sites: list[dict]
    files_written: int


#: Where the cohort's coordinator.yaml puts the SuperLink, and so where each site.yaml's
#: ``federation.superlink`` points (loopback: the cohort is one machine's federation).
COORDINATOR_HOST = "127.0.0.1"
COORDINATOR_PORT = 9092
#: The first site's SuperNode runtime API port (``federation.port``); each next site takes the
#: next port, so that the cohort's sites can run side by side on one machine.
SUPERNODE_PORT = 9094


def pki_command(out_dir: Path, names: list[str]) -> str:
    """The command that makes the keys the cohort's configs name (``<out_dir>/pki``)."""
    return f"python3 deployments/make_pki.py {Path(out_dir) / 'pki'} " + " ".join(f"--site {n}" for n in names)


def synth(out_dir: Path, sites: int = 3, per_site: int = 120, seed: int = 0, image_size: int = 64,
          progress=None, test_fraction: float | None = None,
          shortcut: str | Shortcut | None = None) -> SynthResult:
    """Write the cohort; returns what was written. Deterministic for a given (sites, per_site, seed).

    ``shortcut`` (``FIELD:SIGNS`` or a :class:`Shortcut`): plant an acquisition-field shortcut,
    the header field going with the label with the given sign at each site (:func:`_plant`);
    None (the default) writes the same bytes as before the option existed.

    ``test_fraction``: the share of patients in each site's test split, written to each site.yaml
    (``splits.test``; None: the site default, 0.15). A benchmark cohort wants big test splits: the
    precision of a site's AUROC depends on its test size, not on its training size.

    pydicom's value validation is switched off while writing (every value is made here, and the
    tests check every file with pydicom and with dcmtk); it is restored afterwards.
    """
    saved = (pydicom_config.settings.reading_validation_mode, pydicom_config.settings.writing_validation_mode)
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        if isinstance(shortcut, str):
            shortcut = parse_shortcut(shortcut, sites)
        if shortcut is not None and len(shortcut.signs) != sites:
            raise ValueError(f"--shortcut needs one sign (+, - or 0) per site: {sites} signs, comma-separated")
        result = _synth(out_dir, sites, per_site, seed, image_size, progress, test_fraction, shortcut)
        if shortcut is not None:
            signs = ", ".join(f"{x['name']} {'+-0'[(1, -1, 0).index(g)]}" for x, g in zip(result.sites, shortcut.signs))
            with open(result.out_dir / "README.md", "a") as fh:
                fh.write(f"\nPlanted acquisition-field shortcut (`--shortcut`): the header field "
                         f"`{SHORTCUT_FIELDS[shortcut.field]}` goes with the label at each site with sign: {signs} "
                         "(+ high on positives, - high on negatives, 0 no association).\n")
        return result
    finally:
        pydicom_config.settings.reading_validation_mode, pydicom_config.settings.writing_validation_mode = saved


def _synth(out_dir: Path, sites: int, per_site: int, seed: int, image_size: int, progress,
           test_fraction: float | None = None, shortcut: Shortcut | None = None) -> SynthResult:
    if not 1 <= sites <= len(PROFILES):
        raise ValueError(f"--sites must be between 1 and {len(PROFILES)}")
    if test_fraction is not None and not 0 < test_fraction < 0.85:
        raise ValueError("--test-fraction must be above 0 and below 0.85 (validation keeps 0.15)")
    splits = "" if test_fraction is None else f"splits: {{val: 0.15, test: {test_fraction:g}}}\n"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = []
    total = 0
    steps = sites * (per_site + 5)
    done = 0
    for s in range(sites):
        p = PROFILES[s]
        site_dir = out_dir / p.name
        dicom = site_dir / "dicom"
        rng = np.random.default_rng([seed, s])
        n_patients = max(2, int(round(per_site / 1.5)))
        patients = []
        for i in range(n_patients):
            age = float(np.clip(rng.normal(p.age_mean, p.age_sd), 18, 95))
            first_study = dt.date(2021, 1, 1) + dt.timedelta(days=int(rng.integers(0, 900)))
            patients.append({
                "id": f"{p.name[-1].upper()}{100000 + i * 7 + s}",
                "name": _person(rng),
                "sex": "MF"[int(rng.integers(2))],
                "birth": first_study - dt.timedelta(days=int(age * 365.25)),
                "first_study": first_study,
                "referrer": _person(rng),
                "house": int(rng.integers(1, 9999)),
                "age": age,
            })
        rows = []
        writer = _Writer(SYNTAXES[p.syntax])
        positives = 0
        for k in range(per_site):
            pat = patients[k % n_patients]
            study_no = k // n_patients
            irng = np.random.default_rng([seed, s, k])
            ap = bool(irng.random() < p.ap_fraction)
            logit = np.log(p.prevalence / (1 - p.prevalence)) + 0.05 * (pat["age"] - p.age_mean)
            label = int(irng.random() < 1 / (1 + np.exp(-logit)))
            positives += label
            img = phantom(irng, p.matrix, bool(label), ap, p, _confounders(irng, p, label))
            ds = _base_dataset(p, seed, pat, study_no, k, irng)
            _image_dataset(p, ds, img, "AP" if ap else "PA")
            if shortcut is not None:
                _plant(ds, shortcut, s, label, np.random.default_rng([seed, s, k, 7]))
            rel = Path(f"STU{study_no:03d}{k % n_patients:04d}") / "SER001" / (f"IM{k:05d}" + (".dcm" if k % 3 == 0 else ""))
            writer.save(ds, dicom / rel, ds.SOPClassUID)
            rows.append((ds.AccessionNumber, label))
            total += 1
            done += 1
            if progress:
                progress(done, steps)
        # A few bad files per site, so every report shows real rejects.
        bad_rng = np.random.default_rng([seed, s, 10**6])
        pat = patients[0]
        img = phantom(bad_rng, p.matrix, False, False, p)
        bad = dicom / "BAD"
        ds = _image_dataset(p, _base_dataset(p, seed, pat, 0, 90001, bad_rng), img, "PA")
        _save(ds, bad / "TRUNC01", ExplicitVRLittleEndian, ds.SOPClassUID)
        data = (bad / "TRUNC01").read_bytes()
        (bad / "TRUNC01").write_bytes(data[: len(data) // 2])
        ds = _image_dataset(p, _base_dataset(p, seed, pat, 0, 90002, bad_rng), img, "PA")
        del ds.PixelData
        _save(ds, bad / "NOPIX01", ExplicitVRLittleEndian, ds.SOPClassUID)
        ds = _image_dataset(p, _base_dataset(p, seed, pat, 0, 90003, bad_rng), img, "PA")
        ds.BurnedInAnnotation = "YES"
        _save(ds, bad / "BURNED01", ExplicitVRLittleEndian, ds.SOPClassUID)
        sr = _sr(p, _base_dataset(p, seed, pat, 0, 90004, bad_rng))
        _save(sr, bad / "SR01", ExplicitVRLittleEndian, BASIC_TEXT_SR)
        (bad / "export-notes.txt").write_text("Exported by PACS. Not a DICOM file.\n")
        total += 5
        done += 5
        if progress:
            progress(done, steps)
        with open(site_dir / "labels.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["accession_number", "label"])
            for acc, lab in sorted(set(rows)):
                w.writerow([acc, lab])
        key = site_dir / "site.key"
        key.write_text(hashlib.sha256(f"dicomfl-synth-key/{seed}/{p.name}/{os.urandom(8).hex()}".encode()).hexdigest())
        key.chmod(0o600)
        (site_dir / "site.yaml").write_text(
            f"# Generated by dicomfl synth (seed {seed}). Paths are relative to this file.\n"
            f"site:\n  name: {p.name}\n  dicom_dir: dicom\n  labels: labels.csv\n  label_key: accession_number\n"
            f"  secret_file: site.key\n  state_dir: state\n"
            f"deid: {{retain_patient_characteristics: true, retain_longitudinal_modified_dates: false}}\n"
            f"preprocess: {{image_size: {image_size}}}\n"
            f"{splits}"
            f"privacy: {{dp: false, run_epsilon: 8.0, lifetime_epsilon: 8.0, delta: 1.0e-5, max_grad_norm: 1.0, share_local_model: true}}\n"
            f"train: {{batch_size: 32, lr: 1.0e-3}}\n"
            f"# The cohort's coordinator (coordinator.yaml) and the keys of make_pki.py --site {p.name} in ../pki\n"
            f"# (the command is in coordinator.yaml): dicomfl site start site.yaml joins the federation.\n"
            f"federation: {{superlink: '{COORDINATOR_HOST}:{COORDINATOR_PORT}', root_certificates: ../pki/ca.crt,\n"
            f"             auth_private_key: ../pki/sites/{p.name}.key, port: {SUPERNODE_PORT + s}}}\n"
        )
        summary.append({**asdict(p), "images": per_site, "patients": n_patients, "positives": positives})
    names = [x["name"] for x in summary]
    (out_dir / "coordinator.yaml").write_text(
        "# Generated by dicomfl synth: the SuperLink for this cohort (loopback). Its keys (pki/):\n"
        f"# {pki_command(out_dir, names)}\n"
        f"coordinator: {{address: {COORDINATOR_HOST}, port: {COORDINATOR_PORT}, state_dir: coordinator-state, tls: true,\n"
        f"              supernode_auth: true, pki_dir: pki, authorized_sites: [{', '.join(names)}]}}\n"
    )
    run = run_config_dict("demo", out_dir="runs/demo", model={"mode": "fused", "image_size": image_size, "width": 16},
                          sites=[f"{n}/site.yaml" for n in names])
    (out_dir / "run.yaml").write_text("# Generated by dicomfl synth.\n" + yaml.safe_dump(run, sort_keys=False))
    (out_dir / "bench.yaml").write_text(
        "# Generated by dicomfl synth: dicomfl bench bench.yaml\n"
        "sites: [" + ", ".join(f"{n}/site.yaml" for n in names) + "]\n"
        "strategies: [local, pooled, fedavg, fedprox, fedadam]\n"
        "proximal_mu: [0.01, 0.1]\n"
        "dp_epsilons: [null, 8.0, 1.0]\n"
        "leave_one_site_out: true\n"
        "ablation: true\n"
        "seeds: [0, 1, 2]\n"
        "rounds: 25  # pooled and local training have converged by then (README: learning curves)\n"
        "replicates: 1000  # replicate AUROCs per model and site: the paired headline comparisons\n"
        f"model: {{mode: fused, image_size: {image_size}, width: 16, depth: 3}}\n"
        "scale_sites: 100\n"
        "out_dir: runs/bench\n"
    )
    _write_readme(out_dir, summary, seed)
    return SynthResult(out_dir=out_dir, sites=summary, files_written=total)


def _write_readme(out_dir: Path, summary: list[dict], seed: int) -> None:
    cols = [("name", "site"), ("manufacturer", "manufacturer"), ("modality", "modality"), ("matrix", "matrix"),
            ("pixel_spacing", "spacing mm"), ("bits_stored", "bits"), ("signed", "signed"), ("photometric", "photometric"),
            ("syntax", "transfer syntax"), ("noise", "noise"), ("blur", "blur"), ("gamma", "curve (gamma)"),
            ("ap_fraction", "AP share"), ("prevalence", "prevalence"), ("age_mean", "age mean"),
            ("confounder", "confounder"), ("images", "images"), ("patients", "patients"), ("positives", "positives")]
    lines = [
        "# Generated multicenter cohort (dicomfl synth)",
        "",
        f"Seed {seed}. Every patient, name, date, identifier and institution here is fake. Each site has a",
        "`dicom/` folder (nested study/series folders, some files without `.dcm`), `labels.csv` keyed by",
        "AccessionNumber, a secret key and a ready `site.yaml`; `BAD/` holds a truncated file, one without",
        "pixel data, one with BurnedInAnnotation=YES, an SR document and a non-DICOM file.",
        "",
        "The configs form a federation on this machine: `coordinator.yaml` (SuperLink on "
        f"{COORDINATOR_HOST}:{COORDINATOR_PORT}) and each",
        "`site.yaml`'s `federation:` section use the keys in `pki/`, made with",
        f"`{pki_command(out_dir, [s['name'] for s in summary])}`; then",
        "`dicomfl coordinator start coordinator.yaml`, `dicomfl site start <site>/site.yaml` and `dicomfl run run.yaml`.",
        "",
        "The finding (a lung opacity) is in the pixels; prevalence rises with age, and the opacity is",
        "fainter on AP views. Every artifact kind (corner markers, collimation, exposure) occurs at every",
        "site in 30% of images; each site's own kind (column `confounder`) is instead present in 90% of",
        "its positives and 10% of its negatives: a model trained on one site can lean on it and fail",
        "elsewhere.",
        "",
        "| " + " | ".join(h for _, h in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for s in summary:
        lines.append("| " + " | ".join(str(s[k]) for k, _ in cols) + " |")
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")
