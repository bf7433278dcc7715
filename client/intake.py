"""DICOM Storage SCP of a site: studies pushed by a PACS or router land in the site's DICOM folder.

Hospital IT moves images by DICOM networking: a PACS (or a DICOM router) pushes studies to an AI
node's Storage SCP with C-STORE. :class:`IntakeServer` is that SCP, built on pynetdicom:

* it accepts C-ECHO (Verification) and C-STORE for the image storage SOP classes only, in the
  common uncompressed and compressed transfer syntaxes;
* only the configured (calling AE title, source address) pairs may associate; everyone else is
  refused at association time with a log line naming the calling AE title and address;
* each instance is written, as received and without decoding, atomically to
  ``<dicom_dir>/intake/<hh>/<sha256(SOPInstanceUID)>.dcm`` (mode 0600, folders 0700); a re-sent
  instance with the same bytes is acknowledged without a write, one with the same SOP Instance
  UID but other bytes is refused (0xC111), never written over the stored one;
* the store has an optional quota (``max_store_gb``) and the file system a free-space floor
  (``min_free_gb``): an instance that would pass either is refused with 0xA700 (out of
  resources), and accepted again once space returns; both checks are O(1) per C-STORE (a running
  total, counted once at start, and one ``statvfs``);
* an instance that is not an image, has no SOP Instance UID, does not match its C-STORE request
  or is larger than ``max_instance_bytes`` is refused with a failure status; the part of an
  oversized instance past the cap is dropped as it arrives, so memory stays bounded;
* DICOM TLS (PS3.15 Annex B), with client certificates when a CA is configured;
* counts and timestamps (never header values) are kept in ``<state_dir>/intake/status.json``.

De-identification is not done here: the files are the site's own and stay on its disk, as received;
ingestion de-identifies them later, in memory. No header value (patient name, IDs, UIDs) ever
appears in a path or a log line: paths carry a hash and log lines carry codes and counts.

pynetdicom's own logging can print command sets, PDUs and C-FIND identifiers at INFO/DEBUG level.
The server turns pynetdicom's standard event logging off and keeps the ``pynetdicom`` logger at
WARNING or quieter; at those levels pynetdicom logs only fixed messages, codes and protocol
tracebacks, never data set values. This module reads only two UIDs of each received data set, as
raw bytes (pixel data is never decoded), and its handlers never raise into pynetdicom, whose
handler-exception log would print the exception. pydicom does warn, quoting the value, when
pynetdicom decodes a command set with an invalid UID; the intake process (:func:`serve`) routes
those warnings through :class:`dicomfl.common.logs.LibraryRedactor` into its 0600 log.
"""

from __future__ import annotations

import errno
import hashlib
import io
import ipaddress
import json
import logging
import os
import socket
import ssl
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, cast

import pydicom
from pydicom import uid as _uid
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pynetdicom import (
    AE,
    AllStoragePresentationContexts,
    StoragePresentationContexts,
    evt,
)
from pynetdicom import (
    _config as _pynetdicom_config,
)
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomfl.common.config import AllowedPeer, IntakeSection, IntakeTLS, parse_ip as _parse_ip

__all__ = [
    "AllowedPeer",
    "IntakeError",
    "IntakeSection",
    "IntakeServer",
    "IntakeTLS",
    "IMAGE_STORAGE_SOP_CLASSES",
    "TRANSFER_SYNTAXES",
    "check_instance",
    "intake_path",
    "iter_intake_files",
    "read_status",
    "status_path",
]

LOGGER = logging.getLogger("dicomfl.client.intake")

# C-STORE statuses (PS3.4 Annex B.2.3 and PS3.7 Annex C).
STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122  # Refused: SOP Class not supported
# Error: cannot understand (PS3.4 B.2.3: C000-CFFF, the low bits the SCP's own reason), for a
# re-sent instance whose SOP Instance UID is stored with other bytes. PS3.7's "Duplicate SOP
# Instance" (0x0111) names the case but is an N-CREATE status, not one of C-STORE's (dcmtk reports
# it as "Unknown Status"); 0xA9xx says the data set does not match its SOP class, which is not
# the case; and a Refused 0xA7xx (out of resources) invites a PACS to retry, which cannot help.
# A Cxxx error is final, and 0x111 in its low bits echoes the PS3.7 name.
STATUS_DUPLICATE_CONFLICT = 0xC111
STATUS_OUT_OF_RESOURCES = 0xA700  # Refused: out of resources (too large, disk full)
STATUS_DATASET_MISMATCH = 0xA900  # Error: data set does not match SOP class (or the command)
STATUS_CANNOT_UNDERSTAND = 0xC000  # Error: cannot understand (unreadable, no SOP Instance UID)

# Reason codes: the only thing a log line says about a refused instance.
R_TOO_LARGE = "too-large"
R_NON_IMAGE = "non-image-sop-class"
R_UNREADABLE = "unreadable"
R_NO_INSTANCE_UID = "no-sop-instance-uid"
R_MISMATCH = "command-dataset-mismatch"
R_CONFLICT = "same-uid-other-content"  # an instance with this SOP Instance UID but other bytes is stored
R_QUOTA = "store-quota-reached"
R_FLOOR = "free-space-floor-reached"
R_DISK_FULL = "file-system-full"

