"""One decode per photo per run: a bounded, per-process cache of decoded photos.

Every consumer of a photo in a run (embedding, stage 1's full path, explaining, the report's
thumbnails) calls :func:`load_photo` with the chips it will cut and its
:class:`infra.images.DecodeNeed`. The bytes are read and hashed each time (cheap next to a
decode); the cache key is ``(uri, content hash)``, so a file rewritten under the same name is
decoded afresh, never served stale. A photo already decoded in this run is not read again while
its storage version (size with ETag or modification time: :meth:`infra.storage.StorageTarget.version`,
one metadata request) is the one it was read at. A cached decode serves a request when its scale is at most
the coarsest scale the request allows (a finer decode serves a coarser need); otherwise the photo
is decoded again, at the finer scale the request needs, and that decode replaces the entry.

The cache holds decoded pixels up to :func:`max_bytes` (``PAIRX_DECODED_PHOTOS_MB``, default
512 MiB per process; least recently used photos go first), so a big night cannot exhaust memory:
there a photo evicted before its last consumer is decoded again. The run's entry empties it
when the run ends (:func:`clear_decoded_photos`); a long-lived worker empties it when a task of
another run asks (``run_id``).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from .images import DEFAULT_MAX_PIXELS, Chip, DecodedPhoto, DecodeNeed, content_hash, decode_photo
from .storage import StorageTarget

__all__ = ["DecodedPhotoCache", "clear_decoded_photos", "load_photo", "max_bytes"]

#: environment variable: the cache's limit in MiB of decoded pixels per process (0: no cache)
MAX_MB_ENV = "PAIRX_DECODED_PHOTOS_MB"
DEFAULT_MAX_MB = 512


def max_bytes() -> int:
    """The per-process limit in bytes: ``PAIRX_DECODED_PHOTOS_MB`` MiB, else :data:`DEFAULT_MAX_MB`."""
    text = os.environ.get(MAX_MB_ENV, "").strip()
    try:
        megabytes = float(text) if text else DEFAULT_MAX_MB
    except ValueError:
        megabytes = DEFAULT_MAX_MB
    return max(0, int(megabytes * 2**20))


class DecodedPhotoCache:
    """Decoded photos by ``(uri, content hash)``, least recently used first out, bounded in bytes."""

    def __init__(self, limit: int | None = None):
        self.limit = max_bytes() if limit is None else limit
        self._photos: OrderedDict[tuple[str, str], DecodedPhoto] = OrderedDict()
        #: uri -> (storage version, content hash) of the bytes last read from it in this run
        self._versions: dict[str, tuple[tuple, str]] = {}
        self._bytes = 0
        self._run_id: str | None = None
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes of decoded pixels held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._photos)

    def get(self, uri: str, digest: str, chips: Sequence[Chip], need: DecodeNeed | None) -> DecodedPhoto | None:
        """The cached decode of ``(uri, digest)`` if it is fine enough for ``chips`` and ``need``."""
        with self._lock:
            photo = self._photos.get((uri, digest))
            if photo is None or not photo.serves(chips, need):
                return None
            self._photos.move_to_end((uri, digest))
            return photo

    def digest_at(self, uri: str, version: tuple | None) -> str | None:
        """The content hash of ``uri``'s bytes when they were last read at ``version`` (else None)."""
        if version is None:
            return None
        with self._lock:
            seen = self._versions.get(uri)
        return seen[1] if seen is not None and seen[0] == version else None

    def remember(self, uri: str, version: tuple | None, digest: str) -> None:
        """``uri`` read at ``version`` held the bytes hashed ``digest``."""
        if version is not None:
            with self._lock:
                self._versions[uri] = (version, digest)

    def put(self, photo: DecodedPhoto) -> None:
        """Keep ``photo`` (replacing an earlier decode of the same file); evict to stay in bounds."""
        key = (photo.uri, photo.content_hash)
        with self._lock:
            self._drop(key)
            if photo.nbytes > self.limit:
                return
            self._photos[key] = photo
            self._bytes += photo.nbytes
            while self._bytes > self.limit:
                self._drop(next(iter(self._photos)))

    def enter_run(self, run_id: str | None) -> None:
        """Empty the cache when ``run_id`` is not the run its photos were decoded for."""
        if run_id is None:
            return
        with self._lock:
            if run_id != self._run_id:
                self._photos.clear()
                self._versions.clear()
                self._bytes = 0
                self._run_id = run_id

    def clear(self) -> None:
        with self._lock:
            self._photos.clear()
            self._versions.clear()
            self._bytes = 0
            self._run_id = None

    def _drop(self, key: tuple[str, str]) -> None:
        photo = self._photos.pop(key, None)
        if photo is not None:
            self._bytes -= photo.nbytes


#: this process's cache
_CACHE = DecodedPhotoCache()


def decoded_photos() -> DecodedPhotoCache:
    """This process's cache of decoded photos."""
    return _CACHE


def clear_decoded_photos() -> None:
    """Empty this process's cache (the end of a run)."""
    _CACHE.clear()


def load_photo(uri: str, chips: Sequence[Chip], need: DecodeNeed | None, *,
               storage_options: Mapping[str, Any] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
               run_id: str | None = None) -> DecodedPhoto:
    """Read the photo at ``uri`` and decode it, or take this run's decode of the same bytes.

    ``chips``: the ``(box, theta)`` the caller will cut (:meth:`infra.images.DecodedPhoto.chip`);
    ``need``: the caller's :class:`infra.images.DecodeNeed`. ``run_id``: the run asking (a
    long-lived worker drops the photos of earlier runs).

    Raises:
        ImageError: the bytes are not a usable image.
        StorageError: the file cannot be read; transient I/O errors propagate unchanged.
    """
    _CACHE.enter_run(run_id)
    storage = StorageTarget.from_url(uri, storage_options)
    location = storage.root  # the name rows record, as infra.images.load_image gives it
    version = storage.version("")  # taken before the read: a rewrite during it is not missed
    known = _CACHE.digest_at(location, version)
    photo = None if known is None else _CACHE.get(location, known, chips, need)
    if photo is not None:
        return photo  # decoded in this run from the same bytes: not read again
    data = storage.read_bytes("")
    digest = content_hash(data)
    photo = _CACHE.get(location, digest, chips, need)
    if photo is None:
        photo = decode_photo(data, location, chips=chips, need=need, max_pixels=max_pixels, digest=digest)
        _CACHE.put(photo)
    _CACHE.remember(location, version, digest)
    return photo
