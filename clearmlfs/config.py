"""clearml.conf → typed settings, and per-URL credential resolution.

The files are found and merged as the ClearML SDK does (`find_config_files`) and
read with pyhocon, so a user's existing file works unchanged and means the same.
Keys live under ``sdk { ... }``; a file without the ``sdk`` wrapper is accepted
too. What clearmlfs adds lives in the top-level ``clearmlfs { }`` section, which
the SDK never reads; a key the SDK would choke on is refused with the fix.

Resolution follows ClearML (longest configured prefix wins) with two fixes:
prefixes match whole path segments (an entry for ``bucket`` does not capture
``bucket2``) and an entry without usable credentials is reported, not dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import sdk_size_cache
from .errors import ConfigError, InvalidURL
from .urls import StorageURL, parse_url, register_s3_host

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.clearml/cache"
DEFAULT_CACHE_FILE_LIMIT = 100  # ClearML's storage.cache.default_cache_manager_size


@dataclass(frozen=True)
class S3Credentials:
    """One `sdk.aws.s3.credentials` entry (or the defaults, with bucket/host empty)."""

    bucket: str = ""
    host: str = ""  # "host:port" of an S3-compatible server; empty for AWS
    key: str = field(default="", repr=False)
    secret: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    region: str = ""
    profile: str = ""
    multipart: bool = True
    secure: bool = True
    verify: bool | str | None = None  # False, True, or a CA bundle path
    use_credentials_chain: bool = False
    extra_args: str = field(default="", repr=False)  # JSON of boto3's upload ExtraArgs (may hold an SSE-C key)
    origin: str = field(default="", compare=False)  # where it was configured, for messages

    @property
    def has_keys(self) -> bool:
        return bool(self.key and self.secret)

    @property
    def upload_args(self) -> dict[str, Any]:
        """The ExtraArgs every upload sends, as the SDK sends them (`sdk.aws.s3.extra_args`, or the entry's)."""
        args: dict[str, Any] = json.loads(self.extra_args) if self.extra_args else {}
        return args

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
    """One `sdk.azure.storage.containers` entry, with what a matching `clearmlfs.azure` entry adds
    (`endpoint`, `connection_string`: the SDK refuses unknown keys in its own entries)."""

    account_name: str
    account_key: str = field(default="", repr=False)
    container_name: str = ""  # empty: every container of the account
    endpoint: str = ""  # default https://ACCOUNT.blob.core.windows.net
    connection_string: str = field(default="", repr=False)
    use_default_credential: bool = False
    origin: str = field(default="", compare=False)

    @property
    def account_url(self) -> str:
        return self.endpoint.rstrip("/") or f"https://{self.account_name}.blob.core.windows.net"


@dataclass(frozen=True)
class GCSBucket:
    """One `sdk.google.storage.credentials` entry (or the defaults, with bucket empty)."""

    bucket: str = ""
    subdir: str = ""
    project: str = ""
    credentials_json: str = field(default="", repr=False)  # a file, or the key's JSON itself (as the SDK takes)
    origin: str = field(default="", compare=False)

    @property
    def prefix(self) -> str:
        return "/".join(p for p in (f"gs://{self.bucket}", self.subdir.strip("/")) if p).rstrip("/")

    @property
    def inline_json(self) -> bool:
        """`credentials_json` holds the service-account key itself, not a file name."""
        return self.credentials_json.lstrip().startswith("{")


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
    web_server: str = ""  # the SDK derives a files_server left unset from it
    files_server: str = ""
    access_key: str = ""
    secret_key: str = field(default="", repr=False)
    # More URL prefixes the SDK sends the session's token to: sdk.storage.http.legacy_fileservers and
    # sdk.metrics.plot_upload_destination.
    extra_file_servers: tuple[str, ...] = ()
    # Whether TLS certificates are checked (True), not (False), or against a CA bundle (its path), as the SDK's
    # HTTP sessions decide, CLEARML_API_HOST_VERIFY_CERT first: for the api server's login, by
    # api.verify_certificate; for http(s) storage, the fileserver's included, by the key it reads under `sdk`
    # (sdk.api.verify_certificate), which clearml.conf files rarely have.
    verify: bool | str = True
    storage_verify: bool | str = True
    auth_token: str = field(default="", repr=False)  # CLEARML_AUTH_TOKEN: logs in instead of the key pair


@dataclass(frozen=True)
class SizeCache:
    """The SDK's size-aware cache (`sdk.storage.cache.disk_space_file_size_strategy`, or the legacy
    `storage.cache.size`), when clearml.conf turns it on: its layout and these limits replace the per-context
    count limit, for the SDK and clearmlfs alike (sdk_size_cache.py)."""

    max_used_bytes: int = -1  # the cache's total size; <= 0: no limit
    min_free_bytes: int = 10**10  # left free on its disk; <= 0: no limit
    cleanup_margin: float = 0.05  # a cleanup goes this fraction beyond the limits
    cleanup_seconds_threshold: float = 20.0  # a file used this recently is never evicted
    zero_file_size_check: bool = False  # an empty copy counts as missing


@dataclass(frozen=True)
class Settings:
    source: Path | None = None  # the file read last (whose keys win), if any
    s3: S3Settings = S3Settings()
    azure: tuple[AzureContainer, ...] = ()
    azure_own: tuple[AzureContainer, ...] = ()  # `clearmlfs.azure`: endpoint/connection_string per account
    gcs_default: GCSBucket = GCSBucket()
    gcs: tuple[GCSBucket, ...] = ()
    cache_dir: Path = Path(DEFAULT_CACHE_DIR).expanduser()
    cache_file_limit: int = DEFAULT_CACHE_FILE_LIMIT
    cache_file_limit_set: bool = False  # default_cache_manager_size is set in clearml.conf: the mount applies it too
    direct_access: tuple[str, ...] = ("file://*",)
    timeouts: Timeouts = DEFAULT_TIMEOUTS
    api: ApiSettings = ApiSettings()
    offline_reads: bool = True  # serve a cached copy when the server cannot say whether it is current
    cache_min_free: str = ""  # free space the cache leaves on its disk (cache.min_free_bytes); "" = default
    mount_defaults: tuple[str, ...] = ()  # the `clearmlfs { }` section as mount options, before the given ones
    size_cache: SizeCache | None = None  # the SDK's size-aware cache, when clearml.conf turns it on
    sources: tuple[Path, ...] = ()  # every file read, in order
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)  # setting → where it came from

    @property
    def mount_file_limit(self) -> int | None:
        """The entry count the mount's cache keeps: none (bytes and free space decide) unless clearml.conf sets
        `default_cache_manager_size`. The SDK's default of 100 files would evict a dataset while an epoch reads it;
        the StorageManager API keeps `cache_file_limit`, as the SDK does."""
        return self.cache_file_limit if self.cache_file_limit_set else None

    # -- resolution -------------------------------------------------------------------------------
    def s3_for(self, url: StorageURL) -> S3Credentials:
        """Credentials for an s3:// URL: the longest matching entry, else the defaults (as the SDK, which then
        needs a key and secret or `use_credentials_chain` too)."""
        entry: S3Credentials | None = _longest_match(url.url, ((c.prefix, c) for c in self.s3.credentials))
        if entry is None:
            entry = dataclasses.replace(self.s3.default, bucket=url.bucket, host=url.host)
        if entry.has_keys or entry.use_credentials_chain:
            return entry
        if entry.origin.endswith("]"):
            raise ConfigError(f"{entry.origin}: the entry for {entry.prefix} has no key/secret "
                              "(add them, or set use_credentials_chain: true)")
        raise ConfigError(
            f"{self._where()}: no S3 credentials for {url.root}: set sdk.aws.s3.key and secret (or "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), add an sdk.aws.s3.credentials entry, or set "
            "use_credentials_chain: true"
        )

    def azure_for(self, url: StorageURL) -> AzureContainer:
        """The container entry for an azure:// URL: the first entry of its account naming its container or none
        (the SDK's order), with what the first matching `clearmlfs.azure` entry adds."""
        entry = _first_container(self.azure, url)
        if entry is None:
            raise ConfigError(
                f"{self._where()}: no sdk.azure.storage.containers entry (and no AZURE_STORAGE_ACCOUNT/"
                f"AZURE_STORAGE_KEY) for account {url.account!r}, container {url.bucket!r}"
            )
        own = _first_container(self.azure_own, url)
        if own is not None:
            entry = dataclasses.replace(
                entry, endpoint=own.endpoint or entry.endpoint,
                connection_string=own.connection_string or entry.connection_string,
            )
        if entry.account_key or entry.connection_string:
            return entry
        if entry.use_default_credential:
            raise ConfigError(f"{entry.origin}: use_default_credential (azure-identity) is not supported by "
                              "clearmlfs; give account_key, or a connection_string in clearmlfs.azure")
        raise ConfigError(f"{entry.origin}: the Azure entry for account {url.account!r} has no account_key")

    def gcs_for(self, url: StorageURL) -> GCSBucket:
        """The most specific bucket+subdir entry for a gs:// URL, as it is (the SDK fills nothing in from the
        defaults), else the defaults."""
        entry: GCSBucket | None = _longest_match(url.url, ((c.prefix, c) for c in self.gcs))
        if entry is None:
            return dataclasses.replace(self.gcs_default, bucket=url.bucket)
        return entry

    def direct_path(self, url: str) -> str | None:
        """The local path `url` is read from in place, never cached, or None: the SDK's decision.

        By default the SDK reads every file:// URL (or plain path) in place and `storage.direct_access` is not
        consulted. With its disk-space cache strategy the globs decide instead: a URL of any scheme matching
        one is read at "/" + netloc + path (storage mounted locally), and a file:// URL matching none is cached.
        """
        parsed = parse_url(url)
        if not self._direct_access_globs_apply():
            return parsed.key if parsed.scheme == "file" else None
        if not any(direct_access_match(p, parsed.url) for p in self.direct_access):
            return None
        netloc, _, path = parsed.url.partition("://")[2].partition("/")
        return os.path.join("/", f"{netloc}/" if netloc else "", path.lstrip("/"))

    def _direct_access_globs_apply(self) -> bool:
        return self.size_cache is not None  # (the SDK's disk-space strategy)

    def _where(self) -> str:
        return str(self.source) if self.source else "configuration"


