"""`fdfo-reward-server`: serve configured reward terms over HTTP, for the trainer's `remote` term.

    fdfo-reward-server --reward pickscore:1 --reward-models pickscore=PATH --device cuda --port 8700
    fdfo-train ... --reward remote:1 --reward-servers http://127.0.0.1:8700

The served reward is built from the same options as the trainer's (--reward, --reward-models, --reward-dtype, and
any other RewardConfig option) by the trainer's own builder (`fdfo_fast.builder.make_reward`), so whatever a
training run can score, a server can; only the `human` term is refused (nobody labels on a server). The wire format
is in fdfo_fast.rewards.remote. The server prints the URL it listens on (one line) once the rewards are loaded.

Hardening as the labelling page's server (fdfo_fast.human): loopback by default; any other address needs --token
(sent as `Authorization: Bearer TOKEN`, compared in constant time); on loopback the Host header must name the
server (no DNS rebinding) and /score takes only application/octet-stream (no browser form can post one without a
CORS preflight, which is never answered). Each connection has a socket timeout, at most MAX_CONNECTIONS are served
at once (503 beyond), the request size is checked from Content-Length before the body is read (413), and the
decoded pixels are bounded by the same limit. Batches are scored one at a time under a lock (model rewards are not
thread-safe) while other connections are still accepted or refused. Every bad request gets a 4xx with a one-line
reason (401 token, 411 no length, 413 too large, 415 type, 400 malformed, 422 the reward refused the batch with an
FdfoError); an unexpected exception is a 500 whose traceback is logged here only.
"""

from __future__ import annotations

import argparse
import dataclasses
import hmac
import io
import ipaddress
import json
import logging
import struct
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import numpy as np
import torch

from fdfo_fast.cli_args import ArgumentParser, add_dataclass_args, option, overrides_from_args, replace_checked
from fdfo_fast.config import HumanConfig, RewardConfig, _rule_error, reward_term_names
from fdfo_fast.errors import FdfoError, cli_entry
from fdfo_fast.local_http import MAX_CONNECTIONS, BoundedServer, JsonHandler
from fdfo_fast.rewards.remote import ENCODINGS, PROTOCOL, encode_scores, names_remote_term

_log = logging.getLogger("fdfo_fast")
MAX_SIDE = 1 << 14  # pixels per image side a request may declare


@dataclass(frozen=True)
class ServerConfig:
    host: str = option("127.0.0.1", "address to listen on (anything but loopback requires --token)")
    port: int = option(0, "port (0 = any free port; the URL is printed)")
    token: str = option("", "token clients must send (--remote-token); '' = none, allowed on loopback only")
    device: str = option("auto", "where the reward models run: auto | cpu | cuda | cuda:N")
    max_request_mb: float = option(256.0, "largest request body, and largest decoded batch of pixels, in MiB")
    max_batch: int = option(256, "most images per request (a client splits larger batches)")
    delay_ms: float = option(0.0, "injected latency per batch in ms, slept under the scoring lock (benchmarks, tests)")