# The transfer syntaxes accepted: uncompressed, deflated, and the compressed ones that the site's
# decoders (python-gdcm, pylibjpeg-openjpeg, pylibjpeg-rle) can read at ingestion.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    _uid.ExplicitVRLittleEndian,
    _uid.ImplicitVRLittleEndian,
    _uid.DeflatedExplicitVRLittleEndian,
    _uid.ExplicitVRBigEndian,  # retired, still sent by old modalities
    _uid.JPEGBaseline8Bit,
    _uid.JPEGExtended12Bit,
    _uid.JPEGLossless,
    _uid.JPEGLosslessSV1,
    _uid.JPEGLSLossless,
    _uid.JPEGLSNearLossless,
    _uid.JPEG2000Lossless,
    _uid.JPEG2000,
    _uid.HTJ2KLossless,
    _uid.HTJ2KLosslessRPCL,
    _uid.HTJ2K,
    _uid.RLELossless,
)


def _is_image_storage(sop_class_uid: str) -> bool:
    """True for an image storage SOP class (the rule of the ingestion reader: the name says so)."""
    return "Image Storage" in _uid.UID(sop_class_uid).name


def _image_storage_sop_classes() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    # StoragePresentationContexts (at most 128, what an SCU may propose) holds a few retired image
    # classes that old modalities still send; AllStoragePresentationContexts adds the newer ones.
    for cx in (*StoragePresentationContexts, *AllStoragePresentationContexts):
        if cx.abstract_syntax and _is_image_storage(cx.abstract_syntax):
            seen.setdefault(str(cx.abstract_syntax), None)
    return tuple(seen)


IMAGE_STORAGE_SOP_CLASSES: tuple[str, ...] = _image_storage_sop_classes()
_IMAGE_SET = frozenset(IMAGE_STORAGE_SOP_CLASSES)


# --------------------------------------------------------------------------- configuration


# The schema (IntakeSection, AllowedPeer, IntakeTLS) lives with the other config schemas.


class IntakeError(RuntimeError):
    """The intake server cannot start (bad TLS files, port in use, unusable folders)."""


# --------------------------------------------------------------------------- paths and status


def intake_path(dicom_dir: Path, sop_instance_uid: str) -> Path:
    """Where an instance is stored: ``<dicom_dir>/intake/<hh>/<sha256 hex of the UID>.dcm``.

    Parameters
    ----------
    dicom_dir : Path
        The site's DICOM folder.
    sop_instance_uid : str
        The instance's SOP Instance UID (trailing NUL/space padding is ignored).

    Returns
    -------
    Path
        The file's path; the same UID always gives the same path.
    """
    digest = hashlib.sha256(_clean_uid(sop_instance_uid).encode("ascii", "replace")).hexdigest()
    return Path(dicom_dir) / "intake" / digest[:2] / f"{digest}.dcm"


def status_path(state_dir: Path) -> Path:
    """``<state_dir>/intake/status.json``."""
    return Path(state_dir) / "intake" / "status.json"


_COUNTERS = (
    "received",  # C-STORE requests that reached the handler
    "written",  # instances written (new ones)
    "duplicates",  # instances re-sent with the bytes already stored (acknowledged, not rewritten)
    "conflicts",  # instances re-sent with a stored SOP Instance UID but other bytes (refused)
    "rejected",  # instances refused with a failure status (too large, not an image, ...)
    "out_of_space",  # instances refused for the store quota, the free-space floor or a full disk
    "failed",  # instances that could not be written (disk errors)
    "associations_accepted",
    "associations_refused",
    "connections_refused",  # TCP connections closed at accept (address not allowed, per-peer cap)
    "echoes",
    "store_bytes",  # bytes of the instances in the store (a gauge: recounted at every start)
)
_TIMESTAMPS = ("started_at", "updated_at", "last_received_at", "last_written_at", "last_refused_at")


def read_status(state_dir: Path) -> dict[str, Any]:
    """The intake counters and timestamps of a site, for ``dicomfl site status``.

    Parameters
    ----------
    state_dir : Path
        The site's state folder.

    Returns
    -------
    dict
        Every counter of the status file (0 when there is no file yet or a counter is missing)
        and its ISO-8601 timestamps (None when unknown). Counts are totals across restarts.
    """
    out: dict[str, Any] = {k: 0 for k in _COUNTERS} | {k: None for k in _TIMESTAMPS}
    try:
        data = json.loads(status_path(state_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return out
    if not isinstance(data, dict):
        return out
    for k in _COUNTERS:
        v = data.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            out[k] = v
    for k in _TIMESTAMPS:
        v = data.get(k)
        if isinstance(v, str):
            out[k] = v
    return out


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _mkdir_private(path: Path) -> None:
    """Create ``path`` (and parents) with mode 0700 for the folders this module creates."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            pass
        os.chmod(d, 0o700)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a hidden temp file in the same folder (mode 0600),
    fsync it, rename it over ``path`` and fsync the folder."""
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=path.parent)  # 0600, hidden
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


class _Status:
    """Thread-safe counters, persisted (atomically, 0600) to the status file."""

    def __init__(self, state_dir: Path) -> None:
        self.path = status_path(state_dir)
        self._lock = threading.Lock()
        prev = read_status(state_dir)
        self._data: dict[str, Any] = {k: prev[k] for k in _COUNTERS} | {k: prev[k] for k in _TIMESTAMPS}
        self._dirty = True
        self._last_save = 0.0

    def bump(self, counter: str, stamp: str | None = None) -> None:
        with self._lock:
            self._data[counter] += 1
            if stamp:
                self._data[stamp] = _now()
            self._dirty = True

    def set(self, counter: str, value: int) -> None:
        with self._lock:
            if self._data[counter] != value:
                self._data[counter] = value
                self._dirty = True

    def mark(self, stamp: str) -> None:
        with self._lock:
            self._data[stamp] = _now()
            self._dirty = True

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._data)

    def save(self, min_interval_s: float = 0.0) -> None:
        """Persist the counters when changed (and not saved within ``min_interval_s``)."""
        with self._lock:
            if not self._dirty or time.monotonic() - self._last_save < min_interval_s:
                return
            self._data["updated_at"] = _now()
            text = json.dumps(self._data, indent=1, sort_keys=True)
            self._dirty = False
            self._last_save = time.monotonic()
            try:
                _mkdir_private(self.path.parent)
                _write_atomic(self.path, text.encode())
            except OSError as exc:
                self._dirty = True
                LOGGER.warning("intake: cannot write the status file (%s)", type(exc).__name__)


