"""The `remote` reward term: batches scored by one or more `fdfo-reward-server`s over HTTP (fdfo_fast.reward_server).

Wire format (protocol 1), shared with the server:
- `GET /info` -> JSON {"terms": the server composite's names ("reward" first), "weights", "max_request_bytes",
  "max_batch", "encodings": ["raw", "png"], "protocol": 1}.
- `POST /score`, Content-Type application/octet-stream: a 4-byte big-endian header length L, L bytes of UTF-8 JSON
  {"n", "height", "width", "encoding": "raw" | "png", "prompts": [n str], "metadata": [n dict] | null,
  "seeds": [n int] | null}, then the images: raw = n·H·W·3 uint8 bytes (NHWC, row-major); png = n times a 4-byte
  big-endian length and an RGB PNG file of H×W.
- The answer: JSON {"scores": {term: [n values]}}. JSON has no NaN: a finite score is a JSON number (a float32 as
  the shortest repr of its double, so it round-trips bit for bit), a non-finite one the string "nan", "inf" or
  "-inf". An error is a 4xx / 5xx with {"error": one line}.
- Every request carries `Authorization: Bearer TOKEN` when the server has a token.

The term names are `remote` (the server's weighted `reward`) and `remote.<term>` for each of its terms (logged, and
weightable in --reward like any term). Each request goes to the next server in turn; a server that failed is left
out for the next `REPROBE_SECONDS` while another is up. A batch larger than a server's max_batch / max_request_bytes
is split into several requests and reassembled in order.

Failures: a refused connection, a timeout, a dropped connection or a 5xx is retried (`--remote-retries`, backoff
0.5 s · 2^k capped at 8 s, each retry on the next server). When the retries are spent, `--remote-on-failure stop`
raises FdfoError naming the servers and the last error; `skip` scores the whole batch NaN (the trainer skips and
counts that epoch: `skipped_epochs_reward_unavailable`; an evaluation reports NaN for the remote terms and is never
the best) and counts it in `failed_batches`. A 4xx (wrong token, a request refused) or an answer that breaks the
protocol is not unavailability but a misconfiguration: FdfoError at once, under either policy.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import math
import struct
import time
from urllib.parse import urlparse

import numpy as np
import torch

from fdfo_fast.config import reward_term_names
from fdfo_fast.errors import FdfoError
from fdfo_fast.rewards.base import Reward

_log = logging.getLogger("fdfo_fast")

PROTOCOL = 1
ENCODINGS = ("raw", "png")
PNG_COMPRESS_LEVEL = 1  # zlib level of the PNGs sent (benchmarks/reward_transport.py: higher levels cost more time)
BACKOFF_BASE, BACKOFF_CAP = 0.5, 8.0  # seconds before retry k: min(BASE · 2^k, CAP)
REPROBE_SECONDS = 30.0  # a failed server is left out this long while another server is up
MAX_RESPONSE_BYTES = 64 << 20  # a score list is a few kB; anything near this is not a reward server
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def names_remote_term(spec: str) -> bool:
    """Whether a --reward spec ('remote:1,quality:0.1') names the remote term or one of its `remote.*` terms."""
    return any(t == "remote" or t.startswith("remote.") for t in reward_term_names(spec))


def parse_server_urls(spec: str) -> list[tuple[str, int]]:
    """'http://host:port[,http://host:port...]' -> [(host, port)]; FdfoError naming a malformed entry."""
    out = []
    for url in filter(None, (u.strip() for u in spec.split(","))):
        u = urlparse(url)
        try:
            port = u.port
        except ValueError:
            port = None
        if u.scheme != "http" or not u.hostname or port is None or u.path not in ("", "/") or u.query:
            raise FdfoError(f"--reward-servers: {url!r} is not a server address of the form http://HOST:PORT")
        out.append((u.hostname, port))
    if not out:
        raise FdfoError("--reward-servers must name at least one server, e.g. http://127.0.0.1:8700")
    return out


# ---------------------------------------------------------------------------------------------------------------
# The wire format (also read and written by fdfo_fast.reward_server)
# ---------------------------------------------------------------------------------------------------------------
def encode_png(image_hwc: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_hwc).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def pack_request(
    uint8_nhwc: np.ndarray, prompts: list[str], metadata: list | None, seeds: list | None, encoding: str
) -> list:
    """The body of a POST /score as a list of byte buffers (sent one after another: no copy of the pixels)."""
    n, h, w, _ = uint8_nhwc.shape
    header = {
        "n": n, "height": h, "width": w, "encoding": encoding, "prompts": list(prompts),
        "metadata": None if metadata is None else list(metadata),
        "seeds": None if seeds is None else [int(s) for s in seeds],
    }  # fmt: skip
    head = json.dumps(header, allow_nan=False).encode()
    parts: list = [struct.pack(">I", len(head)), head]
    if encoding == "raw":
        parts.append(memoryview(np.ascontiguousarray(uint8_nhwc)).cast("B"))
    else:
        for image in uint8_nhwc:
            png = encode_png(image)
            parts += [struct.pack(">I", len(png)), png]
    return parts


def encode_scores(scores: dict[str, torch.Tensor]) -> bytes:
    """{term: [n] tensor} -> the JSON answer (non-finite values as "nan" / "inf" / "-inf")."""

    def value(x: float):
        return x if math.isfinite(x) else ("nan" if math.isnan(x) else "inf" if x > 0 else "-inf")

    body = {"scores": {k: [value(x) for x in v.tolist()] for k, v in scores.items()}}
    return json.dumps(body, allow_nan=False).encode()


def decode_scores(raw: bytes, terms: tuple[str, ...], n: int, where: str) -> dict[str, torch.Tensor]:
    """The JSON answer -> {term: float32 [n] tensor}, FdfoError naming `where` when it breaks the protocol."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise FdfoError(f"reward server {where} answered something that is not JSON: {raw[:60]!r}") from None
    scores = body.get("scores") if isinstance(body, dict) else None
    if not isinstance(scores, dict):
        raise FdfoError(f"reward server {where} answered JSON without a 'scores' object")
    if set(scores) != set(terms):
        raise FdfoError(f"reward server {where} answered terms {sorted(scores)}; its /info announced {sorted(terms)}")
    out = {}
    for name in terms:
        values = scores[name]
        if not isinstance(values, list) or len(values) != n:
            got = len(values) if isinstance(values, list) else type(values).__name__
            raise FdfoError(f"reward server {where} answered {got} values for term {name!r}; {n} images were sent")
        try:
            floats = [_NON_FINITE[x] if isinstance(x, str) else _plain_number(x) for x in values]
        except (KeyError, TypeError):
            raise FdfoError(f"reward server {where} answered a value for {name!r} that is not a number") from None
        out[name] = torch.tensor(floats, dtype=torch.float32)
    return out


