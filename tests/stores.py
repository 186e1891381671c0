"""clearml.conf snippets and root URLs for each real test server, shared by the storage and mount tests.

HOCON is a superset of JSON, so a conf is built as a dict and written with json.dump.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tests import servers


@dataclass(frozen=True)
class Store:
    """One configured bucket/container: its ClearML root URL and the clearml.conf section that reaches it."""

    name: str
    root: str  # e.g. "s3://127.0.0.1:8333/clearmlfs-test"
    conf: dict[str, Any]  # under `sdk { }`
    own: dict[str, Any] = field(default_factory=dict)  # under `clearmlfs { }`, which the SDK never reads

    def fresh_prefix(self) -> str:
        """A URL folder no other test uses."""
        return f"{self.root}/t-{uuid.uuid4().hex[:12]}"


def s3_host_store(name: str, host: str, bucket: str, key: str, secret: str, multipart: bool = True) -> Store:
    entry = {"host": host, "key": key, "secret": secret, "secure": False, "multipart": multipart}
    return Store(name, f"s3://{host}/{bucket}", {"aws": {"s3": {"credentials": [entry]}}})


def seaweed_store(sw: servers.SeaweedFS, multipart: bool = True, host: str | None = None) -> Store:
    return s3_host_store("seaweedfs", host or sw.host, sw.bucket, *sw.admin, multipart=multipart)


def moto_store(moto: servers.MotoS3) -> Store:
    return s3_host_store("moto", moto.host, moto.bucket, moto.key, moto.secret)


def azure_store(az: servers.Azurite) -> Store:
    """The SDK's container entry, and Azurite's endpoint in clearmlfs's own section (the SDK refuses it in its)."""
    entry = {"account_name": az.account_name, "account_key": az.account_key, "container_name": az.container}
    endpoint = {"account_name": az.account_name, "container_name": az.container, "endpoint": az.endpoint}
    root = f"azure://{az.account_name}.blob.core.windows.net/{az.container}"
    return Store("azurite", root, {"azure": {"storage": {"containers": [entry]}}}, {"azure": [endpoint]})


def gcs_store(gcs: servers.GCSEmulator) -> Store:
    return Store("gcs", f"gs://{gcs.bucket}", {"google": {"storage": {"project": gcs.project}}})


def local_store(folder: Path) -> Store:
    folder.mkdir(parents=True, exist_ok=True)
    return Store("local", f"file://{folder}", {})


def write_conf(path: Path, cache_dir: Path, *stores: Store, extra: dict[str, Any] | None = None) -> Path:
    """A clearml.conf (with an `api` section, as users have) combining the stores' sections."""
    sdk: dict[str, Any] = {"storage": {"cache": {"default_base_dir": str(cache_dir)}}}
    own: dict[str, Any] = {}
    for store in stores:
        _merge(sdk, store.conf)
        _merge(own, store.own)
    _merge(sdk, extra or {})
    conf: dict[str, Any] = {"api": {"api_server": "http://127.0.0.1:1"}, "sdk": sdk}
    path.write_text(json.dumps({**conf, "clearmlfs": own} if own else conf, indent=2))
    return path


def _merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        elif isinstance(value, list) and isinstance(into.get(key), list):
            into[key] = into[key] + value
        else:
            into[key] = value


def conf_for(tmp_path: Path, name: str, *stores: Store, extra: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """A private clearml.conf with its own (not yet existing) cache folder: (conf, cache)."""
    cache = tmp_path / f"{name}-cache"
    conf = write_conf(tmp_path / f"{name}.conf", cache, *stores, extra=extra)
    conf.chmod(0o600)  # it holds credentials; the mount warns about a readable one
    return conf, cache


def service_account_key(marker: str = "") -> str:
    """A Google service-account key's JSON (a fresh RSA key; `marker` inside its private key), as
    `credentials_json` may hold it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return json.dumps({
        "type": "service_account", "project_id": "p", "private_key_id": "1",
        "private_key": pem.replace("-----END", f"{marker}\n-----END") if marker else pem,
        "client_email": "sa@p.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    })


def random_bytes(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(size)
