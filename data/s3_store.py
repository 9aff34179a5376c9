"""The S3 object store: ``data.store.ObjectStore`` over boto3.

Credentials come from the standard AWS chain (env vars, profile, instance
role); the endpoint from the ``endpoint_url`` argument or ``AWS_ENDPOINT_URL``. boto3's own retries
are off; our loop retries throttling (SlowDown/503/429), 5xx, timeouts, connection resets and
truncated bodies with exponential backoff and full jitter, for at most ``max_attempts`` tries and
``retry_time`` seconds (a refused connection: ``REFUSED_RETRY_S``), then raises
``StoreUnavailable``. An attempt waits at most ``connect_timeout`` for a connection and
``read_timeout`` for each reply; retries that keep a caller waiting over a second are logged
(logger ``data.s3_store``, WARNING) with what they wait for. ``train.config.StoreConfig`` holds these
settings for runs. Every body is checked against Content-Length / Content-Range (and a
whole-object read against the ETag when it is a plain MD5), so a short read is retried, never
returned. At most ``max_concurrency`` requests run at once per process, fewer while the store
throttles: each SlowDown / 503 / 429 or timeout halves the number allowed at once (down to
one), and every run of that many successes lets one more run again, up to ``max_concurrency``
(additive increase, multiplicative decrease). ``stats()`` counts requests, retries by reason, bytes and the cuts.
An S3Store is safe to share across threads, to fork (the client is re-created in the child)
and to pickle (DataLoader workers with spawn).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import random
import re
import threading
import time

from data import store as store_module
from data.store import (MIN_PART_BYTES, NotFound, ObjectStore, StoreError, StoreUnavailable, Upload,
                        _check_range, redact, validate_key)

log = logging.getLogger(__name__)

# A connection refused means nothing listens on the port: retry it only this long (a restarting
# gateway comes back within it; a wrong port fails fast). Other transient errors get retry_time.
REFUSED_RETRY_S = 1.0

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


def retry_jitter_seed(seed: int | None) -> int:
    """The retry-jitter stream of this process: (seed, purpose, rank, loader worker), so ranks
    and workers back off independently (one shared seed would retry in lockstep), yet the same
    for the same seed and place. Rank from torchrun's RANK; worker from torch's DataLoader."""
    from data.mix import derive_key

    worker = 0
    try:
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
    except ImportError:
        pass
    rank = int(os.environ.get("RANK", "0") or 0)
    return derive_key(0 if seed is None else seed, "", "s3-retry-jitter", f"rank-{rank}",
                      f"worker-{worker}")


class _Retry(Exception):
    """Internal: this attempt failed in a way worth retrying; ``reason`` is counted in stats."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# Retry reasons that mean "too many requests" (or a server too busy to answer in time): they
# cut the concurrency (_AdaptiveLimit).
_THROTTLE = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
             "TooManyRequests", "ServiceUnavailable", "503", "429", "timeout"}


