"""Object stores: one small interface and a local-directory implementation; the S3 one is
``data.s3_store.S3Store``. ``open_store`` picks by URL.

Usage::

    from data.store import open_store, NotFound
    store = open_store("s3://bucket/datasets/demo")   # or "/abs/dir", "file:///abs/dir"
    store.put("shards/000.tar", payload)               # atomic: readers see all of it or nothing
    head = store.get("shards/000.tar", 0, 512)          # ranged read, Python slice semantics
    n = store.size("shards/000.tar")
    store.exists("index.json"); store.delete("tmp.bin"); store.list("shards/")

Semantics shared by both implementations:

- Keys are relative, '/'-separated paths below the store's root (``store.url``); empty parts,
  ``.``/``..`` parts, a leading '/', backslashes and NUL are rejected with ``ValueError``.
- ``get(key, start, end)`` returns ``whole_object[start:end]`` (``end`` exclusive, ``None`` = to the
  end; a range past the end is clipped, like slicing). A missing key raises ``NotFound`` (also a
  ``FileNotFoundError``), whatever the backend.
- ``put`` replaces the object atomically; ``delete`` of a missing key is not an error.
- ``list(prefix)`` returns sorted keys. It is for tools and ingest; the data hot path never lists
  (it reads a manifest and per-shard indexes instead).
- Objects are treated as immutable once written (the cache in ``data.cache`` relies on it).

Large objects: ``open_upload(key, size, part_size)`` gives an ``Upload`` whose parts any threads
write in any order and whose ``commit`` publishes the whole object at once (S3: a multipart
upload, parts of at least ``MIN_PART_BYTES`` except the last; a directory: ``pwrite`` into one
temp file, fsync, rename). Error messages name the URL and the S3 error code, never
credentials: every endpoint and URL in a message or log line goes through ``redact``.
"""

from __future__ import annotations

import abc
import os
import re
import threading
import uuid
from pathlib import Path
from urllib.parse import urlparse, urlsplit, urlunsplit

from train.errors import UserError

__all__ = ["ObjectStore", "LocalStore", "Upload", "open_store", "StoreError", "NotFound",
           "StoreUnavailable", "validate_key", "redact", "MIN_PART_BYTES", "S3_WAIT_OPTIONS"]

# S3 refuses multipart parts below 5 MiB (all but the last part of an upload).
MIN_PART_BYTES = 5 << 20

# Guards lazy per-process initialisation (first use in a process may come from many threads at
# once). Re-created in a forked child, where a copy held by another parent thread would deadlock.
_INIT_LOCK = threading.Lock()
os.register_at_fork(after_in_child=lambda: globals().update(_INIT_LOCK=threading.Lock()))


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def _redact_one(url: str) -> str:
    scheme, rest = url.split("://", 1)
    if "@" in rest:  # userinfo; the last '@' also catches unescaped '/' or '@' inside a password
        rest = "***@" + rest.rsplit("@", 1)[1]
    try:
        parts = urlsplit(f"{scheme}://{rest}")
    except ValueError:  # e.g. a malformed IPv6 host: keep only the scheme
        return f"{scheme}://***"
    query = "&".join(p.split("=", 1)[0] + ("=***" if "=" in p else "") for p in parts.query.split("&")
                     if p)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def redact(text: str) -> str:
    """``text`` with credentials removed from every URL in it: userinfo (``user:secret@``) becomes
    ``***@`` and every query-string value ``***`` (presigned signatures, tokens, keys). Use it on
    any endpoint, URL or message holding one before it is printed, logged or raised."""
    return _URL_IN_TEXT.sub(lambda m: _redact_one(m.group(0)), str(text))


class StoreError(UserError):
    """A store operation failed (bad credentials, bad bucket, unexpected reply...)."""


class NotFound(StoreError, FileNotFoundError):
    """The key does not exist in the store."""


class StoreUnavailable(StoreError):
    """The store kept failing with retryable errors until the retry budget ran out."""


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise ValueError naming it."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"object key must be a non-empty string, got {key!r}")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"object key {key!r} must be relative and use '/' separators")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"object key {key!r} has an empty, '.' or '..' part")
    return key


def _check_range(start: int | None, end: int | None) -> tuple[int, int | None]:
    start = 0 if start is None else start
    if start < 0 or (end is not None and end < 0):
        raise ValueError(f"range [{start}, {end}) must be non-negative")
    return start, end


