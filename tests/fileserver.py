"""A ClearML server's fileserver, and the api server's `auth.login`, on 127.0.0.1 for the tests.

The fileserver's routes are clearml-server's `fileserver/fileserver.py` (Flask; github.com/allegroai/clearml-server)
as they are: upload is a POST to ``/`` of a multipart form whose field names are the paths to store; a GET
(HEAD, ranges, ETag and conditional requests: werkzeug's `send_from_directory`) or DELETE of ``/<path>`` reads or
deletes one file; every request must carry ``Authorization: Bearer <token>`` (401 otherwise). Its two wrappers
are here too: flask-compress with its defaults (text-like files are sent compressed, as a stream without
Content-Length, to a client that accepts deflate; their ETag gets ``:deflate``) and flask-cors's headers. What
differs: the real fileserver asks the api server to validate a token (`auth.validate_token`, cached in Redis);
this one checks the token's signature and expiry itself, having issued it.

The api server's `auth.login` (GET or POST ``/auth.login``, HTTP basic auth with an access key and secret, or a
valid token as ``Authorization: Bearer``, which gets a new one) answers
``{"meta": {...}, "data": {"token": "<JWT>"}}`` as the real one does; the JWT carries ``exp`` (the SDK reads it to
renew the token a minute early). Two endpoints of the stand-in's own, under ``/_test/``, let a test
count logins and revoke every token issued so far (a server restart with a new secret, or permissions changed).

Run as ``python -m tests.fileserver --root DIR --files-port N --api-port M --key K [--tls DIR]`` (https, with
DIR's cert.pem and key.pem); `start` does that and waits until both answer.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask, Response, abort, request, send_from_directory
from werkzeug.exceptions import NotFound
from werkzeug.security import safe_join
from werkzeug.serving import WSGIRequestHandler, make_server

from tests import servers

# flask-compress's defaults (COMPRESS_MIMETYPES, COMPRESS_MIN_SIZE, COMPRESS_ALGORITHM_STREAMING) as far as the
# standard library can compress: of the streaming algorithms (zstd, br, deflate), deflate.
COMPRESS_MIMETYPES = frozenset({
    "text/html", "text/css", "text/plain", "text/xml", "text/x-component", "text/javascript",
    "application/x-javascript", "application/javascript", "application/json", "application/manifest+json",
    "application/vnd.api+json", "application/xml", "application/xhtml+xml", "application/rss+xml",
    "application/atom+xml", "image/svg+xml", "image/x-icon",
})
COMPRESS_MIN_SIZE = 500


class Tokens:
    """The JWTs the api server issues (HS256) and the fileserver accepts."""

    def __init__(self, lifetime: int) -> None:
        self.lifetime = lifetime  # seconds; the real server's default is 30 days
        self.secret = secrets.token_bytes(32)
        self.logins = 0
        self.lock = threading.Lock()

    def issue(self, user: str, expiration_sec: int | None = None) -> str:
        now = int(time.time())
        payload = {
            "identity": {"user": user, "company": "d1bd92a3b039400cbafc60a7a5b1e52b", "role": "user"},
            "env": "test", "iat": now, "exp": now + (expiration_sec or self.lifetime),
            "session_id": uuid.uuid4().hex, "api_version": "2.31", "server_version": "2.0.0",
            "feature_set": "basic",
        }
        head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        body = _b64(json.dumps(payload).encode())
        with self.lock:
            self.logins += 1
            return f"{head}.{body}.{self._sign(head, body)}"

    def valid(self, token: str) -> bool:
        try:
            head, body, signature = token.split(".")
            exp = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))["exp"]
        except (ValueError, KeyError, TypeError):
            return False
        return hmac.compare_digest(signature, self._sign(head, body)) and exp > time.time()

    @staticmethod
    def user(token: str) -> str:
        """Whose a (valid) token is."""
        body = token.split(".")[1]
        return str(json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))["identity"]["user"])

    def revoke_all(self) -> None:
        with self.lock:
            self.secret = secrets.token_bytes(32)

    def _sign(self, head: str, body: str) -> str:
        return _b64(hmac.new(self.secret, f"{head}.{body}".encode(), hashlib.sha256).digest())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _result(status: int, msg: str, data: dict[str, Any], endpoint: str) -> Response:
    """The api server's envelope: `meta` (result code and message), `data`."""
    meta = {
        "id": uuid.uuid4().hex, "trx": uuid.uuid4().hex,
        "endpoint": {"name": endpoint, "requested_version": "2.31", "actual_version": "1.0"},
        "result_code": status, "result_subcode": 0 if status == 200 else 20, "result_msg": msg,
        "error_stack": "", "error_data": {},
    }
    return Response(json.dumps({"meta": meta, "data": data}), status, mimetype="application/json")


