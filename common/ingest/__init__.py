"""Ingestion: a site's DICOM folder + labels CSV -> de-identified, full-depth training data on disk.

    labels (checked first) -> discover (by content) -> for each new file, in a worker process:
      read (mapped, hashed as it is read) -> check header -> check codestream -> label key
      -> patient pseudonym, age -> de-identify -> features -> pixels -> scaling statistics
    -> the parent appends each result to the on-disk cache -> labels join -> patient-level splits

In stages (:mod:`.stages`): triage (discover, cache lookup), dispatch (the file pool), collect
(each reply -> a typed outcome), publish (cache rows, index) and report (``reports/ingest.json``,
written by :func:`ingest` itself, whoever calls it). The per-file work (:mod:`.perfile`) is shared
with ``dicomfl predict``; what an ingestion leaves is in :mod:`.report`.

Each file is processed in a worker process (:mod:`dicomfl.common.workers`): a native decoder that aborts,
segfaults, panics, hangs or asks for gigabytes costs only its file, which is rejected with a
reason (``decoder-crash``, ``timeout``, ``worker-memory``) and the ingestion goes on. Before
anything decodes, the header is checked (:func:`~dicomfl.common.reader.check_image`) and so is the compressed
codestream's own header (:func:`~dicomfl.common.codestream.check_codestream`): a 6 kB JPEG 2000 file that
declares 65000 x 65000 pixels is rejected without allocating them. Files over
``ingest.max_file_bytes`` are rejected without being read.

The original header exists only inside a worker; what leaves it is a :class:`~dicomfl.common.cache.Record`
(codes, pseudonyms, HMACs), one float32 image, its feature vector and its two scaling numbers.
The parent writes them straight into the site's on-disk cache (:mod:`dicomfl.common.cache`) and keeps only
the small per-file records, so the parent's memory does not grow with the images; training
reads batches from the cache (:class:`SiteData` holds lazy views, not arrays).

Nothing identifying is written or printed: a rejected file is named in the report and the logs
by a site-local reference (``file:`` + an HMAC of its relative path under the site key), since
folder names are often patient names; ``<state_dir>/reports/rejects-map.tsv`` (mode 0600, in a
0700 folder) maps references back to paths for the site's operator and is never sent anywhere.
Reject details are reason codes, DICOM keywords and exception type names: never a header value.
"""

from __future__ import annotations

from dicomfl.common.cache import LazyRows
from .perfile import (MODALITIES, WORKER_ENV, Accepted, FileJob, FileWorker, Known, Rejected, Reply, content_key,
                      map_file, modality_code, process_file)
from .report import (PIPELINE_VERSION, IngestReport, IngestResult, SiteData, file_ref, fingerprint,
                     prepare_state_dir, read_rejects_map, storage_cause, tsv_field, write_rejects_map, write_report)
from .stages import RETRY_REASONS, Deferred, FileOutcome, ingest

__all__ = ["IngestReport", "IngestResult", "LazyRows", "SiteData", "content_key", "file_ref", "ingest", "map_file",
           "prepare_state_dir", "process_file", "read_rejects_map", "write_rejects_map"]
