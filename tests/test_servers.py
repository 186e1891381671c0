"""Smoke tests of the test infrastructure itself: each server works with its own SDK, and the proxy counts."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from tests.proxy import Proxy
from tests.servers import Azurite, GCSEmulator, MotoS3, SeaweedFS, s3_client

MiB = 1024 * 1024


def test_seaweedfs_stores_and_returns_an_object(seaweedfs: SeaweedFS) -> None:
    client = seaweedfs.client()
    client.put_object(Bucket=seaweedfs.bucket, Key="smoke/hello.txt", Body=b"hello")
    assert client.get_object(Bucket=seaweedfs.bucket, Key="smoke/hello.txt")["Body"].read() == b"hello"


def test_seaweedfs_key_a_uses_bucket_a_but_is_denied_bucket_b(seaweedfs: SeaweedFS) -> None:
    key_a = seaweedfs.client(*seaweedfs.key_a)
    key_a.put_object(Bucket="bucket-a", Key="mine.txt", Body=b"a")
    # Other tests share the session's buckets: assert on our own key only.
    assert "mine.txt" in [o["Key"] for o in key_a.list_objects_v2(Bucket="bucket-a")["Contents"]]
    seaweedfs.client(*seaweedfs.key_b).put_object(Bucket="bucket-b", Key="theirs.txt", Body=b"b")

    for attempt in (
        lambda: key_a.get_object(Bucket="bucket-b", Key="theirs.txt"),
        lambda: key_a.put_object(Bucket="bucket-b", Key="x.txt", Body=b"x"),
        lambda: key_a.list_objects_v2(Bucket="bucket-b"),
    ):
        with pytest.raises(ClientError) as denied:
            attempt()
        assert denied.value.response["Error"]["Code"] == "AccessDenied"


def test_seaweedfs_rejects_a_wrong_secret(seaweedfs: SeaweedFS) -> None:
    with pytest.raises(ClientError) as denied:
        seaweedfs.client(seaweedfs.key_a[0], "wrong-secret").list_objects_v2(Bucket="bucket-a")
    assert denied.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


def test_moto_stores_and_returns_an_object(moto_s3: MotoS3) -> None:
    client = moto_s3.client()
    client.put_object(Bucket=moto_s3.bucket, Key="smoke/hello.txt", Body=b"hello")
    assert client.get_object(Bucket=moto_s3.bucket, Key="smoke/hello.txt")["Body"].read() == b"hello"


def test_azurite_stores_and_returns_a_blob(azurite: Azurite) -> None:
    container = azurite.service_client().get_container_client(azurite.container)
    container.upload_blob("smoke/hello.txt", b"hello", overwrite=True)
    assert container.download_blob("smoke/hello.txt").readall() == b"hello"
    assert container.download_blob("smoke/hello.txt", offset=1, length=3).readall() == b"ell"


def test_gcs_emulator_handles_resumable_upload_and_ranged_download(gcs_emulator: GCSEmulator) -> None:
    assert os.environ["STORAGE_EMULATOR_HOST"] == gcs_emulator.endpoint
    data = os.urandom(9 * MiB + 123)  # above 8 MiB so the client uses a resumable upload
    bucket = gcs_emulator.client().bucket(gcs_emulator.bucket)
    bucket.blob("smoke/big.bin", chunk_size=4 * MiB).upload_from_string(data)

    blob = bucket.get_blob("smoke/big.bin")
    assert blob is not None and blob.size == len(data)
    assert blob.download_as_bytes(start=MiB, end=MiB + 99) == data[MiB : MiB + 100]
    assert blob.download_as_bytes() == data


def test_environment_is_clean_during_the_session() -> None:
    assert not [name for name in os.environ if name.startswith(("AWS_", "AZURE_", "CLEARML_", "TRAINS_"))]
    assert not Path(os.environ["HOME"], "clearml.conf").exists()


def test_proxy_counts_a_multipart_upload_and_download(
    seaweedfs: SeaweedFS, seaweedfs_proxy: Proxy, tmp_path: Path
) -> None:
    client = seaweedfs.client(endpoint=seaweedfs_proxy.url)
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(40 * MiB))
    transfer = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB)

    client.upload_file(str(source), seaweedfs.bucket, "proxy/big.bin", Config=transfer)
    assert seaweedfs_proxy.count("PUT", path_contains="proxy/big.bin") == 5  # 40 MiB in 8 MiB parts
    assert seaweedfs_proxy.count("POST", path_contains="proxy/big.bin") == 2  # create + complete

    seaweedfs_proxy.reset()
    target = tmp_path / "back.bin"
    client.download_file(seaweedfs.bucket, "proxy/big.bin", str(target), Config=transfer)
    assert target.read_bytes() == source.read_bytes()
    assert seaweedfs_proxy.bytes_sent(path_contains="proxy/big.bin") == 40 * MiB
    assert seaweedfs_proxy.count("PUT") == 0


def test_proxy_fail_next_returns_the_status_without_forwarding(
    seaweedfs: SeaweedFS, seaweedfs_proxy: Proxy
) -> None:
    no_retry = s3_client(seaweedfs_proxy.url, *seaweedfs.admin, retries={"total_max_attempts": 1})
    seaweedfs_proxy.fail_next(1, status=503)
    with pytest.raises(ClientError) as failed:
        no_retry.put_object(Bucket=seaweedfs.bucket, Key="proxy/never.txt", Body=b"x")
    assert failed.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    with pytest.raises(ClientError):
        seaweedfs.client().head_object(Bucket=seaweedfs.bucket, Key="proxy/never.txt")

    no_retry.put_object(Bucket=seaweedfs.bucket, Key="proxy/later.txt", Body=b"y")
    assert [r.status for r in seaweedfs_proxy.requests] == [503, 200]


def test_proxy_injected_faults_are_retried_by_boto3(seaweedfs: SeaweedFS, seaweedfs_proxy: Proxy) -> None:
    client = s3_client(
        seaweedfs_proxy.url, *seaweedfs.admin, retries={"max_attempts": 10, "mode": "standard"}
    )
    seaweedfs_proxy.fail_rate(0.3, seed=1)
    for i in range(10):
        client.put_object(Bucket=seaweedfs.bucket, Key=f"proxy/flaky-{i}.txt", Body=b"z" * 1000)
        assert (
            client.get_object(Bucket=seaweedfs.bucket, Key=f"proxy/flaky-{i}.txt")["Body"].read()
            == b"z" * 1000
        )
    faults = {r.fault for r in seaweedfs_proxy.requests}
    assert faults - {None}, "a 30% fault rate over 20+ requests should have injected something"


def test_proxy_drops_a_request_whose_body_is_cut_short(seaweedfs: SeaweedFS, seaweedfs_proxy: Proxy) -> None:
    """Like a real server, the proxy never forwards a body that ended early as if it were the whole request."""
    head = f"PUT /{seaweedfs.bucket}/proxy/cut.bin HTTP/1.1\r\nHost: {seaweedfs_proxy.host}\r\nContent-Length: 1000\r\n"
    with socket.create_connection(("127.0.0.1", seaweedfs_proxy.port), timeout=30) as sock:
        sock.sendall(head.encode() + b"\r\n" + b"x" * 10)
        sock.shutdown(socket.SHUT_WR)  # 990 bytes short
        assert sock.recv(1024) == b"", "the proxy answered a request it never received whole"
    assert [(r.method, r.status, r.request_bytes) for r in seaweedfs_proxy.requests] == [("PUT", 0, 10)]
