"""clearml.conf → typed settings, and per-URL credential resolution.

The file is found the way ClearML finds it (explicit path or CLEARML_CONFIG_FILE,
then ~/clearml.conf, then ~/.clearml.conf) and read with pyhocon, so a user's
existing file works unchanged. Keys live under ``sdk { ... }``; a file without
the ``sdk`` wrapper is accepted too.

Resolution follows ClearML (longest configured prefix wins) with two fixes:
prefixes match whole path segments (an entry for ``bucket`` does not capture
``bucket2``) and an entry without usable credentials is reported, not dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, InvalidURL
from .urls import StorageURL, parse_url

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.clearml/cache"
DEFAULT_CACHE_FILE_LIMIT = 100  # ClearML's storage.cache.default_cache_manager_size


@dataclass(frozen=True)
class S3Credentials:
    """One `sdk.aws.s3.credentials` entry (or the defaults, with bucket/host empty)."""

    bucket: str = ""
    host: str = ""  # "host:port" of an S3-compatible server; empty for AWS
    key: str = ""
    secret: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    region: str = ""
    profile: str = ""
    multipart: bool = True
    secure: bool = True
    verify: bool | str | None = None  # False, True, or a CA bundle path
    use_credentials_chain: bool = False

    @property
    def has_keys(self) -> bool:
        return bool(self.key and self.secret)

    @property
    def prefix(self) -> str:
        netloc = f"{self.host}/{self.bucket}" if self.host else self.bucket
        return f"s3://{netloc}".rstrip("/").lower()


@dataclass(frozen=True)
class S3Settings:
    default: S3Credentials = S3Credentials()
    credentials: tuple[S3Credentials, ...] = ()
    pool_connections: int = 512
    max_multipart_concurrency: int = 16
    multipart_threshold: int = 8 * 1024 * 1024
    multipart_chunksize: int = 8 * 1024 * 1024


@dataclass(frozen=True)
class AzureContainer:
    """One `sdk.azure.storage.containers` entry. `endpoint`/`connection_string` are clearmlfs additions."""

    account_name: str
    account_key: str = field(default="", repr=False)
    container_name: str = ""  # empty: every container of the account
    endpoint: str = ""  # default https://ACCOUNT.blob.core.windows.net
    connection_string: str = field(default="", repr=False)

    @property
    def account_url(self) -> str:
        return self.endpoint.rstrip("/") or f"https://{self.account_name}.blob.core.windows.net"


@dataclass(frozen=True)
class GCSBucket:
    """One `sdk.google.storage.credentials` entry (or the defaults, with bucket empty)."""

    bucket: str = ""
    subdir: str = ""
    project: str = ""
    credentials_json: str = ""

    @property
    def prefix(self) -> str:
        return "/".join(p for p in (f"gs://{self.bucket}", self.subdir.strip("/")) if p).rstrip("/")


@dataclass(frozen=True)
class Timeouts:
    """How long clearmlfs waits for a server (seconds). A stalled server costs a caller `operation` at most."""

    connect: float = 10.0  # to open a connection
    read: float = 20.0  # without a byte from the server, once a request is sent
    operation: float = 20.0  # all the remote calls of one filesystem operation, retries included
    revalidate: float = 3.0  # checking that a cached copy or listing is still current, before using it anyway

    def __post_init__(self) -> None:
        for name in ("connect", "read", "operation", "revalidate"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} timeout must be a positive number of seconds, not {getattr(self, name)!r}")


DEFAULT_TIMEOUTS = Timeouts()


@dataclass(frozen=True)
class ApiSettings:
    """The `api` section: the ClearML server, its fileserver (http(s) storage) and the key pair that logs in."""

    api_server: str = ""
    files_server: str = ""
    access_key: str = ""
    secret_key: str = field(default="", repr=False)


@dataclass(frozen=True)
class Settings:
    source: Path | None = None  # the file read, if any
    s3: S3Settings = S3Settings()
    azure: tuple[AzureContainer, ...] = ()
    gcs_default: GCSBucket = GCSBucket()
    gcs: tuple[GCSBucket, ...] = ()
    cache_dir: Path = Path(DEFAULT_CACHE_DIR).expanduser()
    cache_file_limit: int = DEFAULT_CACHE_FILE_LIMIT
    direct_access: tuple[str, ...] = ("file://*",)
    timeouts: Timeouts = DEFAULT_TIMEOUTS
    api: ApiSettings = ApiSettings()
    offline_reads: bool = True  # serve a cached copy when the server cannot say whether it is current
    cache_min_free: str = ""  # free space the cache leaves on its disk (cache.min_free_bytes); "" = default
    mount_defaults: tuple[str, ...] = ()  # the `clearmlfs { }` section as mount options, before the given ones

    # -- resolution -------------------------------------------------------------------------------
    def s3_for(self, url: StorageURL) -> S3Credentials:
        """Credentials for an s3:// URL: the longest matching entry, else the defaults."""
        entry: S3Credentials | None = _longest_match(url.url, ((c.prefix, c) for c in self.s3.credentials))
        if entry is None:
            d = self.s3.default
            return S3Credentials(**{**d.__dict__, "bucket": url.bucket, "host": url.host})
        if not (entry.has_keys or entry.use_credentials_chain):
            raise ConfigError(
                f"{self._where()}: the sdk.aws.s3.credentials entry for {entry.prefix} has no key/secret "
                "(add them, or set use_credentials_chain: true)"
            )
        return entry

    def azure_for(self, url: StorageURL) -> AzureContainer:
        """The container entry for an azure:// URL (an exact container beats an account-wide entry)."""
        matches = [c for c in self.azure if c.account_name == url.account and c.container_name in ("", url.bucket)]
        if not matches:
            raise ConfigError(
                f"{self._where()}: no sdk.azure.storage.containers entry (and no AZURE_STORAGE_ACCOUNT/"
                f"AZURE_STORAGE_KEY) for account {url.account!r}, container {url.bucket!r}"
            )
        best = max(matches, key=lambda c: bool(c.container_name))
        if not (best.account_key or best.connection_string):
            raise ConfigError(f"{self._where()}: the Azure entry for account {url.account!r} has no account_key")
        return best

    def gcs_for(self, url: StorageURL) -> GCSBucket:
        """The most specific bucket+subdir entry for a gs:// URL, else the defaults."""
        entry = _longest_match(url.url, ((c.prefix, c) for c in self.gcs))
        if entry is None:
            return GCSBucket(url.bucket, "", self.gcs_default.project, self.gcs_default.credentials_json)
        return GCSBucket(
            entry.bucket,
            entry.subdir,
            entry.project or self.gcs_default.project,
            entry.credentials_json or self.gcs_default.credentials_json,
        )

    def direct_path(self, url: str) -> str | None:
        """The local path behind `url` when it is read in place (file://, always), else None."""
        parsed = parse_url(url)
        if parsed.scheme != "file":
            return None
        return parsed.key

    def is_direct_access(self, url: str) -> bool:
        return parse_url(url).scheme == "file" or any(_glob_match(p, url) for p in self.direct_access)

    def _where(self) -> str:
        return str(self.source) if self.source else "configuration"