class ObjectStore(abc.ABC):
    """The object-store interface every backend (and the tiered cache) implements."""

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """Root of this store, e.g. ``s3://bucket/prefix`` or ``file:///abs/dir``."""

    @abc.abstractmethod
    def get(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of the object (``None`` = its beginning / end)."""

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write the whole object atomically (readers never see a partial object)."""

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """Length of the object in bytes."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether the object exists."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error."""

    def open_upload(self, key: str, size: int, part_size: int) -> "Upload":
        """An object of `size` bytes written in parts at multiples of `part_size` (see Upload)."""
        return _BufferedUpload(self, key, size)

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with ``prefix`` (tools and ingest only, never the hot path)."""

    def stats(self) -> dict:
        """Counters of this process (requests, bytes, retries); empty where nothing is counted."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


# ----------------------------------------------------------------------------- local directory

class Upload(abc.ABC):
    """One object written in parts: `write(offset, data)` from any thread in any order (offsets
    are multiples of the upload's part size; every part but the last is exactly that long),
    then `commit()` publishes all of it at once, or `abort()` drops it. Nothing is visible
    under the key before the commit."""

    @abc.abstractmethod
    def write(self, offset: int, data) -> None: ...

    @abc.abstractmethod
    def commit(self) -> None: ...

    @abc.abstractmethod
    def abort(self) -> None: ...


class _BufferedUpload(Upload):
    """For stores without part uploads: collect the parts, one put on commit."""

    def __init__(self, store: "ObjectStore", key: str, size: int):
        self.store, self.key, self.buf = store, key, bytearray(size)

    def write(self, offset, data):
        self.buf[offset:offset + len(data)] = data

    def commit(self):
        self.store.put(self.key, bytes(self.buf))

    def abort(self):
        self.buf = bytearray()


class _FileUpload(Upload):
    """Parts pwritten into one temp file next to the target; fsync and rename on commit."""

    def __init__(self, path: Path, size: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.tmp = path.parent / f"{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex}"
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.ftruncate(self.fd, size)

    def write(self, offset, data):
        view = memoryview(data).cast("B")
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def commit(self):
        try:
            os.fsync(self.fd)  # the rename must not publish a file whose data is not on disk
            os.close(self.fd)
            self.fd = -1
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)


_TMP_MARK = ".mmpt-tmp-"  # temp files of in-progress puts; never listed, never read as objects


class LocalStore(ObjectStore):
    """A directory on a local or shared file system with the same semantics as S3Store."""

    def __init__(self, root: str | os.PathLike, *, create: bool = True):
        self.root = Path(root).expanduser().resolve()
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store directory {self.root} is a file, not a directory; "
                             "point at a directory (or an s3:// URL)")
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise NotFound(f"store directory {self.root} does not exist")

    @property
    def url(self) -> str:
        return self.root.as_uri()

    def _path(self, key: str) -> str:  # a string: a pathlib join costs more than a ranged read
        validate_key(key)
        if _TMP_MARK in key:
            raise ValueError(f"object key {key!r} uses the reserved marker {_TMP_MARK!r}")
        return os.path.join(self.root, key)

    def _missing(self, key: str) -> NotFound:
        return NotFound(f"no such object: {self.url}/{key}")

    def get(self, key, start=None, end=None):
        start, end = _check_range(start, end)
        try:  # ranged reads are the loader's hot path: a bare descriptor and pread, no file object
            fd = os.open(self._path(key), os.O_RDONLY)
            try:
                end = os.fstat(fd).st_size if end is None else end
                data = os.pread(fd, max(end - start, 0), start)  # a directory raises here
                while start + len(data) < end and (more := os.pread(fd, end - start - len(data),
                                                                   start + len(data))):
                    data += more  # a short read before the end: only for > 2 GiB at once
                return data
            finally:
                os.close(fd)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._missing(key) from None

    def put(self, key, data):
        path = Path(self._path(key))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # the rename must not publish a file whose data is not on disk
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def open_upload(self, key, size, part_size):
        return _FileUpload(Path(self._path(key)), size)

    def size(self, key):
        path = Path(self._path(key))
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise self._missing(key) from None
        if not path.is_file():
            raise self._missing(key)
        return st.st_size

    def exists(self, key):
        return os.path.isfile(self._path(key))

    def delete(self, key):
        try:
            os.unlink(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            pass

    def list(self, prefix=""):
        keys = []
        for dirpath, _dirs, files in os.walk(self.root):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if _TMP_MARK in name:
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)


# S3Store options about waiting and retrying (train.config.StoreConfig); a local store has no
# network to wait for and ignores them, so one set of options serves every store URL.
S3_WAIT_OPTIONS = frozenset({"connect_timeout", "read_timeout", "retry_time", "max_attempts",
                             "backoff_base", "backoff_cap", "max_concurrency", "seed"})


def open_store(url: str, **opts) -> ObjectStore:
    """Open ``s3://bucket[/prefix]`` (options go to S3Store) or a local path / ``file://`` URL
    (S3_WAIT_OPTIONS are ignored there)."""
    if not url:
        raise ValueError("store URL is empty")
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"store URL {redact(url)!r} has no bucket")
        if "@" in parsed.netloc:
            raise ValueError(f"store URL {redact(url)!r} holds credentials: use the AWS credential "
                             "chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)")
        if parsed.query or parsed.fragment or parsed.params:
            raise ValueError(f"store URL {redact(url)!r}: s3:// URLs take no query string")
        from data.s3_store import S3Store  # boto3 is imported only for s3:// URLs

        return S3Store(parsed.netloc, parsed.path, **opts)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"store URL {redact(url)!r}: file:// URLs must name a local path")
        return LocalStore(parsed.path, **_local_opts(opts))
    if parsed.scheme and len(parsed.scheme) > 1:  # a one-letter "scheme" is a Windows drive
        raise ValueError(f"store URL {redact(url)!r}: unsupported scheme {parsed.scheme!r} "
                         "(use s3://bucket/prefix, file:///path or a plain path)")
    return LocalStore(url, **_local_opts(opts))


def _local_opts(opts: dict) -> dict:
    return {k: v for k, v in opts.items() if k not in S3_WAIT_OPTIONS}
