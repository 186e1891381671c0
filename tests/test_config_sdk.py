"""The same clearml.conf means the same to the real ClearML SDK and to clearmlfs.

Each conf (every ```hocon block of README.md, and the confs tests/stores.py writes for the test servers) is loaded
by the SDK in a fresh process (it keeps global config state) and by clearmlfs; both must accept it and resolve
sample URLs to the same credentials, endpoint, region, TLS and multipart settings. Nothing here sends a request
except the upload test, which checks that clearml.conf's `extra_args` and the content type reach the server as
the SDK sends them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from clearmlfs import StorageManager
from clearmlfs.backends import BackendPool
from clearmlfs.config import load_settings
from clearmlfs.errors import ConfigError
from clearmlfs.urls import parse_url
from tests import servers, stores
from tests.servers import REPO

# What the SDK makes of each URL: the bucket config its StorageHelper uses, and the boto3 arguments it builds.
_SDK_RESOLVE = r"""
import json, sys
from clearml.storage.helper import StorageHelper, _Boto3Driver

def resolve(url):
    if url.startswith("s3://"):
        cfg = StorageHelper._s3_configurations.get_config_by_uri(url)
        kw = _Boto3Driver._get_boto_resource_kwargs_from_config(cfg)
        return {"endpoint": kw["endpoint_url"], "bucket": StorageHelper._resolve_base_url(url).rsplit("/", 1)[1],
                "key": kw.get("aws_access_key_id"), "chain": bool(cfg.use_credentials_chain),
                "region": kw["region_name"], "secure": bool(cfg.secure), "multipart": bool(cfg.multipart),
                "verify": kw["verify"], "extra_args": dict(cfg.extra_args or {}),
                "helper": StorageHelper.get(url) is not None}
    if url.startswith("azure://"):
        cfg = StorageHelper._azure_configurations.get_config_by_uri(url)
        return {"account": cfg.account_name, "key": cfg.account_key, "container": cfg.container_name,
                "helper": StorageHelper.get(url) is not None}
    if url == "cache://limit":
        from clearml.storage.cache import CacheManager
        return {"limit": CacheManager.get_cache_manager()._file_limit}
    cfg = StorageHelper._gs_configurations.get_config_by_uri(url)
    return {"project": cfg.project or "", "credentials_json": cfg.credentials_json or ""}

results = {}
for url in sys.argv[1:]:
    try:
        results[url] = resolve(url)
    except Exception as exc:
        results[url] = {"error": type(exc).__name__ + ": " + str(exc)}