def api_app(tokens: Tokens, users: dict[str, str]) -> Flask:
    app = Flask("clearml-api-standin")

    @app.route("/auth.login", methods=["GET", "POST"])
    @app.route("/v<version>/auth.login", methods=["GET", "POST"])
    def login(version: str = "") -> Response:
        auth = request.authorization
        if auth is not None and auth.type == "bearer":  # a valid token gets a new one (CLEARML_AUTH_TOKEN)
            if not tokens.valid(auth.token or ""):
                return _result(401, "Unauthorized (invalid token)", {}, "auth.login")
            user = tokens.user(auth.token or "")
        elif auth is None or auth.type != "basic":
            return _result(401, "Unauthorized (missing credentials)", {}, "auth.login")
        elif not hmac.compare_digest(users.get(auth.username or "", "\0"), auth.password or ""):
            return _result(
                401, "Unauthorized (invalid credentials) (failed to locate provided credentials)", {}, "auth.login"
            )
        else:
            user = auth.username or ""
        raw = request.args.get("expiration_sec") or (request.get_json(silent=True) or {}).get("expiration_sec")
        return _result(200, "OK", {"token": tokens.issue(user, int(raw) if raw else None)}, "auth.login")

    @app.route("/_test/logins", methods=["GET"])
    def logins() -> Response:
        return Response(json.dumps({"logins": tokens.logins}), 200, mimetype="application/json")

    @app.route("/_test/revoke", methods=["POST"])
    def revoke() -> Response:
        tokens.revoke_all()
        return Response("revoked", 200)

    return app


def files_app(upload_folder: Path, tokens: Tokens) -> Flask:
    """clearml-server's fileserver.py routes, with auth enabled (the server's default)."""
    app = Flask("clearml-fileserver-standin")
    app.config["UPLOAD_FOLDER"] = str(upload_folder)
    app.config["SEND_FILE_MAX_AGE_DEFAULT"] = 5 * 60

    def validate() -> None:  # AuthHandler.validate
        header = request.headers.get("Authorization")
        if not header:
            abort(401)
        if not header.startswith("Bearer "):
            abort(Response("Only bearer token authorization is supported", status=401))
        if not tokens.valid(header.partition(" ")[2]):
            abort(Response("Invalid token", 401))

    @app.route("/", methods=["GET"])
    def ping() -> tuple[str, int]:
        if request.headers.get("Authorization"):
            validate()
        return "OK", 200

    @app.before_request
    def before_request() -> tuple[str, int] | None:
        if request.content_encoding:
            return f"Content encoding is not supported ({request.content_encoding})", 415
        return None

    @app.after_request
    def after_request(response: Response) -> Response:
        response.headers["server"] = "clearml"
        response.headers["Access-Control-Allow-Origin"] = "*"  # flask-cors, origins "*"
        return _compress(response)

    @app.route("/", methods=["POST"])
    def upload() -> tuple[str, int]:
        validate()
        results = []
        for filename, file in request.files.items():
            if not filename:
                continue
            file_path = filename.lstrip(os.sep)
            safe_path = safe_join(app.config["UPLOAD_FOLDER"], file_path)
            if safe_path is None:
                raise NotFound()
            target = Path(safe_path)
            target.parent.mkdir(parents=True, exist_ok=True)
            file.save(str(target))
            results.append(file_path)
        return json.dumps(results), 200

    @app.route("/<path:path>", methods=["GET"])
    def download(path: str) -> Response:
        validate()
        return send_from_directory(app.config["UPLOAD_FOLDER"], path, as_attachment="download" in request.args)

    @app.route("/<path:path>", methods=["DELETE"])
    def delete(path: str) -> tuple[str, int]:
        validate()
        joined = safe_join(app.config["UPLOAD_FOLDER"], path)
        full_path = Path(joined) if joined else None
        if not (full_path and full_path.exists() and full_path.is_file()):
            abort(Response(f"File {path} not found", 404))
        full_path.unlink()
        return json.dumps(path), 200

    return app


def _compress(response: Response) -> Response:
    """flask-compress's `after_request` for a file response (a stream): compressed with the first streaming
    algorithm the client accepts (deflate, here), without Content-Length, its strong ETag marked."""
    vary = response.headers.get("Vary")
    response.headers["Vary"] = f"{vary}, Accept-Encoding" if vary else "Accept-Encoding"
    accepted = {
        part.split(";")[0].strip().lower() for part in request.headers.get("Accept-Encoding", "").split(",")
        if not part.replace(" ", "").endswith(";q=0")
    }
    if (
        not response.is_streamed or "deflate" not in accepted or response.mimetype not in COMPRESS_MIMETYPES
        or not 200 <= response.status_code < 300 or "Content-Encoding" in response.headers
        or (response.content_length is not None and response.content_length < COMPRESS_MIN_SIZE)
    ):
        return response
    response.direct_passthrough = False
    response.headers["Content-Encoding"] = "deflate"
    response.response = _deflated(response.iter_encoded())
    response.headers.pop("Content-Length", None)
    etag, weak = response.get_etag()
    if etag and not weak:
        response.set_etag(f"{etag}:deflate")
    return response


