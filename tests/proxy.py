"""A counting, fault-injecting HTTP reverse proxy for tests (stdlib only).

Put it between a client and one upstream server to count what the client really sends (how many GETs, how
many bytes were downloaded) and to inject failures (503s, connection resets, truncated bodies, stalls).

    with Proxy(upstream=seaweedfs.endpoint) as proxy:
        client = seaweedfs.client(endpoint=proxy.url)
        ...
        assert proxy.count("PUT") == 1

The Host header is forwarded exactly as the client sent it: S3 SigV4 signs it, and the client signed the
proxy's host:port, so rewriting it would break every signature.

A stalled request is read whole and never answered, like a server that hangs: it is held until
``stall_seconds`` pass, or ``resume()``, ``reset()`` or ``stop()`` comes, then its connection is reset.

    proxy.stall()   # every request from now on hangs
    ...
    proxy.resume()  # held requests are reset at once; new ones are forwarded again
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

# Meaningful for one connection only (RFC 9110 7.6.1); Expect is answered by the proxy itself.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
}
FAULT_KINDS = ("503", "reset", "truncate")  # what fail_rate() injects by default
KNOWN_FAULT_KINDS = (*FAULT_KINDS, "stall")  # a stall costs a client its read timeout: only on request
STALL_SECONDS = 30.0
COPY_CHUNK = 256 * 1024
UPSTREAM_TIMEOUT = 120.0


class IncompleteBody(Exception):
    """The client hung up before sending the whole request body it announced."""

    def __init__(self, received: int) -> None:
        super().__init__(f"client closed the connection after {received} bytes of the request body")
        self.received = received


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str  # percent-decoded, without the query
    query: str
    status: int  # 0 when no response was sent: the connection was reset, or the client hung up mid-body
    request_bytes: int  # request body bytes received from the client
    response_bytes: int  # response body bytes sent to the client
    fault: str | None = None  # injected: "reset", "truncate", "stall", or the status as a string ("503")
    agent: str = ""  # the request's User-Agent


class _Draw(NamedTuple):
    """What to do with one request."""

    fault: str | None
    status: int = 0
    stall_generation: int = 0  # for a stall: the resume() it waits for, drawn atomically with the fault


class Proxy:
    def __init__(self, upstream: str, seed: int = 0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream must look like http://HOST:PORT, not {upstream!r}")
        self.upstream_host: str = parts.hostname
        self.upstream_port: int = parts.port
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._rng = random.Random(seed)
        self._fail_next = 0
        self._fail_status = 503
        self._fail_rate = 0.0
        self._fail_kinds: tuple[str, ...] = FAULT_KINDS
        self.stall_seconds: float = STALL_SECONDS  # how long a stalled request is held at most
        # A remote object store's manners, for benchmarks: every answer starts this late, and each response
        # body flows at most this fast (bytes/s, 0: unlimited), so that concurrency decides, not local CPU.
        self.first_byte_delay: float = 0.0
        self.rate: float = 0.0
        # Held requests wait on this, under the same lock as the fault draws: a request that draws a stall
        # before resume() is released by it, one drawn after it is not stalled (unless by fail_rate).
        self._released = threading.Condition(self._lock)
        self._stall_all = False
        self._stall_generation = 0  # bumped by resume(): everything held before it is released
        self._stopped = False
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> Proxy:
        with self._lock:
            self._stopped = False
        server = _Server(("127.0.0.1", 0), _make_handler(self))
        server.daemon_threads = True  # idle keep-alive connections must not block stop()
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name=f"proxy:{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        # Held requests first: they must never outlive the proxy (shutdown() does not wait for handlers).
        with self._released:
            self._stopped = True
            self._released.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("proxy not started")
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # -- counting --------------------------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of the requests seen so far, in completion order (a stalled one: when its hold began)."""
        with self._lock:
            return list(self._records)

    def reset(self) -> None:
        """Forget the counted requests and any pending faults; ends a stall."""
        with self._lock:
            self._records.clear()
            self._fail_next = 0
            self._fail_rate = 0.0
        self.resume()

    def count(self, method: str | None = None, path_contains: str | None = None) -> int:
        return len(self._matching(method, path_contains))

    def bytes_sent(self, path_contains: str | None = None) -> int:
        """Response body bytes delivered to the client."""
        return sum(r.response_bytes for r in self._matching(None, path_contains))

    def _matching(self, method: str | None, path_contains: str | None) -> list[RequestRecord]:
        return [
            r
            for r in self.requests
            if (method is None or r.method == method.upper())
            and (path_contains is None or path_contains in r.path)
        ]

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    # -- faults ----------------------------------------------------------------------------------------

    def fail_next(self, n: int, status: int = 503) -> None:
        """Answer the next ``n`` requests with ``status`` without forwarding them."""
        with self._lock:
            self._fail_next = n
            self._fail_status = status

    def fail_rate(self, rate: float, kinds: Iterable[str] = FAULT_KINDS, seed: int | None = None) -> None:
        """Inject a fault of a random kind into a ``rate`` fraction of requests (seeded, so runs repeat)."""
        kinds = tuple(kinds)
        unknown = set(kinds) - set(KNOWN_FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; known: {KNOWN_FAULT_KINDS}")
        with self._lock:
            self._fail_rate = rate
            self._fail_kinds = kinds
            if seed is not None:
                self._rng.seed(seed)

    def stall(self) -> None:
        """Hold every request from now on (new connections and kept-alive ones) unanswered, until resume()."""
        with self._lock:
            self._stall_all = True

    def resume(self) -> None:
        """End a stall: every held request has its connection reset at once, so its client retries now."""
        with self._released:
            self._stall_all = False
            self._stall_generation += 1
            self._released.notify_all()

    def _hold(self, generation: int) -> None:
        """Block a stalled request's handler until stall_seconds pass or resume()/stop() releases it."""
        deadline = time.monotonic() + self.stall_seconds
        with self._released:
            while self._stall_generation == generation and not self._stopped:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._released.wait(remaining)

    def _next_fault(self) -> _Draw:
        """What to do with the next request; under the lock so draws happen in a repeatable order."""
        with self._lock:
            if self._stall_all:
                return _Draw("stall", 0, self._stall_generation)
            if self._fail_next > 0:
                self._fail_next -= 1
                return _Draw("status", self._fail_status)
            if self._fail_rate > 0 and self._rng.random() < self._fail_rate:
                return _Draw(self._rng.choice(self._fail_kinds), 503, self._stall_generation)
            return _Draw(None)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: tuple[str, int]) -> None:
        # A handler that dies must say why (the default prints to a stderr nobody reads in a daemon thread).
        log.exception("test proxy: handler for %s failed", client_address)


