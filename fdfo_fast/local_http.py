"""What the project's two small HTTP servers share (the labelling page, fdfo_fast.human; the reward server,
fdfo_fast.reward_server): a threading server that serves at most `MAX_CONNECTIONS` at once (503 and close beyond)
and logs clients that hang up or stall quietly, and a JSON request handler whose every answer closes a refused
connection and whose unexpected exceptions become a 500 with the traceback logged on the server only."""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_log = logging.getLogger("fdfo_fast")
SOCKET_TIMEOUT = 10.0  # seconds a connection may stall on one read or write before it is closed
MAX_CONNECTIONS = 16  # connections served at once; one more gets 503 and is closed at once


class BoundedServer(ThreadingHTTPServer):
    """At most `limit` connections at once (503 and close beyond), and no tracebacks on stderr for clients that hang
    up or stall; `label` names the server in the log."""

    label = "server"
    daemon_threads = True
    # socketserver listens with a backlog of 5: with a few stalled clients not yet accepted, a new browser connection's
    # SYN is dropped and retried a second later (seen in CI); the kernel caps this at net.core.somaxconn anyway
    request_queue_size = 128

    def __init__(self, address, handler, limit: int = MAX_CONNECTIONS):
        self.slots = threading.BoundedSemaphore(limit)
        self.limit = limit
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            _log.debug("%s: %d connections busy, refusing %s", self.label, self.limit, client_address)
            try:
                request.settimeout(1.0)
                body = b'{"error": "server busy"}'
                request.sendall(
                    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address):
        err = sys.exc_info()[1]
        if isinstance(err, (ConnectionError, TimeoutError)):
            _log.debug("%s: %s: %s", self.label, client_address, err or type(err).__name__)
        else:
            _log.error("%s: request from %s failed", self.label, client_address, exc_info=True)


class JsonHandler(BaseHTTPRequestHandler):
    """GET / POST dispatched to `_get` / `_post` under `_guard`; `_send` / `_json` answer with no-store, nosniff and,
    for a refusal, `Connection: close` (its body may be unread: never parse it as the next request)."""

    label = "server"
    timeout = SOCKET_TIMEOUT  # StreamRequestHandler sets it on the socket

    def log_message(self, fmt, *args):  # quiet: one line per request, at debug level only
        _log.debug(f"{self.label}: " + fmt, *args)

    def _send(self, status: int, body: bytes, ctype: str = "application/json", headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if status >= 400:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj):
        self._send(status, obj if isinstance(obj, bytes) else json.dumps(obj).encode())

    def _guard(self, fn):
        try:
            fn()
        except (ConnectionError, TimeoutError):
            raise  # the client went away or stalled: handle_error logs it quietly
        except Exception as err:  # a bug: answer 500 instead of dropping the connection; the traceback stays here
            _log.exception("%s: %s %s failed", self.label, self.command, self.path)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(err).__name__}"})

    def do_GET(self):
        self._guard(self._get)

    def do_POST(self):
        self._guard(self._post)

    def _get(self):
        self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

    def _post(self):
        self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
