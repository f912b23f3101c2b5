"""Human-in-the-loop FDFO: a person labels each paired rollout on a local web page (`--reward human:1`).

FDFO's pairs fit pairwise judgement exactly (docs/method.md §1): for a pair (A, B) the label "A better" gives rewards
(+1, −1), "B better" (−1, +1), "no preference" or "skip" (0, 0) — a zero difference, so the pair carries no gradient.

- `LabelStore`: an append-only JSONL file. Each label is one `os.write` of a complete line on an O_APPEND descriptor
  (then fsync), validated before it is written; undo appends an `undo` record. A line cut short by a crash is
  ignored and truncated away on the next open, so the file never holds a corrupt record that is read back.
- `LabelServer`: a stdlib HTTP server (127.0.0.1 by default) that serves the page (`assets/label.html`), the epoch's
  pairs and images, and takes labels / undo as JSON posts. Every request needs the run's token (random and printed in
  the URL, as Jupyter does, unless `--human-token` names one) and a Host header naming the bound address (no DNS
  rebinding); a post must be same-origin (a foreign Origin / Referer is refused) `application/json`. Each connection
  has a socket timeout and at most `MAX_CONNECTIONS` are served at once (503 beyond). Every bad request gets a 4xx
  with a reason; a client that hangs up is logged at debug level, never as a traceback.
- An epoch closes when the trainer takes its labels: a later label or undo for it is refused (409).
- `HumanPreferenceReward`: the reward term `human`. For an epoch it saves the pairs' images, publishes them, and
  blocks until every pair shown to the human is labelled. Labels already in the file for the same epoch, pair,
  prompt and seed are reused, so a restarted trainer (or page) continues the epoch where the labels stop. Mixed
  mode (`--human-fraction < 1`): a programmatic or model reward (`--human-auto-label`) labels every pair by its
  preference, and the human overrides a sampled subset.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import threading
import time
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import torch

from fdfo_fast.errors import FdfoError
from fdfo_fast.local_http import MAX_CONNECTIONS, SOCKET_TIMEOUT, BoundedServer, JsonHandler
from fdfo_fast.rewards.base import Reward
from fdfo_fast.sampling import derive_seed

_log = logging.getLogger("fdfo_fast")
CHOICES = ("left", "right", "none", "skip")
PAGE = Path(__file__).parent / "assets" / "label.html"
MAX_BODY = 4096


# ---------------------------------------------------------------------------------------------------------------
# The label file
# ---------------------------------------------------------------------------------------------------------------
class LabelStore:
    """Append-only JSONL of label and undo records; `effective(epoch)` replays them into pair -> record."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.records: list[dict] = []
        if self.path.exists():
            raw = self.path.read_bytes()
            good = 0
            for line in raw.split(b"\n"):
                if not line:
                    good += 1
                    continue
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut short by a crash: everything after it is dropped below
                good += len(line) + 1
            if good < len(raw):
                _log.warning("%s: dropping a partial last line (%d bytes)", self.path, len(raw) - good)
                with open(self.path, "r+b") as f:
                    f.truncate(min(good, len(raw)))
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        with self.lock:
            os.write(self.fd, line)  # one write of a whole line on O_APPEND: never interleaved or half-written
            os.fsync(self.fd)
            self.records.append(record)

    def effective(self, epoch: int) -> dict[int, dict]:
        out: dict[int, dict] = {}
        for r in self.records:
            if r.get("epoch") != epoch:
                continue
            if r.get("kind") == "undo":
                out.pop(r["pair"], None)
            else:
                out[r["pair"]] = r
        return out

    def close(self) -> None:
        os.close(self.fd)