def _make_handler(proxy: Proxy) -> type[BaseHTTPRequestHandler]:
    class Handler(_ProxyHandler):
        owner = proxy

    return Handler


class _ProxyHandler(BaseHTTPRequestHandler):
    owner: Proxy
    protocol_version = "HTTP/1.1"  # keep-alive and "Expect: 100-continue" need 1.1
    timeout = 120  # an idle client connection is dropped after this many seconds

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature from the base class
        pass  # the records are the log of requests...

    def log_error(self, format: str, *args: object) -> None:  # noqa: A002 - signature from the base class
        log.warning("test proxy: " + format, *args)  # ...but a timed-out or malformed request must be seen

    def _proxy(self) -> None:
        parts = urlsplit(self.path)
        try:
            body = self._read_body()
        except IncompleteBody as exc:
            # Like any real server: a request whose body was cut short is dropped, never forwarded as if whole.
            agent = self.headers["User-Agent"] or ""
            self.owner._record(RequestRecord(self.command, unquote(parts.path), parts.query, 0, exc.received, 0,
                                             agent=agent))
            self.close_connection = True
            return
        fault, status, stall_generation = self.owner._next_fault()

        # Called before the last byte reaches the client, so a test that got its response sees the record.
        def done(status: int, sent: int, fault: str | None = fault) -> None:
            self.owner._record(
                RequestRecord(
                    self.command, unquote(parts.path), parts.query, status, len(body), sent, fault,
                    self.headers["User-Agent"] or "",
                )
            )

        try:
            if fault in ("status", "503"):
                self._send_error_status(status, lambda sent: done(status, sent, str(status)))
            elif fault == "reset":
                done(0, 0)
                self._reset_connection()
            elif fault == "stall":
                done(0, 0)  # recorded when the hold begins: a test can see that a request is being held
                self.owner._hold(stall_generation)
                self._reset_connection()
            else:
                self._forward(body, fault == "truncate", done)
        except OSError:
            self.close_connection = True  # the client went away; nothing left to tell it

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = _proxy

    # -- request side ----------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        """The whole request body, de-chunked; forwarded with a Content-Length (simplest for any upstream)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            raise IncompleteBody(len(body))
        return body

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            line = self.rfile.readline()
            if not line.endswith(b"\n"):
                raise IncompleteBody(sum(map(len, chunks)))
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                break
            chunk = self.rfile.read(size)
            chunks.append(chunk)
            if len(chunk) < size or not self.rfile.readline().endswith(b"\n"):  # CRLF after each chunk
                raise IncompleteBody(sum(map(len, chunks)))
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailers, dropped
        return b"".join(chunks)

    def _forward(self, body: bytes, truncate: bool, done: Callable[[int, int], None]) -> None:
        conn = http.client.HTTPConnection(
            self.owner.upstream_host, self.owner.upstream_port, timeout=UPSTREAM_TIMEOUT
        )
        try:
            try:
                response = self._send_upstream(conn, body)
            except (OSError, http.client.HTTPException):
                # Upstream unreachable: answer the way a load balancer would.
                self._send_error_status(502, lambda sent: done(502, sent))
                return
            if self.owner.first_byte_delay:
                time.sleep(self.owner.first_byte_delay)
            if truncate:
                self._send_truncated(response, done)
            else:
                self._relay(response, done)
        finally:
            conn.close()

    def _send_upstream(self, conn: http.client.HTTPConnection, body: bytes) -> http.client.HTTPResponse:
        conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():  # Host included, unchanged
            if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                conn.putheader(name, value)
        if body or self.command in ("PUT", "POST", "PATCH"):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body or None)
        return conn.getresponse()

    # -- response side ---------------------------------------------------------------------------------

    def _send_headers_of(self, response: http.client.HTTPResponse, chunked: bool) -> None:
        """Status and headers into the send buffer; the caller flushes them with end_headers()."""
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")

    def _relay(self, response: http.client.HTTPResponse, done: Callable[[int, int], None]) -> None:
        no_body = self.command == "HEAD" or response.status in (204, 304)
        chunked = response.getheader("Content-Length") is None and not no_body
        self._send_headers_of(response, chunked)
        if no_body or response.getheader("Content-Length") == "0":  # recorded before the whole response goes out
            done(response.status, 0)
            self.end_headers()
            return
        self.end_headers()
        sent, started, rate = 0, time.monotonic(), self.owner.rate
        # One chunk of look-ahead: the record is written before the final chunk goes out.
        pending = response.read(COPY_CHUNK)
        while pending:
            following = response.read(COPY_CHUNK)
            if not following and not chunked:
                done(response.status, sent + len(pending))
            self.wfile.write(b"%x\r\n%s\r\n" % (len(pending), pending) if chunked else pending)
            sent += len(pending)
            if rate:
                time.sleep(max(0.0, sent / rate - (time.monotonic() - started)))
            pending = following
        if chunked or sent == 0:
            done(response.status, sent)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _send_truncated(self, response: http.client.HTTPResponse, done: Callable[[int, int], None]) -> None:
        """Headers promise the full body; half of it arrives, then the connection is reset."""
        data = b"" if self.command == "HEAD" else response.read()
        half = data[: len(data) // 2]
        self._send_headers_of(response, chunked=False)
        done(response.status, len(half))
        self.end_headers()
        self.wfile.write(half)
        self._reset_connection()

    def _send_error_status(self, status: int, done: Callable[[int], None]) -> None:
        # An S3-style XML error body: boto3, azure and google clients all retry on the status alone.
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
            b"<Message>injected by the test proxy</Message></Error>"
        )
        if self.command == "HEAD":
            body = b""
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)) if body else "0")
        self.send_header("Retry-After", "0")
        done(len(body))
        self.end_headers()
        self.wfile.write(body)

    def _reset_connection(self) -> None:
        """Close with SO_LINGER 0 so the client sees a TCP RST, like a crashed server."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # detach(): closes the fd now, not when the buffered reader and writer let go of the socket.
            socket.close(self.connection.detach())
