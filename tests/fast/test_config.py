"""clearml.conf loading and per-URL credential resolution (no servers needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clearmlfs.config import load_settings
from clearmlfs.errors import ConfigError, InvalidURL
from clearmlfs.urls import mount_path_to_url, parse_url, url_to_mount_path
from tests.stores import service_account_key

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
            { account_name: "local", account_key: "k", container_name: "c" }
        ]
    }
}
clearmlfs {
    azure: [ { account_name: "local", endpoint: "http://127.0.0.1:10000/local" } ]
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
def test_azure_first_matching_entry_wins(settings, url: str, key: str) -> None:
    assert settings.azure_for(parse_url(url)).account_key == key


def test_azure_entries_match_in_the_sdks_order(tmp_path: Path) -> None:
    conf = _write(tmp_path, """sdk.azure.storage.containers: [
        { account_name: "acct", account_key: "any-key" }
        { account_name: "acct", account_key: "models-key", container_name: "models" } ]""")
    assert load_settings(conf).azure_for(parse_url("azure://acct.blob.core.windows.net/models/x")).account_key == (
        "any-key"
    )


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


def test_direct_access_by_default_is_every_file_url_and_the_globs_are_not_consulted(settings) -> None:
    # As the SDK's default cache: its file driver reads in place; storage.direct_access is not asked.
    assert settings.direct_access == ("file://*", "s3://local-mirror/*")
    assert settings.direct_path("file:///nfs/models/a.pt") == "/nfs/models/a.pt"
    assert settings.direct_path("/nfs/models/a.pt") == "/nfs/models/a.pt"
    assert settings.direct_path("s3://local-mirror/x/y") is None
    assert settings.direct_path("s3://bucket/a") is None


def test_file_without_sdk_wrapper_is_accepted(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, 'aws.s3 { key: "k", secret: "s" }\nstorage.cache.default_base_dir: "/c"'))
    assert settings.s3.default.key == "k" and settings.cache_dir == Path("/c")


def test_lookup_order_env_then_home(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "clearml.conf").write_text('sdk.aws.s3.key: "home"')
    assert load_settings().s3.default.key == "home"
    monkeypatch.setenv("CLEARML_CONFIG_FILE", str(_write(tmp_path, 'sdk.aws.s3.key: "env"', "env.conf")))
    assert load_settings().s3.default.key == "env"
    assert load_settings(_write(tmp_path, 'sdk.aws.s3.key: "explicit"', "x.conf")).s3.default.key == "explicit"


def test_the_sdk_merges_trains_conf_under_clearml_conf_and_never_reads_dot_clearml_conf(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".clearml.conf").write_text('sdk.aws.s3 { key: "hidden", secret: "hidden" }')
    assert load_settings().sources == ()
    (tmp_path / "trains.conf").write_text('sdk.aws.s3 { key: "old", region: "eu-west-1" }')
    (tmp_path / "clearml.conf").write_text('sdk.aws.s3 { key: "new" }')
    settings = load_settings()
    assert settings.sources == (tmp_path / "trains.conf", tmp_path / "clearml.conf")
    assert (settings.s3.default.key, settings.s3.default.region) == ("new", "eu-west-1")  # later file wins, keys merge
    assert settings.origins["s3.region"] == f"{tmp_path / 'trains.conf'}: sdk.aws.s3.region"


def test_trains_config_file_variable_and_a_variable_naming_no_file_reads_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "clearml.conf").write_text('sdk.aws.s3.key: "home"')
    monkeypatch.setenv("TRAINS_CONFIG_FILE", str(_write(tmp_path, 'sdk.aws.s3.key: "trains"', "t.conf")))
    assert load_settings().s3.default.key == "trains"
    monkeypatch.setenv("CLEARML_CONFIG_FILE", str(tmp_path / "missing.conf"))
    settings = load_settings()  # as the SDK: the named file replaces the home files, even when it is missing
    assert settings.sources == () and settings.s3.default.key == ""


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


# -- the SDK's meaning of each setting ------------------------------------------------------------------------------


def test_azure_endpoint_in_the_sdk_entry_is_refused_with_the_fix(tmp_path: Path) -> None:
    # The SDK raises TypeError for every Azure URL when its entry has a key it does not know.
    conf = _write(tmp_path, 'sdk.azure.storage.containers: [ { account_name: "a", account_key: "k", '
                            'endpoint: "http://127.0.0.1:1/a" } ]')
    with pytest.raises(ConfigError) as info:
        load_settings(conf)
    message = str(info.value)
    assert message.startswith(f"{conf}: sdk.azure.storage.containers[0]")
    assert "endpoint" in message and "clearmlfs.azure" in message


def test_clearmlfs_azure_adds_endpoint_and_connection_string_to_the_sdks_entry(tmp_path: Path) -> None:
    conf = _write(tmp_path, """
        sdk.azure.storage.containers: [ { account_name: "a", account_key: "k", container_name: "c" } ]
        clearmlfs.azure: [ { account_name: "a", container_name: "other", endpoint: "http://wrong" }
                           { account_name: "a", endpoint: "http://127.0.0.1:1/a", connection_string: "cs" } ]""")
    settings = load_settings(conf)
    entry = settings.azure_for(parse_url("azure://a.blob.core.windows.net/c/x"))
    assert (entry.account_key, entry.account_url, entry.connection_string) == ("k", "http://127.0.0.1:1/a", "cs")
    assert settings.mount_defaults == ()  # (the list is no mount option)


def test_azure_default_credential_is_a_clear_difference(tmp_path: Path) -> None:
    conf = _write(tmp_path, 'sdk.azure.storage.containers: [ { account_name: "a", use_default_credential: true } ]')
    with pytest.raises(ConfigError, match="use_default_credential.*not supported"):
        load_settings(conf).azure_for(parse_url("azure://a.blob.core.windows.net/c/x"))


def test_gcs_credentials_json_given_inline_is_used(tmp_path: Path, monkeypatch) -> None:
    from clearmlfs.backends import gcs

    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    inline = service_account_key()
    conf = _write(tmp_path, f"sdk.google.storage {{ credentials_json: {json.dumps(inline)} }}")
    entry = load_settings(conf).gcs_for(parse_url("gs://b/x"))
    assert entry.inline_json and inline not in repr(entry)
    client = gcs._bare_client(entry)
    assert client.project == "p" and client._credentials.service_account_email == "sa@p.iam.gserviceaccount.com"


@pytest.mark.parametrize("broken", ["not json", "bad key"])
def test_a_bad_inline_gcs_key_is_a_config_error_without_the_key(tmp_path: Path, monkeypatch, broken: str) -> None:
    from clearmlfs.backends import gcs

    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    inline = service_account_key(MARKER)
    inline = inline[:-5] if broken == "not json" else inline.replace("BEGIN PRIVATE", "BEGIN BROKEN")
    conf = _write(tmp_path, f"sdk.google.storage {{ credentials_json: {json.dumps(inline)} }}")
    with pytest.raises(ConfigError) as info:
        gcs._bare_client(load_settings(conf).gcs_for(parse_url("gs://b/x")))
    assert "credentials_json" in str(info.value) and MARKER not in str(info.value)
    assert "PRIVATE" not in str(info.value)


def test_gcs_entry_keeps_its_own_credentials_as_the_sdk_does(settings, tmp_path: Path) -> None:
    conf = _write(tmp_path, """sdk.google.storage { project: "dp", credentials_json: "/default.json",
        credentials: [ { bucket: "b", project: "p1" } ] }""")
    entry = load_settings(conf).gcs_for(parse_url("gs://b/x"))
    assert (entry.project, entry.credentials_json) == ("p1", "")  # the SDK fills nothing in from the defaults


def test_s3_host_entry_without_a_port_names_a_host_as_in_the_sdk(tmp_path: Path) -> None:
    conf = _write(tmp_path, 'sdk.aws.s3.credentials: [ { host: "Minio.Example", key: "k", secret: "s" } ]')
    settings = load_settings(conf)
    url = parse_url("s3://minio.example/bucket/a/b")
    assert (url.host, url.bucket, url.key) == ("minio.example", "bucket", "a/b")
    assert settings.s3_for(url).key == "k"
    assert parse_url("s3://elsewhere/a").bucket == "elsewhere"  # an unconfigured name stays a bucket


def test_s3_extra_args_and_content_type_make_the_upload_arguments(tmp_path: Path) -> None:
    from clearmlfs.backends.base import Attrs
    from clearmlfs.backends.s3 import upload_args

    conf = _write(tmp_path, """sdk.aws.s3 {
        key: "k", secret: "s", extra_args: { ServerSideEncryption: "aws:kms", SSEKMSKeyId: "kid" }
        credentials: [ { bucket: "acl", key: "k", secret: "s", extra_args: { ACL: "bucket-owner-full-control",
                                                                             Metadata: { team: "x" } } } ] }""")
    settings = load_settings(conf)
    default = settings.s3_for(parse_url("s3://other/a.json"))
    assert upload_args(default, "a.json", None) == {
        "ContentType": "application/json", "ServerSideEncryption": "aws:kms", "SSEKMSKeyId": "kid",
    }
    entry = settings.s3_for(parse_url("s3://acl/model.bin"))  # an entry's own extra_args only, as in the SDK
    args = upload_args(entry, "model.bin", Attrs(mode=0o100644))
    assert args["ContentType"] == "application/octet-stream" and args["ACL"] == "bucket-owner-full-control"
    assert args["Metadata"] == {"team": "x", "mode": str(0o100644)} and "ServerSideEncryption" not in args
    assert upload_args(entry, "noext", None)["ContentType"] == "binary/octet-stream"  # the SDK's fallback


def test_an_extra_arg_boto3_would_refuse_is_refused(tmp_path: Path) -> None:
    conf = _write(tmp_path, 'sdk.aws.s3 { extra_args: { Encryption: "AES256" } }')
    with pytest.raises(ConfigError, match=rf"{conf}: sdk.aws.s3.extra_args: Encryption is not an upload argument"):
        load_settings(conf)


def test_s3_defaults_mean_what_the_sdk_means(tmp_path: Path, monkeypatch) -> None:
    from clearmlfs.backends.s3 import make_client

    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-north-1")
    conf = _write(tmp_path, """sdk.aws.s3 {
        key: "k", secret: "s", region: "", secure: false, verify: false, multipart: false
        credentials: [ { host: "h:9000", key: "hk", secret: "hs" }
                       { bucket: "chain", key: "ignored", secret: "ignored", use_credentials_chain: true } ] }""")
    settings = load_settings(conf)
    default = settings.s3_for(parse_url("s3://b/x"))
    # An empty region falls back to AWS_DEFAULT_REGION; top-level secure applies, verify and multipart do not.
    assert (default.region, default.secure, default.verify, default.multipart) == ("eu-north-1", False, None, True)
    host = settings.s3_for(parse_url("s3://h:9000/b/x"))
    assert (host.secure, host.region) == (True, "")  # entries inherit nothing from the top level
    assert make_client(host, settings.s3).meta.region_name == "eu-north-1"  # boto3's own fallback, as the SDK's
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-chain")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-chain-secret")
    chained = make_client(settings.s3_for(parse_url("s3://chain/x")), settings.s3)
    assert chained._request_signer._credentials.access_key == "from-chain"  # the chain, not the entry's keys


def test_no_s3_credentials_at_all_is_an_error_as_in_the_sdk(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no S3 credentials for s3://b"):
        load_settings(_write(tmp_path, "sdk {}")).s3_for(parse_url("s3://b/x"))
    settings = load_settings(_write(tmp_path, "sdk.aws.s3.use_credentials_chain: true"))
    assert settings.s3_for(parse_url("s3://b/x")).use_credentials_chain


def test_direct_access_globs_apply_with_the_sdks_size_aware_cache(tmp_path: Path) -> None:
    conf = _write(tmp_path, """sdk.storage {
        cache.disk_space_file_size_strategy.enabled: true
        direct_access: [ { url: "s3://mirror/*" }, { url: "file:///nfs/*.pt" }, { content_type: "text/*" } ] }""")
    settings = load_settings(conf)
    assert settings.direct_path("s3://mirror/a/b.bin") == "/mirror/a/b.bin"  # the SDK's local path for it
    assert settings.direct_path("file:///nfs/m.pt") == "/nfs/m.pt"
    assert settings.direct_path("file:///nfs/m.txt") is None  # not matched: cached, as by the SDK
    assert settings.direct_path("s3://mirrors/x") is None


def test_an_empty_direct_access_list_is_kept(tmp_path: Path) -> None:
    assert load_settings(_write(tmp_path, "sdk.storage.direct_access: []")).direct_access == ()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('sdk.aws.s3.credentials: [ { bucket: 5, key: "k", secret: "s" } ]', "sdk.aws.s3.credentials[0].bucket"),
        ('sdk.aws.s3.credentials: [ "bucket" ]', "sdk.aws.s3.credentials[0]"),
        ('sdk.aws.s3.credentials: { bucket: "b" }', "sdk.aws.s3.credentials"),
        ('sdk.aws.s3.credentials: [ { bucket: "b", key: "k", secret: "s", secure: "false" } ]',
         "sdk.aws.s3.credentials[0].secure"),
        ('sdk.aws.s3.credentials: [ { bucket: "b", key: "k", secret: "s", extra: 1 } ]', "sdk.aws.s3.credentials[0]"),
        ('sdk.aws.s3.credentials: [ { bucket: "b", key: "k", secret: "s", verify: "false" } ]',
         "sdk.aws.s3.credentials[0].verify"),
        ("sdk.aws.s3.key: 1234", "sdk.aws.s3.key"),
        ('sdk.aws.boto3.pool_connections: "many"', "sdk.aws.boto3.pool_connections"),
        ('sdk.storage.cache.default_cache_manager_size: "abc"', "sdk.storage.cache.default_cache_manager_size"),
        ('sdk.storage.direct_access: [ { url: 5 } ]', "sdk.storage.direct_access[0].url"),
        ('sdk.google.storage.credentials: [ { subdir: "x" } ]', "sdk.google.storage.credentials[0]"),
        ('sdk.azure.storage.containers: [ { account_key: "k" } ]', "sdk.azure.storage.containers[0]"),
        ('clearmlfs.azure: [ { account_name: "a", key: "k" } ]', "clearmlfs.azure[0]"),
        ('clearmlfs.connect_timeout: "soon"', "clearmlfs.connect_timeout"),
    ],
)
def test_a_value_the_sdk_cannot_use_is_a_config_error_naming_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    conf = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(conf)
    assert str(info.value).startswith(f"{conf}: {key}")
    proc = subprocess.run([sys.executable, "-m", "clearmlfs.cli", "config", "--config", str(conf)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and key in proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr


def test_a_count_in_quotes_is_refused_as_the_sdk_fails_on_it(tmp_path: Path) -> None:
    assert load_settings(_write(tmp_path, "sdk.storage.cache.default_cache_manager_size: 50")).cache_file_limit == 50
    with pytest.raises(ConfigError, match="default_cache_manager_size must be a number without quotes"):
        load_settings(_write(tmp_path, 'sdk.storage.cache.default_cache_manager_size: "50"'))


def test_the_mount_counts_files_only_when_clearml_conf_sets_a_count(tmp_path: Path) -> None:
    unset = load_settings(_write(tmp_path, "sdk.storage.cache.default_base_dir: /tmp/x"))
    assert (unset.cache_file_limit, unset.mount_file_limit) == (100, None)  # the API keeps the SDK's 100
    limit = load_settings(_write(tmp_path, "sdk.storage.cache.default_cache_manager_size: 100000"))
    assert (limit.cache_file_limit, limit.mount_file_limit) == (100000, 100000)


# -- provenance, and no secret anywhere ----------------------------------------------------------------------------

MARKER = "SECRET-MARKER-1234"

MARKED_CONF = f"""
api {{ api_server: "http://127.0.0.1:1", credentials {{ access_key: "AK", secret_key: "{MARKER}-api" }} }}
sdk {{
    aws.s3 {{
        key: "dk", secret: "{MARKER}-s3-default", token: "{MARKER}-token"
        credentials: [ {{ bucket: "b", key: "{MARKER}-key", secret: "{MARKER}-secret", token: "{MARKER}-t",
                          extra_args: {{ SSECustomerAlgorithm: "AES256", SSECustomerKey: "{MARKER}-ssec" }} }} ]
    }}
    azure.storage.containers: [ {{ account_name: "acct", account_key: "{MARKER}-azure" }} ]
    google.storage {{ credentials_json: "{{\"type\": \"service_account\", \"private_key\": \"{MARKER}-gcs\"}}" }}
}}
clearmlfs {{ azure: [ {{ account_name: "acct", connection_string: "AccountKey={MARKER}-cs" }} ] }}
"""


def test_config_shows_where_each_setting_comes_from(tmp_path: Path, monkeypatch) -> None:
    conf = _write(tmp_path, MARKED_CONF)
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(tmp_path / "cache"))
    env = {**os.environ, "AWS_DEFAULT_REGION": "eu-west-2", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "clearmlfs.cli", "config", "--config", str(conf)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"cache: {tmp_path / 'cache'} [environment CLEARML_CACHE_DIR], file limit 100 [default]" in out
    assert f"[key: {conf}: sdk.aws.s3.key], region eu-west-2 [environment AWS_DEFAULT_REGION]" in out
    assert f"s3: s3://b [key/secret, upload args SSECustomerAlgorithm, SSECustomerKey] [{conf}: " \
           "sdk.aws.s3.credentials[0]]" in out
    assert f"[{conf}: sdk.azure.storage.containers[0]] [endpoint: {conf}: clearmlfs.azure[0]]" in out
    assert f"gs (buckets without an entry): inline JSON key [{conf}: sdk.google.storage.credentials_json]" in out
    assert f"api: http://127.0.0.1:1 [{conf}: api.api_server], key pair set" in out


def test_no_secret_in_config_output_errors_logs_or_reprs(tmp_path: Path, caplog) -> None:
    from clearmlfs.backends.gcs import _bare_client

    conf = _write(tmp_path, MARKED_CONF)
    proc = subprocess.run([sys.executable, "-m", "clearmlfs.cli", "config", "--config", str(conf)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    seen = [proc.stdout, proc.stderr]
    settings = load_settings(conf)
    seen += [repr(settings), repr(settings.s3), repr(settings.azure_own), repr(settings.gcs_default)]
    for url in ("gs://b/x", "s3://nokey/x"):
        with pytest.raises(ConfigError) as info:
            if url.startswith("gs"):
                _bare_client(settings.gcs_for(parse_url(url)))
            else:
                load_settings(_write(tmp_path, MARKED_CONF.replace('key: "dk", ', ""), "nokey.conf")).s3_for(
                    parse_url(url))
        seen.append(str(info.value))
    # A malformed file near a secret, and a secret where the SDK wants a number.
    for i, broken in enumerate((f'sdk.aws.s3 {{ secret: "{MARKER}" key = [ }}', f"sdk.aws.s3.secret: {MARKER}x{{")):
        with pytest.raises(ConfigError) as info:
            load_settings(_write(tmp_path, broken, f"broken{i}.conf"))
        seen.append(str(info.value))
    seen.append(caplog.text)
    assert not [text for text in seen if MARKER in text]