print("RESOLVED:" + json.dumps(results))
"""


def sdk_resolve(conf: Path, urls: list[str], home: Path) -> dict[str, Any]:
    home.mkdir(exist_ok=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "CLEARML_CONFIG_FILE": str(conf), "LANG": "C.UTF-8"}
    done = subprocess.run([sys.executable, "-c", _SDK_RESOLVE, *urls], env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    found = [line for line in done.stdout.splitlines() if line.startswith("RESOLVED:")]
    assert done.returncode == 0 and found, f"the clearml SDK failed:\n{done.stdout}\n{done.stderr}"
    resolved: dict[str, Any] = json.loads(found[-1][len("RESOLVED:"):])
    return resolved


def ours_resolve(conf: Path, urls: list[str]) -> dict[str, Any]:
    settings = load_settings(conf)
    results: dict[str, Any] = {}
    for url in urls:
        parsed = parse_url(url)
        if parsed.scheme == "s3":
            c = settings.s3_for(parsed)
            results[url] = {
                "endpoint": f"{'https' if c.secure else 'http'}://{c.host}" if c.host else None,
                "bucket": parsed.bucket, "key": None if c.use_credentials_chain else c.key or None,
                "chain": c.use_credentials_chain, "region": c.region or None, "secure": c.secure,
                "multipart": c.multipart, "verify": None if c.verify is True else c.verify,
                "extra_args": c.upload_args, "helper": True,
            }
        elif parsed.scheme == "azure":
            a = settings.azure_for(parsed)
            results[url] = {"account": a.account_name, "key": a.account_key,
                            "container": a.container_name or parsed.bucket, "helper": True}
        else:
            g = settings.gcs_for(parsed)
            results[url] = {"project": g.project, "credentials_json": g.credentials_json}
    return results


def assert_same(conf: Path, urls: list[str], home: Path) -> None:
    ours = ours_resolve(conf, urls)
    sdk = sdk_resolve(conf, urls, home)
    for url in urls:
        assert ours[url] == sdk[url], f"{url}: clearmlfs {ours[url]} != SDK {sdk[url]}"


# -- README.md ----------------------------------------------------------------------------------------------------

README_URLS = [
    "s3://team-models/a/model.pt", "s3://team-models", "s3://minio.local:9000/any/x", "s3://prod-data/x",
    "s3://elsewhere/x", "azure://myaccount.blob.core.windows.net/models/x", "gs://my-bucket/team/x",
    "gs://my-bucket/other/x", "gs://elsewhere/x",
]


def readme_blocks() -> list[str]:
    return re.findall(r"```hocon\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def test_the_readme_has_complete_configuration_files() -> None:
    blocks = readme_blocks()
    assert blocks and all(re.search(r"^sdk \{", block, re.M) for block in blocks)


@pytest.mark.parametrize("index", range(len(readme_blocks())))
def test_each_readme_example_means_the_same_to_the_sdk_and_to_clearmlfs(tmp_path: Path, index: int) -> None:
    conf = tmp_path / "clearml.conf"
    conf.write_text(readme_blocks()[index])
    settings = load_settings(conf)
    known = [u for u in README_URLS if (u.startswith("s3") and settings.s3.credentials)
             or (u.startswith("azure") and settings.azure) or (u.startswith("gs") and settings.gcs)]
    assert_same(conf, known or ["s3://elsewhere/x"], tmp_path / "home")


# -- tests/stores.py ----------------------------------------------------------------------------------------------


def _stores(request: pytest.FixtureRequest, names: list[str], tmp_path: Path) -> list[stores.Store]:
    made = {
        "seaweedfs": lambda: stores.seaweed_store(request.getfixturevalue("seaweedfs")),
        "seaweedfs-single-put": lambda: stores.seaweed_store(request.getfixturevalue("seaweedfs"), multipart=False),
        "moto": lambda: stores.moto_store(request.getfixturevalue("moto_s3")),
        "azurite": lambda: stores.azure_store(request.getfixturevalue("azurite")),
        "gcs": lambda: stores.gcs_store(request.getfixturevalue("gcs_emulator")),
        "local": lambda: stores.local_store(tmp_path / "local"),
    }
    return [made[name]() for name in names]


@pytest.mark.parametrize(
    "names",
    [["seaweedfs"], ["seaweedfs-single-put"], ["moto"], ["azurite"], ["gcs"], ["local"],
     ["seaweedfs", "moto", "azurite", "gcs", "local"]],
    ids=lambda names: "+".join(names),
)
def test_every_test_store_conf_means_the_same_to_the_sdk_and_to_clearmlfs(
    request: pytest.FixtureRequest, tmp_path: Path, names: list[str]
) -> None:
    chosen = _stores(request, names, tmp_path)
    conf, _ = stores.conf_for(tmp_path, "c", *chosen)
    urls = [f"{s.root}/a/b.bin" for s in chosen if not s.root.startswith("file://")]
    assert_same(conf, urls or ["gs://nobody/x"], tmp_path / "home")


def test_an_inline_gcs_key_is_taken_by_both(tmp_path: Path) -> None:
    from clearmlfs.backends.gcs import _service_account

    conf = tmp_path / "clearml.conf"
    conf.write_text(f"sdk.google.storage {{ credentials_json: {json.dumps(stores.service_account_key())} }}")
    sdk_side = ("import sys\nfrom clearml.storage.helper import StorageHelper, _GoogleCloudStorageDriver\n"
                "cfg = StorageHelper._gs_configurations.get_config_by_uri('gs://b/x')\n"
                "print('EMAIL:' + _GoogleCloudStorageDriver._Container('gs://b', cfg).client._credentials"
                ".service_account_email)")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "CLEARML_CONFIG_FILE": str(conf), "LANG": "C.UTF-8"}
    done = subprocess.run([sys.executable, "-c", sdk_side], env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert "EMAIL:sa@p.iam.gserviceaccount.com" in done.stdout, done.stderr
    ours = _service_account(load_settings(conf).gcs_for(parse_url("gs://b/x")))
    assert ours.service_account_email == "sa@p.iam.gserviceaccount.com"


# -- values the SDK cannot use ------------------------------------------------------------------------------------

ENTRY = '{ bucket: "b", key: "k", secret: "s"'


@pytest.mark.parametrize(
    ("text", "url"),
    [
        ('sdk.aws.s3.credentials: [ { bucket: 5, key: "k", secret: "s" } ]', "s3://5/x"),
        ('sdk.aws.s3.credentials: [ "bucket" ]', "s3://b/x"),
        ('sdk.aws.s3.credentials: { bucket: "b" }', "s3://b/x"),
        (f"sdk.aws.s3.credentials: [ {ENTRY}, extra: 1 }} ]", "s3://b/x"),
        ('sdk.aws.s3 { key: 1234, secret: "s" }', "s3://b/x"),
        ('sdk.aws.s3 { key: "k", secret: "s" }\nsdk.aws.boto3.pool_connections: "64"', "s3://b/x"),
        ('sdk.aws.s3 { key: "k", secret: "s" }\nsdk.aws.boto3.connect_timeout: "10"', "s3://b/x"),
        ('sdk.storage.cache.default_cache_manager_size: "50"', "cache://limit"),
        ('sdk.google.storage.credentials: [ { subdir: "x" } ]', "gs://b/x"),
        ('sdk.azure.storage.containers: [ { account_key: "k" } ]', "azure://a.blob.core.windows.net/c/x"),
        ('sdk.azure.storage.containers: [ { account_name: "a", account_key: "k", endpoint: "http://e" } ]',
         "azure://a.blob.core.windows.net/c/x"),
    ],
)
def test_what_clearmlfs_refuses_the_sdk_fails_on(tmp_path: Path, text: str, url: str) -> None:
    conf = tmp_path / "clearml.conf"
    conf.write_text(text)
    with pytest.raises(ConfigError):
        load_settings(conf)
    assert "error" in sdk_resolve(conf, [url], tmp_path / "home")[url]


@pytest.mark.parametrize(("option", "sdk_reads"), [("secure", True), ("verify", "false"), ("multipart", True)])
def test_what_clearmlfs_refuses_the_sdk_misreads(tmp_path: Path, option: str, sdk_reads: object) -> None:
    conf = tmp_path / "clearml.conf"
    conf.write_text(f'sdk.aws.s3.credentials: [ {ENTRY}, {option}: "false" }} ]')
    with pytest.raises(ConfigError, match=f"{option} must be"):
        load_settings(conf)
    assert sdk_resolve(conf, ["s3://b/x"], tmp_path / "home")["s3://b/x"][option] == sdk_reads


# -- uploads ------------------------------------------------------------------------------------------------------


def test_uploads_carry_extra_args_and_the_content_type_as_the_sdks_do(moto_s3: servers.MotoS3, tmp_path: Path) -> None:
    store = stores.moto_store(moto_s3)
    entry = {**store.conf["aws"]["s3"]["credentials"][0],
             "extra_args": {"ServerSideEncryption": "AES256", "Metadata": {"team": "vision"}}}
    sse = stores.Store("moto", store.root, {"aws": {"s3": {"credentials": [entry]}}})
    conf, _ = stores.conf_for(tmp_path, "c", sse)
    src = tmp_path / "report.json"
    src.write_text('{"a": 1}')
    big = tmp_path / "weights.csv"
    big.write_bytes(b"1,2\n" * (3 * 1024 * 1024))  # past the 8 MiB multipart threshold
    prefix = f"{store.root}/extra-{os.getpid()}"
    StorageManager.configure(conf)
    for path in (src, big):
        StorageManager.upload_file(str(path), f"{prefix}/ours/{path.name}")
    pool = BackendPool(load_settings(conf))  # a streamed upload, too
    with open(src, "rb") as reader:
        pool.get(parse_url(prefix)).upload_stream(reader, f"{parse_url(prefix).key}/ours/streamed.json")
    pool.close()
    sdk_upload = ("import sys\nfrom clearml import StorageManager\nfor path in sys.argv[2:]:\n"
                  "    StorageManager.upload_file(path, sys.argv[1] + '/' + path.rsplit('/', 1)[1])")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "CLEARML_CONFIG_FILE": str(conf), "LANG": "C.UTF-8"}
    done = subprocess.run([sys.executable, "-c", sdk_upload, f"{prefix}/sdk", str(src), str(big)], env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    client, bucket, key = moto_s3.client(), parse_url(prefix).bucket, parse_url(prefix).key
    for name, content_type in (("report.json", "application/json"), ("weights.csv", "text/csv")):
        sdk, ours = (client.head_object(Bucket=bucket, Key=f"{key}/{who}/{name}") for who in ("sdk", "ours"))
        for head in (sdk, ours):
            assert (head["ContentType"], head["ServerSideEncryption"]) == (content_type, "AES256"), head
            assert head["Metadata"].get("team") == "vision"
    streamed = client.head_object(Bucket=bucket, Key=f"{key}/ours/streamed.json")
    assert (streamed["ContentType"], streamed["ServerSideEncryption"]) == ("application/json", "AES256")