_GIB = 1 << 30


class _StoreSpace:
    """The store's quota and the file system's free-space floor, checked in O(1) per C-STORE.

    The bytes of the stored instances are counted once (:meth:`count`, at start) and then kept
    as a running total: :meth:`reserve` adds an instance's size before it is written (so
    concurrent associations cannot pass the quota together), :meth:`release` takes it back when
    the write fails. The floor is one ``statvfs`` of the store's folder per instance. Files
    removed from the store by hand are noticed by a recount, made only while the quota refuses
    and at most once per :data:`RECOUNT_INTERVAL_S`, never per instance.
    """

    RECOUNT_INTERVAL_S = 10.0

    def __init__(self, root: Path, quota_gb: float | None, floor_gb: float) -> None:
        self.root = root
        self.quota = None if quota_gb is None else int(quota_gb * _GIB)
        self.floor = int(floor_gb * _GIB)
        self._lock = threading.Lock()
        self._used = 0
        self._counted_at = -1e18

    @property
    def used(self) -> int:
        with self._lock:
            return self._used

    def count(self) -> int:
        """Walk the store once and set the running total to the bytes its instances hold."""
        total = 0
        try:
            with os.scandir(self.root) as top:
                for sub in top:
                    if not sub.is_dir(follow_symlinks=False):
                        continue
                    try:
                        with os.scandir(sub.path) as files:
                            for f in files:
                                if f.name.endswith(".dcm") and not f.name.startswith("."):
                                    try:
                                        total += f.stat(follow_symlinks=False).st_size
                                    except OSError:
                                        pass
                    except OSError:
                        pass
        except OSError:
            pass
        with self._lock:
            self._used = total
            self._counted_at = time.monotonic()
        return total

    def reserve(self, nbytes: int) -> str | None:
        """Take ``nbytes`` of the quota for an instance about to be written; the reason code
        when it would pass the quota or the floor (nothing is taken then)."""
        if self.floor > 0:
            st = os.statvfs(self.root)
            if st.f_bavail * st.f_frsize - nbytes < self.floor:
                return R_FLOOR
        if self.quota is None:
            with self._lock:
                self._used += nbytes
            return None
        with self._lock:
            over = self._used + nbytes > self.quota
            stale = time.monotonic() - self._counted_at >= self.RECOUNT_INTERVAL_S
        if over and stale:
            self.count()
        with self._lock:
            if self._used + nbytes > self.quota:
                return R_QUOTA
            self._used += nbytes
        return None

    def release(self, nbytes: int) -> None:
        with self._lock:
            self._used = max(0, self._used - nbytes)


# --------------------------------------------------------------------------- helpers


def _printable(value: object, limit: int = 64) -> str:
    """A peer-supplied token made safe for one log line (no control characters, bounded)."""
    text = str(value)[:limit]
    return "".join(ch if 0x20 <= ord(ch) <= 0x7E else "?" for ch in text)


def _clean_uid(value: object) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip("\x00 ")


_SOP_CLASS_TAG = Tag(0x0008, 0x0016)
_SOP_INSTANCE_TAG = Tag(0x0008, 0x0018)
_header_lock = threading.Lock()  # warnings.catch_warnings() is not thread-safe


def _header_uids(part10: bytes) -> tuple[str, str]:
    """The data set's own SOP Class and SOP Instance UIDs, read from the raw elements (no value
    conversion, so no validation warning can quote a value). Pixel data is never decoded."""
    with _header_lock, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(
            io.BytesIO(part10),
            stop_before_pixels=True,
            specific_tags=[_SOP_CLASS_TAG, _SOP_INSTANCE_TAG],
        )
        out = []
        for tag in (_SOP_CLASS_TAG, _SOP_INSTANCE_TAG):
            if tag not in ds:
                out.append("")
                continue
            elem = ds.get_item(tag)
            value = elem.value if isinstance(elem, RawDataElement) else getattr(elem, "value", "")
            out.append(_clean_uid(value))
    return out[0], out[1]


def check_instance(
    part10: bytes, dataset_size: int, sop_class_uid: str, sop_instance_uid: str, max_bytes: int
) -> tuple[int, str | None, str]:
    """Decide whether a received instance is stored.

    Parameters
    ----------
    part10 : bytes
        The instance as a Part 10 file (``event.encoded_dataset()``).
    dataset_size : int
        Size of the encoded data set (without file meta).
    sop_class_uid, sop_instance_uid : str
        The C-STORE request's Affected SOP Class/Instance UIDs.
    max_bytes : int
        The size cap.

    Returns
    -------
    (int, str or None, str)
        The C-STORE status, the reason code when refused (None when accepted), and the
        instance's SOP Instance UID (empty when refused).
    """
    if dataset_size > max_bytes:
        return STATUS_OUT_OF_RESOURCES, R_TOO_LARGE, ""
    if not _is_image_storage(_clean_uid(sop_class_uid)):
        return STATUS_SOP_CLASS_NOT_SUPPORTED, R_NON_IMAGE, ""
    try:
        ds_class, ds_instance = _header_uids(part10)
    except Exception:  # noqa: BLE001 - any parser failure refuses the instance, never the server
        return STATUS_CANNOT_UNDERSTAND, R_UNREADABLE, ""
    if not ds_instance:
        return STATUS_CANNOT_UNDERSTAND, R_NO_INSTANCE_UID, ""
    if not ds_class or not _is_image_storage(ds_class):
        return STATUS_SOP_CLASS_NOT_SUPPORTED, R_NON_IMAGE, ""
    if ds_class != _clean_uid(sop_class_uid) or ds_instance != _clean_uid(sop_instance_uid):
        return STATUS_DATASET_MISMATCH, R_MISMATCH, ""
    return STATUS_SUCCESS, None, ds_instance


