"""Logging set-up, shared by the CLI and the helper processes (which must not import the CLI)."""

from __future__ import annotations

import logging
import os
from pathlib import Path


def private_log(path: str | Path) -> Path:
    """Create (or tighten) a log file readable by its owner only: logs name buckets and objects."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    os.chmod(path, 0o600)
    return Path(path)


def setup_logging(level: str, log_file: str | None) -> None:
    handler: logging.Handler = logging.FileHandler(private_log(log_file)) if log_file else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # The SDKs log request headers (signatures, key ids, SAS tokens) at debug level: never let them through.
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "azure", "google", "pyfuse3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
