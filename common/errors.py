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


class StorageError(DicomflError):
    """The site's ``state_dir`` cannot take more data: its disk is full (ENOSPC, EDQUOT) or fails
    (EIO). A transient condition, never a verdict on a file: what was not finished is deferred to
    the next run. The message names the folder and the count, never a file's path."""


class ModelMismatch(ValueError):
    """The weights or the model config a message carries do not fit this site's model or data
    (names, shapes, image size). A site answers it with the ``model-mismatch`` error code."""


class BadRequest(DicomflError):
    """A coordinator's message asks for something a site will not do: a run name or a number that
    breaks its pattern or bounds. The site answers ``bad-request``; no value is echoed."""


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


# Reasons for a file whose worker process failed (see :mod:`workers`): it died on a signal or
# native code raised a BaseException; it ran past ``ingest.file_timeout_s``; it ran out of its
# address space (``ingest.worker_memory_mb``) or was killed by the OOM killer; ``fn`` raised an
# ordinary exception (detail: its type name).
DECODER_CRASH = "decoder-crash"
TIMEOUT = "timeout"
WORKER_MEMORY = "worker-memory"
WORKER_ERROR = "worker-error"
# A file that was not processed for a reason of the machine, not of the file: the site's disk is
# full, an input/output error, or its worker was killed by an operator's signal. Never cached:
# the file is tried again at the next ingestion. The detail says which (one of DEFERRED_WHY).
DEFERRED = "deferred"
DISK_FULL = "disk full"
IO_ERROR = "io error"
INTERRUPTED = "interrupted"
DEFERRED_WHY = (DISK_FULL, IO_ERROR, INTERRUPTED)
# The compressed codestream's own header disagrees with the DICOM header, or cannot be parsed
# strictly (see :mod:`codestream`): rejected before any decoder sees it.
CODESTREAM_MISMATCH = "codestream-mismatch"
# A bug or an unforeseen file: rejected with the exception's type name, never its text.
INTERNAL_ERROR = "internal-error"


def printable(text: str, limit: int | None = None) -> str:
    """``text`` safe to print on one line of a terminal or a log: control and format characters
    (newlines, ESC, BiDi overrides), line/paragraph separators and undecodable bytes (lone
    surrogates from a non-UTF-8 file name) become ``\\xNN`` / ``\\uNNNN`` escapes. ``limit``:
    only the first ``limit`` characters of ``text`` are shown (a token a peer sent, which may be
    any length). The one such helper: every module that prints or logs outside text uses it."""
    import unicodedata

    if limit is not None:
        text = text[:limit]
    out = []
    for ch in text:
        if ch.isprintable() and unicodedata.category(ch) not in ("Cf", "Cs", "Zl", "Zp"):
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    return "".join(out)