# ---------------------------------------------------------------------------------------------------------------
# The epoch being labelled, shared by the server threads and the trainer
# ---------------------------------------------------------------------------------------------------------------
class LabelTask:
    def __init__(self, store: LabelStore, image_root: Path):
        self.store, self.image_root = store, image_root
        self.cond = threading.Condition()
        self.epoch: int | None = None
        self.pairs: list[dict] = []  # pair, prompt, seed, left ("A"/"B"), image paths; only the human's pairs
        self.closed: set[int] = set()  # epochs whose labels the trainer has taken: no more labels or undo

    def publish(self, epoch: int, pairs: list[dict]) -> None:
        with self.cond:
            self.epoch, self.pairs = epoch, pairs
            self.closed.discard(epoch)
            self.cond.notify_all()

    def _refuse(self, epoch) -> str | None:
        if epoch in self.closed:
            return f"epoch {epoch} is closed: the trainer has already taken its labels"
        if epoch != self.epoch:
            return f"epoch {epoch} is not the epoch being labelled ({self.epoch})"
        return None

    def state(self) -> dict:
        with self.cond:
            labels = self.store.effective(self.epoch) if self.epoch is not None else {}
            pairs = [
                {
                    "pair": p["pair"],
                    "prompt": p["prompt"],
                    "left": f"/images/{Path(p['images'][p['left']]).relative_to(self.image_root).as_posix()}",
                    "right": f"/images/{Path(p['images'][p['right']]).relative_to(self.image_root).as_posix()}",
                    "choice": labels.get(p["pair"], {}).get("choice"),
                }
                for p in self.pairs
            ]
            done = sum(p["choice"] is not None for p in pairs)
            closed = self.epoch in self.closed
            return {"epoch": self.epoch, "pairs": pairs, "labeled": done, "total": len(pairs), "closed": closed}

    def label(self, epoch, pair, choice) -> tuple[int, str]:
        """(HTTP status, message) for a label post; appends the record when valid."""
        with self.cond:
            if refused := self._refuse(epoch):
                return HTTPStatus.CONFLICT, refused
            item = next((p for p in self.pairs if p["pair"] == pair), None)
            if item is None:
                return HTTPStatus.NOT_FOUND, f"pair {pair} is not shown in epoch {epoch}"
            preferred = {"left": item["left"], "right": item["right"]}.get(choice)
            self.store.append(
                {
                    "kind": "label",
                    "epoch": epoch,
                    "pair": pair,
                    "prompt": item["prompt"],
                    "seed": item["seed"],
                    "images": item["images"],
                    "left": item["left"],
                    "choice": choice,
                    "preferred": preferred,
                    "source": "human",
                    "time": time.time(),
                }
            )
            self.cond.notify_all()
            return HTTPStatus.OK, "ok"

    def undo(self, epoch) -> tuple[int, str]:
        with self.cond:
            if refused := self._refuse(epoch):
                return HTTPStatus.CONFLICT, refused
            shown = {p["pair"] for p in self.pairs}
            mine = [r for r in self.store.effective(epoch).values() if r["pair"] in shown]
            if not mine:
                return HTTPStatus.CONFLICT, "nothing to undo in this epoch"
            last = max(mine, key=lambda r: r["time"])
            self.store.append({"kind": "undo", "epoch": epoch, "pair": last["pair"], "time": time.time()})
            self.cond.notify_all()
            return HTTPStatus.OK, f"pair {last['pair']} undone"

    def wait_complete(self, epoch: int, timeout: float | None, close: bool = True) -> dict[int, dict]:
        """Block until every published pair of `epoch` has a label; returns pair -> record. With `close` the epoch is
        closed in the same critical section, so no label or undo can land between the check and the training."""
        deadline = None if not timeout else time.monotonic() + timeout
        with self.cond:
            while True:
                labels = self.store.effective(epoch)
                if all(p["pair"] in labels for p in self.pairs):
                    if close:
                        self.closed.add(epoch)
                    return labels
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    missing = sum(p["pair"] not in labels for p in self.pairs)
                    raise FdfoError(f"human labels: {missing} pairs of epoch {epoch} still unlabelled after {timeout}s")
                self.cond.wait(timeout=1.0 if left is None else min(1.0, left))