class _DeferredHandshakeContext(ssl.SSLContext):
    """An SSL context whose server sockets do the TLS handshake on first read.

    pynetdicom wraps each accepted socket in its accept loop; with the handshake done there, one
    client that connects and stays silent would stall every other sender. Deferred, the handshake
    runs in the association's own thread, under its timeouts.
    """

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, **kwargs):  # type: ignore[override]
        return super().wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False, **kwargs)


def _ssl_context(tls: IntakeTLS) -> ssl.SSLContext:
    ctx = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile=str(tls.cert_file), keyfile=str(tls.key_file))
        if tls.ca_file is not None:
            ctx.load_verify_locations(cafile=str(tls.ca_file))
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise IntakeError(f"intake.tls: cannot load the certificate, key or CA ({type(exc).__name__})") from None
    return ctx


# --------------------------------------------------------------------------- the server


class IntakeServer:
    """The site's DICOM Storage SCP (C-ECHO, C-STORE of images), non-blocking.

    Parameters
    ----------
    section : IntakeSection
        The validated ``intake:`` settings.
    dicom_dir : Path
        The site's DICOM folder; instances go to ``<dicom_dir>/intake/``.
    state_dir : Path
        The site's state folder; counters go to ``<state_dir>/intake/status.json``.
    logger : logging.Logger, optional
        Where to log (``dicomfl.client.intake`` by default).

    Examples
    --------
    >>> server = IntakeServer(section, dicom_dir, state_dir)  # doctest: +SKIP
    >>> server.start(); ...; server.stop()                     # doctest: +SKIP
    """

    def __init__(
        self,
        section: IntakeSection,
        dicom_dir: Path,
        state_dir: Path,
        logger: logging.Logger | None = None,
    ) -> None:
        self.section = section
        self.dicom_dir = Path(dicom_dir)
        self.state_dir = Path(state_dir)
        self.log = logger or LOGGER
        self._status = _Status(self.state_dir)
        self._server: Any = None
        self._ae: AE | None = None
        # Bytes of the data set being received, per association (the memory guard).
        self._pending: weakref.WeakKeyDictionary[Any, tuple[int, bool]] = weakref.WeakKeyDictionary()
        self._cut: weakref.WeakSet[Any] = weakref.WeakSet()  # messages emptied by the guard
        self._pending_lock = threading.Lock()
        self._last_conn_log: dict[str, float] = {}
        self._recent_accepts: dict[str, list[float]] = {}
        self._space = _StoreSpace(self.dicom_dir / "intake", section.max_store_gb, section.min_free_gb)
        # Check-then-write of one path is atomic under its stripe's lock: two associations
        # sending the same SOP Instance UID cannot both find the path free and write in turn.
        self._path_locks = tuple(threading.Lock() for _ in range(64))
        self._space_log_lock = threading.Lock()
        self._space_refused = 0  # refused for space since the last line said so
        self._space_logged_at = -1e18  # when that line was written (-1e18: not short of space)

    # ----------------------------------------------------------------- lifecycle

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the server listens on (the real port when ``port`` was 0)."""
        if self._server is None:
            raise IntakeError("the intake server is not running")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._server is not None

    def counters(self) -> dict[str, Any]:
        """The current counters and timestamps (what the status file holds)."""
        return self._status.snapshot()

    def start(self) -> None:
        """Start listening in background threads and return at once.

        Raises
        ------
        IntakeError
            When the folders cannot be made, the TLS files cannot be loaded or the port cannot be
            bound.
        """
        if self._server is not None:
            return
        s = self.section
        _quiet_pynetdicom()
        try:
            _mkdir_private(self.dicom_dir / "intake")
            _mkdir_private(status_path(self.state_dir).parent)
            _sweep_temp_files(self.dicom_dir / "intake")
            self._status.set("store_bytes", self._space.count())
        except OSError as exc:
            raise IntakeError(f"intake: cannot create the intake folders ({type(exc).__name__})") from None
        ssl_context = _ssl_context(s.tls) if s.tls is not None else None

        ae = AE(ae_title=s.ae_title)
        ae.maximum_pdu_size = s.max_pdu
        ae.maximum_associations = s.max_associations
        ae.acse_timeout = s.acse_timeout_s
        ae.dimse_timeout = s.dimse_timeout_s
        ae.network_timeout = s.network_timeout_s
        # Defence in depth: pynetdicom's own calling-AE check, under the (AE, address) check of
        # _on_requested. With an empty allow-list that hook refuses everyone.
        ae.require_calling_aet = sorted({p.ae_title for p in s.allowed})
        ae.require_called_aet = s.require_called_ae_title
        ae.add_supported_context(Verification, list(TRANSFER_SYNTAXES[:3]))
        for sop_class in IMAGE_STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_PDU_RECV, self._on_pdu_recv),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        try:
            server = ae.start_server(
                (s.host, s.port), block=False, ssl_context=ssl_context, evt_handlers=handlers
            )
        except OSError as exc:
            raise IntakeError(
                f"intake: cannot listen on {s.host}:{s.port} ({type(exc).__name__}: {exc.strerror or 'error'})"
            ) from None
        # Refuse at TCP accept, before any thread or PDU: a second connection from a source address
        # no allowed entry covers, and one past max_associations_per_peer from an allowed one.
        server.verify_request = lambda request, client_address: self._verify_connection(server, client_address)
        self._ae, self._server = ae, server
        self._status.mark("started_at")
        self._status.save()
        host, port = self.address
        self.log.info(
            "intake: DICOM SCP %s listening on %s:%d (%s, %d allowed sender(s))",
            s.ae_title, host, port, "TLS" if ssl_context else "plain TCP", len(s.allowed),
        )

    def _verify_connection(self, server: Any, client_address: Any) -> bool:
        """socketserver's accept-time hook: True lets the connection in, False closes it at once."""
        try:
            address = str(client_address[0])
            ip = _parse_ip(address)
            allowed = ip is not None and any(ip in ipaddress.ip_network(p.host) for p in self.section.allowed)
            # A source address no allowed entry covers keeps one connection (answered with an
            # A-ASSOCIATE-RJ naming it); any more from it are closed here.
            cap = self.section.max_associations_per_peer if allowed else 1
            now = time.monotonic()
            # An accepted connection's association thread starts a moment later: from an address
            # not allowed, a connection accepted in the last second counts as held until its
            # thread shows (an allowed sender may reconnect at once, and is counted by threads).
            recent = [t for t in self._recent_accepts.get(address, []) if now - t < 1.0] if not allowed else []
            held = sum(1 for a in server.active_associations if str(a.requestor.address or "") == address)
            held = max(held, len(recent))
            if held < cap:
                self._recent_accepts[address] = [*recent, now]
                return True
            self._recent_accepts[address] = recent
            reason = f"{held} connection(s) already open from this {'' if allowed else 'not allowed '}address"
        except Exception as exc:  # noqa: BLE001 - refuse on any doubt
            address, reason = "?", f"unreadable address ({type(exc).__name__})"
        self._status.bump("connections_refused", "last_refused_at")
        now = time.monotonic()
        if now - self._last_conn_log.get(address, -1e9) >= 10.0:  # one line per address per 10 s
            self._last_conn_log[address] = now
            self.log.warning("intake: connection from %s closed at accept: %s", _printable(address), reason)
        return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, let running associations finish (at most ``timeout_s``), abort the
        rest, and save the counters."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        deadline = time.monotonic() + timeout_s
        for assoc in list(server.active_associations):
            if not assoc.is_established:
                # Connected but never associated (silent, or a failed TLS handshake): pynetdicom
                # holds such a thread until its ACSE timeout. Nothing can be stored through it:
                # close its socket and do not wait.
                _shutdown_socket(assoc)
                continue
            assoc.join(timeout=max(0.0, deadline - time.monotonic()))
            if assoc.is_alive():
                assoc.abort()
        self._ae = None
        self._status.save()
        self.log.info("intake: DICOM SCP stopped")

    def __enter__(self) -> IntakeServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- association events

    @staticmethod
    def _peer(assoc: Any) -> tuple[str, str]:
        """(calling AE title, address) of an association's requestor, safe to log."""
        primitive = getattr(assoc.requestor, "primitive", None)
        ae_title = getattr(primitive, "calling_ae_title", None) or assoc.requestor.ae_title or ""
        return _printable(str(ae_title).strip(" ")), _printable(assoc.requestor.address or "")

    def _on_requested(self, event: evt.Event) -> None:
        """Refuse, before any negotiation, a sender not on the allow-list (or a wrong called AE)."""
        assoc = event.assoc
        try:
            primitive = assoc.requestor.primitive
            if primitive is None:
                raise ValueError("no A-ASSOCIATE request")
            calling = str(primitive.calling_ae_title or "")
            called = str(primitive.called_ae_title or "").strip(" ")
            address = str(assoc.requestor.address or "")
            allowed = any(p.matches(calling, address) for p in self.section.allowed)
            reason = None
            if not allowed:
                reason, diagnostic = "calling AE title/address not allowed", 0x03
            elif self.section.require_called_ae_title and called != self.section.ae_title:
                reason, diagnostic = "called AE title not ours", 0x07
        except Exception as exc:  # noqa: BLE001 - refuse on any doubt
            reason, diagnostic = f"unreadable request ({type(exc).__name__})", 0x01
        if reason is None:
            return
        ae_title, addr = self._peer(assoc)
        self._status.bump("associations_refused", "last_refused_at")
        self.log.warning("intake: association refused from AE '%s' at %s: %s", ae_title, addr, reason)
        # Permanent rejection by the service user (PS3.8 9.3.4); the reactor then skips negotiation.
        assoc.acse.send_reject(0x01, 0x01, diagnostic)
        assoc.kill()

    def _on_rejected(self, event: evt.Event) -> None:
        """pynetdicom's own refusals (too many associations, protocol errors)."""
        ae_title, addr = self._peer(event.assoc)
        self._status.bump("associations_refused", "last_refused_at")
        self.log.warning(
            "intake: association refused from AE '%s' at %s by the DICOM layer (e.g. too many associations)",
            ae_title, addr,
        )

    def _on_accepted(self, event: evt.Event) -> None:
        ae_title, addr = self._peer(event.assoc)
        self._status.bump("associations_accepted")
        self.log.info("intake: association accepted from AE '%s' at %s", ae_title, addr)

    def _on_conn_open(self, event: evt.Event) -> None:
        """Bound every read of the connection: accepted sockets are blocking, so a sender that
        stops half-way through a PDU (or a TLS handshake) would hold its thread for ever; and put
        the PDU-length guard (:func:`_guard_pdu_reads`) in front of pynetdicom's reads."""
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        if sock is not None:
            sock.settimeout(self.section.network_timeout_s)
        try:
            _guard_pdu_reads(event.assoc, self.section, self.log)
        except Exception as exc:  # noqa: BLE001 - no guard, no connection
            self.log.error("intake: cannot guard a connection (%s); closed", type(exc).__name__)
            _shutdown_socket(event.assoc)

    def _on_conn_close(self, event: evt.Event) -> None:
        with self._pending_lock:
            self._pending.pop(event.assoc, None)
            self._cut.discard(event.assoc)
        self._status.save()

    def _on_pdu_recv(self, event: evt.Event) -> None:
        """Memory guard: once the data set being received passes ``max_instance_bytes``, keep
        none of the rest of it.

        pynetdicom assembles a C-STORE data set in memory before the C-STORE handler runs. Past
        the cap, this handler empties each further data-set fragment of the PDU it is handed
        (keeping the fragment's control byte, so the message still completes), and marks the
        message: the C-STORE handler then refuses that one instance with 0xA700 and the
        association carries on with the next. If a pynetdicom release stopped passing the PDU
        by reference, the C-STORE handler's own size check would still refuse the instance
        (only the memory bound would be lost).
        """
        items = getattr(event.pdu, "presentation_data_value_items", None)
        if not items:
            return
        assoc = event.assoc
        cap = self.section.max_instance_bytes
        with self._pending_lock:
            size, cut = self._pending.get(assoc, (0, False))
            for item in items:
                pdv = item.presentation_data_value
                if not pdv or pdv[0] & 0x01:  # a command fragment
                    continue
                if not cut:
                    size += len(pdv) - 1
                    cut = size > cap
                if cut:
                    item.presentation_data_value = pdv[:1]
                if pdv[0] & 0x02:  # the data set's last fragment
                    if cut:
                        self._cut.add(assoc)
                    size, cut = 0, False
            self._pending[assoc] = (size, cut)

    def _was_cut(self, assoc: Any) -> bool:
        with self._pending_lock:
            if assoc in self._cut:
                self._cut.discard(assoc)
                return True
            return False

    # ----------------------------------------------------------------- DIMSE services

    def _on_echo(self, event: evt.Event) -> int:
        self._status.bump("echoes")
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        """Store one instance as received; never raises (pynetdicom would log the exception)."""
        self._status.bump("received", "last_received_at")
        try:
            request = cast(C_STORE, event.request)
            if self._was_cut(event.assoc):
                return self._refuse(event, STATUS_OUT_OF_RESOURCES, R_TOO_LARGE, "dropped while being received")
            dataset_size = request.DataSet.getbuffer().nbytes if request.DataSet is not None else 0
            part10 = event.encoded_dataset()
            status, reason, sop_instance = check_instance(
                part10,
                dataset_size,
                str(request.AffectedSOPClassUID or ""),
                str(request.AffectedSOPInstanceUID or ""),
                self.section.max_instance_bytes,
            )
            if reason is not None:
                return self._refuse(event, status, reason)
            return self._store(event, part10, sop_instance)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the temp file is gone: nothing partial
                return self._refuse(event, STATUS_OUT_OF_RESOURCES, R_DISK_FULL)
            self._status.bump("failed")
            self.log.error("intake: cannot write an instance (%s, errno %s)", type(exc).__name__, exc.errno)
            return STATUS_OUT_OF_RESOURCES
        except Exception as exc:  # noqa: BLE001 - the exception text could quote a value: type only
            self._status.bump("failed")
            self.log.error("intake: failed to store an instance (%s)", type(exc).__name__)
            return STATUS_CANNOT_UNDERSTAND
        finally:
            self._status.save(min_interval_s=2.0)

    def _refuse(self, event: evt.Event, status: int, reason: str, note: str = "") -> int:
        """Count and log a refused instance (reason code only), and return its status."""
        ae_title, addr = self._peer(event.assoc)
        self._status.bump("rejected")
        if reason in (R_QUOTA, R_FLOOR, R_DISK_FULL):
            return self._refuse_for_space(ae_title, addr, status, reason)
        self.log.warning(
            "intake: instance from AE '%s' at %s refused: %s%s (status 0x%04X)",
            ae_title, addr, reason, f", {note}" if note else "", status,
        )
        return status

    def _refuse_for_space(self, ae_title: str, addr: str, status: int, reason: str) -> int:
        """Out of space: one line at the first refusal and then at most one a minute (a PACS
        pushing a study into a full store would otherwise write a line per instance, maybe onto
        the same full disk), each saying how many were refused since the last."""
        self._status.bump("out_of_space", "last_refused_at")
        now = time.monotonic()
        with self._space_log_lock:
            self._space_refused += 1
            if now - self._space_logged_at < 60.0:
                return status
            count, self._space_refused, self._space_logged_at = self._space_refused, 0, now
        self.log.warning(
            "intake: instance from AE '%s' at %s refused: %s (status 0x%04X); %d refused for space since the last line",
            ae_title, addr, reason, status, count,
        )
        return status

    def _space_back(self) -> None:
        """After refusals for space, the first instance stored again says so in one line."""
        with self._space_log_lock:
            if not self._space_logged_at > -1e18:
                return
            count, self._space_refused, self._space_logged_at = self._space_refused, 0, -1e18
        self.log.warning("intake: space available again: accepting instances (%d more refused before)", count)

    def _store(self, event: evt.Event, part10: bytes, sop_instance_uid: str) -> int:
        """Write a checked instance unless its path is taken; returns the C-STORE status.

        The same bytes again: success, nothing written (a PACS retrying after a lost response).
        Other bytes under a stored SOP Instance UID: refused with 0xC111, the stored file is
        kept (the first version wins; a re-sent, changed instance is never silently written
        over it). A new instance is written only when the quota and the floor allow it.
        """
        path = intake_path(self.dicom_dir, sop_instance_uid)
        with self._path_locks[int(path.stem[:2], 16) % len(self._path_locks)]:
            if os.path.lexists(path):
                if _same_bytes(path, part10):
                    self._status.bump("duplicates")
                    return STATUS_SUCCESS
                self._status.bump("conflicts")
                # The UID's hash prefix names the stored file for the operator; the UID stays out.
                return self._refuse(event, STATUS_DUPLICATE_CONFLICT, R_CONFLICT, f"stored as {path.stem[:12]}")
            nbytes = len(part10)
            reason = self._space.reserve(nbytes)
            if reason is not None:
                return self._refuse(event, STATUS_OUT_OF_RESOURCES, reason)
            try:
                if not path.parent.is_dir():
                    _mkdir_private(path.parent)
                _write_atomic(path, part10)
            except BaseException:
                self._space.release(nbytes)
                raise
        self._status.set("store_bytes", self._space.used)
        self._status.bump("written", "last_written_at")
        if self._space_logged_at > -1e18:
            self._space_back()
        return STATUS_SUCCESS