def _first_container(entries: Iterable[AzureContainer], url: StorageURL) -> AzureContainer | None:
    return next((c for c in entries if c.account_name == url.account and c.container_name in ("", url.bucket)), None)


def _longest_match(url: str, candidates: Iterable[tuple[str, Any]]) -> Any:
    """The candidate whose prefix covers `url` on a segment boundary, longest prefix first."""
    low = url.lower()
    best: tuple[int, Any] | None = None
    for prefix, value in candidates:
        if low == prefix or low.startswith(prefix + "/"):
            if best is None or len(prefix) > best[0]:
                best = (len(prefix), value)
    return best[1] if best else None


def direct_access_match(pattern: str, url: str) -> bool:
    """The SDK's `storage.direct_access` matcher: a pattern whose only `*`s end it (and without `?`) is a
    prefix; anything else is an fnmatch glob."""
    if "*" not in pattern.rstrip("*") and "?" not in pattern and pattern.rstrip("*"):
        return url.startswith(pattern.rstrip("*"))
    return fnmatch.fnmatch(url, pattern)


# -- loading ---------------------------------------------------------------------------------------

FILE_VARIABLES = ("CLEARML_CONFIG_FILE", "TRAINS_CONFIG_FILE")
# Without a variable the SDK reads both and merges them, the later one's keys winning (~/.clearml.conf is
# not among them).
HOME_FILES = ("~/trains.conf", "~/clearml.conf")


