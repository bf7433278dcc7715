"""Config schemas: ``site.yaml``, ``run.yaml`` (with its ``model:``) and ``coordinator.yaml``.

The keys shown in the README's "Configuration" section are a contract that scripts rely on
(``site.name``, ``site.dicom_dir``, ``site.labels``, ``site.label_key``, ``site.secret_file``,
``site.state_dir``, ``preprocess``, ``privacy``, ``train``; ``run``, ``cross_site``, ``model``):
keys are added, never renamed. Unknown keys, wrong types and missing files are errors that name
the file and key. Relative paths are resolved against the folder holding the YAML file.

This module imports neither torch nor the data path (a test holds it to that): loading a config
is cheap, for every command.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, printable

LabelKey = Literal["path", "sop_instance_uid", "study_instance_uid", "accession_number", "patient_id"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- DICOM intake (the site SCP)


def parse_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address from a peer address string (a zone index dropped, IPv4-mapped IPv6 unwrapped)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _check_ae_title(value: str) -> str:
    """An AE title: 1-16 characters of the DICOM default repertoire, no backslash, no control
    characters; leading and trailing spaces are not significant (PS3.5 6.2, VR AE)."""
    stripped = value.strip(" ")
    if not 1 <= len(stripped) <= 16:
        raise ValueError("an AE title has 1 to 16 characters (spaces around it do not count)")
    for ch in stripped:
        if ch == "\\" or not 0x20 <= ord(ch) <= 0x7E:
            raise ValueError("an AE title holds printable ASCII characters other than backslash")
    return stripped


AETitle = Annotated[str, AfterValidator(_check_ae_title)]


class AllowedPeer(_Strict):
    """One sender allowed to push: its calling AE title and its source address.

    ``host`` is an IP address or a network in CIDR notation (``10.1.2.0/24``); host names are not
    resolved (a DNS answer must not decide who may push images).
    """

    ae_title: AETitle
    host: str

    @field_validator("host")
    @classmethod
    def _ip_or_network(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError:
            raise ValueError("host must be an IP address or a CIDR network, not a host name") from None

    def matches(self, ae_title: str, address: str) -> bool:
        """True when this entry allows ``ae_title`` calling from ``address``."""
        if ae_title.strip(" ") != self.ae_title:
            return False
        ip = parse_ip(address)
        return ip is not None and ip in ipaddress.ip_network(self.host)


class IntakeTLS(_Strict):
    """DICOM TLS (PS3.15 Annex B): the SCP's certificate and key, and optionally the CA that
    signs the senders' client certificates (then every sender must present one)."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None



class IntakeSection(_Strict):
    """The ``intake:`` section of a site config: the site's DICOM Storage SCP.

    Attributes
    ----------
    port : int
        TCP port to listen on (0 picks a free port, for tests).
    host : str
        Bind address, an IP literal (``127.0.0.1`` by default; ``0.0.0.0`` for all interfaces).
    ae_title : str
        The SCP's own AE title.
    require_called_ae_title : bool
        Refuse associations whose Called AE Title is not ``ae_title``.
    allowed : list of AllowedPeer
        Who may push (calling AE title and source address). Empty means nobody.
    max_pdu : int
        Largest PDU the SCP receives, in bytes (what it tells the sender).
    max_associations : int
        Associations served at once; more are refused (transient).
    max_associations_per_peer : int
        Connections open at once from one allowed source address; more are closed at TCP accept.
        A source address no ``allowed`` entry covers gets one connection at a time (refused at
        association); more are closed at accept, before any thread or PDU.
    max_instance_bytes : int
        Largest instance accepted (encoded data set size). A larger one is refused with status
        0xA700 and the association goes on; the part received past the cap is dropped as it
        arrives, so memory holds at most about twice this per association (the received data set
        and its Part 10 copy).
    max_store_gb : float or None
        Quota of the intake's store (``<dicom_dir>/intake``), in GiB (2**30 bytes; fractions
        allowed). An instance that would take the store past it is refused with status 0xA700;
        the store is counted once at start and then kept as a running total. None: no quota.
    min_free_gb : float
        Free-space floor of the file system holding the store, in GiB. An instance that would
        leave less free space than this is refused with status 0xA700; both checks are made on
        every C-STORE, so the intake accepts again as soon as space returns. 0: no floor.
    acse_timeout_s, dimse_timeout_s, network_timeout_s : float
        pynetdicom's association, message and idle-network timeouts.
    tls : IntakeTLS or None
        DICOM TLS; plain TCP when absent.
    """

    port: int = Field(ge=0, le=65535)
    host: str = "127.0.0.1"
    ae_title: AETitle = "DICOMFL"
    require_called_ae_title: bool = True
    allowed: list[AllowedPeer] = Field(default_factory=list)
    max_pdu: int = Field(default=262_144, ge=4096, le=0xFFFFFFFF)
    max_associations: int = Field(default=8, ge=1, le=256)
    max_associations_per_peer: int = Field(default=4, ge=1, le=256)
    max_instance_bytes: int = Field(default=1024**3, ge=1024)
    max_store_gb: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    min_free_gb: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    acse_timeout_s: float = Field(default=30.0, gt=0)
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    network_timeout_s: float = Field(default=120.0, gt=0)
    tls: IntakeTLS | None = None

    @field_validator("host")
    @classmethod
    def _ip_literal(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_address(v.strip()))
        except ValueError:
            raise ValueError("host must be an IP address to bind to (e.g. 127.0.0.1 or 0.0.0.0)") from None