# ---------------------------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------------------------
class _Handler(JsonHandler):
    server_version = "fdfo-label/1"
    label = "label server"
    task: LabelTask
    token: str
    hosts: frozenset[str]  # the Host header values accepted ('' in it: any, on a wildcard address)

    def _same_origin(self, value: str) -> bool:
        """`value` (an Origin or Referer) names this server as the request's own Host does."""
        u = urlparse(value)
        return u.scheme == "http" and bool(u.netloc) and u.netloc.lower() == self.headers.get("Host", "").lower()

    def _authorised(self, url, post: bool) -> bool:
        """Host, Origin / Referer and token checks; on refusal the 403 is already sent."""
        host = self.headers.get("Host", "").strip().lower()
        if "" not in self.hosts and host not in self.hosts:
            self._json(HTTPStatus.FORBIDDEN, {"error": f"Host {host!r} is not this server"})
            return False
        origin, referer = self.headers.get("Origin"), self.headers.get("Referer")
        if origin is not None and not self._same_origin(origin):
            self._json(HTTPStatus.FORBIDDEN, {"error": f"cross-origin request from {origin!r} refused"})
            return False
        if post and origin is None and referer is not None and not self._same_origin(referer):
            self._json(HTTPStatus.FORBIDDEN, {"error": "cross-origin request refused (Referer)"})
            return False
        given = parse_qs(url.query).get("token", [""])[0] or self.headers.get("X-Label-Token", "")
        # bytes on both sides: compare_digest refuses non-ASCII str (a TypeError that dropped the connection)
        if hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.token.encode()):
            return True
        self._json(HTTPStatus.FORBIDDEN, {"error": "missing or wrong token"})
        return False

    def _get(self):
        url = urlparse(self.path)
        if not self._authorised(url, post=False):
            return
        if url.path in ("/", "/index.html"):
            return self._send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
        if url.path == "/api/state":
            return self._json(HTTPStatus.OK, self.task.state())
        if url.path.startswith("/images/"):
            root = self.task.image_root.resolve()
            target = (root / url.path[len("/images/") :]).resolve()
            if root not in target.parents or target.suffix != ".png" or not target.is_file():
                return self._json(HTTPStatus.NOT_FOUND, {"error": "no such image"})
            return self._send(HTTPStatus.OK, target.read_bytes(), "image/png")
        self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path {url.path}"})

    def _post(self):
        url = urlparse(self.path)
        if not self._authorised(url, post=True):
            return
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "Content-Type must be application/json"})
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._json(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"})
        if not 0 < length <= MAX_BODY:
            return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"body must be 1..{MAX_BODY} bytes"})
        raw = self.rfile.read(length)
        if len(raw) < length:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "body shorter than Content-Length"})
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "body is not JSON"})
        except RecursionError:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "body is not JSON (nested too deeply)"})
        if not isinstance(body, dict) or not isinstance(body.get("epoch"), int) or isinstance(body["epoch"], bool):
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "'epoch' must be an integer"})
        if url.path == "/api/label":
            pair, choice = body.get("pair"), body.get("choice")
            if not isinstance(pair, int) or isinstance(pair, bool):
                return self._json(HTTPStatus.BAD_REQUEST, {"error": "'pair' must be an integer"})
            if not isinstance(choice, str) or choice not in CHOICES:
                return self._json(HTTPStatus.BAD_REQUEST, {"error": f"'choice' must be one of {list(CHOICES)}"})
            status, msg = self.task.label(body["epoch"], pair, choice)
        elif url.path == "/api/undo":
            status, msg = self.task.undo(body["epoch"])
        else:
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path {url.path}"})
        self._json(status, {"ok": status == HTTPStatus.OK, "message": msg} if status == 200 else {"error": msg})


class _Server(BoundedServer):
    label = "label server"


class LabelServer:
    """The labelling page and its API on host:port, served from daemon threads."""

    def __init__(self, task: LabelTask, host: str = "127.0.0.1", port: int = 8765, token: str = ""):
        token = token or secrets.token_urlsafe(16)  # a per-run token even on loopback; an explicit one wins
        handler = type("Handler", (_Handler,), {"task": task, "token": token, "timeout": SOCKET_TIMEOUT})
        try:
            self.httpd = _Server((host, port), handler, MAX_CONNECTIONS)
        except OSError as err:
            raise FdfoError(f"label server: cannot listen on {host}:{port} ({err.strerror})") from None
        self.token = token
        self.host, self.port = host, self.httpd.server_address[1]
        names = {"127.0.0.1", "localhost", "[::1]", f"[{host}]" if ":" in host else host.lower()}
        hosts = {f"{n}:{self.port}" for n in names}
        if self.port == 80:
            hosts |= names
        if host in ("", "0.0.0.0", "::"):
            hosts.add("")  # a wildcard address answers to any name: the token is the guard there
        handler.hosts = frozenset(hosts)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="fdfo-label", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/?token={self.token}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------------------------------------------------