def find_config_files(explicit: str | os.PathLike[str] | None = None) -> tuple[Path, ...]:
    """The files to read, in the SDK's order (a later file's keys win); () means defaults and environment.

    `explicit` (--config) must be a file. CLEARML_CONFIG_FILE (or TRAINS_CONFIG_FILE) replaces the home files;
    when it names no file the SDK reads none, and so does clearmlfs (with a warning)."""
    if explicit:
        path = Path(explicit).expanduser()
        if path.is_dir():
            raise ConfigError(f"configuration file {path} is a directory, not a file")
        if not path.is_file():
            raise ConfigError(f"configuration file {path} does not exist")
        return (path,)
    variable = next((name for name in FILE_VARIABLES if name in os.environ), None)
    if variable and os.environ[variable]:
        path = Path(os.environ[variable]).expanduser()
        if path.is_file():
            return (path,)
        log.warning("%s names no file (%s): no clearml.conf is read, as the ClearML SDK does", variable, path)
        return ()
    return tuple(p for p in (Path(f).expanduser() for f in HOME_FILES) if p.is_file())


def load_settings(explicit: str | os.PathLike[str] | None = None) -> Settings:
    """Read clearml.conf (see `find_config_files`) into Settings. Raises ConfigError naming file and key."""
    paths = find_config_files(explicit)
    conf = _Conf(tuple((path, _with_sdk_wrapper(_parse(path))) for path in paths))
    try:
        settings = _settings_from(conf)
    except ConfigError as exc:
        if not paths or any(str(exc).startswith(str(p)) for p in paths):
            raise
        raise ConfigError(f"{paths[-1]}: {exc}") from None
    except (TypeError, ValueError, AttributeError, InvalidURL) as exc:
        raise ConfigError(f"{conf.where('')}: {exc}") from None
    for entry in settings.s3.credentials:
        if entry.host:  # (a port-less one is a host only because clearml.conf says so)
            register_s3_host(entry.host)
    return settings


def _with_sdk_wrapper(tree: Mapping[str, Any]) -> Mapping[str, Any]:
    """A file of bare SDK keys (no `sdk { }` around them) is read as if it had one."""
    if "sdk" in tree or not any(k in tree for k in ("aws", "azure", "google", "storage")):
        return tree
    return {"sdk": {k: v for k, v in tree.items() if k not in ("api", OWN_SECTION)},
            **{k: v for k, v in tree.items() if k in ("api", OWN_SECTION)}}


class _Conf:
    """The files read, merged as the SDK merges them; every key can say which file set it."""

    def __init__(self, trees: tuple[tuple[Path, Mapping[str, Any]], ...]) -> None:
        self.trees = trees
        self.merged: dict[str, Any] = {}
        for _, tree in trees:
            _merge(self.merged, tree)

    def get(self, dotted: str, default: Any = None) -> Any:
        return _get(self.merged, dotted, default)

    def has(self, dotted: str) -> bool:
        return _get(self.merged, dotted, _MISSING) is not _MISSING

    def where(self, dotted: str) -> str:
        """"FILE: key" for the last file that sets `dotted` (or the last file read)."""
        path = next((p for p, t in reversed(self.trees) if _get(t, dotted, _MISSING) is not _MISSING), None)
        path = path or (self.trees[-1][0] if self.trees else None)
        return ": ".join(str(part) for part in (path, dotted) if part) or "configuration"

    def origin(self, dotted: str, *variables: str) -> str:
        """Where a setting comes from: the environment variable that wins, the file and key, or the default."""
        variable = next((v for v in variables if os.environ.get(v)), None)
        if variable:
            return f"environment {variable}"
        return self.where(dotted) if self.has(dotted) else "default"


