"""A ClearML fileserver (http:// URLs, api.files_server) as a storage: the Python API next to the real SDK on the
same clearml.conf, logging in with api.credentials, and a real mount (`http/HOST:PORT/...`).

The server is tests/fileserver.py: clearml-server's fileserver routes and the api server's auth.login.
"""

from __future__ import annotations

import errno
import http.server
import json
import logging
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from clearmlfs import StorageManager
from clearmlfs.errors import ConfigError, StorageError
from tests import fileserver as standin
from tests.fileserver import FileServer
from tests.mounting import at, mounted, no_mounts_left  # noqa: F401 - a session fixture, used by being imported
from tests.stores import random_bytes

SDK_TIMEOUT = 180.0


def _conf(path: Path, cache: Path, api: dict[str, Any], legacy_fileservers: tuple[str, ...] = ()) -> Path:
    storage = {"cache": {"default_base_dir": str(cache)}, "http": {"legacy_fileservers": list(legacy_fileservers)}}
    path.write_text(json.dumps({"api": api, "sdk": {"storage": storage}}))
    path.chmod(0o600)
    return path


@pytest.fixture()
def ours(fileserver: FileServer, tmp_path: Path) -> Iterator[Path]:
    """clearmlfs's StorageManager on a clearml.conf naming the fileserver; yields its cache folder."""
    cache = tmp_path / "ours-cache"
    StorageManager.configure(_conf(tmp_path / "ours.conf", cache, fileserver.api_conf()))
    yield cache
    StorageManager.configure(settings=None)


def _folder(fileserver: FileServer) -> str:
    return f"{fileserver.files_server}/t-{uuid.uuid4().hex[:10]}"


_SDK = """
import json, sys
from clearml import StorageManager
action, url = sys.argv[1], sys.argv[2]
if action == "get":
    print("RESULT:" + json.dumps(StorageManager.get_local_copy(url, extract_archive=False)))
elif action == "size":
    print("RESULT:" + json.dumps(StorageManager.get_file_size_bytes(url)))
else:
    print("RESULT:" + json.dumps(StorageManager.upload_file(sys.argv[3], url)))
"""