def _deflated(chunks: Iterator[bytes]) -> Iterator[bytes]:
    compressor = zlib.compressobj(6)
    for chunk in chunks:
        if out := compressor.compress(chunk):
            yield out
    yield compressor.flush()


@dataclass(frozen=True)
class FileServer:
    files_server: str  # "http://127.0.0.1:PORT": api.files_server
    api_server: str  # "http://127.0.0.1:PORT": api.api_server
    host: str  # "127.0.0.1:PORT" of the fileserver
    root: Path  # where it stores the files
    key: str
    secret: str

    def api_conf(self, key: str | None = None, secret: str | None = None) -> dict[str, Any]:
        """clearml.conf's `api` section for this server (these credentials unless given)."""
        return {
            "api_server": self.api_server, "files_server": self.files_server,
            "credentials": {"access_key": key or self.key, "secret_key": secret or self.secret},
        }

    def logins(self) -> int:
        return int(self._call("GET", "/_test/logins")["logins"])

    def revoke_tokens(self) -> None:
        self._call("POST", "/_test/revoke")

    def token(self) -> str:
        """A token of the test's own, for looking at the fileserver directly."""
        import requests

        answer = requests.get(f"{self.api_server}/auth.login", auth=(self.key, self.secret), timeout=10)
        answer.raise_for_status()
        return str(answer.json()["data"]["token"])

    def _call(self, method: str, path: str) -> Any:
        import requests

        answer = requests.request(method, self.api_server + path, timeout=10)
        answer.raise_for_status()
        return answer.json() if answer.headers.get("Content-Type", "").startswith("application/json") else None


ACCESS_KEY, SECRET_KEY = "TESTACCESSKEY0000001", "test-secret-key-never-shown"


def start(root: Path, token_seconds: int | None = None, tls: Path | None = None) -> servers.Running[FileServer]:
    """The stand-in in a subprocess, on free ports, once both servers answer; its tokens last `token_seconds`.
    With `tls` (a folder), both serve https with a self-signed certificate made there (`tls / "cert.pem"`)."""
    files_port, api_port = servers.free_ports(2)
    scheme = "https" if tls else "http"
    cmd = [
        str(servers.VENV_BIN / "python"), "-m", "tests.fileserver", "--root", str(root),
        "--files-port", str(files_port), "--api-port", str(api_port), "--key", ACCESS_KEY,
        *(["--token-seconds", str(token_seconds)] if token_seconds else []),
        *(["--tls", str(tls)] if tls else []),
    ]
    if tls:
        servers.self_signed(tls)
    with servers.started("fileserver", cmd, servers.REPO) as (process, log_path):
        servers.wait_until("fileserver", process, log_path,
                           lambda: servers.http_answers("127.0.0.1", files_port, tls=bool(tls)))
        servers.wait_until("fileserver", process, log_path,
                           lambda: servers.http_answers("127.0.0.1", api_port, "/_test/logins", tls=bool(tls)))
    info = FileServer(
        f"{scheme}://127.0.0.1:{files_port}", f"{scheme}://127.0.0.1:{api_port}", f"127.0.0.1:{files_port}", root,
        ACCESS_KEY, SECRET_KEY,
    )
    return servers.Running("fileserver", process, log_path, info)


class _KeepAlive(WSGIRequestHandler):
    protocol_version = "HTTP/1.1"  # connections kept open between requests, as behind the real server's gunicorn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--files-port", type=int, required=True)
    parser.add_argument("--api-port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--token-seconds", type=int, default=30 * 24 * 3600)
    parser.add_argument("--tls", type=Path, help="a folder with cert.pem and key.pem: serve https")
    args = parser.parse_args()
    # The secret is not on the command line (other users see that): the fixture and this module share it.
    tokens = Tokens(args.token_seconds)
    args.root.mkdir(parents=True, exist_ok=True)
    tls = (str(args.tls / "cert.pem"), str(args.tls / "key.pem")) if args.tls else None
    api = make_server("127.0.0.1", args.api_port, api_app(tokens, {args.key: SECRET_KEY}), threaded=True,
                      request_handler=_KeepAlive, ssl_context=tls)
    files = make_server("127.0.0.1", args.files_port, files_app(args.root, tokens), threaded=True,
                        request_handler=_KeepAlive, ssl_context=tls)
    threading.Thread(target=api.serve_forever, daemon=True).start()
    files.serve_forever()


if __name__ == "__main__":
    main()