_MISSING = object()


def _merge(into: dict[str, Any], other: Mapping[str, Any]) -> None:
    """HOCON's merge of two files: sections merge, anything else (lists too) is replaced."""
    for key, value in other.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = _plain(value)


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
    from pyhocon.exceptions import ConfigException, ConfigSubstitutionException
    from pyparsing import ParseBaseException

    try:
        tree = ConfigFactory.parse_file(str(path))
    except ParseBaseException as exc:
        # pyparsing's message quotes the text it found, which may be a secret: only what it expected.
        expected = exc.msg.split(", found")[0]
        raise ConfigError(f"{path}:{exc.lineno}: malformed clearml.conf: {expected}") from None
    except ConfigSubstitutionException as exc:  # (names the variable and its line, no value)
        raise ConfigError(f"{path}: malformed clearml.conf: {exc}") from None
    except ConfigException:  # (its message may quote a value)
        raise ConfigError(f"{path}: malformed clearml.conf: values that cannot be combined") from None
    except OSError as exc:  # (the file, or a file it includes)
        raise ConfigError(f"{exc.filename or path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(_not_utf8(path)) from None
    plain: Mapping[str, Any] = _plain(tree)
    return plain if isinstance(plain, Mapping) else {}


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


# The words distutils' strtobool takes, with which the SDK reads its boolean environment variables.
STRTOBOOL_TRUE = ("y", "yes", "t", "true", "on", "1")
STRTOBOOL_FALSE = ("n", "no", "f", "false", "off", "0")


def parse_bool(text: str) -> bool:
    """true/yes/on/1 or false/no/off/0, in any case; ValueError for anything else."""
    word = text.strip().lower()
    if word in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return word in ("true", "yes", "on", "1")
    raise ValueError(text)


def _bool(value: Any, name: str) -> bool:
    """A clearmlfs setting's boolean (on/off, yes/no and quoted forms too)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return parse_bool(value)
    raise ConfigError(f"{name} must be true or false, not {value!r}")


# -- the SDK's values, as strictly as the SDK can use them ---------------------------------------------
# Messages never quote a value: it may be a secret.


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, Mapping):
        return "a section"
    if isinstance(value, list):
        return "a list"
    return "text"


def _text(value: Any, where: str) -> str:
    """A string the SDK calls string methods on: a number there breaks it, so it must be quoted."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    raise ConfigError(f"{where} must be text (in quotes), not {_kind(value)}: the ClearML SDK fails on it")


def _flag(value: Any, where: str, default: bool) -> bool:
    """A flag the SDK tests for truth: the text "false" would be true to it, so only true/false are taken."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    raise ConfigError(
        f"{where} must be true or false without quotes, not {_kind(value)}: the ClearML SDK would take it as "
        f"{'true' if value else 'false'}"
    )


def _whole(value: Any, where: str) -> int:
    """A count the SDK reads with int() through its lazy config proxy, which fails on text ("50" too)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    raise ConfigError(f"{where} must be a number without quotes, not {_kind(value)}: the ClearML SDK fails on it")


def _seconds(value: Any, where: str) -> float:
    try:
        if isinstance(value, (bool, Mapping, list)):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a number of seconds, not {_kind(value)}") from None


def _entries(value: Any, where: str, what: str) -> list[Mapping[str, Any]]:
    """A list of sections, each only with the keys the SDK's entry class takes (it raises TypeError on others,
    for every URL of that kind)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list of {{ {what} }} entries, not {_kind(value)}")
    for i, entry in enumerate(value):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}[{i}] must be a {{ {what} }} section, not {_kind(entry)}")
    return value


def _refuse_unknown(entry: Mapping[str, Any], known: frozenset[str], where: str, fix: str = "") -> None:
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ConfigError(
            f"{where}: the ClearML SDK refuses the key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"here (a TypeError on every URL of this kind); {fix or 'remove it'}"
        )


def _verify(value: Any, where: str) -> bool | str | None:
    if value is None or isinstance(value, bool):
        return value
    if not isinstance(value, str) or value.strip().lower() in ("true", "false", "yes", "no", "on", "off", ""):
        raise ConfigError(f"{where} must be true, false (without quotes) or a CA bundle's path, not {_kind(value)}")
    if "://" in value:
        raise ConfigError(f"{where}: a CA bundle URL is not supported by clearmlfs; download it and give its path")
    return os.path.expanduser(value)


def _extra_args(value: Any, where: str) -> str:
    """`extra_args` as the JSON S3Credentials keeps; the keys boto3's upload accepts (the SDK's uploads would
    all fail on another)."""
    if value is None:
        return ""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a section of boto3 upload arguments, not {_kind(value)}")
    from s3transfer.manager import TransferManager

    unknown = sorted(set(value) - set(TransferManager.ALLOWED_UPLOAD_ARGS))
    if unknown:
        raise ConfigError(f"{where}: {', '.join(unknown)} is not an upload argument boto3 accepts (every upload "
                          f"of the ClearML SDK would fail); use e.g. ServerSideEncryption, SSEKMSKeyId, ACL, Metadata")
    return json.dumps(value, sort_keys=True) if value else ""


# The top-level section for clearmlfs's own settings: the ClearML SDK reads only `api`, `sdk` and `agent`, so
# one clearml.conf serves both. Its keys are the mount options of the same name, and `azure` (a list).
OWN_SECTION = "clearmlfs"
OWN_LISTS = ("azure",)


def _timeouts(conf: _Conf) -> Timeouts:
    """clearmlfs's own keys first, then the SDK's boto3 ones (which it applies to S3 alone), then defaults."""
    base = Timeouts()

    def seconds(own: str, sdk: str | None, default: float) -> float:
        if conf.has(f"{OWN_SECTION}.{own}"):
            return _seconds(conf.get(f"{OWN_SECTION}.{own}"), conf.where(f"{OWN_SECTION}.{own}"))
        if sdk and conf.has(f"sdk.aws.boto3.{sdk}"):  # (read by the SDK with int(), as the counts)
            return _whole(conf.get(f"sdk.aws.boto3.{sdk}"), conf.where(f"sdk.aws.boto3.{sdk}"))
        return default

    return Timeouts(
        connect=seconds("connect_timeout", "connect_timeout", base.connect),
        read=seconds("read_timeout", "read_timeout", base.read),
        operation=seconds("op_timeout", None, base.operation),
        revalidate=seconds("revalidate_timeout", None, base.revalidate),
    )


def _as_options(own: Mapping[str, Any]) -> tuple[str, ...]:
    """The `clearmlfs { }` section as `-o` items: `name=value`, with on/off for booleans (a false flag such as
    `allow_other: false` is left out)."""
    items = []
    for name, value in own.items():
        if name in OWN_LISTS:
            continue
        if isinstance(value, bool):
            if value or name not in ("allow_other", "ro"):
                items.append(f"{name}={'on' if value else 'off'}")
        elif isinstance(value, (str, int, float)):
            items.append(f"{name}={value}")
        else:
            raise ConfigError(f"{OWN_SECTION}.{name} must be a single value, not {type(value).__name__}")
    return tuple(items)


def _settings_from(conf: _Conf) -> Settings:
    sdk = conf.get("sdk", {})
    own = conf.get(OWN_SECTION, {})
    if not isinstance(own, Mapping):
        raise ConfigError(f"{conf.where(OWN_SECTION)} must be a section, not {_kind(own)}")
    base_dir = "sdk.storage.cache.default_base_dir"
    cache_dir = os.environ.get("CLEARML_CACHE_DIR") or _text(
        conf.get(base_dir, DEFAULT_CACHE_DIR), conf.where(base_dir)
    )
    limit = "sdk.storage.cache.default_cache_manager_size"
    s3, s3_origins = _s3_settings(conf)
    azure, azure_own = _azure_containers(conf)
    gcs_default, gcs = _gcs_settings(conf)
    origins = {
        "cache_dir": conf.origin(base_dir, "CLEARML_CACHE_DIR"),
        "cache_file_limit": conf.origin(limit),
        "direct_access": conf.origin("sdk.storage.direct_access"),
        **s3_origins,
        "gs.credentials_json": conf.origin("sdk.google.storage.credentials_json", "GOOGLE_APPLICATION_CREDENTIALS"),
        "timeouts.connect": conf.origin(f"{OWN_SECTION}.connect_timeout")
        if conf.has(f"{OWN_SECTION}.connect_timeout") else conf.origin("sdk.aws.boto3.connect_timeout"),
        "timeouts.read": conf.origin(f"{OWN_SECTION}.read_timeout")
        if conf.has(f"{OWN_SECTION}.read_timeout") else conf.origin("sdk.aws.boto3.read_timeout"),
        "api.api_server": conf.origin("api.api_server", "CLEARML_API_HOST", "TRAINS_API_HOST"),
        "api.credentials": conf.origin("api.credentials.access_key", "CLEARML_API_ACCESS_KEY", "TRAINS_API_ACCESS_KEY"),
        **{f"size_cache.{name}": conf.origin(key) for name, key in sdk_size_cache.setting_keys(sdk).items()},
    }
    return Settings(
        source=conf.trees[-1][0] if conf.trees else None,
        sources=tuple(path for path, _ in conf.trees),
        s3=s3,
        azure=azure,
        azure_own=azure_own,
        gcs_default=gcs_default,
        gcs=gcs,
        cache_dir=Path(os.path.expandvars(cache_dir)).expanduser(),
        cache_file_limit=_whole(conf.get(limit, DEFAULT_CACHE_FILE_LIMIT), conf.where(limit)),
        cache_file_limit_set=conf.has(limit),
        direct_access=_direct_access(conf),
        timeouts=_timeouts(conf),
        api=_api_settings(conf.get("api", {}), sdk),
        offline_reads=_bool(own.get("offline", True), f"{OWN_SECTION}.offline"),
        cache_min_free=str(own.get("cache_min_free", "")),
        mount_defaults=_as_options(own),
        size_cache=_size_cache(sdk),
        origins=origins,
    )


def _direct_access(conf: _Conf) -> tuple[str, ...]:
    """`storage.direct_access` url globs; the SDK's default (`file://*`) only when the key is absent."""
    key = "sdk.storage.direct_access"
    if not conf.has(key):
        return ("file://*",)
    globs = []
    for i, entry in enumerate(_entries(conf.get(key), conf.where(key), "url: GLOB")):
        for name, value in entry.items():
            if not isinstance(value, str):  # the SDK's matcher raises ValueError
                raise ConfigError(f"{conf.where(key)}[{i}].{name} must be a glob in quotes, not {_kind(value)}")
        if entry.get("url"):  # (the SDK asks only about urls: a content_type entry never matches)
            globs.append(str(entry["url"]))
    return tuple(globs)


