"""Session-wide test set-up: a clean environment and real storage servers on 127.0.0.1.

Server fixtures (session-scoped, started on first use, stopped at session end):
    seaweedfs     -> servers.SeaweedFS    (S3 with per-bucket keys)
    moto_s3       -> servers.MotoS3
    azurite       -> servers.Azurite
    gcs_emulator  -> servers.GCSEmulator  (also sets STORAGE_EMULATOR_HOST for the session)
    fileserver    -> fileserver.FileServer (a ClearML fileserver and the api server's auth.login)
Per test:
    seaweedfs_proxy -> proxy.Proxy in front of seaweedfs, stopped after the test
A missing server binary fails the test with a hint to run `make setup`; nothing is skipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from tests import servers
from tests.proxy import Proxy

if TYPE_CHECKING:  # (Flask, which the stand-in is written in, is imported by the tests that use it only)
    from tests.fileserver import FileServer

# Anything that could point a client at the caller's real accounts, proxies or CA bundles.
ENV_PREFIXES = ("AWS_", "AZURE_", "GOOGLE_", "CLEARML_", "TRAINS_")
ENV_NAMES = {
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
    "STORAGE_EMULATOR_HOST",
}

# Log files of the servers started in this session, by fixture name, for the failure report.
_server_logs: dict[str, Path] = {}

T = TypeVar("T")


@pytest.fixture(scope="session", autouse=True)
def clean_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests must not depend on the caller's credentials or ~/clearml.conf; restored after the session."""
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith(ENV_PREFIXES) or name in ENV_NAMES:
            del os.environ[name]
    os.environ["HOME"] = str(tmp_path_factory.mktemp("home"))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _serve(name: str, start: Callable[[], servers.Running[T]]) -> Iterator[T]:
    try:
        running = start()
    except servers.ServerError as exc:
        pytest.fail(str(exc), pytrace=False)
    _server_logs[name] = running.log_path
    try:
        yield running.info
    finally:
        running.stop()


@pytest.fixture(scope="session")
def seaweedfs(
    clean_environment: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[servers.SeaweedFS]:
    yield from _serve("seaweedfs", lambda: servers.start_seaweedfs(tmp_path_factory.mktemp("seaweedfs")))


@pytest.fixture(scope="session")
def moto_s3(clean_environment: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.MotoS3]:
    yield from _serve("moto_s3", lambda: servers.start_moto(tmp_path_factory.mktemp("moto")))


@pytest.fixture(scope="session")
def azurite(clean_environment: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Azurite]:
    yield from _serve("azurite", lambda: servers.start_azurite(tmp_path_factory.mktemp("azurite")))


@pytest.fixture(scope="session")
def gcs_emulator(
    clean_environment: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[servers.GCSEmulator]:
    for info in _serve("gcs_emulator", lambda: servers.start_gcs_emulator(tmp_path_factory.mktemp("gcs"))):
        # google-cloud-storage (and so any code under test) finds the emulator only through this variable.
        os.environ["STORAGE_EMULATOR_HOST"] = info.endpoint
        try:
            yield info
        finally:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)


@pytest.fixture(scope="session")
def fileserver(clean_environment: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    from tests import fileserver as standin

    yield from _serve("fileserver", lambda: standin.start(tmp_path_factory.mktemp("fileserver")))


@pytest.fixture
def seaweedfs_proxy(seaweedfs: servers.SeaweedFS) -> Iterator[Proxy]:
    with Proxy(upstream=seaweedfs.endpoint) as proxy:
        yield proxy


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    """Append the tail of each server log the failed test used (directly or through other fixtures)."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for name in getattr(item, "fixturenames", ()):
        if name in _server_logs:
            report.sections.append(
                (f"{name} log tail ({_server_logs[name]})", servers.log_tail(_server_logs[name]))
            )
