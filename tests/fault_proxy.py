"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the moto S3 server.

The job talks to it exactly as to a real endpoint (``storage.endpoint_url``; Ray workers too), and
it forwards every request to moto, except that requests matching a rule get a fault instead:

``slowdown``  503 with S3's ``SlowDown`` error body (what S3 answers when throttling)
``reset``     the connection is reset (RST) before any response byte
``short``     the real status and headers (full Content-Length), half the body, then the connection closes
``empty``     the real status and headers but an empty body with ``Content-Length: 0`` (a read that
              "succeeds" with no data)

Rules match on method and a substring of the path; a rule may let its first ``after`` matching
requests through (so a shard's up-front check passes and the later reads fail). Each rule fires a
fixed number of times (or forever): the faults are deterministic, and ``hits`` records what fired.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("slowdown", "reset", "short", "empty")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}
_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


@dataclass
class Rule:
    fault: str
    path_contains: str = ""
    method: str = "GET"
    times: int | None = 1  # None = forever
    after: int = 0  # let this many matching requests through first
    fired: int = 0
    seen: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.fired >= self.times:
            return False
        if method != self.method or self.path_contains not in path:
            return False
        self.seen += 1
        return self.seen > self.after


@dataclass
class FaultProxy:
    upstream: str
    rules: list[Rule] = field(default_factory=list)
    hits: list[tuple[str, str, str]] = field(default_factory=list)  # (fault, method, path)
    requests: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        parts = urlsplit(self.upstream)
        self._upstream = (parts.hostname, parts.port)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:  # resets are on purpose
                pass

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add(self, fault: str, path_contains: str = "", **kwargs) -> Rule:
        if fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}")
        rule = Rule(fault, path_contains, **kwargs)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.hits.clear()

    def fired(self, fault: str | None = None) -> int:
        return sum(1 for f, _, _ in self.hits if fault is None or f == fault)

    # -- one request -------------------------------------------------------------------------------
    def _pick(self, method: str, path: str) -> str | None:
        with self._lock:
            self.requests += 1
            for rule in self.rules:
                if rule.matches(method, path):
                    rule.fired += 1
                    self.hits.append((rule.fault, method, path))
                    return rule.fault
        return None

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        method, path = handler.command, handler.path
        body = self._read_request_body(handler)
        fault = self._pick(method, path)
        if fault == "reset":
            self._reset(handler)
            return
        if fault == "slowdown":
            self._respond(handler, 503, [("Content-Type", "application/xml")], _SLOWDOWN)
            return
        status, headers, data = self._forward(method, path, handler.headers, body)
        if fault == "empty":
            self._respond(handler, status, headers, b"", length=0)
        elif fault == "short":
            self._respond(handler, status, headers, data[: len(data) // 2], length=len(data))
            handler.close_connection = True
            self._reset(handler)
        else:
            self._respond(handler, status, headers, data)

    @staticmethod
    def _read_request_body(handler: BaseHTTPRequestHandler) -> bytes | None:
        if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raw = bytearray()
            while True:  # keep the chunked framing: it is forwarded as it came
                line = handler.rfile.readline()
                raw += line
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers, then the empty line
                        trailer = handler.rfile.readline()
                        raw += trailer
                        if trailer in (b"\r\n", b"\n", b""):
                            return bytes(raw)
                raw += handler.rfile.read(size + 2)
        length = int(handler.headers.get("Content-Length") or 0)
        return handler.rfile.read(length) if length else None

    def _forward(self, method: str, path: str, headers, body: bytes | None):
        conn = http.client.HTTPConnection(*self._upstream, timeout=60)
        try:
            out_headers = {k: v for k, v in headers.items() if k.lower() not in ("connection", "proxy-connection")}
            conn.request(method, path, body=body, headers=out_headers, encode_chunked=False)
            resp = conn.getresponse()
            data = resp.read()
            kept = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
            if method == "HEAD":  # no body, but the object's length is the answer
                kept += [(k, v) for k, v in resp.getheaders() if k.lower() == "content-length"]
            return resp.status, kept, data
        finally:
            conn.close()

    @staticmethod
    def _respond(handler: BaseHTTPRequestHandler, status: int, headers, data: bytes, length: int | None = None) -> None:
        handler.send_response_only(status)
        for key, value in headers:
            handler.send_header(key, value)
        if handler.command != "HEAD":
            handler.send_header("Content-Length", str(len(data) if length is None else length))
        handler.end_headers()
        if handler.command != "HEAD" and data:
            handler.wfile.write(data)
        handler.wfile.flush()

    @staticmethod
    def _reset(handler: BaseHTTPRequestHandler) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0), as a dropped connection looks."""
        sock = handler.connection
        handler.close_connection = True
        try:
            handler.wfile.flush()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handler.rfile.close()
            handler.wfile.close()
            sock.close()  # the last reference: the descriptor closes with linger 0, i.e. RST
        except OSError:
            pass