S3_ENTRY_KEYS = frozenset({  # the SDK's S3BucketConfig
    "bucket", "subdir", "host", "key", "secret", "token", "multipart", "acl", "secure", "region", "verify",
    "use_credentials_chain", "extra_args", "profile",
})


def _s3_entry(raw: Mapping[str, Any], where: str) -> S3Credentials:
    _refuse_unknown(raw, S3_ENTRY_KEYS, where)

    def text(name: str) -> str:
        return _text(raw.get(name), f"{where}.{name}").strip()

    entry = S3Credentials(
        bucket=text("bucket").strip("\"'").strip("/"),
        host=text("host").lower(),
        key=text("key"),
        secret=text("secret"),
        token=text("token"),
        region=text("region"),
        profile=text("profile"),
        multipart=_flag(raw.get("multipart"), f"{where}.multipart", True),
        secure=_flag(raw.get("secure"), f"{where}.secure", True),
        verify=_verify(raw.get("verify"), f"{where}.verify"),
        use_credentials_chain=_flag(raw.get("use_credentials_chain"), f"{where}.use_credentials_chain", False),
        extra_args=_extra_args(raw.get("extra_args"), f"{where}.extra_args"),
        origin=where,
    )
    if not (entry.bucket or entry.host):
        raise ConfigError(f"{where} names neither a bucket nor a host")
    if not (entry.has_keys or entry.use_credentials_chain):
        log.warning("%s (%s) has no key/secret; requests to it will fail", where, entry.prefix)
    return entry