def _sweep_temp_files(root: Path, min_age_s: float = 600.0) -> None:
    """Remove temp files left by a crash mid-write (hidden ``.*.tmp``, older than ``min_age_s``)."""
    cutoff = time.time() - min_age_s
    for tmp in root.glob("*/.*.tmp"):
        try:
            if tmp.is_file() and tmp.stat().st_mtime < cutoff:
                tmp.unlink()
        except OSError:
            pass


# Largest A-ASSOCIATE-RQ (and any PDU other than P-DATA-TF) read before negotiation. A request
# holds at most 128 presentation contexts (PS3.8 9.3.2.2: odd IDs 1-255) of an abstract syntax and
# its transfer syntaxes, a few hundred bytes each with the usual few.
MAX_REQUEST_PDU = 64 * 1024
# Allowance over the negotiated maximum for a P-DATA-TF PDU (senders that count the PDU header).
PDU_MARGIN = 1024
# Largest command set of one DIMSE message, over all its fragments. A command set is a few
# hundred bytes (a C-STORE request's is under 1 KiB); pynetdicom joins the fragments of one
# in memory, with no limit, until a fragment carries the last-fragment bit.
MAX_COMMAND_BYTES = 64 * 1024
_PDU_TYPES_KNOWN = frozenset(range(1, 8))