def _longest_match(url: str, candidates: Iterable[tuple[str, Any]]) -> Any:
    """The candidate whose prefix covers `url` on a segment boundary, longest prefix first."""
    low = url.lower()
    best: tuple[int, Any] | None = None
    for prefix, value in candidates:
        if low == prefix or low.startswith(prefix + "/"):
            if best is None or len(prefix) > best[0]:
                best = (len(prefix), value)
    return best[1] if best else None


def _glob_match(pattern: str, url: str) -> bool:
    body = pattern[:-1]
    if pattern.endswith("*") and not any(ch in body for ch in "*?["):
        return url.startswith(body)  # a trailing * alone is a prefix match
    return fnmatch.fnmatchcase(url, pattern)


# -- loading ---------------------------------------------------------------------------------------


def find_config_file(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The clearml.conf to read, in ClearML's order; None when there is none (defaults apply)."""
    chosen = explicit or os.environ.get("CLEARML_CONFIG_FILE")
    if chosen:
        path = Path(chosen).expanduser()
        if path.is_dir():
            raise ConfigError(f"configuration file {path} is a directory, not a file")
        if not path.is_file():
            raise ConfigError(f"configuration file {path} does not exist")
        return path
    for candidate in (Path("~/clearml.conf"), Path("~/.clearml.conf")):
        path = candidate.expanduser()
        if path.is_file():
            return path
    return None


def load_settings(explicit: str | os.PathLike[str] | None = None) -> Settings:
    """Read clearml.conf (see `find_config_file`) into Settings. Raises ConfigError naming file and line."""
    path = find_config_file(explicit)
    tree = _parse(path) if path else {}
    sdk = tree.get("sdk", tree) if isinstance(tree, Mapping) else {}
    own = tree.get(OWN_SECTION, {}) if isinstance(tree, Mapping) else {}
    try:
        settings = _settings_from(sdk, path, own)
        return dataclasses.replace(settings, api=_api_settings(_get(tree, "api", {})))
    except ConfigError:
        raise
    except (TypeError, ValueError, AttributeError, InvalidURL) as exc:
        raise ConfigError(f"{path or 'configuration'}: {exc}") from None


def _not_utf8(path: Path) -> str:
    """Where `path` (or, if it reads as UTF-8, a file it includes) stops being UTF-8, as an error message."""
    try:
        raw = path.read_bytes()
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        return f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); clearml.conf is read as UTF-8"
    except OSError:
        pass
    return f"{path}: a file it includes is not UTF-8 text"