def _s3_settings(conf: _Conf) -> tuple[S3Settings, dict[str, str]]:
    """`sdk.aws` as the SDK reads it: the top-level keys (each falling back to its AWS variable when empty) serve
    only URLs no entry matches, and entries inherit nothing from them."""
    s3 = conf.get("sdk.aws.s3", {})
    if not isinstance(s3, Mapping):
        raise ConfigError(f"{conf.where('sdk.aws.s3')} must be a section, not {_kind(s3)}")
    variables = {"key": "AWS_ACCESS_KEY_ID", "secret": "AWS_SECRET_ACCESS_KEY", "token": "AWS_SESSION_TOKEN",
                 "region": "AWS_DEFAULT_REGION", "profile": "AWS_PROFILE"}
    values: dict[str, str] = {}
    origins: dict[str, str] = {}
    for name, variable in variables.items():
        dotted = f"sdk.aws.s3.{name}"
        given = _text(s3.get(name), conf.where(dotted)).strip()
        values[name] = given or os.environ.get(variable, "").strip()
        origins[f"s3.{name}"] = conf.where(dotted) if given else conf.origin("", variable)
    for ignored in ("multipart", "verify"):
        if ignored in s3:
            log.warning("%s is ignored, as by the ClearML SDK: set it in a credentials entry",
                        conf.where(f"sdk.aws.s3.{ignored}"))
    default = S3Credentials(
        key=values["key"], secret=values["secret"], token=values["token"], region=values["region"],
        profile=values["profile"],
        secure=_flag(s3.get("secure"), conf.where("sdk.aws.s3.secure"), True),
        use_credentials_chain=_flag(
            s3.get("use_credentials_chain"), conf.where("sdk.aws.s3.use_credentials_chain"), False
        ),
        extra_args=_extra_args(s3.get("extra_args"), conf.where("sdk.aws.s3.extra_args")),
        origin=conf.where("sdk.aws.s3"),
    )
    where = conf.where("sdk.aws.s3.credentials")
    raw = _entries(s3.get("credentials"), where, "bucket/host, key, secret")
    entries = tuple(_s3_entry(entry, f"{where}[{i}]") for i, entry in enumerate(raw))

    def count(name: str, default: int) -> int:
        dotted = f"sdk.aws.boto3.{name}"
        return _whole(conf.get(dotted, default), conf.where(dotted))

    settings = S3Settings(
        default=default,
        credentials=entries,
        pool_connections=count("pool_connections", 512),
        max_multipart_concurrency=max(1, count("max_multipart_concurrency", 16)),
        multipart_threshold=count("multipart_threshold", 8 * 1024 * 1024),
        multipart_chunksize=count("multipart_chunksize", 8 * 1024 * 1024),
    )
    return settings, origins


