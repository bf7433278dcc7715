"""Error types.

Every message built here is safe to print and log: it is made from reason codes, file paths
relative to the site's DICOM folder, CSV row numbers, DICOM tags/keywords and exception *type*
names -- never from exception text or element values, which may quote PHI.
"""

from __future__ import annotations


class DicomflError(Exception):
    """A user error (bad config, bad labels file, ...): the CLI prints it as one line and exits 2."""


class ConfigError(DicomflError):
    """A configuration file is invalid; the message names the file and the key."""


class ModelMismatch(ValueError):
    """The weights or the model config a message carries do not fit this site's model or data
    (names, shapes, image size). A site answers it with the ``model-mismatch`` error code."""


class NoTrainingData(ValueError):
    """A site has no labelled training images. A site answers it with ``no-training-data``."""


class RejectedFile(Exception):
    """A DICOM file that ingestion skips, with a stable reason code and a PHI-free detail."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason if not detail else f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# Stable reason codes (they appear in reports and tests).
NOT_DICOM = "not-dicom"
EMPTY_FILE = "empty-file"
UNREADABLE = "unreadable"
TRUNCATED = "truncated"
NO_PIXEL_DATA = "no-pixel-data"
NO_DECODER = "no-decoder"
DECODE_FAILED = "decode-failed"
BURNED_IN = "burned-in-annotation"
NON_IMAGE = "non-image-sop-class"
TOO_LARGE = "too-large"
COLOR_REJECTED = "color-rejected"
BAD_GEOMETRY = "bad-pixel-geometry"
BAD_PIXELS = "bad-pixel-values"