class _BoundedPduReader:
    """Stands in front of pynetdicom's :class:`~pynetdicom.transport.AssociationSocket` of one
    accepted connection and bounds every PDU before its body is read.

    pynetdicom's DUL reads a PDU with ``recv(6)`` (type and declared length) and then
    ``recv(length)``, which reads the whole body into memory, up to the 4 GiB the header may
    declare, before any check. Here the header is checked first: a P-DATA-TF PDU may declare at
    most our own maximum PDU receive size plus :data:`PDU_MARGIN`, and only once the association
    is established; any other PDU at most :data:`MAX_REQUEST_PDU`. A PDU over its limit gets an
    A-ABORT, the connection is shut down, one line is logged (address and declared length), and
    the DUL sees the connection closed. Each PDU must also arrive whole within
    ``network_timeout_s`` of its first byte (the A-ASSOCIATE-RQ within ``acse_timeout_s`` of the
    connection), so a sender trickling bytes cannot hold the thread. The command fragments of
    each P-DATA-TF body are counted too: a command set passing :data:`MAX_COMMAND_BYTES` (a
    sender that never sets the last-fragment bit) is aborted the same way. Everything else is
    passed to the wrapped socket.
    """

    def __init__(self, inner: Any, assoc: Any, section: IntakeSection, log: logging.Logger) -> None:
        self._inner = inner
        self._assoc = assoc
        self._section = section
        self._log = log
        self._need: int | None = None  # body bytes the DUL asks next (None: a header comes next)
        self._pdu_type = 0  # type of the PDU whose body comes next
        self._command_bytes = 0  # bytes of the command set being received
        self._closed = False
        self._request_deadline = time.monotonic() + section.acse_timeout_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def ready(self) -> bool:
        return False if self._closed else bool(self._inner.ready)

    def _refuse(self, reason: str) -> bytearray:
        addr = _printable(getattr(self._assoc.requestor, "address", "") or "")
        self._log.warning("intake: connection from %s aborted: %s", addr, reason)
        self._closed = True
        raw = self._inner.socket
        if raw is not None:
            try:
                # A-ABORT, source 2 (service provider), reason 6 (invalid PDU parameter value).
                raw.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06")
            except OSError:
                pass
            try:
                raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return bytearray()  # the DUL reads a short PDU: transport connection closed (Evt17)

    def _read(self, n: int, deadline: float) -> bytearray:
        raw = self._inner.socket
        out = bytearray()
        while raw is not None and len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                return self._refuse("a PDU did not arrive in time")
            raw.settimeout(min(left, self._section.network_timeout_s))
            try:
                chunk = raw.recv(min(65536, n - len(out)))
            except (TimeoutError, socket.timeout):
                return self._refuse("a PDU did not arrive in time")
            if not chunk:
                break
            out += chunk
        return out

    def recv(self, nr_bytes: int) -> bytearray:
        if self._closed:
            return bytearray()
        established = bool(self._assoc.is_established)
        start = time.monotonic()
        deadline = start + self._section.network_timeout_s
        if not established:
            deadline = min(deadline, self._request_deadline)
        if self._need is None:  # a PDU header
            if nr_bytes != 6:
                return self._refuse("unexpected read pattern")
            head = self._read(6, deadline)
            if len(head) < 6 or self._closed:
                return head
            pdu_type, length = head[0], int.from_bytes(head[2:6], "big")
            if pdu_type == 0x04 and established:
                limit = self._assoc.acceptor.maximum_length or self._section.max_pdu
                limit = int(limit) + PDU_MARGIN
            else:
                limit = MAX_REQUEST_PDU
            if length > limit:
                return self._refuse(f"PDU type 0x{pdu_type:02X} declares {length} bytes, over the limit of {limit}")
            if pdu_type in _PDU_TYPES_KNOWN:
                self._need, self._pdu_type = length, pdu_type
            return head
        need, self._need = self._need, None
        if nr_bytes != need:
            return self._refuse("unexpected read pattern")
        body = self._read(need, deadline)
        if self._pdu_type == 0x04 and len(body) == need and not self._closed and self._command_too_long(body):
            return self._refuse(f"a command set passes the limit of {MAX_COMMAND_BYTES} bytes")
        return body

    def _command_too_long(self, body: bytearray) -> bool:
        """Count the command fragments of a P-DATA-TF body (PS3.8 9.3.5: items of a 4-byte
        length, the presentation context ID, the message control header, the fragment); True
        once one message's command set passes :data:`MAX_COMMAND_BYTES`. A malformed item list is
        left to pynetdicom, which aborts on it."""
        off, end = 0, len(body)
        while off + 6 <= end:
            item_len = int.from_bytes(body[off : off + 4], "big")
            if item_len < 2:
                return False
            control = body[off + 5]
            if control & 0x01:  # a command fragment
                self._command_bytes += item_len - 2
                if self._command_bytes > MAX_COMMAND_BYTES:
                    return True
                if control & 0x02:  # its last fragment
                    self._command_bytes = 0
            off += 4 + item_len
        return False


