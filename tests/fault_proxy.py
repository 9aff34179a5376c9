"""A fault-injecting HTTP proxy on loopback, in front of a real S3 endpoint (for tests).

Usage::

    from tests.fault_proxy import FaultProxy
    with FaultProxy(s3.endpoint, fraction=0.1, seed=0) as proxy:
        store = S3Store(bucket, endpoint_url=proxy.endpoint, access_key=..., secret_key=...)
        ...
        proxy.counts   # {"requests": 812, "slowdown": 21, "reset": 19, "truncate": 22, "delay": 20}

Fault kinds (``kinds``): ``slowdown`` answers 503 with an S3 ``SlowDown`` XML error without
forwarding; ``reset`` drops the connection (RST) before forwarding; ``reset_after`` forwards (the
store applies the request) and then drops the connection instead of answering; ``truncate``
forwards and relays the status, headers (full Content-Length) and only half of the body, then drops
the connection; ``delay`` waits ``delay_s`` and then forwards normally; ``hang`` reads the request
and never answers (only when asked for: it tests client timeouts).

Which requests get a fault is a pure function of (seed, method, path+query, Range header, how many
times this same request was seen before), never of thread timing, so a run is reproducible even
with concurrent clients. A given request is faulted at most ``max_faults_per_request`` times, so a
client that retries always gets through eventually. Requests keep their Host header, so SigV4
signatures made for the proxy's address stay valid upstream.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

KINDS = ("slowdown", "reset", "reset_after", "truncate", "delay", "hang")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
               "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade", "expect"}
_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message><RequestId>fault-proxy"
             b"</RequestId></Error>")


class FaultProxy:
    """Forward HTTP requests to ``upstream`` (http://host:port), injecting faults on some."""

    def __init__(self, upstream: str, *, fraction: float = 0.1,
                 kinds: tuple[str, ...] = ("slowdown", "reset", "truncate", "delay"),
                 seed: int = 0, delay_s: float = 0.2, max_faults_per_request: int = 3):
        unknown = set(kinds) - set(KINDS)
        if unknown or not kinds:
            raise ValueError(f"fault kinds must be a non-empty subset of {KINDS}, got {kinds}")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        u = urlparse(upstream)
        self.upstream = (u.hostname, u.port or 80)
        self.fraction, self.kinds, self.seed = fraction, tuple(kinds), seed
        self.delay_s, self.max_faults_per_request = delay_s, max_faults_per_request
        self.counts: dict[str, int] = {"requests": 0}
        self.faults: list[tuple[str, str, str]] = []  # (method, path, kind) in arrival order
        self._seen: dict[tuple, int] = {}
        self._faulted: dict[tuple, int] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def decide(self, method: str, path: str, byte_range: str) -> str | None:
        """The fault for this request (or None), counted; deterministic as described above."""
        sig = (method, path, byte_range)
        with self._lock:
            self.counts["requests"] += 1
            n = self._seen.get(sig, 0)
            self._seen[sig] = n + 1
            digest = hashlib.sha256(f"{self.seed}|{method}|{path}|{byte_range}|{n}".encode()).digest()
            draw = int.from_bytes(digest[:8], "big") / 2**64
            if draw >= self.fraction or self._faulted.get(sig, 0) >= self.max_faults_per_request:
                return None
            kind = self.kinds[int.from_bytes(digest[8:12], "big") % len(self.kinds)]
            self._faulted[sig] = self._faulted.get(sig, 0) + 1
            self.counts[kind] = self.counts.get(kind, 0) + 1
            self.faults.append((method, path, kind))
            return kind

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and `Expect: 100-continue` is answered for us
    owner: FaultProxy

    def log_message(self, *args) -> None:  # quiet: tests read counts, not logs
        pass

    def do_GET(self):
        self._handle()

    do_PUT = do_POST = do_HEAD = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _drop(self) -> None:
        """Close with RST: the client sees a reset connection, not a clean end."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _forward(self, body: bytes):
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP]
        if self.command in ("PUT", "POST") or body:
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers.append(("Content-Length", str(len(body))))
        for attempt in range(2):  # an idle upstream keep-alive connection may have been closed
            conn = getattr(self, "_upstream", None)
            if conn is None:
                conn = self._upstream = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in headers:
                    conn.putheader(k, v)
                conn.endheaders(body or None)
                resp = conn.getresponse()
                data = resp.read() if self.command != "HEAD" else b""
                return resp, data
            except (ConnectionError, http.client.HTTPException):
                conn.close()
                self._upstream = None
                if attempt:
                    raise

    def _handle(self) -> None:
        body = self._read_body()
        kind = self.owner.decide(self.command, self.path, self.headers.get("Range", ""))
        if kind == "hang":
            self.owner._stopping.wait()
            return self._drop()
        if kind == "reset":
            return self._drop()
        if kind == "slowdown":
            self.send_response(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(_SLOWDOWN)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(_SLOWDOWN)
            return
        if kind == "delay":
            time.sleep(self.owner.delay_s)
        try:
            resp, data = self._forward(body)
        except OSError:
            return self._drop()
        if kind == "reset_after" or (kind == "truncate" and len(data) < 2):
            return self._drop()
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP_BY_HOP | {"content-length", "server", "date"}:
                self.send_header(k, v)
        length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
        if length is not None:
            self.send_header("Content-Length", length)
        self.end_headers()
        if kind == "truncate":
            self.wfile.write(data[: len(data) // 2])
            return self._drop()
        self.wfile.write(data)
