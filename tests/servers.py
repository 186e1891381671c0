"""Real storage servers on 127.0.0.1 for the tests: SeaweedFS (S3), moto (S3), Azurite (Azure Blob), and
gcp-storage-emulator (GCS).

Each ``start_*`` function launches one server as a subprocess, waits until it answers (polling with a
deadline), creates its buckets and returns a ``Running`` handle whose ``info`` is a small frozen dataclass the
tests use. The pytest fixtures in ``conftest.py`` wrap these; nothing here depends on pytest.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

REPO = Path(__file__).resolve().parent.parent
LOG_DIR = REPO / "tests" / ".logs"
# Not resolved on purpose: .venv/bin/python is a symlink to the system interpreter, the scripts sit beside it.
VENV_BIN = Path(sys.executable).parent
AZURITE_BIN = REPO / ".tools" / "azurite" / "node_modules" / ".bin" / "azurite-blob"

START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0

# Azurite's well-known development account (public, documented by Microsoft; not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

TEST_BUCKET = "clearmlfs-test"


class ServerError(RuntimeError):
    """A test server could not be found or started."""


# ---------------------------------------------------------------------------------------------------------
# Process plumbing
# ---------------------------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Ports the kernel just handed out; all sockets stay open until all are picked, so no duplicates."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def require_binary(path: Path) -> Path:
    if not path.exists():
        raise ServerError(f"{path} is missing: run `make setup` (scripts/setup.sh) first")
    return path


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


T = TypeVar("T")


@dataclass
class Running(Generic[T]):
    """A started server process and the info the tests get about it."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    info: T
    stop_grace: float = STOP_TIMEOUT

    def stop(self) -> None:
        stop_process(self.process, self.stop_grace)


def launch(name: str, cmd: list[str], cwd: Path) -> tuple[subprocess.Popen[bytes], Path]:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"{name}.log"
    with log_path.open("wb") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        # Own session: a Ctrl-C in the terminal reaches pytest only, which tears the servers down in order;
        # it also lets us kill the whole process group (node or python wrappers included).
        process = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ),
            start_new_session=True,
        )
    return process, log_path


def stop_process(process: subprocess.Popen[bytes], grace: float = STOP_TIMEOUT) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds, to the whole process group."""
    if process.poll() is not None:
        return
    for sig, timeout in ((signal.SIGTERM, grace), (signal.SIGKILL, STOP_TIMEOUT)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_until(
    name: str,
    process: subprocess.Popen[bytes],
    log_path: Path,
    probe: Callable[[], Any],
    timeout: float = START_TIMEOUT,
) -> Any:
    """Call ``probe`` until it returns without raising; fail early if the process died."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(
                f"{name} exited with {process.returncode}; log {log_path}:\n{log_tail(log_path)}"
            )
        try:
            return probe()
        except Exception as exc:  # noqa: BLE001 - any failure just means "not ready yet"
            last_error = exc
        time.sleep(0.1)  # poll interval, not a readiness guess
    stop_process(process)
    raise ServerError(
        f"{name} not ready after {timeout:.0f}s (last error: {last_error!r}); "
        f"log {log_path}:\n{log_tail(log_path)}"
    )


def http_answers(host: str, port: int, path: str = "/", tls: bool = False) -> int:
    """Any HTTP status at all means the server is listening and speaking HTTP (over TLS, any certificate)."""
    conn = (http.client.HTTPSConnection(host, port, timeout=2, context=ssl._create_unverified_context()) if tls
            else http.client.HTTPConnection(host, port, timeout=2))
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