AZURE_ENTRY_KEYS = frozenset({"account_name", "account_key", "container_name", "use_default_credential"})
OWN_AZURE_KEYS = frozenset({"account_name", "container_name", "endpoint", "connection_string"})


def _azure_containers(conf: _Conf) -> tuple[tuple[AzureContainer, ...], tuple[AzureContainer, ...]]:
    """The SDK's container entries (then its environment fallback), and clearmlfs's additions to them."""
    where = conf.where("sdk.azure.storage.containers")
    containers = []
    for i, raw in enumerate(_entries(conf.get("sdk.azure.storage.containers"), where, "account_name, account_key")):
        at = f"{where}[{i}]"
        fix = (f"move it to a `{OWN_SECTION}.azure: [ {{ account_name, endpoint, connection_string }} ]` entry, "
               "which the SDK never reads")
        _refuse_unknown(raw, AZURE_ENTRY_KEYS, at, fix if set(raw) & {"endpoint", "connection_string"} else "")
        name = _text(raw.get("account_name"), f"{at}.account_name").strip()
        if not name:
            raise ConfigError(f"{at} needs an account_name")
        containers.append(AzureContainer(
            account_name=name,
            account_key=_text(raw.get("account_key"), f"{at}.account_key").strip(),
            container_name=_text(raw.get("container_name"), f"{at}.container_name").strip(),
            use_default_credential=_flag(raw.get("use_default_credential"), f"{at}.use_default_credential", False),
            origin=at,
        ))
    account, key = os.environ.get("AZURE_STORAGE_ACCOUNT"), os.environ.get("AZURE_STORAGE_KEY")
    default_credential = os.environ.get("CLEARML_AZURE_STORAGE_USE_DEFAULT_CREDENTIAL", "").strip().lower()
    chain = default_credential in STRTOBOOL_TRUE
    if account and (key or chain):  # the SDK's environment fallback, after the configured entries
        containers.append(AzureContainer(account_name=account, account_key=key or "", use_default_credential=chain,
                                         origin="environment AZURE_STORAGE_ACCOUNT/AZURE_STORAGE_KEY"))
    own_where = conf.where(f"{OWN_SECTION}.azure")
    own = []
    for i, raw in enumerate(_entries(conf.get(f"{OWN_SECTION}.azure"), own_where, "account_name, endpoint")):
        at = f"{own_where}[{i}]"
        unknown = sorted(set(raw) - OWN_AZURE_KEYS)
        if unknown:
            raise ConfigError(f"{at}: unknown key {', '.join(unknown)} (known: {', '.join(sorted(OWN_AZURE_KEYS))})")
        name = _text(raw.get("account_name"), f"{at}.account_name").strip()
        if not name:
            raise ConfigError(f"{at} needs an account_name")
        own.append(AzureContainer(
            account_name=name,
            container_name=_text(raw.get("container_name"), f"{at}.container_name").strip(),
            endpoint=_text(raw.get("endpoint"), f"{at}.endpoint").strip(),
            connection_string=_text(raw.get("connection_string"), f"{at}.connection_string").strip(),
            origin=at,
        ))
    return tuple(containers), tuple(own)


GCS_ENTRY_KEYS = frozenset({"bucket", "subdir", "project", "credentials_json", "pool_connections", "pool_maxsize"})


def _gcs_settings(conf: _Conf) -> tuple[GCSBucket, tuple[GCSBucket, ...]]:
    """`sdk.google.storage`: its defaults, and its bucket entries."""
    top = "sdk.google.storage"
    section = conf.get(top, {})
    if not isinstance(section, Mapping):
        raise ConfigError(f"{conf.where(top)} must be a section, not {_kind(section)}")
    for name in ("pool_connections", "pool_maxsize"):
        if section.get(name) is not None:
            _whole(section[name], conf.where(f"{top}.{name}"))
    default = GCSBucket(
        project=_text(section.get("project"), conf.where(f"{top}.project")).strip(),
        credentials_json=_text(section.get("credentials_json"), conf.where(f"{top}.credentials_json")).strip(),
        origin=conf.where(f"{top}.credentials_json"),
    )
    where = conf.where(f"{top}.credentials")
    entries = []
    for i, raw in enumerate(_entries(section.get("credentials"), where, "bucket, credentials_json")):
        at = f"{where}[{i}]"
        _refuse_unknown(raw, GCS_ENTRY_KEYS, at)
        bucket = _text(raw.get("bucket"), f"{at}.bucket").strip().strip("/")
        if not bucket:
            raise ConfigError(f"{at} needs a bucket")
        for name in ("pool_connections", "pool_maxsize"):
            if raw.get(name) is not None:
                _whole(raw[name], f"{at}.{name}")
        entries.append(GCSBucket(
            bucket=bucket,
            subdir=_text(raw.get("subdir"), f"{at}.subdir").strip().strip("/"),
            project=_text(raw.get("project"), f"{at}.project").strip(),
            credentials_json=_text(raw.get("credentials_json"), f"{at}.credentials_json").strip(),
            origin=at,
        ))
    return default, tuple(entries)