def _guard_pdu_reads(assoc: Any, section: IntakeSection, log: logging.Logger) -> None:
    """Put :class:`_BoundedPduReader` in front of an accepted association's socket.

    The one adapter to pynetdicom's internals (written against pynetdicom 3.0.4): it replaces
    ``assoc.dul.socket`` (what ``DULServiceProvider._read_pdu_data`` reads with ``recv(6)`` and
    ``recv(pdu_length)``, and polls with ``ready``) before the association's threads start
    (EVT_CONN_OPEN is triggered in ``RequestHandler.handle`` before ``assoc.start()``).
    ``tests/test_intake_doors.py`` fails if those internals change.
    """
    dul = assoc.dul
    inner = dul.socket
    if inner is None or isinstance(inner, _BoundedPduReader):
        return
    dul.socket = _BoundedPduReader(inner, assoc, section, log)


def _shutdown_socket(assoc: Any) -> None:
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _same_bytes(path: Path, data: bytes) -> bool:
    try:
        if path.stat().st_size != len(data):
            return False
        with open(path, "rb") as f:
            return _chunks_equal(f, data)
    except OSError:
        return False


def _chunks_equal(f: io.BufferedReader, data: bytes, chunk: int = 1 << 20) -> bool:
    view = memoryview(data)
    for start in range(0, len(data), chunk):
        if f.read(chunk) != view[start : start + chunk]:
            return False
    return f.read(1) == b""


