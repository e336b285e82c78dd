"""The ingest stage: URL lists -> raw batches downloaded by img2dataset.

Modules: ``urllists`` (reading and validating URL lists), ``staging`` (the streamed, host-interleaved staged list
and the pre-download network check), ``run`` (one img2dataset call with the guard on every hop), ``accounting``
(every list row accounted for, per-row reasons), ``exif`` (EXIF orientation) and ``stage`` (``ingest`` itself).
The entry points are imported lazily, as in ``tasks.curate``."""

from __future__ import annotations

from tasks.lazy import lazy_getattr

_EXPORTS = {
    "IngestResult": "stage",
    "ingest": "stage",
    "ingest_task": "stage",
    "user_agent_token": "stage",
    "DownloadOptions": "run",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