# The remote term's own options: a server scores, it does not forward to other servers.
CLIENT_ONLY = (
    "reward_servers",
    "remote_token",
    "remote_timeout",
    "remote_retries",
    "remote_encoding",
    "remote_on_failure",
    "overlap_scoring",
)  # fmt: skip (the trainer's side of scoring)
# The served reward's options: every RewardConfig field but those (a field added there, e.g. a plugin option,
# is a server option too).
ServedRewardOptions = dataclasses.make_dataclass(
    "ServedRewardOptions",
    [(f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
     for f in dataclasses.fields(RewardConfig) if f.name not in CLIENT_ONLY],
    frozen=True,
)  # fmt: skip


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BadRequest(Exception):
    """A malformed /score request: 400 with this message."""


def parse_score_request(body, max_batch: int, max_pixel_bytes: int):
    """A /score body -> (uint8 [n, 3, H, W] images, prompts, metadata or None, seeds or None); BadRequest naming
    what is wrong."""
    view = memoryview(body)
    if len(view) < 4:
        raise BadRequest("body shorter than its 4-byte header length")
    (head_len,) = struct.unpack(">I", view[:4])
    if head_len > len(view) - 4:
        raise BadRequest(f"header length {head_len} exceeds the body ({len(view) - 4} bytes after it)")
    try:
        head = json.loads(bytes(view[4 : 4 + head_len]))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest("header is not JSON") from None
    if not isinstance(head, dict):
        raise BadRequest("header must be a JSON object")

    def count(key: str, low: int, high: int) -> int:
        v = head.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
            raise BadRequest(f"header '{key}' must be an integer in [{low}, {high}], got {str(v)[:40]}")
        return v

    n = count("n", 1, max_batch)
    h, w = count("height", 1, MAX_SIDE), count("width", 1, MAX_SIDE)
    encoding = head.get("encoding")
    if encoding not in ENCODINGS:
        raise BadRequest(f"header 'encoding' must be one of {list(ENCODINGS)}, got {str(encoding)[:40]}")
    prompts, metadata, seeds = head.get("prompts"), head.get("metadata"), head.get("seeds")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise BadRequest("header 'prompts' must be a list of strings")
    if len(prompts) != n:
        raise BadRequest(f"header has {len(prompts)} prompts for n = {n} images")
    if metadata is not None and (not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata)):
        raise BadRequest("header 'metadata' must be null or a list of objects")
    if metadata is not None and len(metadata) != n:
        raise BadRequest(f"header has {len(metadata)} metadata records for n = {n} images")
    if seeds is not None and (
        not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise BadRequest("header 'seeds' must be null or a list of integers")
    if seeds is not None and len(seeds) != n:
        raise BadRequest(f"header has {len(seeds)} seeds for n = {n} images")
    if n * h * w * 3 > max_pixel_bytes:
        raise BadRequest(f"{n} images of {h}x{w} decode to more than the server's {max_pixel_bytes} bytes")
    data = view[4 + head_len :]
    if encoding == "raw":
        if len(data) != n * h * w * 3:
            raise BadRequest(f"raw images: {len(data)} bytes for n·H·W·3 = {n * h * w * 3}")
        pixels = torch.frombuffer(data, dtype=torch.uint8).view(n, h, w, 3)
    else:
        pixels = torch.empty(n, h, w, 3, dtype=torch.uint8)
        pos = 0
        for i in range(n):
            if len(data) - pos < 4:
                raise BadRequest(f"png images: the body ends before image {i}")
            (size,) = struct.unpack(">I", data[pos : pos + 4])
            pos += 4
            if size > len(data) - pos:
                raise BadRequest(f"png image {i}: {size} bytes declared, {len(data) - pos} left in the body")
            pixels[i].numpy()[:] = _decode_png(bytes(data[pos : pos + size]), i, h, w)
            pos += size
        if pos != len(data):
            raise BadRequest(f"png images: {len(data) - pos} bytes after the last image")
    return pixels.permute(0, 3, 1, 2), prompts, metadata, seeds


def _decode_png(data: bytes, i: int, h: int, w: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
            if im.mode != "RGB" or im.size != (w, h):  # checked before decoding: the declared size bounds memory
                raise BadRequest(f"png image {i} is {im.mode} {im.size[0]}x{im.size[1]}; expected RGB {w}x{h}")
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadRequest(f"png image {i} is not a valid PNG ({type(err).__name__})") from None


class _Handler(JsonHandler):
    server_version = "fdfo-reward/1"
    label = "reward server"
    app: RewardServer  # set per server

    def _error(self, status: int, message: str):
        headers = {"WWW-Authenticate": "Bearer"} if status == HTTPStatus.UNAUTHORIZED else None
        self._send(status, json.dumps({"error": message}).encode(), headers=headers)

    def _authorised(self) -> bool:
        app = self.app
        host = self.headers.get("Host", "").strip().lower()
        if app.hosts is not None and host not in app.hosts:
            self._error(HTTPStatus.FORBIDDEN, f"Host {host[:80]!r} is not this server")
            return False
        if not app.token:
            return True
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        # bytes on both sides: compare_digest refuses non-ASCII str
        if scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode("utf-8", "surrogateescape"), app.token.encode()
        ):
            return True
        self._error(HTTPStatus.UNAUTHORIZED, "missing or wrong token (Authorization: Bearer TOKEN)")
        return False

    def _get(self):
        if not self._authorised():
            return
        if self.path != "/info":
            return self._error(HTTPStatus.NOT_FOUND, f"no such path {self.path[:80]}")
        self._json(HTTPStatus.OK, self.app.info())

    def _post(self):
        app = self.app
        if not self._authorised():
            return
        if self.path != "/score":
            return self._error(HTTPStatus.NOT_FOUND, f"no such path {self.path[:80]}")
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/octet-stream":
            return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "Content-Type must be application/octet-stream")
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            return self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
        if int(length) > app.max_request_bytes:  # before reading a byte of the body
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"body of {length} bytes exceeds the server's {app.max_request_bytes}")  # fmt: skip
        body = bytearray(int(length))
        view, got = memoryview(body), 0
        while got < len(body):
            k = self.rfile.readinto(view[got:])
            if not k:
                return self._error(HTTPStatus.BAD_REQUEST, f"body ended after {got} of {length} bytes")
            got += k
        try:
            images, prompts, metadata, seeds = parse_score_request(body, app.max_batch, app.max_request_bytes)
        except BadRequest as err:
            return self._error(HTTPStatus.BAD_REQUEST, str(err))
        try:
            scores = app.score(images, prompts, metadata, seeds)
        except FdfoError as err:
            return self._error(HTTPStatus.UNPROCESSABLE_ENTITY, str(err).splitlines()[0] if str(err) else "refused")
        self._json(HTTPStatus.OK, encode_scores(scores))


