"""Self-test of the proxy's "stall" fault: a server that reads a request and never answers.

It must cost a client exactly its read timeout, end for every held request at once on resume(), and never
outlive the proxy; the mount tests (test_offline.py, the fault soak) rely on all three.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from botocore.exceptions import HTTPClientError, ReadTimeoutError

from tests.mounting import poll
from tests.proxy import FAULT_KINDS, Proxy
from tests.servers import SeaweedFS, s3_client

KEY = "proxy/stall.txt"
BODY = b"held, then served"
PROMPT = 5.0  # seconds: "at once", with room for a loaded machine


def impatient_client(seaweedfs: SeaweedFS, proxy: Proxy) -> Any:
    """Gives up on a silent server after 1 s; max_attempts=1 is botocore's legacy "one retry"."""
    return s3_client(proxy.url, *seaweedfs.admin, connect_timeout=1, read_timeout=1, retries={"max_attempts": 1})


def patient_client(seaweedfs: SeaweedFS, proxy: Proxy) -> Any:
    """Would wait 30 s for an answer: only a reset by the proxy ends its wait early."""
    return s3_client(proxy.url, *seaweedfs.admin, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"})


def stalls(proxy: Proxy) -> int:
    return sum(1 for r in proxy.requests if r.fault == "stall")


@pytest.fixture
def stored(seaweedfs: SeaweedFS) -> str:
    seaweedfs.client().put_object(Bucket=seaweedfs.bucket, Key=KEY, Body=BODY)
    return KEY


def test_a_stalled_request_costs_the_client_its_read_timeout_and_resume_lets_it_through(
    seaweedfs: SeaweedFS, seaweedfs_proxy: Proxy, stored: str
) -> None:
    client = impatient_client(seaweedfs, seaweedfs_proxy)
    seaweedfs_proxy.stall()
    started = time.monotonic()
    with pytest.raises(ReadTimeoutError):
        client.head_object(Bucket=seaweedfs.bucket, Key=stored)
    took = time.monotonic() - started
    assert took < PROMPT, f"a 1 s read timeout (one retry) took {took:.1f}s to fail"
    assert stalls(seaweedfs_proxy) >= 1 and all(r.fault == "stall" for r in seaweedfs_proxy.requests)

    seaweedfs_proxy.resume()
    assert client.head_object(Bucket=seaweedfs.bucket, Key=stored)["ContentLength"] == len(BODY)


def test_resume_and_reset_release_held_requests_at_once(
    seaweedfs: SeaweedFS, seaweedfs_proxy: Proxy, stored: str
) -> None:
    client = patient_client(seaweedfs, seaweedfs_proxy)

    def get() -> bytes:
        return bytes(client.get_object(Bucket=seaweedfs.bucket, Key=stored)["Body"].read())

    with ThreadPoolExecutor(1) as pool:
        for release in (seaweedfs_proxy.resume, seaweedfs_proxy.reset):
            seaweedfs_proxy.reset()  # no stall counted from the previous round
            seaweedfs_proxy.stall()
            getting = pool.submit(get)
            assert poll(lambda: stalls(seaweedfs_proxy) > 0, PROMPT), "the request never reached the proxy"
            released = time.monotonic()
            release()
            # The held connection is reset, so the client retries at once (not after its 30 s read timeout).
            assert getting.result(timeout=PROMPT) == BODY, f"{release.__name__}() did not let the request through"
            assert time.monotonic() - released < PROMPT


def test_a_drawn_stall_is_reset_after_stall_seconds_and_recorded(
    seaweedfs: SeaweedFS, seaweedfs_proxy: Proxy, stored: str
) -> None:
    assert "stall" not in FAULT_KINDS, "fail_rate() without kinds must not start stalling existing callers"
    seaweedfs_proxy.stall_seconds = 0.5
    seaweedfs_proxy.fail_rate(1.0, kinds=("stall",))
    started = time.monotonic()
    with pytest.raises(HTTPClientError) as failed:
        impatient_client(seaweedfs, seaweedfs_proxy).head_object(Bucket=seaweedfs.bucket, Key=stored)
    took = time.monotonic() - started
    # Reset by the proxy after 0.5 s, before the client's own 1 s read timeout would have fired.
    assert not isinstance(failed.value, ReadTimeoutError), f"the client timed out first: {failed.value!r}"
    assert took < PROMPT, f"two 0.5 s stalls took {took:.1f}s"
    records = seaweedfs_proxy.requests
    assert records and all((r.fault, r.status) == ("stall", 0) for r in records), records


def test_stop_releases_held_requests(seaweedfs: SeaweedFS, stored: str) -> None:
    proxy = Proxy(upstream=seaweedfs.endpoint).start()
    try:
        proxy.stall()
        head = f"HEAD /{seaweedfs.bucket}/{stored} HTTP/1.1\r\nHost: {proxy.host}\r\n\r\n"
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=PROMPT) as sock:
            sock.sendall(head.encode())
            assert poll(lambda: stalls(proxy) == 1, PROMPT), "the request never reached the proxy"
            stopped = time.monotonic()
            proxy.stop()
            try:
                answer = sock.recv(1024)
            except ConnectionResetError:
                answer = b""
            assert answer == b"", f"a stalled request was answered: {answer!r}"
            assert time.monotonic() - stopped < PROMPT
    finally:
        proxy.stop()
