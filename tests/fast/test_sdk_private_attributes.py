"""clearmlfs reaches into a few private attributes of the SDKs (for speed, and for a request log). Each use is
checked here twice, without servers: that the attribute is still where it was (so an SDK upgrade that moves it
fails loudly here, not quietly in production), and that the code still works when it is gone."""

from __future__ import annotations

from typing import Any

import boto3
import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from clearmlfs.backends import gcs, s3
from clearmlfs.config import GCSBucket, S3Credentials, S3Settings

CREDS = S3Credentials(host="127.0.0.1:1", key="k", secret="s", secure=False)


def test_botocore_still_has_the_private_attributes_clearmlfs_uses() -> None:
    session = boto3.session.Session(aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1")
    assert session._session.get_component("response_parser_factory").set_parser_defaults
    client = s3.make_client(CREDS, S3Settings())
    assert client._request_signer._credentials is not None
    assert client._endpoint.http_session.send
    assert s3.PlainGet.for_client(client, "bucket") is not None


def test_the_s3_backend_works_without_them(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoPrivates:
        """A boto3 client whose private attributes are gone: everything public is passed through."""

        def __init__(self, client: Any) -> None:
            self._wrapped = client

        def __getattr__(self, name: str) -> Any:
            if name.startswith("_"):
                raise AttributeError(name)
            return getattr(self._wrapped, name)

    s3._parse_timestamps_faster(object())  # a boto3 session without its botocore one: botocore's parser stays
    client = s3.make_client(CREDS, S3Settings())
    assert s3.PlainGet.for_client(NoPrivates(client), "bucket") is None  # GETs go through the client
    backend = s3.S3Backend(CREDS, S3Settings(), "bucket", client=NoPrivates(client))
    assert backend._plain is None


def test_google_cloud_storage_still_has_the_requests_session_clearmlfs_tunes() -> None:
    client = storage.Client(project="p", credentials=AnonymousCredentials())
    assert client._http.mount and isinstance(client._http.hooks["response"], list)


def test_the_gcs_client_works_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:1")

    def gone(self: Any) -> Any:
        raise AttributeError("_http")

    monkeypatch.setattr(storage.Client, "_http", property(gone))
    client = gcs._client(GCSBucket(project="p"), 8)
    assert isinstance(client, storage.Client)