class SiteSection(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    dicom_dir: Path
    labels: Path | None = None
    label_key: LabelKey = "accession_number"
    # A DICOM Storage SCP in the site daemon (dicomfl.client.intake): a PACS pushes studies here.
    intake: "IntakeSection | None" = None
    # The labels CSV's columns. By default the key column is named after label_key or after its
    # DICOM keyword (accession_number or AccessionNumber, ...) and the value column is "label";
    # these name them explicitly.
    labels_key_column: str | None = Field(default=None, min_length=1, max_length=256)
    labels_value_column: str | None = Field(default=None, min_length=1, max_length=256)
    # Labels are the integers 0..n_classes-1; a row outside that range stops ingestion (exit 2).
    n_classes: int = Field(default=2, ge=2, le=1000)
    secret_file: Path
    state_dir: Path


class DeidSection(_Strict):
    """PS3.15 Annex E options the site applies on top of the Basic profile (all explicit)."""

    # Keeps Patient's Age/Sex/Size/Weight (so age and sex can be features).
    retain_patient_characteristics: bool = True
    # Shifts dates by a per-patient offset instead of removing them (keeps intervals).
    retain_longitudinal_modified_dates: bool = False
    # Site proxies: off by default, and never used as features even when on.
    retain_device_identity: bool = False
    retain_institution_identity: bool = False


class PreprocessSection(_Strict):
    image_size: int = Field(default=128, ge=8, le=2048)
    # Multi-frame policy: one sample per file, taken from the middle (or first) frame.
    multiframe: Literal["middle", "first"] = "middle"
    # Colour images: converted to luminance (ITU-R BT.601) or rejected.
    color: Literal["luminance", "reject"] = "luminance"
    # Cap on rows x columns x frames x samples, checked from the header before decoding.
    max_pixels: int = Field(default=256 * 1024 * 1024, ge=1)


class IngestSection(_Strict):
    """How ingestion runs: every file is read, checked, de-identified and decoded in a worker
    process (a crash, hang or runaway allocation in a native decoder costs only that file)."""

    # Worker processes; null: the CPUs this process may use.
    workers: int | None = Field(default=None, ge=1, le=1024)
    # A file still decoding after this long is rejected (reason "timeout"); its worker is killed.
    file_timeout_s: float = Field(default=300.0, gt=0)
    # Address space each worker may add to its start-up size (file mapping + decode); over it the
    # file is rejected ("worker-memory"). null: no limit.
    worker_memory_mb: int | None = Field(default=4096, ge=64)
    # Files larger than this are rejected ("too-large") without being read.
    max_file_bytes: int = Field(default=1 << 30, ge=1024)


class SplitsSection(_Strict):
    val: float = Field(default=0.15, ge=0.0, lt=1.0)
    test: float = Field(default=0.15, ge=0.0, lt=1.0)
    seed: int = 0

    @field_validator("test")
    @classmethod
    def _fractions(cls, v: float, info: Any) -> float:
        if v + info.data.get("val", 0.0) >= 1.0:
            raise ValueError("val + test must be below 1")
        return v


_DEPRECATED_SEEN: set[str] = set()


def _deprecated(key: str, instead: str) -> None:
    """One line, once per process, for a key that is still accepted for one release."""
    if key not in _DEPRECATED_SEEN:
        _DEPRECATED_SEEN.add(key)
        import logging

        logging.getLogger("dicomfl.config").warning("%s is deprecated (accepted for one release): %s", key, instead)


class PrivacySection(_Strict):
    """The site's privacy policy: it decides, whatever a run asks (client/privacy/account.py: a
    run's ``privacy:`` may ask for less privacy loss, never more)."""

    dp: bool = False
    # The per-run cap: the most one run's model (the global model with the releases made for it,
    # the local baseline, the personalized model: each its own stream) may spend of this site's data.
    run_epsilon: float | None = Field(default=8.0, gt=0)
    # The lifetime budget of the site's data: everything every run releases, composed.
    lifetime_epsilon: float | None = Field(default=8.0, gt=0)
    delta: float = Field(default=1.0e-5, gt=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    noise_multiplier: float | None = Field(default=None, ge=0)
    accountant: Literal["rdp", "prv"] = "rdp"
    # Opacus per-sample gradient engine: hooks (the fastest), functorch (less memory) or ghost
    # (Opacus falls back for convolutions); timings: benchmarks/results/train-step-2026-11-22.md.
    grad_sample_mode: Literal["hooks", "functorch", "ghost"] = "hooks"
    # Class-balanced loss weights under DP. "noisy": the label counts are released once per run with
    # Gaussian noise (this multiplier; L2 sensitivity 1) and charged to the site's privacy ledger
    # (`dicomfl privacy plan` shows what it adds). "none": unweighted loss, nothing released.
    class_weights: Literal["noisy", "none"] = "noisy"
    count_noise_multiplier: float = Field(default=10.0, gt=0)
    # Federated feature statistics under DP (dicomfl.client.fedstats): the per-feature counts, sums and
    # sums of squares of the training split are released once per run with Gaussian noise of this
    # multiplier times their L2 sensitivity sqrt(3 x released features), charged to the site's ledger.
    stats_noise_multiplier: float = Field(default=4.0, gt=0)
    # Train and send a local-only model (trained on this site's data alone) when a run asks for one
    # as a baseline. It is another release of the site's data, to the coordinator and to every
    # other site (cross-site validation): off unless the site opts in. Under DP it is charged to
    # the same budget as everything else.
    share_local_model: bool = False
    # Replicate AUROCs (dicomfl.common.protocol.AUROC_REPLICATES): at most this many per evaluated
    # model, when the coordinator asks (run.yaml cross_site.replicates). They are B AUROCs of each
    # model on resamples of this site's test split, for paired comparisons between models; 0 (the
    # default) sends none, whatever the coordinator asks.
    eval_replicates: int = Field(default=0, ge=0, le=5000)

    @model_validator(mode="before")
    @classmethod
    def _old_target(cls, data: Any) -> Any:
        # privacy.target_epsilon (deprecated) was both budgets: it still sets both, for one release
        if isinstance(data, dict) and "target_epsilon" in data:
            if "run_epsilon" in data or "lifetime_epsilon" in data:
                raise ValueError("privacy.target_epsilon: replaced by run_epsilon and lifetime_epsilon; set only those")
            _deprecated("privacy.target_epsilon", "it sets both privacy.run_epsilon (the per-run cap) and "
                        "privacy.lifetime_epsilon (the data's lifetime budget); write those two keys instead")
            old = data["target_epsilon"]
            data = {**{k: v for k, v in data.items() if k != "target_epsilon"}, "run_epsilon": old, "lifetime_epsilon": old}
        return data


class AugmentSection(_Strict):
    """Acquisition-shift augmentation of training batches (dicomfl.common.augment): the ranges of
    each random draw; 0 turns a step off. No flips (left and right are anatomy)."""

    p: float = Field(default=0.8, ge=0, le=1)  # probability that an image is augmented at all
    gamma: float = Field(default=0.3, ge=0, le=1)  # log-gamma of the intensity curve, +-
    contrast: float = Field(default=0.15, ge=0, le=0.5)
    brightness: float = Field(default=0.1, ge=0, le=1)  # in robust-scaled units
    blur: float = Field(default=0.8, ge=0, le=3)  # largest Gaussian sigma, pixels
    rotate_deg: float = Field(default=5.0, ge=0, le=15)
    scale: float = Field(default=0.05, ge=0, le=0.2)
    noise: float = Field(default=0.05, ge=0, le=0.5)  # largest noise standard deviation, scaled units


#: Defaults of ``train.max_model_parameters`` / ``train.max_model_memory_mb``. The models dicomfl
#: trains have well under a million parameters.
MAX_MODEL_PARAMETERS = 50_000_000
MAX_MODEL_MEMORY_MB = 8192


class TrainSection(_Strict):
    """How the site trains. How long (epochs or steps per round) is the run's to say (``run.local_epochs``)."""

    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1.0e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    seed: int = 0
    # The local optimizer. SCAFFOLD (run.strategy: scaffold) assumes plain SGD local steps: a site
    # joins a SCAFFOLD run only with "sgd" (and an lr that suits SGD, e.g. 0.05), else it refuses.
    optimizer: Literal["adam", "sgd"] = "adam"
    # Augment training batches as hospitals differ (null: off). ``augment: {}`` takes the defaults.
    augment: AugmentSection | None = None
    # The largest model this site builds: a coordinator's model description (or a run folder's, in
    # dicomfl predict) with more parameters, or an estimated training footprint (weights, gradients,
    # optimizer state and one batch's activations at batch_size) above this, is refused before
    # anything is allocated (dicomfl.common.model.check_model_size).
    max_model_parameters: int = Field(default=MAX_MODEL_PARAMETERS, ge=1)
    max_model_memory_mb: int = Field(default=MAX_MODEL_MEMORY_MB, ge=64)


    @model_validator(mode="before")
    @classmethod
    def _ignored_keys(cls, data: Any) -> Any:
        # ``train.local_epochs`` in a site config was never read (the run decides); files that
        # still carry it keep loading.
        if isinstance(data, dict) and "local_epochs" in data:
            data = {k: v for k, v in data.items() if k != "local_epochs"}
        return data


class FederationSection(_Strict):
    """How the site daemon reaches the coordinator (``dicomfl site start``)."""

    superlink: str = Field(default="127.0.0.1:9092", pattern=r"^[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}$")
    root_certificates: Path | None = None  # the federation CA certificate (PEM); required unless insecure
    auth_private_key: Path | None = None  # this site's SuperNode key (OpenSSH EC private key)
    insecure: bool = False  # plaintext gRPC: for loopback tests only
    port: int = Field(default=9094, ge=1, le=65535)  # the SuperNode's own runtime API, on loopback
    restart_backoff_s: float = Field(default=5.0, gt=0)
    # One long-lived worker process holds torch, the site's data and the trainers; the ClientApp
    # Flower starts per message only forwards to it (dicomfl.client.transport.warm). false: each message's
    # ClientApp does the work itself (imports torch, opens the data): slower; for comparison.
    warm_worker: bool = True
    # How a message reaches the warm worker. direct: the worker takes the SuperNode's ClientApp
    # tasks itself over the SuperNode's Runtime API (SuperNode in process isolation; no process per
    # message; dicomfl.client.transport.tasks). forwarder: Flower starts a flwr-clientapp process per
    # message, which forwards it over the worker's socket (dicomfl.client.transport.forwarder).
    message_path: Literal["direct", "forwarder"] = "direct"
    # direct: how often an idle worker asks the SuperNode for a task (seconds), until the SuperNode
    # first wakes it (wake_worker); from then on it is woken and asks only every second when idle.
    task_poll_s: float = Field(default=0.1, ge=0.01, le=60)
    # direct: the SuperNode wakes the worker (a datagram on a private socket next to the worker's)
    # as soon as a message has arrived. false: the worker only asks every task_poll_s (slower; for
    # comparison, benchmarks/round_bench.py).
    wake_worker: bool = True
    # The longest the SuperNode waits before asking the SuperLink again for a message (Flower's
    # own wait is a fixed 3 s with no option; dicomfl.client.transport.supernode caps it). Each idle site asks
    # the SuperLink 1/idle_poll_s times a second.
    idle_poll_s: float = Field(default=0.25, ge=0.05, le=3.0)


class SiteConfig(_Strict):
    site: SiteSection
    federation: FederationSection = FederationSection()
    deid: DeidSection = DeidSection()
    preprocess: PreprocessSection = PreprocessSection()
    ingest: IngestSection = IngestSection()
    splits: SplitsSection = SplitsSection()
    privacy: PrivacySection = PrivacySection()
    train: TrainSection = TrainSection()
    source: Path | None = Field(default=None, exclude=True)

    @property
    def secret_key(self) -> bytes:
        return read_site_key(self.site.secret_file)


#: The least key material a site key may hold (bytes; a key written as hex text counts half its length).
MIN_KEY_BYTES = 32
#: The least entropy a site key's bytes may show (bits: their count times their empirical Shannon
#: entropy per byte; 32 random bytes show about 150, hex or base64 text of them more).
MIN_KEY_BITS = 100


def key_weakness(key: bytes) -> str | None:
    """Why ``key`` (a site key file's stripped bytes) is too weak to key pseudonyms, or None.

    Hex text (even length, hex digits only) is read as the bytes it spells; anything else counts
    as raw bytes. Refused: fewer than :data:`MIN_KEY_BYTES` bytes; a shorter pattern repeated
    (``abcabc...``, 32 NUL bytes); less than :data:`MIN_KEY_BITS` bits by its byte counts. A
    heuristic that catches typed or placeholder keys, not a proof of randomness: make keys from
    the OS's entropy (``head -c 32 /dev/urandom | xxd -p -c 64``, which ``dicomfl synth`` also does).
    The reason never quotes the key."""
    import math
    from collections import Counter

    material = key
    if len(key) % 2 == 0 and key and all(c in b"0123456789abcdefABCDEF" for c in key):
        material = bytes.fromhex(key.decode("ascii"))
    n = len(material)
    if n < MIN_KEY_BYTES:
        return f"{n} bytes of key material, fewer than {MIN_KEY_BYTES} (hex text counts half its length)"
    for period in range(1, n // 2 + 1):
        if material[period:] == material[:-period]:
            return "a short pattern repeated"
    bits = -sum(c * math.log2(c / n) for c in Counter(material).values())
    if bits < MIN_KEY_BITS:
        return f"low entropy (about {bits:.0f} bits by its byte counts, fewer than {MIN_KEY_BITS})"
    return None


def read_site_key(path: Path) -> bytes:
    """The site's HMAC key (the file's bytes, surrounding whitespace stripped). Like ssh with a
    private key, a key file that group or others may read is refused; so is a weak key
    (:func:`key_weakness`: too short, a repeated pattern, low entropy), since it keys every
    pseudonym and the privacy ledger's seal. Errors name the file, never its content."""
    where = printable(str(path))
    try:
        mode = path.stat().st_mode
        key = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read site secret key ({type(exc).__name__})") from None
    if mode & 0o077:
        raise ConfigError(f"{where}: site secret key is readable by group or others (mode {mode & 0o777:o}); "
                          f"run: chmod 600 {where}")
    weak = key_weakness(key)
    if weak is not None:
        raise ConfigError(f"{where}: site secret key is too weak: {weak}; make one with: "
                          f"head -c 32 /dev/urandom | xxd -p -c 64 (a new key starts a new cache and new pseudonyms)")
    return key


def format_validation_error(source: Path, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML config file as a mapping; any problem is one :class:`ConfigError` line naming the file."""
    where = printable(str(path))
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read config ({type(exc).__name__})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{where}: not UTF-8 text (line {line}); save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML{line}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    return data


def validate_file(path: Path, model: type[BaseModel]):
    """Read a YAML config and validate it against ``model``; returns (config, the file's folder)."""
    data = load_yaml(path)
    try:
        cfg = model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(path, err)) from None
    return cfg, Path(path).resolve().parent


def _resolve(base: Path, p: Path | None) -> Path | None:
    if p is None:
        return None
    p = Path(p).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def load_site_config(path: str | Path, *, check_files: bool = True) -> SiteConfig:
    """Load ``site.yaml``; raise :class:`ConfigError` naming the file and key on any problem."""
    path = Path(path)
    cfg, base = validate_file(path, SiteConfig)
    s = cfg.site
    s.dicom_dir = _resolve(base, s.dicom_dir)
    s.labels = _resolve(base, s.labels)
    s.secret_file = _resolve(base, s.secret_file)
    s.state_dir = _resolve(base, s.state_dir)
    tls = s.intake.tls if s.intake is not None else None
    if tls is not None:
        tls.cert_file, tls.key_file, tls.ca_file = (_resolve(base, tls.cert_file), _resolve(base, tls.key_file),
                                                    _resolve(base, tls.ca_file))
    fed = cfg.federation
    fed.root_certificates = _resolve(base, fed.root_certificates)
    fed.auth_private_key = _resolve(base, fed.auth_private_key)
    cfg.source = path
    if check_files:
        if not s.dicom_dir.is_dir():
            raise ConfigError(f"{path}: site.dicom_dir: not a folder: {s.dicom_dir}")
        if s.labels is not None and not s.labels.is_file():
            raise ConfigError(f"{path}: site.labels: file not found: {s.labels}")
        if not s.secret_file.is_file():
            raise ConfigError(f"{path}: site.secret_file: file not found: {s.secret_file}")
        read_site_key(s.secret_file)
        for key in ("cert_file", "key_file", "ca_file"):
            f = getattr(tls, key, None) if tls is not None else None
            if f is not None and not f.is_file():
                raise ConfigError(f"{path}: site.intake.tls.{key}: file not found: {f}")
    return cfg


# --------------------------------------------------------------------------- run config

ModelMode = Literal["fused", "image", "metadata"]


class ModelConfig(BaseModel):
    """``model:`` in the run config (a contract: add keys, do not rename)."""

    model_config = ConfigDict(extra="forbid")

    mode: ModelMode = "fused"
    # The image size the network is trained at. It is the sites' ``preprocess.image_size``: the
    # network itself works at any size (global pooling), and images are resized once, at ingest.
    # None takes each site's size; a number is a check: a site whose preprocess.image_size differs
    # refuses the run (``ModelMismatch``) instead of resizing a second time.
    image_size: int | None = Field(default=None, ge=8, le=2048)
    width: int = Field(default=32, ge=4, le=256)  # channels of the first stage; doubled per stage
    depth: int = Field(default=3, ge=1, le=6)  # residual stages, each halves the resolution
    meta_hidden: int = Field(default=64, ge=4, le=1024)
    head_hidden: int = Field(default=64, ge=4, le=1024)
    n_classes: int = Field(default=2, ge=2, le=1000)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    groups: int = Field(default=8, ge=1)  # GroupNorm groups (capped by the channel count)
    # Metadata the sites agree on (dicomfl.common.fedstats): the numeric features are standardized at
    # every site with a mean and std the coordinator combines from the sites' training-split counts,
    # sums and sums of squares before round 1 (false: the schema's fixed scaling only).
    standardize_features: bool = True
    # Schema features (numeric names or categorical groups, e.g. pixel_spacing_mm, modality) whose
    # columns are zero at every site: site proxies and confounders. Their statistics are not released.
    drop_features: list[str] = Field(default_factory=list, max_length=64)

    @field_validator("drop_features")
    @classmethod
    def _known_features(cls, v: list[str]) -> list[str]:
        from .fedstats import check_drop_features

        return check_drop_features(v)




@dataclass(frozen=True)
class ParamBound:
    """One strategy parameter's type and range (``lo``/``hi`` None: unbounded on that side)."""

    kind: type  # int or float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is not allowed
    hi_open: bool = True  # hi itself is not allowed

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not allowed (one line), or None."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.kind is int and not isinstance(value, int)):
            return f"must be {'an int' if self.kind is int else 'a number'}"
        v = float(value)
        below = self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo)
        above = self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi)
        if below or above or v != v:
            lo = "-inf" if self.lo is None else f"{self.lo:g}"
            hi = "inf" if self.hi is None else f"{self.hi:g}"
            return f"must be in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        return None


_FRACTION = ParamBound(float, 0.0, 1.0)  # [0, 1)
_POSITIVE = ParamBound(float, 0.0, None, lo_open=True)
_FEDOPT = {"eta_l": _POSITIVE, "beta_1": _FRACTION, "beta_2": _FRACTION, "tau": _POSITIVE}
_KRUM_F = ParamBound(int, 0)

# The federated strategies a run can name, with the parameters each takes in run.strategy_params and
# their bounds: the pure data, checked when run.yaml is read. How each is built, the state it keeps
# across a resume and the replies it needs are its entry in dicomfl.server.strategies (one entry per
# name here; a test holds the two to the same names and parameters).
STRATEGY_TABLE: dict[str, dict[str, ParamBound]] = {
    "fedavg": {},
    "fedprox": {},
    "fedadam": dict(_FEDOPT),
    "fedyogi": dict(_FEDOPT),
    "fedadagrad": {"eta_l": _POSITIVE, "tau": _POSITIVE},
    "fedavgm": {"server_momentum": _FRACTION},
    "fedmedian": {},
    "fedtrimmedavg": {"beta": ParamBound(float, 0.0, 0.5)},
    "krum": {"num_malicious_nodes": _KRUM_F},
    "multikrum": {"num_malicious_nodes": _KRUM_F, "num_nodes_to_select": ParamBound(int, 1)},
    "bulyan": {"num_malicious_nodes": _KRUM_F},
    "scaffold": {},
}
STRATEGY_PARAMS: dict[str, frozenset[str]] = {k: frozenset(v) for k, v in STRATEGY_TABLE.items()}
FEDERATED_STRATEGIES: tuple[str, ...] = tuple(STRATEGY_TABLE)
StrategyName = Literal[FEDERATED_STRATEGIES]  # type: ignore[valid-type]


def strategy_params_problem(name: str, params: dict[str, Any]) -> str | None:
    """Why ``params`` cannot be strategy ``name``'s parameters (one line naming the key), or None."""
    takes = STRATEGY_TABLE[name]
    extra = sorted(set(params) - set(takes))
    if extra:
        return f"{name} does not take {extra}; it takes {sorted(takes) or 'none'}"
    for key in sorted(params):
        why = takes[key].problem(params[key])
        if why is not None:
            return f"{name}: {key} {why}"
    return None


class PersonalizeSection(_Strict):
    """``run.personalize``: after the last round each site fine-tunes the final global model on its
    own training split (client/personal.py) and keeps the best of ``checks + 1`` candidates (0,
    steps/checks, ..., steps) by its own validation AUROC."""

    steps: int = Field(default=20, ge=0, le=100_000)  # optimizer steps of fine-tuning (0: none)
    # Factor on the site's train.lr, at most 1 (like lr-scale: a coordinator can lower it, never raise it).
    lr_scale: float = Field(default=1.0, ge=1e-3, le=1.0)
    checks: int = Field(default=4, ge=1, le=20)  # validation checkpoints along the fine-tuning


class RunSection(_Strict):
    name: str = Field(default="run", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    rounds: int = Field(default=5, ge=1, le=10000)
    strategy: StrategyName = "fedavg"
    proximal_mu: float = Field(default=0.0, ge=0)
    min_sites: int = Field(default=2, ge=1)
    fraction_train: float = Field(default=1.0, gt=0, le=1)
    fraction_evaluate: float = Field(default=1.0, gt=0, le=1)
    round_timeout_s: float = Field(default=600, gt=0)
    # How often the coordinator asks the SuperLink for replies while a round is out (Flower's
    # send_and_receive waits a fixed 3 s). 0.25 s adds 0.125 s to a round on average. A failed pull
    # (e.g. "database is locked" from a busy SuperLink with its state in SQLite) doubles the wait,
    # up to 5 s, until a pull succeeds again; with the
    # SuperLink's state in memory (the coordinator's default) there is no SQLite to lock.
    poll_interval_s: float = Field(default=0.25, ge=0.01, le=10)
    # Messages in dicomfl's compact form (common/wire.py): 3 Flower objects a message instead of
    # about 10, each a request at every hop. Sites read both forms and answer in the one they were
    # asked in; a site on a dicomfl from before the form cannot read it, so during a rolling upgrade
    # the coordinator sets this to false until every site has the new version.
    compact_messages: bool = True
    local_epochs: int = Field(default=1, ge=1)
    local_steps: int | None = Field(default=None, ge=1)  # if set: S optimizer steps per round instead of epochs
    # The sites' learning rate over the rounds: constant, or a cosine from train.lr down to
    # lr_min_factor x train.lr at the last round. The coordinator sends each round's factor
    # (lr-scale, at most 1: it can lower a site's learning rate, never raise it).
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_min_factor: float = Field(default=0.1, ge=1e-3, le=1.0)
    out_dir: Path | None = None  # default: runs/<name>, relative to the working directory
    seed: int = 0
    # Server learning rate: eta of FedAdam/FedYogi/FedAdagrad, FedAvgM's server_learning_rate,
    # SCAFFOLD's eta_g. None: the strategy's own default (its entry in dicomfl.server.strategies:
    # 0.01 for the server optimizers, 1.0 for FedAvgM and SCAFFOLD). Ignored by the others.
    server_lr: float | None = Field(default=None, gt=0)
    # The strategy's own parameters (dicomfl.server.strategies), e.g. {num_malicious_nodes: 1}.
    strategy_params: dict[str, int | float] = Field(default_factory=dict)
    # ---- what one site's reply may do to the global model (checked before aggregation)
    # Reject an update whose L2 distance from the global model is above this multiple of the
    # global model's norm (works with any number of sites; 0 = off). Honest updates measured here:
    # 3-15% of the norm (Adam, lr 1e-3, 2-200 steps).
    max_update_norm_rel: float = Field(default=1.0, ge=0)
    # ... or above this many times the median distance of the round's updates (>= 3 left; 0 = off).
    # Also the ratio of SCAFFOLD's control-delta rule, whose honest spread is wider (5x seen).
    max_update_norm_ratio: float = Field(default=10.0, ge=0)
    # The model updates' median rule uses the smaller of this and max_update_norm_ratio (both > 0;
    # 0 = this one off). 4: a sign flip x9 or noise x5 of one site in three is out (10 let x9 in
    # every round, and clipping alone does not save the attacked site), and an honest site up to 4x
    # the median still counts (clipped, below). Not with strategy scaffold, whose control
    # corrections spread honest updates wider (4.8x seen): there only max_update_norm_ratio applies.
    max_update_median_ratio: float = Field(default=4.0, ge=0)
    # Clip each accepted update to this L2 distance from the global model (None = no clipping;
    # robust aggregation and central DP assume a fixed bound).
    clip_update_norm: float | None = Field(default=None, gt=0)
    # Clip (not reject) each accepted update to this many times the round's median update distance
    # (with 2 sites: the smaller of the two), so no site's step is more than this many honest
    # steps, and a large honest update still counts in its direction (0 = off).
    clip_update_median_ratio: float = Field(default=2.0, ge=0)
    # With >= 3 sites: reject an update whose cosine with the round's coordinate-wise median update
    # is below this (-1 = off). Off by default: with 3 sites on differing data the honest updates
    # are nearly orthogonal, and the median of three leans towards an outlier, so a x9 sign flip
    # still has a positive cosine with it (server/checks.py, direction_outliers).
    min_update_cosine: float = Field(default=-1.0, ge=-1, le=1)
    # Free riders, reported as such: an update within this fraction of the global model's norm of
    # the global model (it sent the model back; 0 = off) ...
    free_rider_rel: float = Field(default=1e-6, ge=0, lt=1)
    # ... or, with >= 3 sites, below this fraction of the round's median update distance (0 = off).
    free_rider_ratio: float = Field(default=0.01, ge=0, lt=1)
    # No site gets more than this share of the aggregation weight, whatever num-examples it
    # claims (1.0 = off; with 2 sites, 0.5 means equal weights).
    max_weight_share: float = Field(default=0.5, gt=0, le=1)
    # The largest num-examples a reply may claim, and how much it may grow over the site's last
    # accepted claim in this run (the training split does not change within a run).
    max_examples: int = Field(default=1_000_000, ge=1)
    max_examples_growth: float = Field(default=2.0, ge=1)
    # Personalization (client/personal.py): null = off. Each site makes a personalized model after
    # the last round; cross-site validation reports it as personal:<site> next to global and local.
    personalize: PersonalizeSection | None = None
    # FedBN's idea for GroupNorm: each site keeps, trains and uses its own GroupNorm affine
    # parameters; what it sends for them is the global model's value (nothing of its own), and the
    # coordinator checks that. Implies a personalization step at the end (0 fine-tuning steps
    # unless run.personalize says otherwise). Not with strategy scaffold.
    local_norm: bool = False
    # SCAFFOLD: the largest L2 norm of a site's control delta (a gradient-sized quantity). A site
    # refuses a server control above 1e4 (client/handler.py), so the bound can be at most that.
    max_control_norm: float = Field(default=1000.0, gt=0, le=1e4)


class CrossSiteSection(_Strict):
    every: int = Field(default=0, ge=0)  # 0 = at the end only
    local_baseline: bool = True
    # Ask each site for this many replicate AUROCs per model (paired comparisons; a site sends at
    # most its own privacy.eval_replicates, by default none). 0: ask for none.
    replicates: int = Field(default=0, ge=0, le=5000)


class RunPrivacySection(_Strict):
    """What the run asks of the sites. Each site keeps the last word: its own budget caps this one."""

    dp: bool = False
    target_epsilon: float | None = Field(default=8.0, gt=0)
    delta: float = Field(default=1.0e-5, gt=0, lt=1)


class RunConfig(_Strict):
    run: RunSection = RunSection()
    cross_site: CrossSiteSection = CrossSiteSection()
    model: ModelConfig = ModelConfig()
    privacy: RunPrivacySection = RunPrivacySection()
    sites: list[Path] = Field(default_factory=list)  # site configs the launcher/demo starts (optional)
    coordinator: Path | None = None  # the coordinator config (address, TLS) the run is submitted to
    source: Path | None = Field(default=None, exclude=True)

    @property
    def out_dir(self) -> Path:
        return self.run.out_dir if self.run.out_dir is not None else Path("runs") / self.run.name

    @model_validator(mode="after")
    def _local_norm(self) -> "RunConfig":
        if self.run.local_norm and self.run.strategy == "scaffold":
            raise ValueError("run.local_norm: not with run.strategy scaffold (its control update needs every "
                             "parameter's update)")
        return self

    @model_validator(mode="after")
    def _strategy_params(self) -> "RunConfig":
        why = strategy_params_problem(self.run.strategy, self.run.strategy_params)
        if why is not None:
            raise ValueError(f"run.strategy_params: {why}")
        return self


def run_config_dict(name: str, *, model: "ModelConfig | dict", sites: list = (), out_dir: "Path | str | None" = None,
                    rounds: int = 5, strategy: str = "fedavg", proximal_mu: float = 0.0, min_sites: int = 2,
                    local_epochs: int = 1, seed: int = 0, server_lr: float | None = None, round_timeout_s: float = 600,
                    local_baseline: bool = True, cross_site_every: int = 0, dp: bool = False,
                    target_epsilon: float | None = 8.0, delta: float = 1.0e-5, replicates: int = 0) -> dict[str, Any]:
    """A run config as a plain mapping, ready for ``yaml.safe_dump`` (the one builder of run configs:
    ``dicomfl synth``, ``dicomfl demo`` and the benchmark use it). It is validated here, so a bad
    value fails where it is made, not where it is read.
    """
    raw = {"run": {"name": name, "rounds": rounds, "strategy": strategy, "proximal_mu": proximal_mu,
                   "min_sites": min_sites, "local_epochs": local_epochs, "round_timeout_s": round_timeout_s,
                   "seed": seed, **({} if server_lr is None else {"server_lr": server_lr})},
           "cross_site": {"every": cross_site_every, "local_baseline": local_baseline,
                          **({"replicates": replicates} if replicates else {})},
           "model": model.model_dump(exclude_none=True) if isinstance(model, BaseModel) else dict(model),
           "privacy": {"dp": dp, "target_epsilon": target_epsilon, "delta": delta},
           "sites": [str(p) for p in sites]}
    if out_dir is not None:
        raw["run"]["out_dir"] = str(out_dir)
    try:
        RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(Path(f"run config {name}"), err)) from None
    return raw


def load_run_config(path: str | Path, *, check_files: bool = True) -> RunConfig:
    """Load ``run.yaml``; site and coordinator paths are resolved against its folder."""
    path = Path(path)
    cfg, base = validate_file(path, RunConfig)
    cfg.sites = [_resolve(base, p) for p in cfg.sites]
    cfg.coordinator = _resolve(base, cfg.coordinator)
    if cfg.run.out_dir is not None:
        cfg.run.out_dir = _resolve(base, cfg.run.out_dir)
    cfg.source = path
    if check_files:
        for i, p in enumerate(cfg.sites):
            if not p.is_file():
                raise ConfigError(f"{path}: sites.{i}: file not found: {p}")
        if cfg.coordinator is not None and not cfg.coordinator.is_file():
            raise ConfigError(f"{path}: coordinator: file not found: {cfg.coordinator}")
    if cfg.sites and cfg.run.min_sites > len(cfg.sites):
        raise ConfigError(f"{path}: run.min_sites: more than the {len(cfg.sites)} sites listed")
    size = cfg.model.image_size
    if check_files and (cfg.run.strategy == "scaffold" or size is not None):
        for i, p in enumerate(cfg.sites):
            site = load_site_config(p, check_files=False)
            # The same fact stated twice: a run whose model.image_size differs from a site's
            # preprocess.image_size is refused by that site in every round; say so before round 1.
            if size is not None and site.preprocess.image_size != size:
                raise ConfigError(f"{path}: model.image_size: {size} differs from sites.{i}'s preprocess.image_size "
                                  f"({site.preprocess.image_size}); make them equal, or leave model.image_size null "
                                  "to take each site's")
            opt = site.train.optimizer
            if cfg.run.strategy == "scaffold" and opt != "sgd":
                raise ConfigError(f"{path}: sites.{i}: train.optimizer is {opt}; run.strategy scaffold needs sgd "
                                  "(plain SGD local steps) at every site")
    return cfg


# --------------------------------------------------------------------------- coordinator config


class CoordinatorSection(_Strict):
    address: str = "127.0.0.1"  # where the SuperLink listens (all its APIs share one port)
    port: int = Field(default=9092, ge=1, le=65535)
    state_dir: Path = Path("coordinator-state")  # SuperLink database, logs
    tls: bool = True
    supernode_auth: bool = True
    pki_dir: Path = Path("pki")  # ca.crt, superlink.crt, superlink.key, sites/<site>.pub (see deployments/make_pki.py)
    authorized_sites: list[str] = Field(default_factory=list)  # site names whose sites/<name>.pub is registered at start
    # Where the SuperLink keeps its state: in memory (fast; a restart loses Flower's run list, and
    # dicomfl resumes runs from its own checkpoints) or in <state_dir>/superlink.db.
    superlink_state: Literal["memory", "file"] = "memory"


class CoordinatorConfig(_Strict):
    coordinator: CoordinatorSection = CoordinatorSection()
    source: Path | None = Field(default=None, exclude=True)

    @property
    def target(self) -> str:
        return f"{self.coordinator.address}:{self.coordinator.port}"


def load_coordinator_config(path: str | Path) -> CoordinatorConfig:
    path = Path(path)
    cfg, base = validate_file(path, CoordinatorConfig)
    c = cfg.coordinator
    c.state_dir = _resolve(base, c.state_dir)
    c.pki_dir = _resolve(base, c.pki_dir)
    cfg.source = path
    if c.supernode_auth and not c.tls:
        raise ConfigError(f"{path}: coordinator.supernode_auth: needs tls: true (Flower authenticates SuperNodes over TLS only)")
    if c.tls:
        for name in ("ca.crt", "superlink.crt", "superlink.key"):
            if not (c.pki_dir / name).is_file():
                raise ConfigError(f"{path}: coordinator.pki_dir: {name} not found in {c.pki_dir} "
                                  "(make it with: python deployments/make_pki.py)")
    for s in c.authorized_sites:
        if not (c.pki_dir / "sites" / f"{s}.pub").is_file():
            raise ConfigError(f"{path}: coordinator.authorized_sites: no public key {c.pki_dir}/sites/{s}.pub")
    return cfg
