"""The per-site cache: on-disk image, feature and scaling rows, plus an index of records.

Layout under ``<state_dir>/cache/`` (mode 0700, files 0600)::

    LOCK                     held (flock) by the one ingestion writing this cache
    CURRENT                  names the live index file
    index-<id>.json          per-file records; no identifying value (file paths, content and label
                             keys are HMACs under the site key; details are codes and keywords)
    chunks/<cid>.images.npy    (C, S, S) float32   the images at preprocess.image_size
    chunks/<cid>.features.npy  (C, F) float32      the feature vectors
    chunks/<cid>.stats.npy     (C, 2) float32      each image's [median, p99 - p1] (robust scaling)

Rows live in chunks numbered across chunks (row ``r`` is in the chunk whose range holds it). A
chunk's capacity doubles from 64 rows up to about 256 MB of images, so a small site has small
files and a large one has few. Chunks are plain ``.npy`` files
(``numpy.load(..., mmap_mode="r")`` reads them), created sparse at their full capacity and
written row by row with ``pwrite`` as results arrive, so the writer never holds more than one
row; a chunk that fills up is flushed to disk (``fdatasync``) on a background thread while the
next one fills, and the index is published only after every row it names is on disk. Rows are
append-only: an ingestion appends the rows of new content after the last used row
and publishes a new index that covers them; rows an older index uses are never written again.
So a warm re-ingest of unchanged files writes nothing at all, a grown folder writes only its new
rows plus a new index, and an interrupted ingestion leaves the previous index valid (its rows
are untouched; the new index is written, synced and swapped in by an atomic rename of
``CURRENT``). Rows no index uses any more (a file changed or deleted) are dropped by a
compaction when they are more than half of the store.

Reading goes through :class:`StoreRows`, a lazy (N, ...) view that fetches only the rows asked
for, with ``pread`` into a fresh array: no memory map, so a pass over every image of a site
leaves nothing resident in the reader (pages of a memory map count in the reader's resident
set until the kernel reclaims them). A store keeps its files open, so a reader keeps working
even if a later compaction deletes chunk files it uses.

Entries are keyed by an HMAC of the file's content; a file whose path, size and mtime are
unchanged is matched without reading it again (as make and git do). The fingerprint of the whole
pipeline (code version, feature schema, preprocessing, de-identification options, profile table,
site key) guards the cache: any change starts a fresh one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .files import sync_dir, write_bytes

FORMAT = 3
KINDS = ("images", "features", "stats")
#: Largest size of a chunk's images file (its row capacity follows from the image size).
CHUNK_BYTES = 256 << 20
#: Rows of the first chunk; each next chunk has twice as many, up to CHUNK_BYTES.
FIRST_CHUNK_ROWS = 64
_DTYPE = np.dtype("<f4")


@dataclass(slots=True)
class Record:
    status: str  # "accepted" | "rejected"
    reason: str = ""
    detail: str = ""
    modality: str = ""
    label_key: str = ""  # HMAC of the label join key ("" when the image has none)
    patient: str = ""  # pseudonymous patient id
    row: int = -1  # row in the store for accepted records


@dataclass(slots=True)
class FileEntry:
    size: int
    mtime_ns: int
    content: str


def chunk_rows_for(image_size: int) -> int:
    return int(min(65536, max(16, CHUNK_BYTES // (image_size * image_size * 4))))


# ------------------------------------------------------------------------------------ the store


@dataclass(slots=True)
class _Chunk:
    cid: str
    capacity: int
    used: int
    fds: dict[str, int]
    offsets: dict[str, int]
    writable: bool = False
    dirty: bool = False  # rows written and not yet synced
    written: bool = False  # rows were written since the store was opened


class ChunkStore:
    """Append-only rows of (image, features, stats) in chunk files; see the module docstring.

    Parameters
    ----------
    folder : Path
        Where the chunk files live (``cache/chunks``).
    image_size, n_features : int
        Row shapes: (S, S) images, (F,) features, (2,) stats.
    chunk_rows : int
        Largest capacity of a chunk, in rows (the first has ``FIRST_CHUNK_ROWS``, each next one
        twice as many).
    scratch : bool
        Files are unlinked as soon as they are open: the store lives as long as this object
        (``ingest --no-cache``).
    """

    def __init__(self, folder: Path, image_size: int, n_features: int, chunk_rows: int, *, scratch: bool = False) -> None:
        self.folder = Path(folder)
        self.image_size = int(image_size)
        self.n_features = int(n_features)
        self.chunk_rows = int(chunk_rows)
        self.scratch = scratch
        self.row_shape = {"images": (self.image_size, self.image_size), "features": (self.n_features,), "stats": (2,)}
        self.row_bytes = {k: int(np.prod(s)) * 4 for k, s in self.row_shape.items()}
        self._chunks: list[_Chunk] = []
        self._starts = np.zeros(0, dtype=np.int64)  # first row of each chunk
        self._syncs: list = []  # background fdatasync of chunks that filled up
        self._syncer = None

    def _capacity(self, k: int) -> int:
        return min(self.chunk_rows, FIRST_CHUNK_ROWS << min(k, 40))

    def _add(self, chunk: _Chunk) -> None:
        start = int(self._starts[-1]) + self._chunks[-1].capacity if self._chunks else 0
        self._chunks.append(chunk)
        self._starts = np.append(self._starts, np.int64(start))

    # -- opening ----------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: Path, image_size: int, n_features: int, chunk_rows: int,
             chunks: list[tuple[str, int]], *, writable_last: bool = False) -> ChunkStore:
        """Open existing chunks ``[(cid, used rows), ...]`` (all but the last must be full)."""
        store = cls(folder, image_size, n_features, chunk_rows)
        try:
            for i, (cid, used) in enumerate(chunks):
                cap = store._capacity(i)
                if not 0 < used <= cap or (i < len(chunks) - 1 and used != cap):
                    raise ValueError("chunk row counts")
                writable = writable_last and i == len(chunks) - 1
                store._add(store._open_chunk(cid, cap, used, writable))
        except BaseException:
            store.close()
            raise
        return store

    def _open_chunk(self, cid: str, capacity: int, used: int, writable: bool) -> _Chunk:
        fds, offsets = {}, {}
        try:
            for kind in KINDS:
                path = self.folder / f"{cid}.{kind}.npy"
                fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
                fds[kind] = fd
                with open(fd, "rb", closefd=False) as fh:
                    version = np.lib.format.read_magic(fh)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read_header(fh)
                    offsets[kind] = fh.tell()
                if fortran or np.dtype(dtype) != _DTYPE or tuple(shape) != (capacity, *self.row_shape[kind]):
                    raise ValueError("chunk header")
                if os.fstat(fd).st_size < offsets[kind] + capacity * self.row_bytes[kind]:
                    raise ValueError("chunk size")
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        return _Chunk(cid, capacity, used, fds, offsets, writable=writable)

    def _new_chunk(self) -> _Chunk:
        self.folder.mkdir(parents=True, exist_ok=True)
        cid = uuid.uuid4().hex[:16]
        capacity = self._capacity(len(self._chunks))
        fds, offsets = {}, {}
        try:
            for kind in KINDS:
                path = self.folder / f"{cid}.{kind}.npy"
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                fds[kind] = fd
                with open(fd, "wb", closefd=False) as fh:
                    np.lib.format.write_array_header_1_0(
                        fh, {"descr": _DTYPE.str, "fortran_order": False,
                             "shape": (capacity, *self.row_shape[kind])})
                    offsets[kind] = fh.tell()
                os.ftruncate(fd, offsets[kind] + capacity * self.row_bytes[kind])  # sparse
                if self.scratch:
                    os.unlink(path)
        except BaseException:  # a full disk, say: no part of a chunk is left behind
            for fd in fds.values():
                os.close(fd)
            if not self.scratch:
                for kind in KINDS:
                    with contextlib.suppress(OSError):
                        os.unlink(self.folder / f"{cid}.{kind}.npy")
            raise
        return _Chunk(cid, capacity, 0, fds, offsets, writable=True)

    # -- writing ----------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return sum(c.used for c in self._chunks)

    @property
    def chunks(self) -> list[tuple[str, int]]:
        return [(c.cid, c.used) for c in self._chunks]

    @property
    def changed(self) -> bool:
        """Rows were appended since this store was opened."""
        return any(c.dirty or c.written for c in self._chunks)

    def append(self, image: np.ndarray, features: np.ndarray, stats: np.ndarray) -> int:
        """Write one row; returns its row number."""
        last = self._chunks[-1] if self._chunks else None
        if last is None or last.used == last.capacity:
            if last is not None and last.dirty and not self.scratch:
                self._sync_in_background(last)
            last = self._new_chunk()
            self._add(last)
        if not last.writable:
            raise ValueError("the last chunk of this store is open read-only")
        r = last.used
        for kind, arr in (("images", image), ("features", features), ("stats", stats)):
            buf = np.ascontiguousarray(arr, dtype=_DTYPE)
            if buf.shape != self.row_shape[kind]:
                raise ValueError(f"{kind} row has shape {buf.shape}, expected {self.row_shape[kind]}")
            _pwrite_all(last.fds[kind], memoryview(buf).cast("B"), last.offsets[kind] + r * self.row_bytes[kind])
        last.used += 1
        last.dirty = True
        return int(self._starts[-1]) + r

    def _sync_in_background(self, chunk: _Chunk) -> None:
        """A full chunk goes to disk on a thread while rows keep arriving (fdatasync releases the
        GIL), so the final :meth:`sync` has only the last chunk left to wait for."""
        from concurrent.futures import ThreadPoolExecutor

        if self._syncer is None:
            self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dicomfl-cache-sync")
        fds = list(chunk.fds.values())
        self._syncs.append(self._syncer.submit(lambda: [os.fdatasync(fd) for fd in fds]))
        chunk.dirty = False
        chunk.written = True

    def sync(self) -> None:
        """Put every row written so far on disk (before an index that names them is published)."""
        for fut in self._syncs:
            fut.result()
        self._syncs = []
        for c in self._chunks:
            if c.dirty:
                for fd in c.fds.values():
                    os.fdatasync(fd)
                c.dirty = False
                c.written = True

    # -- reading ----------------------------------------------------------------------------
    def read(self, kind: str, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` of ``kind`` as a new float32 array (len(rows), *row shape)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        shape = self.row_shape[kind]
        n = len(rows)
        if n == 0:
            return np.empty((0, *shape), np.float32)
        total = self.rows
        if rows.min() < 0 or rows.max() >= total:
            raise IndexError(f"row out of range for a store of {total} rows")
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        out = np.empty((n, *shape), np.float32)
        rb = self.row_bytes[kind]
        which = np.searchsorted(self._starts, srt, side="right") - 1
        # runs of consecutive rows within one chunk: one read each
        breaks = np.flatnonzero((np.diff(srt) != 1) | (np.diff(which) != 0)) + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [n]])
        flat = out.reshape(n, -1)
        for a, b in zip(starts.tolist(), ends.tolist()):
            k = int(which[a])
            chunk = self._chunks[k]
            view = memoryview(flat[a:b]).cast("B")
            got = os.preadv(chunk.fds[kind], [view], chunk.offsets[kind] + (int(srt[a]) - int(self._starts[k])) * rb)
            if got != len(view):
                raise OSError(f"site cache chunk {chunk.cid}.{kind} is shorter than its index says; "
                              "run the ingestion again")
        if not np.array_equal(order, np.arange(n)):
            res = np.empty_like(out)
            res[order] = out
            out = res
        return out

    def view(self, kind: str, rows: np.ndarray | None = None) -> StoreRows:
        return StoreRows(self, kind, np.arange(self.rows, dtype=np.int64) if rows is None else rows)

    # -- compaction --------------------------------------------------------------------------
    def compacted(self, live: np.ndarray, block: int = 256) -> tuple[ChunkStore, dict[int, int]]:
        """A new store holding only rows ``live`` (in their order), and the old -> new row map."""
        new = ChunkStore(self.folder, self.image_size, self.n_features, self.chunk_rows, scratch=self.scratch)
        mapping: dict[int, int] = {}
        live = np.asarray(live, dtype=np.int64)
        try:
            for i in range(0, len(live), block):
                part = live[i:i + block]
                imgs, feats, stats = (self.read(k, part) for k in KINDS)
                for j, r in enumerate(part.tolist()):
                    mapping[r] = new.append(imgs[j], feats[j], stats[j])
        except BaseException:
            new.close()
            raise
        return new, mapping

    def close(self) -> None:
        for fut in self._syncs:
            try:
                fut.result()
            except OSError:
                pass
        self._syncs = []
        if self._syncer is not None:
            self._syncer.shutdown(wait=True)
            self._syncer = None
        for c in self._chunks:
            for fd in c.fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            c.fds = {}
        self._chunks = []
        self._starts = np.zeros(0, dtype=np.int64)

    def __del__(self) -> None:
        self.close()

    def __reduce__(self):
        if self.scratch:
            raise TypeError("a scratch store (ingest without cache) cannot leave its process")
        return (_reopen, (str(self.folder), self.image_size, self.n_features, self.chunk_rows, self.chunks))


def _reopen(folder, image_size, n_features, chunk_rows, chunks) -> ChunkStore:
    return ChunkStore.open(Path(folder), image_size, n_features, chunk_rows, [tuple(c) for c in chunks])


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


# ------------------------------------------------------------------------------------ lazy views


class LazyRows:
    """A read-only (N, ...) float32 array whose rows are produced on demand by :meth:`take`.

    Indexing with an integer, a slice, an integer array or a boolean mask returns a new
    ``numpy.ndarray`` holding just those rows. ``numpy.asarray(view)`` (and ``reshape``,
    ``astype``) reads every row: a convenience for small data and tests, never used by training.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, n: int, row_shape: tuple[int, ...]) -> None:
        self._n = int(n)
        self._row_shape = tuple(row_shape)

    def take(self, idx: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._n, *self._row_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self._row_shape)

    def __len__(self) -> int:
        return self._n

    def _index(self, key) -> np.ndarray:
        if isinstance(key, slice):
            return np.arange(*key.indices(self._n), dtype=np.int64)
        arr = np.asarray(key)
        if arr.dtype == bool:
            if arr.shape != (self._n,):
                raise IndexError("boolean index of the wrong length")
            return np.flatnonzero(arr)
        if arr.dtype.kind not in "iu":
            raise IndexError("only integers, slices and integer or boolean arrays are valid indices")
        arr = arr.astype(np.int64).reshape(-1)
        if len(arr) and (arr.min() < -self._n or arr.max() >= self._n):
            raise IndexError(f"index out of range for {self._n} rows")
        return np.where(arr < 0, arr + self._n, arr)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            first = self[key[0]]
            rest = key[1:]
            return first[rest] if isinstance(key[0], (int, np.integer)) else first[(slice(None), *rest)]
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if not -self._n <= i < self._n:
                raise IndexError(f"index {i} out of range for {self._n} rows")
            return self.take(np.array([i % self._n], dtype=np.int64))[0]
        return self.take(self._index(key))

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(self._n):
            yield self[i]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.take(np.arange(self._n, dtype=np.int64))
        return out if dtype is None else out.astype(dtype)

    def reshape(self, *shape) -> np.ndarray:
        return np.asarray(self).reshape(*shape)

    def astype(self, dtype, copy: bool = True) -> np.ndarray:
        return np.asarray(self).astype(dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype=float32)"


