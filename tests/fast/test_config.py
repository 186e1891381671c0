"""clearml.conf loading and per-URL credential resolution (no servers needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from clearmlfs.config import load_settings
from clearmlfs.errors import ConfigError, InvalidURL
from clearmlfs.urls import mount_path_to_url, parse_url, url_to_mount_path

FULL_CONF = """
api {
    web_server: https://app.clear.ml
    api_server: https://api.clear.ml
    credentials { access_key: "XYZ", secret_key: "ABC" }
}
agent { git_user: "" }
sdk {
    storage {
        cache { default_base_dir: "~/.clearml/cache" }
        direct_access: [ { url: "file://*" }, { url: "s3://local-mirror/*" } ]
    }
    aws {
        s3 {
            key: "default-key"
            secret: "default-secret"
            region: "eu-west-1"
            credentials: [
                { bucket: "bucket", key: "bucket-key", secret: "bucket-secret" }
                { bucket: "bucket/special", key: "special-key", secret: "special-secret" }
                { host: "minio.local:9000", key: "minio-key", secret: "minio-secret", multipart: false, secure: false }
                { host: "minio.local:9000", bucket: "other", key: "other-key", secret: "other-secret" }
                { bucket: "chain-bucket", use_credentials_chain: true }
                { bucket: "broken-bucket" }
            ]
        }
        boto3 { pool_connections: 64, max_multipart_concurrency: 4 }
    }
    google.storage {
        project: "default-project"
        credentials_json: "/default.json"
        credentials: [
            { bucket: "gbucket", project: "p1", credentials_json: "/p1.json" }
            { bucket: "gbucket", subdir: "deep/dir", project: "p2", credentials_json: "/p2.json" }
        ]
    }
    azure.storage {
        containers: [
            { account_name: "acct", account_key: "acct-key", container_name: "models" }
            { account_name: "acct", account_key: "acct-any-key" }
            { account_name: "local", account_key: "k", container_name: "c", endpoint: "http://127.0.0.1:10000/local" }
        ]
    }
}
"""


@pytest.fixture()
def settings(tmp_path: Path):
    conf = tmp_path / "clearml.conf"
    conf.write_text(FULL_CONF)
    return load_settings(conf)


@pytest.mark.parametrize(
    ("url", "key"),
    [
        ("s3://bucket/a/b.pt", "bucket-key"),
        ("s3://bucket", "bucket-key"),
        ("s3://BUCKET/x", "bucket-key"),  # ClearML compares lower-case
        ("s3://bucket/special/x.pt", "special-key"),  # longest prefix wins
        ("s3://bucket/special2/x.pt", "bucket-key"),  # ... on whole segments only
        ("s3://bucket2/x", "default-key"),  # an entry for "bucket" must not capture "bucket2"
        ("s3://minio.local:9000/any/x", "minio-key"),  # a host-wide entry
        ("s3://minio.local:9000/other/x", "other-key"),  # host + bucket is more specific
        ("s3://minio.local:9001/any/x", "default-key"),  # another port is another host
    ],
)
def test_s3_credentials_resolve_to_the_most_specific_entry(settings, url: str, key: str) -> None:
    assert settings.s3_for(parse_url(url)).key == key


def test_s3_host_entry_carries_endpoint_options(settings) -> None:
    creds = settings.s3_for(parse_url("s3://minio.local:9000/any/x"))
    assert (creds.host, creds.secure, creds.multipart) == ("minio.local:9000", False, False)
    assert settings.s3.pool_connections == 64 and settings.s3.max_multipart_concurrency == 4


def test_unmatched_s3_url_gets_the_defaults_with_its_own_bucket(settings) -> None:
    creds = settings.s3_for(parse_url("s3://elsewhere/k"))
    expected = ("elsewhere", "default-key", "default-secret", "eu-west-1")
    assert (creds.bucket, creds.key, creds.secret, creds.region) == expected


def test_credentials_chain_entry_is_valid_without_keys(settings) -> None:
    creds = settings.s3_for(parse_url("s3://chain-bucket/k"))
    assert creds.use_credentials_chain and not creds.key


def test_entry_without_key_is_reported_not_dropped(settings) -> None:
    with pytest.raises(ConfigError, match="broken-bucket.*no key/secret"):
        settings.s3_for(parse_url("s3://broken-bucket/k"))


@pytest.mark.parametrize(
    ("url", "project", "creds"),
    [
        ("gs://gbucket/x", "p1", "/p1.json"),
        ("gs://gbucket/deep/dir/x", "p2", "/p2.json"),
        ("gs://gbucket/deep/directory/x", "p1", "/p1.json"),
        ("gs://gbucket2/x", "default-project", "/default.json"),
    ],
)
def test_gcs_most_specific_bucket_and_subdir_wins(settings, url: str, project: str, creds: str) -> None:
    entry = settings.gcs_for(parse_url(url))
    assert (entry.project, entry.credentials_json) == (project, creds)


@pytest.mark.parametrize(
    ("url", "key"),
    [
        ("azure://acct.blob.core.windows.net/models/x", "acct-key"),
        ("azure://acct.blob.core.windows.net/data/x", "acct-any-key"),
    ],
)
def test_azure_exact_container_beats_account_wide_entry(settings, url: str, key: str) -> None:
    assert settings.azure_for(parse_url(url)).account_key == key


def test_azure_endpoint_defaults_to_the_public_cloud_and_can_be_set(settings) -> None:
    assert settings.azure_for(parse_url("azure://acct.blob.core.windows.net/m/x")).account_url == (
        "https://acct.blob.core.windows.net"
    )
    assert settings.azure_for(parse_url("azure://local.blob.core.windows.net/c/x")).account_url == (
        "http://127.0.0.1:10000/local"
    )


def test_azure_unknown_account_is_a_clear_error(settings) -> None:
    with pytest.raises(ConfigError, match="nobody"):
        settings.azure_for(parse_url("azure://nobody.blob.core.windows.net/c/x"))


def test_azure_environment_fallback(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT", "envacct")
    monkeypatch.setenv("AZURE_STORAGE_KEY", "envkey")
    assert load_settings(_write(tmp_path, "")).azure_for(parse_url("azure://envacct.blob.core.windows.net/c/x"))


def test_direct_access_always_covers_file_urls(settings) -> None:
    assert settings.direct_path("file:///nfs/models/a.pt") == "/nfs/models/a.pt"
    assert settings.direct_path("s3://bucket/a") is None
    assert settings.is_direct_access("s3://local-mirror/x/y")  # trailing * is a prefix match
    assert not settings.is_direct_access("s3://local-mirrors/x")


def test_file_without_sdk_wrapper_is_accepted(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, 'aws.s3 { key: "k", secret: "s" }\nstorage.cache.default_base_dir: "/c"'))
    assert settings.s3.default.key == "k" and settings.cache_dir == Path("/c")


def test_lookup_order_env_then_home(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("CLEARML_CONFIG_FILE", raising=False)
    (tmp_path / ".clearml.conf").write_text('sdk.aws.s3.key: "hidden"')
    assert load_settings().s3.default.key == "hidden"
    (tmp_path / "clearml.conf").write_text('sdk.aws.s3.key: "home"')
    assert load_settings().s3.default.key == "home"
    monkeypatch.setenv("CLEARML_CONFIG_FILE", str(_write(tmp_path, 'sdk.aws.s3.key: "env"')))
    assert load_settings().s3.default.key == "env"
    assert load_settings(_write(tmp_path, 'sdk.aws.s3.key: "explicit"', "x.conf")).s3.default.key == "explicit"


def test_missing_explicit_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.conf")


def test_a_folder_given_as_the_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_settings(tmp_path)


def test_a_file_that_is_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    conf = tmp_path / "clearml.conf"
    conf.write_bytes(b'sdk {\n  aws.s3.key: "\xff\xfe"\n}\n')
    with pytest.raises(ConfigError, match=rf"{conf}:2: not UTF-8 text \(byte 0xff\)"):
        load_settings(conf)


def test_a_missing_required_include_is_named(tmp_path: Path) -> None:
    conf = _write(tmp_path, 'include required("extra.conf")\nsdk {}\n')
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'extra.conf'}: cannot read"):
        load_settings(conf)


def test_malformed_file_names_file_and_line(tmp_path: Path) -> None:
    conf = _write(tmp_path, 'sdk {\n  aws {\n    s3 { key: "a"\n      credentials: [\n  }\n}\n')
    with pytest.raises(ConfigError) as info:
        load_settings(conf)
    assert f"{conf}:5:" in str(info.value)


def test_cli_exits_2_with_file_and_line_on_malformed_config(tmp_path: Path) -> None:
    conf = _write(tmp_path, "sdk {\n  aws {\n    s3 { key = [ \n}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "clearmlfs.cli", "config", "--config", str(conf)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert f"{conf}:4" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_config_never_prints_secrets(tmp_path: Path) -> None:
    conf = _write(tmp_path, FULL_CONF)
    proc = subprocess.run(
        [sys.executable, "-m", "clearmlfs.cli", "config", "--config", str(conf)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    for secret in ("default-secret", "bucket-secret", "minio-secret", "acct-key", "acct-any-key"):
        assert secret not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("s3://bucket/a/b.pt", "s3/bucket/a/b.pt"),
        ("s3://minio-host:9000/bucket/x", "s3/minio-host:9000/bucket/x"),
        ("gs://bucket/x", "gs/bucket/x"),
        ("azure://account.blob.core.windows.net/container/x", "azure/account.blob.core.windows.net/container/x"),
        ("file:///nfs/models/a.pt", "file/nfs/models/a.pt"),
    ],
)
def test_url_maps_to_mount_path_and_back(url: str, path: str) -> None:
    assert url_to_mount_path(url) == path
    assert mount_path_to_url(path) == url


def test_url_parts() -> None:
    u = parse_url("s3://minio-host:9000/bucket/a/b")
    assert (u.host, u.bucket, u.key, u.root) == ("minio-host:9000", "bucket", "a/b", "s3://minio-host:9000/bucket")
    a = parse_url("azure://account.blob.core.windows.net/container/x")
    assert (a.account, a.bucket, a.key) == ("account", "container", "x")
    with pytest.raises(InvalidURL, match="unsupported URL scheme"):
        parse_url("ftp://x/y")
    with pytest.raises(InvalidURL):
        parse_url("s3://")


def _write(folder: Path, text: str, name: str = "clearml.conf") -> Path:
    path = folder / name
    path.write_text(text)
    return path