@contextlib.contextmanager
def started(name: str, cmd: list[str], cwd: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Launch, and stop again if anything fails before the caller has its handle."""
    process, log_path = launch(name, cmd, cwd)
    try:
        yield process, log_path
    except BaseException:
        stop_process(process)
        raise


# ---------------------------------------------------------------------------------------------------------
# S3: SeaweedFS and moto
# ---------------------------------------------------------------------------------------------------------


def s3_client(endpoint: str, key: str, secret: str, verify: str | None = None, **config: Any) -> Any:
    """A boto3 S3 client the way the tests talk to local servers: path-style, us-east-1, SigV4 (`verify`: the
    CA bundle of a server over https)."""
    import boto3
    from botocore.config import Config

    settings: dict[str, Any] = {
        "s3": {"addressing_style": "path"},
        "signature_version": "s3v4",
        "connect_timeout": 5,
        "read_timeout": 60,
        "retries": {"max_attempts": 2, "mode": "standard"},
    }
    settings.update(config)
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(**settings),
        verify=verify,
    )


@dataclass(frozen=True)
class SeaweedFS:
    endpoint: str  # "http://127.0.0.1:PORT"
    host: str  # "127.0.0.1:PORT"
    admin: tuple[str, str]
    key_a: tuple[str, str]  # may use bucket-a only
    key_b: tuple[str, str]  # may use bucket-b only
    bucket: str
    log_path: Path
    bucket_a: str = "bucket-a"
    bucket_b: str = "bucket-b"

    def client(self, key: str | None = None, secret: str | None = None, endpoint: str | None = None) -> Any:
        """boto3 S3 client; admin credentials unless given. ``endpoint`` lets a test go through a proxy."""
        return s3_client(endpoint or self.endpoint, key or self.admin[0], secret or self.admin[1])


SEAWEED_ADMIN = ("admin-key", "admin-secret")
SEAWEED_KEY_A = ("key-a", "secret-a")
SEAWEED_KEY_B = ("key-b", "secret-b")


def seaweed_identities() -> dict[str, Any]:
    """SeaweedFS static S3 identities; an action written ``Action:bucket`` applies to that bucket only."""

    def identity(name: str, creds: tuple[str, str], actions: list[str]) -> dict[str, Any]:
        return {
            "name": name,
            "credentials": [{"accessKey": creds[0], "secretKey": creds[1]}],
            "actions": actions,
        }

    def only(bucket: str) -> list[str]:
        return [f"{action}:{bucket}" for action in ("Read", "Write", "List", "Tagging")]

    return {
        "identities": [
            identity("admin", SEAWEED_ADMIN, ["Admin", "Read", "Write", "List", "Tagging"]),
            identity("user-a", SEAWEED_KEY_A, only("bucket-a")),
            identity("user-b", SEAWEED_KEY_B, only("bucket-b")),
        ]
    }


def seaweed_command(weed: Path, data: Path, config: Path, ports: list[int]) -> list[str]:
    s3, s3_grpc, master, master_grpc, volume, volume_grpc, filer, filer_grpc = ports
    return [
        str(weed),
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        # Every port explicit: the defaults (and the "+10000" gRPC rule) would collide with other runs.
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-s3.config={config}",
        # These extra listeners default to fixed ports (8181, 9101); 0 turns them off.
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-metricsPort=0",
        # Small volumes, not preallocated: each bucket is a collection with several volumes of its own,
        # and the default 30 GB limit per volume makes no sense on a test machine.
        "-master.volumeSizeLimitMB=512",  # room for the suite's GiB-sized objects (64 MB x 100 filled up)
        "-volume.max=1000",  # not preallocated: a high cap costs nothing, and hitting it stalls writes
    ]


def start_seaweedfs(workdir: Path) -> Running[SeaweedFS]:
    weed = require_binary(VENV_BIN / "weed")
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    config = workdir / "identities.json"
    config.write_text(json.dumps(seaweed_identities(), indent=2))
    ports = free_ports(8)
    with started("seaweedfs", seaweed_command(weed, data, config, ports), workdir) as (process, log_path):
        info = SeaweedFS(
            endpoint=f"http://127.0.0.1:{ports[0]}",
            host=f"127.0.0.1:{ports[0]}",
            admin=SEAWEED_ADMIN,
            key_a=SEAWEED_KEY_A,
            key_b=SEAWEED_KEY_B,
            bucket=TEST_BUCKET,
            log_path=log_path,
        )
        wait_until("seaweedfs", process, log_path, lambda: http_answers("127.0.0.1", ports[0]))
        admin = info.client()
        buckets = [info.bucket_a, info.bucket_b, TEST_BUCKET]
        wait_until("seaweedfs", process, log_path, lambda: create_s3_buckets(admin, buckets))
        # The S3 port answers before a volume server has registered; only a real write proves it can store.
        wait_until("seaweedfs", process, log_path, lambda: probe_s3_write(admin, TEST_BUCKET))
    # weed 4.x never finishes its graceful stop ("Gracefully stopping gRPC server" hangs) after SIGTERM or
    # SIGINT; the data is throwaway, so it gets a short grace and then SIGKILL.
    return Running("seaweedfs", process, log_path, info, stop_grace=1.0)


def create_s3_buckets(client: Any, buckets: list[str]) -> None:
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in buckets:
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)


def probe_s3_write(client: Any, bucket: str) -> None:
    client.put_object(Bucket=bucket, Key=".ready-probe", Body=b"ok")
    client.delete_object(Bucket=bucket, Key=".ready-probe")


@dataclass(frozen=True)
class MotoS3:
    endpoint: str
    host: str
    key: str
    secret: str
    bucket: str
    log_path: Path

    def client(
        self, key: str | None = None, secret: str | None = None, endpoint: str | None = None, ca: Path | None = None
    ) -> Any:
        return s3_client(endpoint or self.endpoint, key or self.key, secret or self.secret,
                         verify=str(ca) if ca else None)


def start_moto(workdir: Path, tls: Path | None = None) -> Running[MotoS3]:
    """moto's S3; with `tls` (a folder), over https with a self-signed certificate made there (cert.pem)."""
    moto = require_binary(VENV_BIN / "moto_server")
    workdir.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    cmd = [str(moto), "-H", "127.0.0.1", "-p", str(port)]
    if tls:
        cmd += ["-c", str(self_signed(tls)), "-k", str(tls / "key.pem")]
    with started("moto_s3", cmd, workdir) as (process, log_path):
        info = MotoS3(
            endpoint=f"{'https' if tls else 'http'}://127.0.0.1:{port}",
            host=f"127.0.0.1:{port}",
            key="moto-key",
            secret="moto-secret",
            bucket="moto-bucket",
            log_path=log_path,
        )
        wait_until("moto_s3", process, log_path, lambda: http_answers("127.0.0.1", port, "/moto-api/", tls=bool(tls)))
        create_s3_buckets(info.client(ca=tls / "cert.pem" if tls else None), [info.bucket])
    return Running("moto_s3", process, log_path, info)


def self_signed(folder: Path) -> Path:
    """A certificate for 127.0.0.1 signed by its own key (cert.pem, key.pem in `folder`): cert.pem."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "clearmlfs test server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    (folder / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return folder / "cert.pem"


# ---------------------------------------------------------------------------------------------------------
# Azure Blob: Azurite
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Azurite:
    account_name: str
    account_key: str
    endpoint: str  # "http://127.0.0.1:PORT/devstoreaccount1"
    container: str
    connection_string: str
    log_path: Path

    def service_client(self, endpoint: str | None = None) -> Any:
        """azure.storage.blob.BlobServiceClient; ``endpoint`` (".../devstoreaccount1") allows a proxy."""
        from azure.storage.blob import BlobServiceClient

        credential = {"account_name": self.account_name, "account_key": self.account_key}
        return BlobServiceClient(endpoint or self.endpoint, credential=credential)


def start_azurite(workdir: Path) -> Running[Azurite]:
    azurite = require_binary(AZURITE_BIN)
    workdir.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    cmd = [
        str(azurite),
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        str(port),
        "--location",
        str(workdir),
        # Newer SDKs send API versions this Azurite may not know yet; --loose ignores unsupported headers.
        "--skipApiVersionCheck",
        "--loose",
        "--silent",
        "--disableTelemetry",
    ]
    with started("azurite", cmd, workdir) as (process, log_path):
        endpoint = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
        info = Azurite(
            account_name=AZURITE_ACCOUNT,
            account_key=AZURITE_KEY,
            endpoint=endpoint,
            container=TEST_BUCKET,
            connection_string=(
                f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
                f"BlobEndpoint={endpoint};"
            ),
            log_path=log_path,
        )
        wait_until(
            "azurite", process, log_path, lambda: http_answers("127.0.0.1", port, f"/{AZURITE_ACCOUNT}")
        )
        container = info.service_client().get_container_client(info.container)
        if not container.exists():
            container.create_container()
    return Running("azurite", process, log_path, info)


# ---------------------------------------------------------------------------------------------------------
# GCS: gcp-storage-emulator
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GCSEmulator:
    endpoint: str  # "http://127.0.0.1:PORT", also what STORAGE_EMULATOR_HOST is set to
    bucket: str
    project: str
    log_path: Path

    def client(self) -> Any:
        """google.cloud.storage.Client for the emulator, anonymous credentials."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project=self.project,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.endpoint},
        )


def start_gcs_emulator(workdir: Path) -> Running[GCSEmulator]:
    emulator = require_binary(VENV_BIN / "gcp-storage-emulator")
    workdir.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    cmd = [str(emulator), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"]
    with started("gcs_emulator", cmd, workdir) as (process, log_path):
        info = GCSEmulator(
            endpoint=f"http://127.0.0.1:{port}",
            bucket=TEST_BUCKET,
            project="test-project",
            log_path=log_path,
        )
        wait_until(
            "gcs_emulator", process, log_path, lambda: http_answers("127.0.0.1", port, "/storage/v1/b")
        )
        client = info.client()
        if client.lookup_bucket(info.bucket) is None:
            client.create_bucket(info.bucket)
    return Running("gcs_emulator", process, log_path, info)