def _parse(path: Path) -> Mapping[str, Any]:
    from pyhocon import ConfigFactory
    from pyhocon.exceptions import ConfigException
    from pyparsing import ParseBaseException

    try:
        tree = ConfigFactory.parse_file(str(path))
    except ParseBaseException as exc:
        raise ConfigError(f"{path}:{exc.lineno}: malformed clearml.conf: {exc.msg}") from None
    except ConfigException as exc:
        raise ConfigError(f"{path}: malformed clearml.conf: {exc}") from None
    except OSError as exc:  # (the file, or a file it includes)
        raise ConfigError(f"{exc.filename or path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(_not_utf8(path)) from None
    plain: Mapping[str, Any] = _plain(tree)
    return plain


def _plain(value: Any) -> Any:
    """pyhocon trees → plain dicts/lists, so nothing below depends on pyhocon."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _get(tree: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return default if node is None else node


def parse_size(text: str) -> int:
    """`20G`, `512MiB`, `1048576` → bytes."""
    units = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    text = text.strip().lower().rstrip("b").rstrip("i")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def parse_bool(text: str) -> bool:
    """true/yes/on/1 or false/no/off/0, in any case; ValueError for anything else."""
    word = text.strip().lower()
    if word in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return word in ("true", "yes", "on", "1")
    raise ValueError(text)


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return parse_bool(value)
    raise ConfigError(f"{name} must be true or false, not {value!r}")


def _verify(value: Any) -> bool | str | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return str(value)  # a CA bundle path, as boto3 accepts


# The top-level section for clearmlfs's own settings: the ClearML SDK reads only `api`, `sdk` and `agent`, so
# one clearml.conf serves both. Its keys are the mount options of the same name.
OWN_SECTION = "clearmlfs"


def _timeouts(own: Mapping[str, Any], boto3: Mapping[str, Any]) -> Timeouts:
    """clearmlfs's own keys first, then the SDK's boto3 ones (which it applies to S3 alone), then defaults."""
    base = Timeouts()
    return Timeouts(
        connect=float(own.get("connect_timeout", boto3.get("connect_timeout", base.connect))),
        read=float(own.get("read_timeout", boto3.get("read_timeout", base.read))),
        operation=float(own.get("op_timeout", base.operation)),
        revalidate=float(own.get("revalidate_timeout", base.revalidate)),
    )


def _as_options(own: Mapping[str, Any]) -> tuple[str, ...]:
    """The `clearmlfs { }` section as `-o` items: `name=value`, with on/off for booleans (a false flag such as
    `allow_other: false` is left out)."""
    items = []
    for name, value in own.items():
        if isinstance(value, bool):
            if value or name not in ("allow_other", "ro"):
                items.append(f"{name}={'on' if value else 'off'}")
        elif isinstance(value, (str, int, float)):
            items.append(f"{name}={value}")
        else:
            raise ConfigError(f"{OWN_SECTION}.{name} must be a single value, not {type(value).__name__}")
    return tuple(items)


def _settings_from(sdk: Mapping[str, Any], path: Path | None, own: Mapping[str, Any] | None = None) -> Settings:
    own = own if isinstance(own, Mapping) else {}
    cache_dir = os.environ.get("CLEARML_CACHE_DIR") or _get(sdk, "storage.cache.default_base_dir", DEFAULT_CACHE_DIR)
    direct = tuple(
        str(e["url"]) for e in _get(sdk, "storage.direct_access", []) if isinstance(e, Mapping) and e.get("url")
    )
    return Settings(
        source=path,
        s3=_s3_settings(_get(sdk, "aws", {})),
        azure=_azure_containers(_get(sdk, "azure.storage", {})),
        gcs_default=_gcs_entry(_get(sdk, "google.storage", {})),
        gcs=tuple(_gcs_entry(e) for e in _get(sdk, "google.storage.credentials", []) if isinstance(e, Mapping)),
        cache_dir=Path(os.path.expandvars(str(cache_dir))).expanduser(),
        cache_file_limit=int(_get(sdk, "storage.cache.default_cache_manager_size", DEFAULT_CACHE_FILE_LIMIT)),
        direct_access=direct or ("file://*",),
        timeouts=_timeouts(own, _get(sdk, "aws.boto3", {})),
        offline_reads=_bool(own.get("offline", True), f"{OWN_SECTION}.offline"),
        cache_min_free=str(own.get("cache_min_free", "")),
        mount_defaults=_as_options(own),
    )


def _s3_entry(entry: Mapping[str, Any], **defaults: Any) -> S3Credentials:
    def s(name: str) -> str:
        value = entry.get(name, defaults.get(name, ""))
        return "" if value is None else str(value).strip()

    return S3Credentials(
        bucket=s("bucket").strip("\"'").strip("/"),
        host=s("host").lower(),
        key=s("key"),
        secret=s("secret"),
        token=s("token"),
        region=s("region"),
        profile=s("profile"),
        multipart=_bool(entry.get("multipart", True), "multipart"),
        secure=_bool(entry.get("secure", defaults.get("secure", True)), "secure"),
        verify=_verify(entry.get("verify", defaults.get("verify"))),
        use_credentials_chain=_bool(entry.get("use_credentials_chain", False), "use_credentials_chain"),
    )


def _s3_settings(aws: Mapping[str, Any]) -> S3Settings:
    s3 = _get(aws, "s3", {})
    env = os.environ
    # ClearML's environment fallbacks for the defaults; boto3's own chain applies when the key stays empty.
    default = _s3_entry(
        {k: v for k, v in s3.items() if k != "credentials"},
        key=env.get("AWS_ACCESS_KEY_ID", ""),
        secret=env.get("AWS_SECRET_ACCESS_KEY", ""),
        token=env.get("AWS_SESSION_TOKEN", ""),
        region=env.get("AWS_DEFAULT_REGION", ""),
        profile=env.get("AWS_PROFILE", ""),
    )
    entries = []
    for raw in _get(s3, "credentials", []):
        if not isinstance(raw, Mapping):
            raise ConfigError("sdk.aws.s3.credentials must be a list of {bucket/host, key, secret} entries")
        entry = _s3_entry(raw)
        if not (entry.bucket or entry.host):
            raise ConfigError("an sdk.aws.s3.credentials entry names neither a bucket nor a host")
        if not (entry.has_keys or entry.use_credentials_chain):
            log.warning("sdk.aws.s3.credentials entry for %s has no key/secret; requests to it will fail", entry.prefix)
        entries.append(entry)
    boto = _get(aws, "boto3", {})
    return S3Settings(
        default=default,
        credentials=tuple(entries),
        pool_connections=int(boto.get("pool_connections", 512)),
        max_multipart_concurrency=max(1, int(boto.get("max_multipart_concurrency", 16))),
        multipart_threshold=int(boto.get("multipart_threshold", 8 * 1024 * 1024)),
        multipart_chunksize=int(boto.get("multipart_chunksize", 8 * 1024 * 1024)),
    )


def _azure_containers(storage: Mapping[str, Any]) -> tuple[AzureContainer, ...]:
    containers = []
    for raw in _get(storage, "containers", []):
        if not isinstance(raw, Mapping) or not raw.get("account_name"):
            raise ConfigError("every sdk.azure.storage.containers entry needs an account_name")
        containers.append(
            AzureContainer(
                account_name=str(raw["account_name"]),
                account_key=str(raw.get("account_key") or ""),
                container_name=str(raw.get("container_name") or ""),
                endpoint=str(raw.get("endpoint") or ""),
                connection_string=str(raw.get("connection_string") or ""),
            )
        )
    account, key = os.environ.get("AZURE_STORAGE_ACCOUNT"), os.environ.get("AZURE_STORAGE_KEY")
    if account and key:  # ClearML's environment fallback, after the configured entries
        containers.append(AzureContainer(account_name=account, account_key=key))
    return tuple(containers)


def _gcs_entry(raw: Mapping[str, Any]) -> GCSBucket:
    return GCSBucket(
        bucket=str(raw.get("bucket") or "").strip("/"),
        subdir=str(raw.get("subdir") or "").strip("/"),
        project=str(raw.get("project") or ""),
        credentials_json=str(raw.get("credentials_json") or ""),
    )


def _env(*names: str) -> str:
    return next((os.environ[n] for n in names if os.environ.get(n)), "")


def _api_settings(api: Mapping[str, Any]) -> ApiSettings:
    """The `api` section, each key overridden by its environment variable as the SDK does."""
    creds = _get(api, "credentials", {})
    return ApiSettings(
        api_server=_env("CLEARML_API_HOST", "TRAINS_API_HOST") or str(api.get("api_server") or ""),
        files_server=_env("CLEARML_FILES_HOST", "TRAINS_FILES_HOST") or str(api.get("files_server") or ""),
        access_key=_env("CLEARML_API_ACCESS_KEY", "TRAINS_API_ACCESS_KEY") or str(creds.get("access_key") or ""),
        secret_key=_env("CLEARML_API_SECRET_KEY", "TRAINS_API_SECRET_KEY") or str(creds.get("secret_key") or ""),
    )
