"""Object stores: one small interface, an S3 implementation and a local-directory implementation.

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

S3Store specifics: credentials come from the standard AWS chain (env vars, profile, instance
role); the endpoint from the ``endpoint_url`` argument or ``AWS_ENDPOINT_URL``. boto3's own retries
are off; our loop retries throttling (SlowDown/503/429), 5xx, timeouts, connection resets and
truncated bodies with exponential backoff and full jitter, for at most ``max_attempts`` tries and
``retry_time`` seconds (a refused connection: ``REFUSED_RETRY_S``), then raises
``StoreUnavailable``. An attempt waits at most ``connect_timeout`` for a connection and
``read_timeout`` for each reply; retries that keep a caller waiting over a second are logged
(logger ``data.store``, WARNING) with what they wait for. ``train.config.StoreConfig`` holds these
settings for runs. Every body is checked against Content-Length / Content-Range (and a
whole-object read against the ETag when it is a plain MD5), so a short read is retried, never
returned. At most ``max_concurrency`` requests run at once per process. ``stats()`` counts
requests, retries by reason and bytes. Error messages name the URL and the S3 error code, never
credentials: every endpoint and URL in a message or log line goes through ``redact``. An S3Store
is safe to share across threads, to fork (the client is re-created in the child) and to pickle
(DataLoader workers with spawn).
"""

from __future__ import annotations

import abc
import base64
import hashlib
import logging
import os
import random
import re
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse, urlsplit, urlunsplit

__all__ = ["ObjectStore", "S3Store", "LocalStore", "open_store", "StoreError", "NotFound",
           "StoreUnavailable", "validate_key", "redact"]

log = logging.getLogger(__name__)

# A connection refused means nothing listens on the port: retry it only this long (a restarting
# gateway comes back within it; a wrong port fails fast). Other transient errors get retry_time.
REFUSED_RETRY_S = 1.0

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


class StoreError(Exception):
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

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys starting with ``prefix`` (tools and ingest only, never the hot path)."""

    def stats(self) -> dict:
        """Counters of this process (requests, bytes, retries); empty where nothing is counted."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


# ----------------------------------------------------------------------------- local directory

_TMP_MARK = ".mmpt-tmp-"  # temp files of in-progress puts; never listed, never read as objects


class LocalStore(ObjectStore):
    """A directory on a local or shared file system with the same semantics as S3Store."""

    def __init__(self, root: str | os.PathLike, *, create: bool = True):
        self.root = Path(root).expanduser().resolve()
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


# ----------------------------------------------------------------------------- S3

# S3 error codes that mean "try again later" (besides any 5xx / 429 status).
_RETRY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "BadDigest",
                "RequestLimitExceeded", "TooManyRequests"}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*[A-Za-z0-9]$")  # legacy names included
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_PLAIN_MD5 = re.compile(r'^"?([0-9a-f]{32})"?$')


def _caused_by(exc: BaseException, kind: type) -> bool:
    """Whether ``kind`` is in the exception's chain (botocore keeps urllib3's as kwargs['error'])."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return True
        todo += [e.__cause__, e.__context__, getattr(e, "kwargs", {}).get("error")]
    return False


def _etag_md5(resp: dict) -> str | None:
    """The object's MD5 if its ETag is one (single-part upload without KMS/customer keys)."""
    if resp.get("ServerSideEncryption") == "aws:kms" or resp.get("SSECustomerAlgorithm"):
        return None
    m = _PLAIN_MD5.match(resp.get("ETag", ""))
    return m[1] if m else None


# Guards lazy per-process initialisation (first use in a process may come from many threads at
# once). Re-created in a forked child, where a copy held by another parent thread would deadlock.
_INIT_LOCK = threading.Lock()
os.register_at_fork(after_in_child=lambda: globals().update(_INIT_LOCK=threading.Lock()))