def _quiet_pynetdicom() -> None:
    """Keep pynetdicom from logging data: no standard event logging (it prints command sets and
    PDUs at INFO/DEBUG), no C-FIND/C-GET/C-MOVE identifier dumps, and its logger at WARNING or
    quieter. These are process-wide settings of pynetdicom."""
    _pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    _pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    _pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    lg = logging.getLogger("pynetdicom")
    if lg.level < logging.WARNING:
        lg.setLevel(logging.WARNING)


def iter_intake_files(dicom_dir: Path) -> Iterator[Path]:
    """Every stored instance under ``<dicom_dir>/intake`` (temp files excluded), sorted."""
    root = Path(dicom_dir) / "intake"
    if not root.is_dir():
        return iter(())
    return iter(sorted(p for p in root.glob("*/*.dcm") if not p.name.startswith(".")))


def serve(site_yaml: Path) -> int:
    """Run the site's Storage SCP until SIGTERM or SIGINT (the site daemon runs this as its own
    supervised child: ``python -m dicomfl.client.intake SITE_YAML``). Returns the exit code:
    0 after a signal, 2 when the config or the port cannot be used (one line on stderr)."""
    import signal
    import sys

    from dicomfl.common.config import load_site_config
    from dicomfl.common.errors import DicomflError
    from dicomfl.common.logs import setup

    try:
        cfg = load_site_config(site_yaml, check_files=False)
        if cfg.site.intake is None:
            raise IntakeError(f"{site_yaml}: site.intake: not configured")
        # pydicom and pynetdicom warn about what a sender sent (quoting it): their records and
        # Python warnings go to the intake's log through the redacting filter, not to stderr.
        setup(cfg.site.state_dir, "intake", console_level=logging.ERROR, libraries=True)
        server = IntakeServer(cfg.site.intake, cfg.site.dicom_dir, cfg.site.state_dir)
        server.start()
    except (DicomflError, IntakeError) as exc:
        print(f"dicomfl intake: error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(5.0):
        if not server.running:
            return 1
    server.stop()
    return 0


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        print("usage: python -m dicomfl.client.intake SITE_YAML", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(serve(Path(sys.argv[1])))