def _plain_number(x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError
    return float(x)


# ---------------------------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------------------------
class _Unavailable(Exception):
    """A failure worth retrying elsewhere or later: refused / dropped connection, timeout, 5xx."""


class RemoteReward(Reward):
    """The `remote` term and the `remote.*` terms of the servers at `servers` (see the module docstring)."""

    wants_uint8 = True
    wants_seeds = True
    wants_metadata = True

    def __init__(
        self,
        servers: str,
        token: str = "",
        timeout: float = 60.0,
        retries: int = 3,
        encoding: str = "raw",
        on_failure: str = "stop",
        sleep=time.sleep,
    ):
        if encoding not in ENCODINGS:
            raise FdfoError(f"--remote-encoding must be raw or png, got {encoding!r}")
        if on_failure not in ("stop", "skip"):
            raise FdfoError(f"--remote-on-failure must be stop or skip, got {on_failure!r}")
        self.servers = parse_server_urls(servers)
        self.token, self.timeout, self.retries = token, timeout, retries
        self.encoding, self.on_failure, self.sleep = encoding, on_failure, sleep
        self.failed_batches = 0  # batches scored NaN under `skip` since construction
        self.epoch_failed_batches = 0  # ... since the last begin_epoch / take_failed_batches
        self._next = 0  # the server the next request goes to
        self._failed_at: dict[int, float] = {}  # server index -> time.monotonic() of its last failure
        infos = [self._info(i) for i in range(len(self.servers))]
        terms = infos[0]["terms"]
        for i, info in enumerate(infos[1:], 1):
            if info["terms"] != terms:
                raise FdfoError(
                    f"reward servers {self._url(0)} and {self._url(i)} serve different terms ({terms} vs "
                    f"{info['terms']}): every server in --reward-servers must be started with the same --reward"
                )
        self.server_terms = tuple(terms)
        self.weights = infos[0]["weights"]
        self.max_batch = min(info["max_batch"] for info in infos)
        self.max_request_bytes = min(info["max_request_bytes"] for info in infos)
        # The servers' rewards micro-batch too: requests of whole blocks (from the batch's start) score exactly as
        # one request over the batch would, which overlapped scoring relies on (Reward.score_block).
        blocks = [info.get("score_block", 1) for info in infos]
        self.block = math.lcm(*(b if isinstance(b, int) and b >= 1 else 1 for b in blocks))
        self.names = ("remote", *(f"remote.{t}" for t in self.server_terms if t != "reward"))

    @classmethod
    def from_config(cls, rc) -> RemoteReward:
        """From a RewardConfig's reward_servers / remote_* fields."""
        if not rc.reward_servers.strip():
            raise FdfoError("--reward names the remote term: give --reward-servers http://HOST:PORT[,...]")
        return cls(rc.reward_servers, rc.remote_token, rc.remote_timeout, rc.remote_retries, rc.remote_encoding,
                   rc.remote_on_failure)  # fmt: skip

    @property
    def score_block(self) -> int:
        return self.block

    # -- bookkeeping the trainer reads ---------------------------------------------------------------------------
    def begin_epoch(self, epoch: int) -> None:
        self.epoch_failed_batches = 0

    def take_failed_batches(self) -> int:
        """Batches scored NaN (server unavailable) since the last call or begin_epoch; resets the count."""
        n, self.epoch_failed_batches = self.epoch_failed_batches, 0
        return n

    # -- HTTP ----------------------------------------------------------------------------------------------------
    def _url(self, i: int) -> str:
        host, port = self.servers[i]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def _request(self, i: int, method: str, path: str, parts: list | None = None) -> bytes:
        """One request to server i; the answer's body on 200. _Unavailable for what a retry may cure, FdfoError
        for a refusal (4xx)."""
        host, port = self.servers[i]
        conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            if self.token:
                conn.putheader("Authorization", f"Bearer {self.token}")
            if parts is not None:
                conn.putheader("Content-Type", "application/octet-stream")
                conn.putheader("Content-Length", str(sum(len(p) for p in parts)))
            conn.endheaders()
            for p in parts or ():
                conn.send(p)
            resp = conn.getresponse()
            length = resp.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > MAX_RESPONSE_BYTES:
                raise FdfoError(f"reward server {self._url(i)} answered {length} bytes; a score list is a few kB")
            body = resp.read(MAX_RESPONSE_BYTES + 1)
        except (OSError, http.client.HTTPException) as err:  # refused, reset, timed out, a broken answer
            raise _Unavailable(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__) from None
        finally:
            conn.close()
        if resp.status == 200:
            return body
        try:
            reason = str(json.loads(body)["error"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            reason = body[:120].decode("utf-8", "replace")
        if resp.status >= 500:
            raise _Unavailable(f"HTTP {resp.status}: {reason}")
        hint = " (set --remote-token to the server's --token)" if resp.status == 401 else ""
        raise FdfoError(f"reward server {self._url(i)} refused {method} {path}: HTTP {resp.status} {reason}{hint}")

    def _info(self, i: int) -> dict:
        try:
            raw = self._request(i, "GET", "/info")
        except _Unavailable as err:
            raise FdfoError(f"reward server {self._url(i)} is not reachable ({err}); start it with "
                            "fdfo-reward-server or fix --reward-servers") from None  # fmt: skip
        try:
            info = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            info = None
        if not isinstance(info, dict) or info.get("protocol") != PROTOCOL:
            got = info.get("protocol") if isinstance(info, dict) else "no JSON object"
            raise FdfoError(f"reward server {self._url(i)} speaks protocol {got!r}; this fdfo_fast speaks {PROTOCOL}")
        terms, mb, mr = info.get("terms"), info.get("max_batch"), info.get("max_request_bytes")
        good = isinstance(terms, list) and terms and terms[0] == "reward" and all(isinstance(t, str) for t in terms)
        if not (good and isinstance(mb, int) and mb >= 1 and isinstance(mr, int) and mr >= 1):
            raise FdfoError(f"reward server {self._url(i)}: its /info is incomplete or malformed")
        if self.encoding not in info.get("encodings", ()):
            raise FdfoError(f"reward server {self._url(i)} does not accept --remote-encoding {self.encoding}")
        return info

    def _pick(self, exclude: int | None) -> int:
        """The next server in turn, leaving out `exclude` (the one that just failed) and recently failed ones while
        another is up."""
        n, now = len(self.servers), time.monotonic()
        order = [(self._next + k) % n for k in range(n)]
        healthy = [i for i in order if i != exclude and now - self._failed_at.get(i, -math.inf) > REPROBE_SECONDS]
        others = [i for i in order if i != exclude]
        i = (healthy or others or order)[0]
        self._next = (i + 1) % n
        return i

    def _score_chunk(self, uint8_nhwc: np.ndarray, prompts, metadata, seeds) -> dict[str, torch.Tensor]:
        """One request (retried); raises _Unavailable with the history when every attempt failed."""
        parts = pack_request(uint8_nhwc, prompts, metadata, seeds, self.encoding)
        errors, last = [], None
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(min(BACKOFF_BASE * 2 ** (attempt - 1), BACKOFF_CAP))
            i = self._pick(last)
            try:
                raw = self._request(i, "POST", "/score", parts)
            except _Unavailable as err:
                self._failed_at[i] = time.monotonic()
                errors.append(f"{self._url(i)}: {err}")
                last = i
                continue
            self._failed_at.pop(i, None)
            return decode_scores(raw, self.server_terms, len(prompts), self._url(i))
        raise _Unavailable("; ".join(errors))

    def _chunks(self, n: int, h: int, w: int, prompts, metadata) -> list[slice]:
        """Row ranges that fit the servers' max_batch and max_request_bytes (pixels as raw bytes, which also bounds
        what a PNG body decodes to), with the JSON header of each chunk counted."""
        per_row = h * w * 3 + 4
        out, lo = [], 0
        while lo < n:
            rows = min(self.max_batch, n - lo)
            while True:
                meta = None if metadata is None else list(metadata[lo : lo + rows])
                head = len(json.dumps({"p": list(prompts[lo : lo + rows]), "m": meta}).encode())
                size = 4 + head + 256 + rows * per_row  # 256: the header's numbers and seeds, generously
                if size <= self.max_request_bytes or rows == 1:
                    break
                rows = max(1, min(rows - 1, rows * self.max_request_bytes // size))
            if size > self.max_request_bytes:
                raise FdfoError(
                    f"one {h}x{w} image ({size} bytes with its prompt) exceeds the reward servers' request limit of "
                    f"{self.max_request_bytes} bytes: start them with a larger --max-request-mb"
                )
            if lo + rows < n and rows > self.block:  # a request that is not the last covers whole blocks
                rows -= rows % self.block
            out.append(slice(lo, lo + rows))
            lo += rows
        return out

    # -- scoring ---------------------------------------------------------------------------------------------------
    def __call__(self, images, prompts, uint8_nhwc=None, seeds=None, metadata=None) -> dict[str, torch.Tensor]:
        self.check_batch(images, prompts)
        if uint8_nhwc is None:  # called alone, not through a CompositeReward
            from fdfo_fast.rewards.base import to_uint8_hwc

            pixels = to_uint8_hwc(images)
        else:
            pixels = uint8_nhwc.detach().cpu().contiguous().numpy()
        n, h, w, _ = pixels.shape
        parts: list[dict] = []
        try:
            for rows in self._chunks(n, h, w, prompts, metadata):
                meta = None if metadata is None else list(metadata[rows])
                parts.append(self._score_chunk(pixels[rows], list(prompts[rows]), meta,
                                               None if seeds is None else list(seeds[rows])))  # fmt: skip
        except _Unavailable as err:
            urls = ", ".join(self._url(i) for i in range(len(self.servers)))
            if self.on_failure == "stop":
                raise FdfoError(
                    f"reward server(s) {urls} unavailable after {self.retries + 1} attempts (last: {err}); start or "
                    "fix them, or pass --remote-on-failure skip to skip such epochs (counted) instead of stopping"
                ) from None
            self.failed_batches += 1
            self.epoch_failed_batches += 1
            _log.warning("reward server(s) %s unavailable (%s): a batch of %d images scored NaN "
                         "(--remote-on-failure skip)", urls, err, n)  # fmt: skip
            return {name: torch.full((n,), math.nan) for name in self.names}
        joined = {t: torch.cat([p[t] for p in parts]) for t in self.server_terms}
        return {("remote" if t == "reward" else f"remote.{t}"): v for t, v in joined.items()}


def remote_failed_batches(reward) -> int:
    """Batches the remote term(s) of a CompositeReward scored NaN since the epoch began (read and reset)."""
    return sum(p.take_failed_batches() for p in getattr(reward, "parts", ()) if isinstance(p, RemoteReward))