class _Retry(Exception):
    """Internal: this attempt failed in a way worth retrying; ``reason`` is counted in stats."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class S3Store(ObjectStore):
    """Objects under ``s3://bucket/prefix`` on any S3-compatible endpoint, through boto3."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, max_concurrency: int = 16, max_attempts: int = 8,
                 backoff_base: float = 0.05, backoff_cap: float = 2.0,
                 connect_timeout: float = 3.0, read_timeout: float = 20.0, retry_time: float = 60.0,
                 profile: str | None = None, access_key: str | None = None,
                 secret_key: str | None = None, seed: int | None = None):
        if len(bucket) < 3:
            raise ValueError(f"S3 bucket name {redact(bucket)!r} must have at least 3 characters")
        if not _BUCKET.match(bucket):
            # also keeps "user:secret@bucket" (credentials put into an s3:// URL) out of every message
            raise ValueError(f"S3 bucket name {'***' if '@' in bucket else bucket!r} may hold only "
                             "letters, digits, '.', '_' and '-'")
        if max_concurrency < 1 or max_attempts < 1:
            raise ValueError("max_concurrency and max_attempts must be >= 1")
        if not (connect_timeout > 0 and read_timeout > 0 and retry_time > 0):
            raise ValueError(f"connect_timeout={connect_timeout}, read_timeout={read_timeout} and "
                             f"retry_time={retry_time} must be > 0 seconds")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self.region = (region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                       or "us-east-1")
        self.max_concurrency = max_concurrency
        self.max_attempts = max_attempts
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.retry_time = retry_time
        self.profile = profile
        # explicit keys (e.g. the embedded server's); None = the standard AWS credential chain
        self._keys = {"aws_access_key_id": access_key, "aws_secret_access_key": secret_key}
        self.seed = seed
        self._pid = None  # per-process state (client, semaphore, counters) is built lazily

    # -- per-process state: boto3 clients and locks must not cross a fork
    def _state(self):
        if self._pid != os.getpid():
            with _INIT_LOCK:
                if self._pid != os.getpid():
                    self._init_process_state()
        return self

    def _init_process_state(self) -> None:
        import boto3
        from botocore.config import Config

        session = boto3.session.Session(profile_name=self.profile)
        config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},  # our loop retries
            connect_timeout=self.connect_timeout, read_timeout=self.read_timeout,
            max_pool_connections=self.max_concurrency,
            s3={"addressing_style": "path"},
            # plain requests/replies: we check integrity ourselves (MD5, lengths)
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        try:
            self._client = session.client("s3", endpoint_url=self.endpoint_url,
                                          region_name=self.region, config=config, **self._keys)
        except ValueError as e:  # botocore's "Invalid endpoint: <url>" would echo credentials
            raise StoreError(f"{self.url}: cannot use endpoint {self.endpoint}: {redact(e)}") from None
        self._sem = threading.BoundedSemaphore(self.max_concurrency)
        self._lock = threading.Lock()
        self._rng = random.Random(self.seed)
        self._counts = {"requests": 0, "retries": 0, "bytes_read": 0, "bytes_written": 0}
        self._retry_reasons: dict[str, int] = {}
        self._pid = os.getpid()

    def __getstate__(self):
        keep = ("bucket", "prefix", "endpoint_url", "region", "max_concurrency", "max_attempts",
                "backoff_base", "backoff_cap", "connect_timeout", "read_timeout", "retry_time", "profile",
                "_keys",
                "seed")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pid = None

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def stats(self) -> dict:
        s = self._state()
        with s._lock:
            return {**s._counts, "retry_reasons": dict(s._retry_reasons)}

    @property
    def endpoint(self) -> str:
        """The endpoint for messages and logs: credentials in the URL are redacted."""
        return redact(self.endpoint_url) if self.endpoint_url else "AWS default"

    # -- the retry loop
    def _call(self, what: str, key: str, attempt_fn):
        """Run ``attempt_fn(client)`` with bounded concurrency and retries; map errors.

        Transient failures are retried with exponential backoff and full jitter until
        ``max_attempts`` attempts are made or ``retry_time`` seconds have passed (a refused
        connection: REFUSED_RETRY_S), whichever comes first; an attempt in flight is bounded by
        the connect/read timeouts. Retries that keep a caller waiting are logged."""
        s = self._state()
        where = f"{self.url}/{key}" if key else self.url
        t0 = time.monotonic()
        last, attempt = None, 0
        while True:
            try:
                with s._sem:
                    self._count("requests")
                    return attempt_fn(s._client)
            except Exception as exc:  # noqa: BLE001 - classified right below
                retry = self._classify(exc, what, where)
            attempt += 1
            last = retry
            with s._lock:
                s._retry_reasons[retry.reason] = s._retry_reasons.get(retry.reason, 0) + 1
            elapsed = time.monotonic() - t0
            budget = min(self.retry_time, REFUSED_RETRY_S) if retry.reason == "refused" else self.retry_time
            # exponential backoff with full jitter: spreads retries of many clients apart
            delay = s._rng.uniform(0, min(self.backoff_cap, self.backoff_base * 2 ** attempt))
            if attempt >= self.max_attempts or elapsed + delay >= budget:
                break
            with s._lock:
                s._counts["retries"] += 1
            # quiet while retries are quick (throttling under load is normal); say what we wait
            # for once a caller has been kept waiting
            log.log(logging.WARNING if elapsed >= 1.0 else logging.DEBUG,
                    "%s %s: %s after %.1f s (endpoint %s); retry %d in %.2f s, giving up after "
                    "%g s or %d attempts", what, where, retry, elapsed, self.endpoint, attempt,
                    delay, budget, self.max_attempts)
            time.sleep(delay)
        why = (f"{attempt} attempts" if attempt >= self.max_attempts
               else f"{attempt} attempts in {time.monotonic() - t0:.1f} s (retry time {budget:g} s"
                    + (" for a refused connection)" if last.reason == "refused" else ")"))
        raise StoreUnavailable(f"{what} {where} failed after {why} (endpoint {self.endpoint}): "
                               f"{redact(last)}") from None

    def _classify(self, exc: Exception, what: str, where: str) -> _Retry:
        """Return a _Retry for transient failures; raise NotFound/StoreError for the rest."""
        from botocore import exceptions as bx

        if isinstance(exc, _Retry):
            return exc
        if isinstance(exc, bx.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in _NOT_FOUND_CODES or status == 404:
                if code == "NoSuchBucket":
                    raise StoreError(f"{what} {where}: bucket {self.bucket!r} does not exist") from None
                raise NotFound(f"no such object: {where}") from None
            if code in _RETRY_CODES or status >= 500 or status == 429:
                return _Retry(code or str(status), f"{code or status}: {err.get('Message', '')}")
            raise StoreError(f"{what} {where} failed: {code or status}: "
                             f"{err.get('Message', '')}") from None
        if isinstance(exc, bx.ConnectTimeoutError):
            return _Retry("timeout", f"no connection within connect_timeout={self.connect_timeout:g} s")
        if isinstance(exc, bx.ReadTimeoutError):
            return _Retry("timeout", f"no reply within read_timeout={self.read_timeout:g} s")
        if isinstance(exc, (bx.IncompleteReadError, bx.ResponseStreamingError)):
            return _Retry("truncated", f"truncated body: {type(exc).__name__}")
        if isinstance(exc, bx.EndpointConnectionError) and _caused_by(exc, ConnectionRefusedError):
            return _Retry("refused", "connection refused (nothing listens at the endpoint's port)")
        if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectionClosedError,
                            bx.HTTPClientError, ConnectionError, TimeoutError)):
            return _Retry("connection", f"connection error: {type(exc).__name__}")
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            raise StoreError(f"{what} {where}: no usable AWS credentials found (set "
                             "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)") from None
        try:  # urllib3 errors can escape botocore's wrapping while streaming a body
            from urllib3.exceptions import HTTPError as Urllib3Error
        except ImportError:  # pragma: no cover
            Urllib3Error = ()
        if isinstance(exc, Urllib3Error):
            return _Retry("connection", f"connection error: {type(exc).__name__}")
        raise exc

    # -- operations
    def get(self, key, start=None, end=None):
        start, end = _check_range(start, end)
        full = self._key(key)
        if end is not None and end <= start:
            self.size(key)  # an empty range still reports a missing key
            return b""
        ranged = start > 0 or end is not None
        headers = {"Range": f"bytes={start}-{'' if end is None else end - 1}"} if ranged else {}

        def attempt(client):
            from botocore import exceptions as bx

            try:
                resp = client.get_object(Bucket=self.bucket, Key=full, **headers)
            except bx.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                    return b""  # start is at or past the end: like slicing, nothing
                raise
            return self._check_body(resp, resp["Body"].read(), start, end, ranged)

        data = self._call("GET", key, attempt)
        self._count("bytes_read", len(data))
        return data

    def _check_body(self, resp, body: bytes, start: int, end: int | None, ranged: bool) -> bytes:
        """Return the asked-for bytes; raise _Retry on a short or mismatched body."""
        expected = resp.get("ContentLength")
        if expected is not None and expected != len(body):
            raise _Retry("truncated", f"got {len(body)} of {expected} bytes")
        if ranged and "ContentRange" in resp:
            m = _CONTENT_RANGE.match(resp["ContentRange"])
            if not m:
                raise _Retry("bad-range", f"unparseable Content-Range {resp['ContentRange']!r}")
            lo, hi, total = int(m[1]), int(m[2]), m[3]
            want_hi = (int(total) if total != "*" else hi + 1) if end is None else end
            if total != "*":
                want_hi = min(want_hi, int(total))
            if lo != start or hi + 1 != want_hi or len(body) != hi - lo + 1:
                raise _Retry("bad-range", f"asked [{start}, {end}), got {resp['ContentRange']} "
                                          f"with {len(body)} bytes")
            return body
        # a whole object (asked for, or a server that ignored Range): check it against the ETag
        m = _etag_md5(resp)
        if m and hashlib.md5(body).hexdigest() != m:
            raise _Retry("etag-mismatch", "whole-object body does not match its ETag")
        return body[start:end] if ranged else body

    def put(self, key, data):
        full = self._key(key)
        md5 = hashlib.md5(data)

        def attempt(client):
            resp = client.put_object(Bucket=self.bucket, Key=full, Body=data,
                                     ContentMD5=base64.b64encode(md5.digest()).decode())
            m = _etag_md5(resp)
            if m and m != md5.hexdigest():
                raise _Retry("etag-mismatch", "stored object's ETag differs from the sent MD5")

        self._call("PUT", key, attempt)
        self._count("bytes_written", len(data))

    def size(self, key):
        full = self._key(key)
        return int(self._call("HEAD", key, lambda c: c.head_object(Bucket=self.bucket, Key=full))
                   ["ContentLength"])

    def exists(self, key):
        try:
            return self.size(key) >= 0
        except NotFound:
            return False

    def delete(self, key):
        full = self._key(key)
        self._call("DELETE", key, lambda c: c.delete_object(Bucket=self.bucket, Key=full))

    def list(self, prefix=""):
        root = f"{self.prefix}/" if self.prefix else ""
        keys, token = [], None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": root + prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("LIST", prefix, lambda c, kw=kwargs: c.list_objects_v2(**kw))
            keys += [o["Key"][len(root):] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(keys)
            token = page["NextContinuationToken"]


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