# The reward term
# ---------------------------------------------------------------------------------------------------------------
class HumanPreferenceReward(Reward):
    """`human` ∈ {+1, −1, 0} per image of an FDFO pair (pair-major rows 2p + b), from the labelling page."""

    names = ("human",)
    wants_seeds = True
    score_block = None  # an epoch's pairs are published and labelled together

    def __init__(
        self,
        folder: str | Path,
        fraction: float = 1.0,
        auto_label=None,
        host: str = "127.0.0.1",
        port: int = 8765,
        token: str = "",
        timeout: float = 0.0,
        seed: int = 0,
    ):
        if not 0 < fraction <= 1:
            raise FdfoError(f"--human-fraction must be in (0, 1], got {fraction}")
        if fraction < 1 and auto_label is None:
            raise FdfoError("--human-fraction < 1 needs --human-auto-label (the reward that labels the other pairs)")
        self.folder = Path(folder)
        self.store = LabelStore(self.folder / "labels.jsonl")
        self.task = LabelTask(self.store, self.folder)
        self.server = LabelServer(self.task, host, port, token)
        self.fraction, self.auto_label, self.timeout, self.seed = fraction, auto_label, timeout, seed
        self.epoch = 0
        print(f"label the pairs at {self.server.url}", flush=True)

    def begin_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def close(self) -> None:
        self.server.close()
        self.store.close()

    def _shown(self, n_pairs: int) -> list[int]:
        """The pairs the human labels this epoch (all, or a fixed-size random subset from (seed, epoch))."""
        if self.fraction >= 1:
            return list(range(n_pairs))
        k = max(1, round(self.fraction * n_pairs))
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 7))
        return sorted(torch.randperm(n_pairs, generator=g)[:k].tolist())

    def __call__(self, images: torch.Tensor, prompts: list[str], seeds: list[int] | None = None) -> dict:
        self.check_batch(images, prompts)
        if len(images) % 2:
            raise FdfoError("the human reward scores FDFO pairs (rows 2p, 2p + 1); use --algorithm fdfo")
        from fdfo_fast.viz import save_image

        n = len(images) // 2
        seeds = seeds if seeds is not None else [0] * len(images)
        epoch = self.epoch
        folder = self.folder / f"epoch_{epoch:05d}"
        pairs = []
        for p in self._shown(n):
            paths = {}
            for b, name in ((0, "A"), (1, "B")):
                path = folder / f"pair_{p:04d}_{name}.png"
                if not path.exists():
                    save_image(images[2 * p + b], path)
                paths[name] = str(path)
            left = "A" if derive_seed(seeds[2 * p], 5) & 1 == 0 else "B"  # random sides against position bias
            pairs.append({"pair": p, "prompt": prompts[2 * p], "seed": seeds[2 * p], "images": paths,
                          "left": left, "right": "B" if left == "A" else "A"})  # fmt: skip
        # labels given before a restart count if they name the same pair, prompt and seed
        stale = [
            r for r in self.store.effective(epoch).values()
            if any(q["pair"] == r["pair"] and (q["prompt"], q["seed"]) != (r["prompt"], r["seed"]) for q in pairs)
        ]  # fmt: skip
        for r in stale:
            self.store.append({"kind": "undo", "epoch": epoch, "pair": r["pair"], "time": time.time()})
        self.task.publish(epoch, pairs)
        labels = self.task.wait_complete(epoch, self.timeout or None)

        pref = torch.zeros(n)  # +1: A preferred, −1: B preferred, 0: no preference / skip
        if self.auto_label is not None:
            auto = self.auto_label(images, prompts)["reward"].view(-1, 2)
            pref = torch.sign(auto[:, 0] - auto[:, 1])
        for p in (q["pair"] for q in pairs):
            pref[p] = {"A": 1.0, "B": -1.0}.get(labels[p].get("preferred"), 0.0)
        return {"human": torch.stack([pref, -pref], 1).flatten()}