def _env(*names: str) -> str:
    return next((os.environ[n] for n in names if os.environ.get(n)), "")


def _api_settings(api: Mapping[str, Any], sdk: Mapping[str, Any]) -> ApiSettings:
    """The `api` section, each key overridden by its environment variable as the SDK does."""
    creds = _get(api, "credentials", {})
    plots = str(_get(sdk, "metrics.plot_upload_destination", "")).strip()
    legacy = tuple(map(str, _get(sdk, "storage.http.legacy_fileservers", [])))
    return ApiSettings(
        api_server=_env("CLEARML_API_HOST", "TRAINS_API_HOST") or str(api.get("api_server") or api.get("host") or ""),
        web_server=_env("CLEARML_WEB_HOST", "TRAINS_WEB_HOST") or str(api.get("web_server") or ""),
        files_server=_env("CLEARML_FILES_HOST", "TRAINS_FILES_HOST") or str(api.get("files_server") or ""),
        access_key=_env("CLEARML_API_ACCESS_KEY", "TRAINS_API_ACCESS_KEY") or str(creds.get("access_key") or ""),
        secret_key=_env("CLEARML_API_SECRET_KEY", "TRAINS_API_SECRET_KEY") or str(creds.get("secret_key") or ""),
        extra_file_servers=legacy + ((plots,) if plots else ()),
        verify=_verify_certificate(api, "api.verify_certificate"),
        storage_verify=_verify_certificate(_get(sdk, "api", {}), "sdk.api.verify_certificate"),
        auth_token=_env("CLEARML_AUTH_TOKEN"),
    )


def _verify_certificate(section: Mapping[str, Any], name: str) -> bool | str:
    """`section`'s verify_certificate, overridden by CLEARML_API_HOST_VERIFY_CERT, read as the SDK's HTTP sessions
    read it: a boolean, a word for one (strtobool's), else the path of a CA bundle."""
    raw = _env("CLEARML_API_HOST_VERIFY_CERT", "TRAINS_API_HOST_VERIFY_CERT")
    raw = raw or _get(section, "verify_certificate", True)
    if not isinstance(raw, str):
        return bool(raw)
    word = raw.strip().lower()
    if word in STRTOBOOL_TRUE + STRTOBOOL_FALSE:
        return word in STRTOBOOL_TRUE
    path = os.path.expanduser(raw.strip())
    if not os.path.isfile(path):
        raise ConfigError(f"{name} (or CLEARML_API_HOST_VERIFY_CERT) must be true, false or the path of a CA bundle "
                          "file, which is not there")
    return path


def _size_cache(sdk: Mapping[str, Any]) -> SizeCache | None:
    """The SDK's size-aware cache settings when its mode is on (read as the SDK reads them), else None."""
    from . import sdk_size_cache as sdk_rules

    where = f"sdk.{sdk_rules.SECTION}"
    try:
        if not sdk_rules.mode_on(sdk):
            return None
        if sdk_rules.secondary_dir(sdk):
            raise ConfigError(
                f"{where}.secondary: clearmlfs does not share the SDK's secondary cache; remove it (and "
                "CLEARML_SECONDARY_CACHE_DIR), or turn the size-aware cache off"
            )
        return SizeCache(
            max_used_bytes=sdk_rules.parse_sdk_size(sdk_rules.setting(sdk, "size", "max_used_bytes", default=-1)),
            min_free_bytes=sdk_rules.parse_sdk_size(
                sdk_rules.setting(sdk, "size", "min_free_bytes", default=sdk_rules.DEFAULT_MIN_FREE)
            ),
            cleanup_margin=sdk_rules.parse_sdk_percentage(
                sdk_rules.setting(sdk, "size", "cleanup_margin_percent", default=sdk_rules.DEFAULT_MARGIN)
            ),
            cleanup_seconds_threshold=float(
                _get(sdk, "storage.cache.cleanup_seconds_threshold", sdk_rules.DEFAULT_CLEANUP_SECONDS)
            ),
            zero_file_size_check=_bool(
                sdk_rules.setting(sdk, "zero_file_size_check", default=False), f"{where}.zero_file_size_check"
            ),
        )
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
