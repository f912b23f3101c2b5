"""Human-in-the-loop FDFO: a person labels each paired rollout on a local web page (`--reward human:1`).

FDFO's pairs fit pairwise judgement exactly (docs/method.md §1): for a pair (A, B) the label "A better" gives rewards
(+1, −1), "B better" (−1, +1), "no preference" or "skip" (0, 0) — a zero difference, so the pair carries no gradient.

- `LabelStore`: an append-only JSONL file. Each label is one `os.write` of a complete line on an O_APPEND descriptor
  (then fsync), validated before it is written; undo appends an `undo` record. A line cut short by a crash is
  ignored and truncated away on the next open, so the file never holds a corrupt record that is read back.
- `LabelServer`: a stdlib HTTP server (127.0.0.1 by default; a URL token is required on any other address) that
  serves the page (`assets/label.html`), the epoch's pairs and images, and takes labels / undo as JSON posts;
  malformed posts get a 4xx with a reason.
- `HumanPreferenceReward`: the reward term `human`. For an epoch it saves the pairs' images, publishes them, and
  blocks until every pair shown to the human is labelled. Labels already in the file for the same epoch, pair,
  prompt and seed are reused, so a restarted trainer (or page) continues the epoch where the labels stop. Mixed
  mode (`--human-fraction < 1`): a programmatic or model reward (`--human-auto-label`) labels every pair by its
  preference, and the human overrides a sampled subset.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import torch

from fdfo_fast.errors import FdfoError
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

    def publish(self, epoch: int, pairs: list[dict]) -> None:
        with self.cond:
            self.epoch, self.pairs = epoch, pairs
            self.cond.notify_all()

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
            return {"epoch": self.epoch, "pairs": pairs, "labeled": done, "total": len(pairs)}

    def label(self, epoch, pair, choice) -> tuple[int, str]:
        """(HTTP status, message) for a label post; appends the record when valid."""
        with self.cond:
            if epoch != self.epoch:
                return HTTPStatus.CONFLICT, f"epoch {epoch} is not the epoch being labelled ({self.epoch})"
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
            if epoch != self.epoch:
                return HTTPStatus.CONFLICT, f"epoch {epoch} is not the epoch being labelled ({self.epoch})"
            shown = {p["pair"] for p in self.pairs}
            mine = [r for r in self.store.effective(epoch).values() if r["pair"] in shown]
            if not mine:
                return HTTPStatus.CONFLICT, "nothing to undo in this epoch"
            last = max(mine, key=lambda r: r["time"])
            self.store.append({"kind": "undo", "epoch": epoch, "pair": last["pair"], "time": time.time()})
            self.cond.notify_all()
            return HTTPStatus.OK, f"pair {last['pair']} undone"

    def wait_complete(self, epoch: int, timeout: float | None) -> dict[int, dict]:
        """Block until every published pair of `epoch` has a label; returns pair -> record."""
        deadline = None if not timeout else time.monotonic() + timeout
        with self.cond:
            while True:
                labels = self.store.effective(epoch)
                if all(p["pair"] in labels for p in self.pairs):
                    return labels
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    missing = sum(p["pair"] not in labels for p in self.pairs)
                    raise FdfoError(f"human labels: {missing} pairs of epoch {epoch} still unlabelled after {timeout}s")
                self.cond.wait(timeout=1.0 if left is None else min(1.0, left))


# ---------------------------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    server_version = "fdfo-label/1"
    task: LabelTask
    token: str

    def log_message(self, fmt, *args):  # quiet: the trainer has its own progress output
        _log.debug("label server: " + fmt, *args)

    def _send(self, status: int, body: bytes, ctype: str = "application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj):
        self._send(status, json.dumps(obj).encode())

    def _authorised(self, url) -> bool:
        if not self.token:
            return True
        given = parse_qs(url.query).get("token", [""])[0] or self.headers.get("X-Label-Token", "")
        if secrets.compare_digest(given, self.token):
            return True
        self._json(HTTPStatus.FORBIDDEN, {"error": "missing or wrong token"})
        return False

    def do_GET(self):
        url = urlparse(self.path)
        if not self._authorised(url):
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

    def do_POST(self):
        url = urlparse(self.path)
        if not self._authorised(url):
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._json(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"})
        if not 0 < length <= MAX_BODY:
            return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"body must be 1..{MAX_BODY} bytes"})
        try:
            body = json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "body is not JSON"})
        if not isinstance(body, dict) or not isinstance(body.get("epoch"), int) or isinstance(body["epoch"], bool):
            return self._json(HTTPStatus.BAD_REQUEST, {"error": "'epoch' must be an integer"})
        if url.path == "/api/label":
            pair, choice = body.get("pair"), body.get("choice")
            if not isinstance(pair, int) or isinstance(pair, bool):
                return self._json(HTTPStatus.BAD_REQUEST, {"error": "'pair' must be an integer"})
            if choice not in CHOICES:
                return self._json(HTTPStatus.BAD_REQUEST, {"error": f"'choice' must be one of {list(CHOICES)}"})
            status, msg = self.task.label(body["epoch"], pair, choice)
        elif url.path == "/api/undo":
            status, msg = self.task.undo(body["epoch"])
        else:
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path {url.path}"})
        self._json(status, {"ok": status == HTTPStatus.OK, "message": msg} if status == 200 else {"error": msg})


class LabelServer:
    """The labelling page and its API on host:port, served from a daemon thread."""

    def __init__(self, task: LabelTask, host: str = "127.0.0.1", port: int = 8765, token: str = ""):
        if host not in ("127.0.0.1", "localhost", "::1") and not token:
            token = secrets.token_urlsafe(16)  # anything reachable from elsewhere needs the token
        handler = type("Handler", (_Handler,), {"task": task, "token": token})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as err:
            raise FdfoError(f"label server: cannot listen on {host}:{port} ({err.strerror})") from None
        self.httpd.daemon_threads = True
        self.token = token
        self.host, self.port = host, self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="fdfo-label", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

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