class StoreRows(LazyRows):
    """Rows ``rows`` of one kind (``images``, ``features``, ``stats``) of a :class:`ChunkStore`."""

    def __init__(self, store: ChunkStore, kind: str, rows: np.ndarray) -> None:
        super().__init__(len(rows), store.row_shape[kind])
        self.store, self.kind = store, kind
        self.rows = np.asarray(rows, dtype=np.int64)

    def take(self, idx: np.ndarray) -> np.ndarray:
        return self.store.read(self.kind, self.rows[np.asarray(idx, dtype=np.int64)])


def take_rows(a, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of an ndarray or a :class:`LazyRows` view, as an ndarray."""
    if isinstance(a, LazyRows):
        return a.take(np.asarray(idx, dtype=np.int64))
    return np.asarray(a[np.asarray(idx, dtype=np.int64)])


# ------------------------------------------------------------------------------------ the cache


@dataclass
class CacheState:
    fingerprint: str
    store: ChunkStore
    files: dict[str, FileEntry] = field(default_factory=dict)
    records: dict[str, Record] = field(default_factory=dict)
    index: str | None = None  # the index file it was loaded from


class SiteCache:
    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / "cache"
        self.chunk_dir = self.root / "chunks"

    def _mkdirs(self) -> None:
        for d in (self.root, self.chunk_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the cache's lock: one ingestion at a time writes it (a second one waits)."""
        import fcntl

        self._mkdirs()
        fd = os.open(self.root / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _current(self) -> str | None:
        try:
            name = (self.root / "CURRENT").read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        return name if name.startswith("index-") and name.endswith(".json") and "/" not in name else None

    def load(self, fingerprint: str, image_size: int, n_features: int) -> CacheState | None:
        """The live cache for this pipeline fingerprint and row shapes, or None."""
        name = self._current()
        if name is None:
            return None
        try:
            index = json.loads((self.root / name).read_text())
            if (index.get("format") != FORMAT or index.get("fingerprint") != fingerprint
                    or index.get("image_size") != image_size or index.get("n_features") != n_features):
                return None
            files = {k: FileEntry(*v) for k, v in index["files"].items()}
            records = {k: Record(*v) for k, v in index["records"].items()}
            store = ChunkStore.open(self.chunk_dir, image_size, n_features, int(index["chunk_rows"]),
                                    [(str(c), int(u)) for c, u in index["chunks"]], writable_last=True)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        n = store.rows
        if any(r.status == "accepted" and not 0 <= r.row < n for r in records.values()):
            store.close()
            return None
        return CacheState(fingerprint=fingerprint, store=store, files=files, records=records, index=name)

    def new_store(self, image_size: int, n_features: int) -> ChunkStore:
        self._mkdirs()
        return ChunkStore(self.chunk_dir, image_size, n_features, chunk_rows_for(image_size))

    def save(self, state: CacheState) -> str:
        """Publish ``state``: sync its rows, write a new index, swap ``CURRENT``, drop what no
        index uses any more. Returns the index file's name.

        All or nothing: if a step before the swap fails (a full disk: ``OSError`` ENOSPC, from
        the sync of the rows, the index or the new ``CURRENT``), ``CURRENT`` still names the previous
        index, whose rows were never written again, the half-written files are removed, and
        ``state.index`` stays None. Once ``CURRENT`` is swapped, ``state.index`` names the new
        index even if syncing the folder then fails.
        """
        self._mkdirs()
        store = state.store
        state.index = None
        store.sync()
        name = f"index-{uuid.uuid4().hex[:12]}.json"
        try:
            self._write_index(state, name)
            # The folder is synced below, after state.index is set: a failed folder sync must not
            # undo a swap that happened.
            write_bytes(self.root / "CURRENT", name.encode(), mode=0o600, sync_dir=False)
        except BaseException:
            with contextlib.suppress(OSError):
                (self.root / name).unlink()
            raise
        state.index = name
        sync_dir(self.root)
        self._collect(name, {c for c, _ in store.chunks})
        return name

    def remove_chunks(self, cids: set[str]) -> None:
        """Delete the files of chunks ``cids`` (chunks of a store no index names: an ingestion
        that could not publish gives their space back)."""
        for cid in cids:
            for kind in KINDS:
                with contextlib.suppress(OSError):
                    (self.chunk_dir / f"{cid}.{kind}.npy").unlink()

    def _write_index(self, state: CacheState, name: str) -> None:
        """Write index ``name`` for ``state``, synced."""
        store = state.store
        index = {
            "format": FORMAT,
            "fingerprint": state.fingerprint,
            "image_size": store.image_size,
            "n_features": store.n_features,
            "chunk_rows": store.chunk_rows,
            "chunks": store.chunks,
            "files": {k: _fields(v) for k, v in state.files.items()},
            "records": {k: _fields(v) for k, v in state.records.items()},
        }
        fd = os.open(self.root / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "w", encoding="utf-8", buffering=1 << 20) as fh:  # streamed: no whole-index string
            json.dump(index, fh, separators=(",", ":"))
            fh.flush()
            os.fsync(fh.fileno())

    def _collect(self, keep_index: str, keep_chunks: set[str]) -> None:
        for p in self.root.iterdir():
            if p.name in ("LOCK", "CURRENT", "chunks", keep_index):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)  # generation folders of the older format
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
        for p in self.chunk_dir.iterdir():
            if p.name.split(".", 1)[0] not in keep_chunks:
                with contextlib.suppress(OSError):
                    p.unlink()


def _fields(entry: FileEntry | Record) -> list:
    """An entry's fields in order, as ``dataclasses.astuple`` gives them without its deep copy
    of every field (a third of the parent's time in publishing a 20k-file index)."""
    return [getattr(entry, name) for name in entry.__slots__]