class _HTTPServer(BoundedServer):
    label = "reward server"


class RewardServer:
    """A CompositeReward served on host:port (`start()` serves from a daemon thread, `serve_forever()` here)."""

    def __init__(
        self,
        reward,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str = "",
        max_request_bytes: int = 256 << 20,
        max_batch: int = 256,
        delay_s: float = 0.0,
    ):
        if not token and not is_loopback(host):
            raise FdfoError(f"--host {host} is not loopback: give --token (clients pass it as --remote-token)")
        self.reward, self.token = reward, token
        self.max_request_bytes, self.max_batch, self.delay_s = int(max_request_bytes), int(max_batch), delay_s
        self.lock = threading.Lock()  # one batch at a time
        self.requests = 0  # /score requests that reached the reward (tests, logs)
        handler = type("Handler", (_Handler,), {"app": self})
        try:
            self.httpd = _HTTPServer((host, port), handler, MAX_CONNECTIONS)
        except OSError as err:
            raise FdfoError(f"reward server: cannot listen on {host}:{port} ({err.strerror or err})") from None
        self.host, self.port = host, self.httpd.server_address[1]
        self.hosts = None  # Host header values accepted; None = any (off loopback the token is the guard)
        if is_loopback(host):
            names = {"127.0.0.1", "localhost", "[::1]", f"[{host}]" if ":" in host else host.lower()}
            self.hosts = frozenset(f"{n}:{self.port}" for n in names) | (frozenset(names) if self.port == 80 else set())
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def info(self) -> dict:
        return {
            "terms": list(self.reward.names),
            "weights": dict(self.reward.weights),
            "max_request_bytes": self.max_request_bytes,
            "max_batch": self.max_batch,
            "score_block": self.reward.score_block or 1,  # requests of whole blocks score as one call would
            "encodings": list(ENCODINGS),
            "protocol": PROTOCOL,
        }

    def score(self, images, prompts, metadata, seeds) -> dict:
        with self.lock:
            self.requests += 1
            if self.delay_s:
                time.sleep(self.delay_s)
            with torch.no_grad():
                scores = self.reward(images, prompts, seeds=seeds, metadata=metadata)
        return {name: scores[name] for name in self.reward.names}

    def start(self) -> RewardServer:
        # a short poll: close() (httpd.shutdown) returns within it
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="fdfo-reward-server", daemon=True)  # fmt: skip
        self.thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        if self.thread is not None:
            self.httpd.shutdown()
        self.httpd.server_close()
        self.reward.close()


def build_served_reward(rc: RewardConfig, device: str = "auto"):
    """The CompositeReward a server serves: the trainer's builder on the server's RewardConfig (so every term a
    run can weight, plugins included, is served the same way), with the human term refused."""
    from fdfo_fast.builder import make_reward, resolve_device

    for f in dataclasses.fields(rc):
        why = _rule_error(f.metadata, getattr(rc, f.name))
        if why:
            raise FdfoError(f"--{f.name.replace('_', '-')} {why}, got {getattr(rc, f.name)!r}")
    if "human" in reward_term_names(rc.reward):
        raise FdfoError("--reward human: nobody labels on a reward server; serve programmatic or model terms")
    if names_remote_term(rc.reward):
        raise FdfoError("--reward remote: a reward server scores itself; serve the terms the other server serves")
    # no human term, so the label page's options, folder and seed are never read
    return make_reward(rc, HumanConfig(), Path("."), 0, resolve_device(device))


@cli_entry
def main(argv=None):
    parser = ArgumentParser(
        prog="fdfo-reward-server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_dataclass_args(parser.add_argument_group("reward (as fdfo-train's)"), ServedRewardOptions)
    add_dataclass_args(parser.add_argument_group("server"), ServerConfig)
    ns = parser.parse_args(argv)
    rc = replace_checked(RewardConfig(), overrides_from_args(ns, ServedRewardOptions))
    sc = replace_checked(ServerConfig(), overrides_from_args(ns, ServerConfig))
    if not sc.token and not is_loopback(sc.host):
        raise FdfoError(f"--host {sc.host} is not loopback: give --token (clients pass it as --remote-token)")
    if not 0 <= sc.port < 65536:
        raise FdfoError(f"--port must be a port number (0 = any free port), got {sc.port}")
    if not sc.max_request_mb > 0 or sc.max_batch < 1 or not sc.delay_ms >= 0:
        raise FdfoError("--max-request-mb must be > 0, --max-batch >= 1 and --delay-ms >= 0")
    reward = build_served_reward(rc, sc.device)
    server = RewardServer(reward, sc.host, sc.port, sc.token, int(sc.max_request_mb * (1 << 20)), sc.max_batch,
                          sc.delay_ms / 1000)  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")  # 500s' tracebacks
    print(server.url, flush=True)
    try:
        server.serve_forever()
    finally:
        server.close()


if __name__ == "__main__":
    main()