def _sdk(conf: Path, home: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    """One clearml.StorageManager call in a fresh process that knows only `conf` (and `env`)."""
    home.mkdir(exist_ok=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "CLEARML_CONFIG_FILE": str(conf), "LANG": "C.UTF-8",
           **(env or {})}
    done = subprocess.run([sys.executable, "-c", _SDK, *args], env=env, capture_output=True, text=True,
                          timeout=SDK_TIMEOUT)
    found = [line for line in done.stdout.splitlines() if line.startswith("RESULT:")]
    assert done.returncode == 0 and found, f"clearml SDK failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return json.loads(found[-1][len("RESULT:"):])


# -- the Python API, next to the SDK -------------------------------------------------------------------------
def test_what_we_upload_the_sdk_reads_from_the_same_cache_path(
    fileserver: FileServer, ours: Path, tmp_path: Path
) -> None:
    data = random_bytes(3 * 1024 * 1024 + 17, seed=41)
    src = tmp_path / "model weights.bin"
    src.write_bytes(data)
    url = f"{_folder(fileserver)}/models/model weights.bin"

    assert StorageManager.upload_file(str(src), url) == url.replace(" ", "%20")  # (quoted, as the SDK returns it)
    assert StorageManager.exists_file(url)
    assert not StorageManager.exists_file(url + ".missing")
    assert StorageManager.get_file_size_bytes(url) == len(data)
    local = Path(StorageManager.get_local_copy(url) or "")
    assert local.read_bytes() == data

    # The SDK, on its own cache folder, finds the file on the server and names its copy as we do.
    sdk_cache = tmp_path / "sdk-cache"
    sdk_conf = _conf(tmp_path / "sdk.conf", sdk_cache, fileserver.api_conf())
    theirs = Path(_sdk(sdk_conf, tmp_path / "home", "get", url))
    assert theirs.read_bytes() == data
    assert theirs.relative_to(sdk_cache) == local.relative_to(ours)
    assert (fileserver.root / url[len(fileserver.files_server) + 1:]).read_bytes() == data  # stored as the SDK does


def test_what_the_sdk_uploads_we_read(fileserver: FileServer, ours: Path, tmp_path: Path) -> None:
    data = random_bytes(200_000, seed=42)
    src = tmp_path / "table.parquet"
    src.write_bytes(data)
    url = f"{_folder(fileserver)}/data/table.parquet"
    sdk_conf = _conf(tmp_path / "sdk.conf", tmp_path / "sdk-cache", fileserver.api_conf())

    _sdk(sdk_conf, tmp_path / "home", "put", url, str(src))

    assert StorageManager.exists_file(url)
    assert StorageManager.get_file_size_bytes(url) == len(data)
    assert Path(StorageManager.get_local_copy(url) or "").read_bytes() == data
    got = StorageManager.download_file(url, str(tmp_path / "downloads"), overwrite=True)
    assert got is not None and Path(got).read_bytes() == data


def test_a_text_file_keeps_its_size_though_the_fileserver_compresses_text(
    fileserver: FileServer, ours: Path, tmp_path: Path
) -> None:
    # The fileserver sends text compressed (and without a length) to clients that accept it; we ask for the
    # file as it is. (The SDK accepts compression, and reports such a file's size as 0.)
    text = ("epoch,loss\n" + "".join(f"{i},{1 / (i + 1):.6f}\n" for i in range(3000))).encode()
    src = tmp_path / "metrics.txt"
    src.write_bytes(text)
    url = f"{_folder(fileserver)}/metrics.txt"
    StorageManager.upload_file(str(src), url)

    assert StorageManager.get_file_size_bytes(url) == len(text)
    assert Path(StorageManager.get_local_copy(url) or "").read_bytes() == text
    sdk_conf = _conf(tmp_path / "sdk.conf", tmp_path / "sdk-cache", fileserver.api_conf())
    assert Path(_sdk(sdk_conf, tmp_path / "home", "get", url)).read_bytes() == text


def test_wrong_credentials_fail_clearly_without_showing_the_secret(
    fileserver: FileServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "wrong-secret-3b9f1c"
    StorageManager.configure(_conf(tmp_path / "bad.conf", tmp_path / "cache", fileserver.api_conf(secret=secret)))
    src = tmp_path / "x.bin"
    src.write_bytes(b"x")
    try:
        with pytest.raises(StorageError) as raised, caplog.at_level(logging.DEBUG):
            StorageManager.upload_file(str(src), f"{_folder(fileserver)}/x.bin")
        message = str(raised.value)
        assert "login refused" in message and fileserver.key in message and "api.credentials" in message
        with caplog.at_level(logging.DEBUG):
            assert StorageManager.get_local_copy(f"{_folder(fileserver)}/x.bin") is None
            assert not StorageManager.exists_file(f"{_folder(fileserver)}/x.bin")
        assert "login refused" in caplog.text
        assert secret not in message and secret not in caplog.text
    finally:
        StorageManager.configure(settings=None)


def test_no_credentials_is_a_configuration_error(fileserver: FileServer, tmp_path: Path) -> None:
    api = {k: v for k, v in fileserver.api_conf().items() if k != "credentials"}
    StorageManager.configure(_conf(tmp_path / "nokeys.conf", tmp_path / "cache", api))
    try:
        with pytest.raises(ConfigError, match="api.credentials"):
            StorageManager.get_file_size_bytes(f"{_folder(fileserver)}/x.bin")
    finally:
        StorageManager.configure(settings=None)


def test_a_token_the_server_stopped_accepting_is_renewed_once(
    fileserver: FileServer, ours: Path, tmp_path: Path
) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(b"abc" * 1000)
    url = f"{_folder(fileserver)}/a.bin"
    StorageManager.upload_file(str(src), url)
    before = fileserver.logins()

    fileserver.revoke_tokens()  # (a server restarted with a new secret, say)

    assert StorageManager.get_file_size_bytes(url) == 3000
    StorageManager.upload_file(str(src), url + ".again")
    assert fileserver.logins() == before + 1


def test_a_token_about_to_expire_is_renewed_before_it_is_used(tmp_path: Path) -> None:
    # Tokens that last 30 s are always within the minute before expiry in which the SDK renews them.
    running = standin.start(tmp_path / "files", token_seconds=30)
    try:
        server = running.info
        StorageManager.configure(_conf(tmp_path / "short.conf", tmp_path / "cache", server.api_conf()))
        src = tmp_path / "a.bin"
        src.write_bytes(b"a")
        StorageManager.upload_file(str(src), f"{server.files_server}/a.bin")
        before = server.logins()
        assert StorageManager.get_file_size_bytes(f"{server.files_server}/a.bin") == 1
        assert StorageManager.get_file_size_bytes(f"{server.files_server}/a.bin") == 1
        assert server.logins() == before + 2
    finally:
        StorageManager.configure(settings=None)
        running.stop()


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A web server that is not the fileserver: serves one body to any GET, and records what it was sent."""

    body = b"public data " * 100
    seen: list[dict[str, str]] = []

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(with_body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(with_body=True)

    def _answer(self, with_body: bool) -> None:
        self.seen.append(dict(self.headers))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.send_header("ETag", '"v1"')
        self.end_headers()
        if with_body:
            self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def other_server() -> Iterator[str]:
    """A web server that is not the fileserver: its root URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Recorder.seen = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def tls_fileserver(tmp_path: Path) -> Iterator[tuple[FileServer, Path]]:
    """The stand-in over https, with a self-signed certificate: (the server, its certificate)."""
    running = standin.start(tmp_path / "tls-files", tls=tmp_path / "tls")
    try:
        yield running.info, tmp_path / "tls" / "cert.pem"
    finally:
        running.stop()


def test_certificates_are_checked_as_the_sdk_checks_them_and_a_refused_one_is_said_at_once(
    tls_fileserver: tuple[FileServer, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ClearML server (api server and fileserver) whose certificate is self-signed. The SDK's login honours
    api.verify_certificate, but its transfers read the key under `sdk` (sdk.api.verify_certificate): only
    CLEARML_API_HOST_VERIFY_CERT (false, or a CA bundle) lets them through. A refused certificate is a
    configuration error naming the setting, said at once instead of retried."""
    server, cert = tls_fileserver
    data = random_bytes(50_000, seed=3)
    (server.root / "tls").mkdir(parents=True)
    (server.root / "tls" / "a.bin").write_bytes(data)
    url = f"{server.files_server}/tls/a.bin"
    strict = _conf(tmp_path / "strict.conf", tmp_path / "cache", server.api_conf())
    api_only = _conf(tmp_path / "api.conf", tmp_path / "cache-api", {**server.api_conf(), "verify_certificate": False})
    try:
        for conf, setting in ((strict, "api.verify_certificate"), (api_only, "CLEARML_API_HOST_VERIFY_CERT")):
            StorageManager.configure(conf)
            with pytest.raises(ConfigError, match="certificate") as raised:
                StorageManager.get_file_size_bytes(url)
            assert setting in str(raised.value), str(raised.value)
        assert _sdk(api_only, tmp_path / "home", "get", url) is None  # (the SDK logged in, then was refused)

        for verify in (str(cert), "false"):
            monkeypatch.setenv("CLEARML_API_HOST_VERIFY_CERT", verify)
            StorageManager.configure(_conf(tmp_path / "env.conf", tmp_path / f"cache-{verify[-3:]}", server.api_conf()))
            assert Path(StorageManager.get_local_copy(url) or "").read_bytes() == data
        got = _sdk(strict, tmp_path / "home", "get", url, env={"CLEARML_API_HOST_VERIFY_CERT": "false"})
        assert Path(got).read_bytes() == data
    finally:
        StorageManager.configure(settings=None)


def test_a_ca_bundle_that_is_not_there_is_a_configuration_error(fileserver: FileServer, tmp_path: Path) -> None:
    conf = _conf(tmp_path / "c.conf", tmp_path / "cache", {**fileserver.api_conf(), "verify_certificate": "/no/ca.pem"})
    with pytest.raises(ConfigError, match="verify_certificate"):
        StorageManager.configure(conf)
    StorageManager.configure(settings=None)


def test_clearml_auth_token_logs_in_instead_of_the_key_pair(
    fileserver: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CLEARML_AUTH_TOKEN (what clearml-agent hands a task) logs in with no api.credentials, for us as for the SDK;
    the token is shown nowhere."""
    token = fileserver.token()
    api = {k: v for k, v in fileserver.api_conf().items() if k != "credentials"}
    src = tmp_path / "t.bin"
    src.write_bytes(random_bytes(10_000, seed=5))
    url = f"{_folder(fileserver)}/t.bin"
    monkeypatch.setenv("CLEARML_AUTH_TOKEN", token)
    StorageManager.configure(_conf(tmp_path / "token.conf", tmp_path / "cache", api))
    try:
        StorageManager.upload_file(str(src), url)
        assert StorageManager.get_file_size_bytes(url) == 10_000
    finally:
        StorageManager.configure(settings=None)
    sdk_conf = _conf(tmp_path / "sdk.conf", tmp_path / "sdk-cache", api)
    got = _sdk(sdk_conf, tmp_path / "home", "get", url, env={"CLEARML_AUTH_TOKEN": token})
    assert Path(got).read_bytes() == src.read_bytes()

    monkeypatch.setenv("CLEARML_AUTH_TOKEN", token[:-4] + "AAAA")  # (its signature no longer matches)
    StorageManager.configure(_conf(tmp_path / "bad.conf", tmp_path / "cache2", api))
    try:
        with pytest.raises(StorageError, match="CLEARML_AUTH_TOKEN") as raised:
            StorageManager.upload_file(str(src), url + ".again")
        assert token[:20] not in str(raised.value)
    finally:
        StorageManager.configure(settings=None)


def test_the_token_goes_to_the_fileserver_only(
    fileserver: FileServer, ours: Path, other_server: str, tmp_path: Path
) -> None:
    url = f"{other_server}/datasets/public.csv?version=2"
    local = Path(StorageManager.get_local_copy(url) or "")
    assert local.read_bytes() == _Recorder.body
    assert _Recorder.seen and not any("Authorization" in headers for headers in _Recorder.seen)
    _Recorder.seen = []  # (the SDK does the same, and names its copy as we do, query included)
    sdk_conf = _conf(tmp_path / "sdk.conf", tmp_path / "sdk-cache", fileserver.api_conf())
    theirs = Path(_sdk(sdk_conf, tmp_path / "home", "get", url))
    assert theirs.read_bytes() == _Recorder.body
    assert theirs.relative_to(tmp_path / "sdk-cache") == local.relative_to(ours)
    assert _Recorder.seen and not any("Authorization" in headers for headers in _Recorder.seen)


def test_the_token_goes_to_legacy_fileservers_too(fileserver: FileServer, tmp_path: Path, other_server: str) -> None:
    conf = _conf(tmp_path / "old.conf", tmp_path / "cache", fileserver.api_conf(), legacy_fileservers=(other_server,))
    StorageManager.configure(conf)
    try:
        assert StorageManager.get_file_size_bytes(f"{other_server}/old/artifact.pkl") == len(_Recorder.body)
    finally:
        StorageManager.configure(settings=None)
    assert _Recorder.seen and all(h.get("Authorization", "").startswith("Bearer ") for h in _Recorder.seen)
    _Recorder.seen = []  # (the SDK does the same)
    assert _sdk(conf, tmp_path / "home", "size", f"{other_server}/old/artifact.pkl") == len(_Recorder.body)
    assert _Recorder.seen and all(h.get("Authorization", "").startswith("Bearer ") for h in _Recorder.seen)


# -- the mount ---------------------------------------------------------------------------------------------
def test_mount_reads_writes_and_lists_what_it_has_seen(fileserver: FileServer, tmp_path: Path) -> None:
    folder = _folder(fileserver)
    conf = _conf(tmp_path / "mount.conf", tmp_path / "cache", fileserver.api_conf())
    existing = {name: random_bytes(100_000 + i, seed=i) for i, name in enumerate(["a.bin", "b.bin", "c.bin"])}
    StorageManager.configure(conf)
    try:
        for name, data in existing.items():
            (tmp_path / name).write_bytes(data)
            StorageManager.upload_file(str(tmp_path / name), f"{folder}/run/{name}")
    finally:
        StorageManager.configure(settings=None)
    new = random_bytes(5 * 1024 * 1024 + 3, seed=9)
    (tmp_path / "new.bin").write_bytes(new)

    with mounted(conf, tmp_path / "mnt") as mnt:
        assert "http" in os.listdir(mnt)
        assert os.listdir(mnt / "http") == [fileserver.host]
        run = at(mnt, f"{folder}/run")
        # A fileserver cannot say a folder exists: one not seen here is made (nothing is sent) to reach its files.
        with pytest.raises(FileNotFoundError):
            os.stat(run)
        os.makedirs(run)
        assert os.listdir(run) == []
        assert subprocess.run(["cat", str(run / "b.bin")], capture_output=True, timeout=60).stdout == existing["b.bin"]
        assert os.listdir(run) == ["b.bin"]  # only what was looked up...
        subprocess.run(["cp", str(tmp_path / "new.bin"), str(run / "new.bin")], check=True, timeout=120)
        assert sorted(os.listdir(run)) == ["b.bin", "new.bin"]  # ...or written
        assert os.stat(run / "a.bin").st_size == len(existing["a.bin"])
        assert sorted(os.listdir(run)) == ["a.bin", "b.bin", "new.bin"]
        with pytest.raises(FileNotFoundError):
            (run / "never-there.bin").read_bytes()
        with pytest.raises(OSError) as raised:
            (run / "50%.bin").write_bytes(b"x")
        assert raised.value.errno == errno.EINVAL
        os.unlink(run / "c.bin")  # (unseen until now: looked up, then deleted on the server)
        assert sorted(os.listdir(run)) == ["a.bin", "b.bin", "new.bin"]
        assert (run / "new.bin").read_bytes() == new

    stored = fileserver.root / folder[len(fileserver.files_server) + 1:] / "run"
    assert (stored / "new.bin").read_bytes() == new
    assert not (stored / "c.bin").exists()
    token = fileserver.token()
    answer = requests.get(f"{folder}/run/new.bin", headers={"Authorization": f"Bearer {token}",
                                                           "Accept-Encoding": "identity"}, timeout=30)
    assert answer.status_code == 200 and answer.content == new


_SDK_FILES_HOSTS = """
import json, sys
from pyhocon import ConfigFactory
from clearml.backend_api import Session
answers = []
for api in json.loads(sys.argv[1]):
    try:
        answers.append(Session.get_files_server_host(ConfigFactory.from_dict({"api": api})))
    except ValueError:
        answers.append(None)
print("RESULT:" + json.dumps(answers))
"""


def test_the_fileserver_is_the_one_the_sdk_derives(tmp_path: Path) -> None:
    from clearmlfs.backends.http import files_server_host
    from clearmlfs.config import ApiSettings

    apis = [
        {"api_server": "http://localhost:8008"},
        {"api_server": "https://api.example.com"},
        {"api_server": "https://demoapi.demo.clear.ml"},
        {"api_server": "https://api.example.com", "web_server": "https://app.other.org:9000"},
        {"api_server": "https://clearml.example.com", "web_server": "https://clearml.example.com"},
        {"api_server": "http://10.0.0.5:8008", "files_server": "http://10.0.0.5:8081/"},
        {},
        {"api_server": "https://clearml.example.com"},
    ]
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8"}
    done = subprocess.run([sys.executable, "-c", _SDK_FILES_HOSTS, json.dumps(apis)], env=env, capture_output=True,
                          text=True, timeout=SDK_TIMEOUT)
    found = [line for line in done.stdout.splitlines() if line.startswith("RESULT:")]
    assert found, f"clearml SDK failed:\n{done.stdout}\n{done.stderr}"
    theirs = json.loads(found[-1][len("RESULT:"):])

    def ours(api: dict[str, str]) -> str | None:
        try:
            return files_server_host(ApiSettings(**api))
        except ConfigError:
            return None

    assert [ours(api) for api in apis] == theirs
    assert theirs[-1] is None  # (and then the mount shows no http/ folder, and no request carries the token)