class _AdaptiveLimit:
    """At most `limit` requests at once; a throttled reply halves `limit` (not below one), each
    `limit` successes in a row raise it by one, up to `maximum` (AIMD, as TCP does)."""

    def __init__(self, maximum: int):
        self.maximum = self.limit = maximum
        self.active = self._ok = self.cuts = 0
        self._cv = threading.Condition()

    def acquire(self) -> None:
        with self._cv:
            while self.active >= self.limit:
                self._cv.wait()
            self.active += 1

    def release(self, throttled: bool) -> None:
        with self._cv:
            self.active -= 1
            if throttled:
                self._ok = 0
                if self.limit > 1:
                    self.limit = max(1, self.limit // 2)
                    self.cuts += 1
            else:
                self._ok += 1
                if self._ok >= self.limit and self.limit < self.maximum:
                    self.limit += 1
                    self._ok = 0
            self._cv.notify_all()


class _S3Upload(Upload):
    """A multipart upload (objects above one part) or a single put (one part) on commit."""

    def __init__(self, store: "S3Store", key: str, size: int, part_size: int):
        self.store, self.key, self.size, self.part_size = store, key, size, part_size
        self.parts: dict[int, str] = {}
        self.single: bytes | None = None
        self.upload_id = None
        self._lock = threading.Lock()
        if size > part_size:
            full = store._key(key)
            self.upload_id = store._call("PUT", key, lambda c: c.create_multipart_upload(
                Bucket=store.bucket, Key=full))["UploadId"]

    def write(self, offset, data):
        if offset % self.part_size or (len(data) != self.part_size
                                       and offset + len(data) != self.size):
            raise ValueError(f"{self.key}: part at {offset} of {len(data)} bytes is not a whole "
                             f"part of {self.part_size} bytes (or the last one)")
        if self.upload_id is None:
            self.single = bytes(data)
            return
        s, full, number = self.store, self.store._key(self.key), offset // self.part_size + 1
        body = bytes(data)
        md5 = hashlib.md5(body)

        def attempt(client):
            resp = client.upload_part(Bucket=s.bucket, Key=full, UploadId=self.upload_id,
                                      PartNumber=number, Body=body,
                                      ContentMD5=base64.b64encode(md5.digest()).decode())
            m = _etag_md5(resp)
            if m and m != md5.hexdigest():
                raise _Retry("etag-mismatch", "stored part's ETag differs from the sent MD5")
            return resp["ETag"]

        etag = s._call("PUT", self.key, attempt)
        s._count("bytes_written", len(body))
        with self._lock:
            self.parts[number] = etag

    def commit(self):
        s, full = self.store, self.store._key(self.key)
        if self.upload_id is None:
            s.put(self.key, self.single if self.single is not None else b"")
            return
        want = -(-self.size // self.part_size)
        if sorted(self.parts) != list(range(1, want + 1)):
            raise StoreError(f"{s.url}/{self.key}: commit with parts {sorted(self.parts)} "
                             f"of {want}")
        parts = [{"PartNumber": n, "ETag": self.parts[n]} for n in sorted(self.parts)]
        try:
            s._call("PUT", self.key, lambda c: c.complete_multipart_upload(
                Bucket=s.bucket, Key=full, UploadId=self.upload_id,
                MultipartUpload={"Parts": parts}))
        except NotFound:
            # a retry after a completion whose reply was lost finds no upload: the object is
            # there if that completion went through
            if s.size(self.key) != self.size:
                raise

    def abort(self):
        if self.upload_id is not None:
            s, full = self.store, self.store._key(self.key)
            try:
                s._call("DELETE", self.key, lambda c: c.abort_multipart_upload(
                    Bucket=s.bucket, Key=full, UploadId=self.upload_id))
            except StoreError as e:
                log.warning("abandoning multipart upload of %s/%s: %s", s.url, self.key, e)


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
            with store_module._INIT_LOCK:  # the store module's, re-created at fork
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
        self._limit = _AdaptiveLimit(self.max_concurrency)
        self._lock = threading.Lock()
        self._rng = random.Random(retry_jitter_seed(self.seed))
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
            return {**s._counts, "retry_reasons": dict(s._retry_reasons),
                    "concurrency_cuts": s._limit.cuts, "concurrency_limit": s._limit.limit}

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
            s._limit.acquire()
            throttled = False
            try:
                self._count("requests")
                return attempt_fn(s._client)
            except Exception as exc:  # noqa: BLE001 - classified right below
                retry = self._classify(exc, what, where)
                throttled = retry.reason in _THROTTLE
            finally:
                s._limit.release(throttled)
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

    def open_upload(self, key, size, part_size):
        if part_size < MIN_PART_BYTES:
            raise ValueError(f"part_size={part_size} is below S3's minimum of {MIN_PART_BYTES}")
        return _S3Upload(self, key, size, part_size)

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
