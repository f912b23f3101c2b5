"""Human-in-the-loop FDFO: the label server's API through a real HTTP client, the label file's crash safety, the
trainer consuming labels given in headless Chromium, restarts that continue an epoch, and mixed mode."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from fdfo_fast.config import make_config
from fdfo_fast.errors import FdfoError
from fdfo_fast.human import LabelServer, LabelStore, LabelTask
from fdfo_fast.viz import save_image

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
MISSING = [name for name in ("chromium", "chromedriver") if not shutil.which(name)]
try:
    import selenium  # noqa: F401
except ImportError:
    MISSING.append("selenium")
HAS_BROWSER = not MISSING
# CI installs Debian's chromium + chromium-driver and sets FDFO_REQUIRE_BROWSER=1: there the browser test must run.
need_browser = pytest.mark.skipif(
    not HAS_BROWSER and os.environ.get("FDFO_REQUIRE_BROWSER") != "1",
    reason=f"needs headless Chromium, {' and '.join(MISSING)} not found: install Debian/Ubuntu's browser and driver "
    "with `sudo apt-get install chromium chromium-driver` (selenium comes with `make install`; see the README)",
)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TOKEN = "t0ken-for-tests"  # every server here gets it (an explicit --human-token wins over the per-run random one)


def _request(url, body=None, raw: bytes | None = None, token: str | None = TOKEN):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"Content-Type": "application/json", **({"X-Label-Token": token} if token else {})}
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _json(url, body=None, raw=None, token=TOKEN):
    status, data = _request(url, body, raw, token)
    return status, json.loads(data)


@pytest.fixture
def server(tmp_path):
    store = LabelStore(tmp_path / "labels.jsonl")
    task = LabelTask(store, tmp_path)
    pairs = []
    for p in range(3):
        paths = {}
        for name in "AB":
            paths[name] = str(
                save_image(torch.rand(3, 8, 8) * 2 - 1, tmp_path / "epoch_00004" / f"pair_{p}_{name}.png")
            )
        pairs.append({"pair": p, "prompt": f"prompt {p}", "seed": 10 + p, "images": paths, "left": "B", "right": "A"})
    srv = LabelServer(task, "127.0.0.1", 0, token=TOKEN)
    task.publish(4, pairs)
    yield srv, task, store, f"http://127.0.0.1:{srv.port}"
    srv.close()
    store.close()


def test_api_serves_the_epoch_and_takes_labels(server):
    srv, task, store, base = server
    status, page = _request(base + "/")
    assert status == 200 and b"Which image is better?" in page
    status, state = _json(base + "/api/state")
    assert state["epoch"] == 4 and state["total"] == 3 and state["labeled"] == 0
    status, png = _request(base + state["pairs"][0]["left"])
    assert status == 200 and png[:4] == b"\x89PNG"
    assert _json(base + "/api/label", {"epoch": 4, "pair": 0, "choice": "left"})[0] == 200
    assert _json(base + "/api/label", {"epoch": 4, "pair": 1, "choice": "none"})[0] == 200
    _, state = _json(base + "/api/state")
    assert [p["choice"] for p in state["pairs"]] == ["left", "none", None] and state["labeled"] == 2
    rec = store.effective(4)[0]
    assert rec["preferred"] == "B" and rec["seed"] == 10 and rec["prompt"] == "prompt 0"  # left showed branch B
    # undo removes the most recent label of the epoch
    assert _json(base + "/api/undo", {"epoch": 4}) == (200, {"ok": True, "message": "pair 1 undone"})
    assert set(store.effective(4)) == {0}
    lines = (Path(store.path)).read_text().splitlines()
    assert [json.loads(x)["kind"] for x in lines] == ["label", "label", "undo"]


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"not json", 400, "not JSON"),
        (b"[1, 2]", 400, "'epoch' must be an integer"),
        (b'{"epoch": "4", "pair": 0, "choice": "left"}', 400, "'epoch' must be an integer"),
        (b'{"epoch": 4, "pair": true, "choice": "left"}', 400, "'pair' must be an integer"),
        (b'{"epoch": 4, "pair": 0, "choice": "LEFT"}', 400, "'choice' must be one of"),
        (b'{"epoch": 3, "pair": 0, "choice": "left"}', 409, "is not the epoch being labelled"),
        (b'{"epoch": 4, "pair": 9, "choice": "left"}', 404, "pair 9 is not shown"),
        (b"{" + b" " * 5000 + b"}", 413, "body must be"),
    ],
)
def test_malformed_posts_get_a_clear_4xx_and_never_touch_the_file(server, body, status, message):
    srv, task, store, base = server
    got, reply = _json(base + "/api/label", raw=body)
    assert got == status and message in reply["error"]
    assert not Path(store.path).exists() or Path(store.path).read_text() == ""


def test_other_errors(server):
    srv, task, store, base = server
    assert _json(base + "/api/undo", {"epoch": 4})[0] == 409  # nothing to undo
    assert _json(base + "/api/nope", {"epoch": 4})[0] == 404
    assert _request(base + "/images/../labels.jsonl")[0] == 404  # no escaping the image folder
    assert _request(base + "/images/epoch_00004/missing.png")[0] == 404


def test_token_is_required_when_set(tmp_path):
    store = LabelStore(tmp_path / "l.jsonl")
    srv = LabelServer(LabelTask(store, tmp_path), "127.0.0.1", 0, token="s3cret")
    base = f"http://127.0.0.1:{srv.port}"
    try:
        assert _json(base + "/api/state", token=None)[0] == 403
        assert _json(base + "/api/state?token=wrong", token=None)[0] == 403
        assert _json(base + "/api/state?token=s3cret", token=None)[0] == 200
        assert _json(base + "/api/state", token="s3cret")[0] == 200  # or in the X-Label-Token header
        assert srv.url.endswith("?token=s3cret")
    finally:
        srv.close()
        store.close()


def test_a_line_cut_short_by_a_crash_is_dropped_on_reopen(tmp_path):
    path = tmp_path / "labels.jsonl"
    store = LabelStore(path)
    store.append({"kind": "label", "epoch": 0, "pair": 1, "choice": "left", "time": 1.0})
    store.close()
    with open(path, "ab") as f:
        f.write(b'{"kind": "label", "epoch": 0, "pa')  # killed mid-write
    again = LabelStore(path)
    assert set(again.effective(0)) == {1}
    again.append({"kind": "label", "epoch": 0, "pair": 2, "choice": "right", "time": 2.0})
    again.close()
    assert [json.loads(x)["pair"] for x in path.read_text().splitlines()] == [1, 2]  # every line parses


def test_human_config_errors():
    with pytest.raises(FdfoError, match="needs --algorithm fdfo"):
        make_config("toy-flow-grpo", overrides=dict(reward="human:1"))
    with pytest.raises(FdfoError, match="--human-auto-label is required"):
        make_config("toy-fdfo", overrides=dict(reward="human:1", human_fraction=0.5))


def _train_cmd(out, port, *extra):
    return [sys.executable, "-m", "fdfo_fast.train", "--preset", "toy-fdfo", "--reward", "human:1",
            "--human-port", str(port), "--out", str(out), "--num-steps", "3", "--eval-every", "0",
            "--eval-per-category", "1", "--eval-num-steps", "2", "--progress", "false", "--tensorboard", "false",
            "--threads", "1", "--human-token", TOKEN, *extra]  # fmt: skip


def _wait_state(base, pred, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            status, state = _json(base + "/api/state")
            if status == 200 and pred(state):
                return state
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.1)
    raise AssertionError("label server never reached the expected state")


def test_restarted_trainer_continues_the_epoch_where_the_labels_stop(tmp_path):
    port = _port()
    base = f"http://127.0.0.1:{port}"
    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(out, port, "--pairs-per-epoch", "3", "--epochs", "1"), env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    state = _wait_state(base, lambda s: s["epoch"] == 0 and s["total"] == 3)
    for p in state["pairs"][:2]:
        assert _json(base + "/api/label", {"epoch": 0, "pair": p["pair"], "choice": "left"})[0] == 200
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc = subprocess.Popen(_train_cmd(out, port, "--pairs-per-epoch", "3", "--epochs", "1"), env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    state = _wait_state(base, lambda s: s["epoch"] == 0 and s["total"] == 3)
    assert state["labeled"] == 2  # the same pairs regenerated (same seeds): their labels count
    last = next(p for p in state["pairs"] if p["choice"] is None)
    assert _json(base + "/api/label", {"epoch": 0, "pair": last["pair"], "choice": "right"})[0] == 200
    assert proc.wait(timeout=180) == 0, proc.stderr.read()[-3000:]
    labels = [json.loads(x) for x in (out / "labels" / "labels.jsonl").read_text().splitlines()]
    assert sorted(r["pair"] for r in labels if r["kind"] == "label") == [0, 1, 2]  # nothing asked twice
    record = next(json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x)
    assert record["fdfo/pairs_with_reward_gap"] == 1.0  # all three pairs had a preference


def test_mixed_mode_shows_a_subset_and_auto_labels_the_rest(tmp_path):
    port = _port()
    base = f"http://127.0.0.1:{port}"
    cmd = _train_cmd(tmp_path / "run", port, "--pairs-per-epoch", "8", "--epochs", "1", "--human-fraction", "0.25",
                     "--human-auto-label", "alignment:1")  # fmt: skip
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = _wait_state(base, lambda s: s["epoch"] == 0)
    assert state["total"] == 2  # 25 % of 8 pairs go to the human
    for p in state["pairs"]:
        assert _json(base + "/api/label", {"epoch": 0, "pair": p["pair"], "choice": "none"})[0] == 200
    assert proc.wait(timeout=180) == 0, proc.stderr.read()[-3000:]
    record = next(
        json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"train"' in x
    )
    # the human said "no preference" on 2 pairs; the other 6 carry the scorer's preference where it had one
    assert record["fdfo/pairs_with_reward_gap"] <= 6 / 8


@need_browser
def test_headless_chromium_labels_an_epoch_and_the_trainer_consumes_it(tmp_path):
    from fdfo_fast.human_oracle import PageOracle
    from fdfo_fast.train import train

    port = _port()
    cfg = make_config(
        "toy-fdfo",
        overrides=dict(out=str(tmp_path / "run"), reward="human:1", human_port=port, pairs_per_epoch=4, epochs=2,
                       num_steps=3, eval_every=0, eval_per_category=1, eval_num_steps=2, progress=False,
                       log_with="none", human_timeout=120, human_token=TOKEN),
    )  # fmt: skip
    oracle = PageOracle(f"http://127.0.0.1:{port}/?token={TOKEN}")
    oracle.start()
    try:
        train(cfg)
    finally:
        oracle.stop()
        oracle.join(timeout=30)
    assert oracle.error is None, oracle.error
    labels = [json.loads(x) for x in (tmp_path / "run" / "labels" / "labels.jsonl").read_text().splitlines()]
    assert len(labels) == 8 and {(r["epoch"], r["pair"]) for r in labels} == {(e, p) for e in (0, 1) for p in range(4)}
    assert sorted((e, p, c) for e, p, c in oracle.clicks) == sorted(
        (r["epoch"], r["pair"], r["choice"]) for r in labels
    )
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    for epoch, rec in enumerate(records):
        decided = [r for r in labels if r["epoch"] == epoch and r["choice"] in ("left", "right")]
        assert rec["fdfo/pairs_with_reward_gap"] == len(decided) / 4  # exactly the clicked preferences trained
        assert rec["reward/human"] == 0.0  # +1 / −1 per decided pair
    assert threading.active_count() < 50


# ---------------------------------------------------------------------------------------------------------------
# The reward term in-process: a background call that blocks on the labels, labelled through the HTTP API
# ---------------------------------------------------------------------------------------------------------------
class _Call(threading.Thread):
    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args, self.result, self.error = fn, args, None, None

    def run(self):
        try:
            self.result = self.fn(*self.args)
        except BaseException as err:  # re-raised in the test thread
            self.error = err


def _label_epoch(reward, images, prompts, seeds, choose):
    """Run the reward on a batch, answer every shown pair with `choose(pair state)` -> (human [2n], shown pairs)."""
    base = f"http://127.0.0.1:{reward.server.port}"
    call = _Call(reward, images, prompts, seeds)
    call.start()
    state = _wait_state(base, lambda s: s["epoch"] == reward.epoch and s["total"] > 0, timeout=60)
    for p in state["pairs"]:
        assert _json(base + "/api/label", {"epoch": state["epoch"], "pair": p["pair"], "choice": choose(p)})[0] == 200
    call.join(timeout=60)
    assert not call.is_alive() and call.error is None, call.error
    human = call.result["human"]
    assert torch.equal(human[1::2], -human[0::2])  # rows 2p, 2p + 1: +r for A, −r for B
    return human[0::2], state["pairs"]


def _left_branch(p) -> str:
    """Which branch the page showed on the left: its image is pair_XXXX_A.png or pair_XXXX_B.png."""
    return p["left"].removesuffix(".png")[-1]


def test_mixed_mode_auto_labelled_pairs_carry_the_auto_rewards_preference(tmp_path):
    """The pairs the human is not shown get sign(R(A) − R(B)) of the --human-auto-label reward, computed here from
    that reward's own scores; the human's pairs get the click (left better -> +1 for the branch shown left)."""
    from fdfo_fast.human import HumanPreferenceReward
    from fdfo_fast.rewards import CompositeReward
    from fdfo_fast.rewards.alignment import AlignmentReward
    from fdfo_fast.world.grammar import parse_prompt
    from fdfo_fast.world.render import render, sample_scene

    texts = ["a red circle", "two squares", "a blue triangle", "a green square and a red circle"]
    wrong = parse_prompt("a white triangle")
    rng = np.random.default_rng(0)
    images, prompts = [], []
    for p in range(8):  # A right and B wrong, B right and A wrong, both right, in turn
        text = texts[p % len(texts)]
        good = render(sample_scene(parse_prompt(text), rng), 16)
        bad = render(sample_scene(wrong, rng), 16)
        images += [[good, bad], [bad, good], [good, good]][p % 3]
        prompts += [text, text]
    images = torch.from_numpy(np.stack(images))
    scores = AlignmentReward()(images, prompts)["alignment"].view(-1, 2)
    auto_pref = torch.sign(scores[:, 0] - scores[:, 1])
    reward = HumanPreferenceReward(tmp_path, 0.25, CompositeReward("alignment:1"), port=0, timeout=60, token=TOKEN)
    try:
        reward.begin_epoch(0)
        pref, shown = _label_epoch(reward, images, prompts, list(range(100, 116)), lambda p: "left")
    finally:
        reward.close()
    by_human = {p["pair"]: 1.0 if _left_branch(p) == "A" else -1.0 for p in shown}
    assert len(by_human) == 2  # 25 % of 8
    auto = [p for p in range(8) if p not in by_human]
    assert {auto_pref[p].item() for p in auto} == {-1.0, 0.0, 1.0}  # both preferences and a tie are exercised
    assert pref[auto].tolist() == auto_pref[auto].tolist()
    assert [pref[p].item() for p in by_human] == list(by_human.values())


def test_sides_are_randomised_and_a_click_maps_to_the_branch_shown_there(tmp_path):
    """Over 64 pairs the branch shown on the left is A for about half of them: under a fair coin the count k is
    Binomial(64, ½) (mean 32, sd 4) and |k − 32| ≤ 16 (4 sd) fails with probability 2·P(k ≤ 15) ≈ 2.4e-5; the sides are
    a fixed function of the pair's seed, so the outcome is deterministic. A click names a side, the label and the
    reward name the branch shown there: "left" -> +1 for A when A is left, −1 (B preferred) when B is."""
    from fdfo_fast.human import HumanPreferenceReward

    n = 64
    images = torch.rand(2 * n, 3, 8, 8) * 2 - 1
    prompts = [f"prompt {i // 2}" for i in range(2 * n)]
    seeds = [1000 + i for i in range(2 * n)]
    choices = {}  # pair -> the side clicked: left for even pairs, right for odd ones

    def choose(p):
        choices[p["pair"]] = "left" if p["pair"] % 2 == 0 else "right"
        return choices[p["pair"]]

    reward = HumanPreferenceReward(tmp_path, port=0, timeout=60, token=TOKEN)
    try:
        pref, shown = _label_epoch(reward, images, prompts, seeds, choose)
        labels = reward.store.effective(0)
    finally:
        reward.close()
    assert len(shown) == n
    lefts = {p["pair"]: _left_branch(p) for p in shown}
    k = sum(side == "A" for side in lefts.values())
    assert abs(k - n / 2) <= 16, f"branch A shown left in {k} of {n} pairs"
    for p, left in lefts.items():
        right = "B" if left == "A" else "A"
        preferred = left if choices[p] == "left" else right
        assert labels[p]["left"] == left and labels[p]["preferred"] == preferred, (p, labels[p])
        assert pref[p].item() == (1.0 if preferred == "A" else -1.0), (p, left, choices[p])
    # every combination of (side shown left, side clicked) occurs
    assert {(lefts[p], choices[p]) for p in lefts} == {(s, c) for s in "AB" for c in ("left", "right")}


# ---------------------------------------------------------------------------------------------------------------
# Hardening (issue 18, items 9–12): real requests with hand-set headers against a real server
# ---------------------------------------------------------------------------------------------------------------
def _raw(port, method, path, body: bytes | None = None, headers=None, host=None):
    """One request through http.client with exactly the headers given (Host too) -> (status, parsed JSON or bytes)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host if host is not None else f"127.0.0.1:{port}")
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        data = r.read()
        try:
            return r.status, json.loads(data)
        except ValueError:
            return r.status, data
    finally:
        conn.close()


LABEL = json.dumps({"epoch": 4, "pair": 0, "choice": "left"}).encode()


def test_default_loopback_server_has_a_per_run_token_in_its_url(tmp_path):
    store = LabelStore(tmp_path / "l.jsonl")
    a, b = (LabelServer(LabelTask(store, tmp_path), "127.0.0.1", 0) for _ in range(2))
    try:
        assert a.token and a.token != b.token and a.url.endswith(f"?token={a.token}")
        base = f"http://127.0.0.1:{a.port}"
        assert _json(base + "/api/state", token=None)[0] == 403
        assert _request(base + "/", token=None)[0] == 403
        assert _json(base + f"/api/state?token={a.token}", token=None)[0] == 200
    finally:
        a.close()
        b.close()
        store.close()


def test_cross_origin_foreign_host_and_non_json_posts_are_refused(server):
    srv, task, store, base = server
    port, tok = srv.port, {"X-Label-Token": TOKEN}
    evil = {"Origin": "http://evil.example"}
    # the reported attack: a text/plain "simple" post from another site (no preflight) -> now refused
    got = _raw(port, "POST", "/api/label", LABEL, {**tok, **evil, "Content-Type": "text/plain"})
    assert got[0] == 403 and "cross-origin" in got[1]["error"]
    assert _raw(port, "POST", "/api/label", LABEL, {**tok, **evil, "Content-Type": "application/json"})[0] == 403
    assert (
        _raw(port, "POST", "/api/label", LABEL, {**tok, "Origin": "null", "Content-Type": "application/json"})[0] == 403
    )
    referer = {"Referer": "http://evil.example/page", "Content-Type": "application/json"}
    assert _raw(port, "POST", "/api/label", LABEL, {**tok, **referer})[0] == 403
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        got = _raw(port, "POST", "/api/label", LABEL, {**tok, **({"Content-Type": ctype} if ctype else {})})
        assert got[0] == 415 and "application/json" in got[1]["error"], ctype
    # DNS rebinding: the page at evil.example:PORT resolving to 127.0.0.1 sends Host: evil.example:PORT
    for host in (f"evil.example:{port}", "127.0.0.1", f"127.0.0.1:{port + 1}", ""):
        got = _raw(port, "GET", "/api/state", headers=tok, host=host)
        assert got[0] == 403 and "Host" in got[1]["error"], host
        assert _raw(port, "POST", "/api/label", LABEL, {**tok, "Content-Type": "application/json"}, host=host)[0] == 403
    assert _raw(port, "GET", "/api/state", headers={**tok, **evil})[0] == 403  # a cross-origin fetch of the state
    assert not Path(store.path).exists() or Path(store.path).read_text() == ""  # none of it was recorded
    # what the page itself sends: same-origin JSON with the token; every loopback name of the bound port works
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert _raw(port, "GET", "/api/state", headers=tok, host=host)[0] == 200, host
    same = {"Origin": f"http://127.0.0.1:{port}", "Referer": f"http://127.0.0.1:{port}/?token={TOKEN}"}
    got = _raw(
        port, "POST", f"/api/label?token={TOKEN}", LABEL, {**same, "Content-Type": "application/json; charset=utf-8"}
    )
    assert got == (200, {"ok": True, "message": "ok"})
    assert set(store.effective(4)) == {0}


def test_stalled_connections_are_closed_after_the_timeout_and_others_still_served(tmp_path, monkeypatch):
    import fdfo_fast.human as human

    monkeypatch.setattr(human, "SOCKET_TIMEOUT", 0.5)
    store = LabelStore(tmp_path / "l.jsonl")
    srv = LabelServer(LabelTask(store, tmp_path), "127.0.0.1", 0, token=TOKEN)
    stalled = []
    try:
        for i in range(8):  # half-open posts: headers promise a body that never comes, or headers never end
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            head = f"POST /api/label HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nX-Label-Token: {TOKEN}\r\n"
            if i % 2:
                head += "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
            s.sendall(head.encode())
            stalled.append(s)
        deadline = time.monotonic() + 10  # the accept thread may lag on a loaded machine: time only the answer
        while srv.httpd.slots._value > human.MAX_CONNECTIONS - 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
        assert _json(f"http://127.0.0.1:{srv.port}/api/state")[0] == 200
        assert time.monotonic() - t0 < 0.4  # answered at once, not after the stalled ones
        t0 = time.monotonic()
        for s in stalled:
            while s.recv(4096):  # a stalled body gets its answer; then EOF: the server closed the connection
                pass
        assert time.monotonic() - t0 < 5
        time.sleep(0.2)
        assert not [t for t in threading.enumerate() if t.name.startswith("Thread-") and "process_request" in t.name]
    finally:
        for s in stalled:
            s.close()
        srv.close()
        store.close()


def test_connections_beyond_the_limit_get_503_at_once(tmp_path, monkeypatch):
    import fdfo_fast.human as human

    monkeypatch.setattr(human, "SOCKET_TIMEOUT", 1.0)
    monkeypatch.setattr(human, "MAX_CONNECTIONS", 4)
    store = LabelStore(tmp_path / "l.jsonl")
    srv = LabelServer(LabelTask(store, tmp_path), "127.0.0.1", 0, token=TOKEN)
    base = f"http://127.0.0.1:{srv.port}"
    stalled = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(4)]
    try:
        for s in stalled:
            s.sendall(b"GET /api/state HTTP/1.1\r\n")
        time.sleep(0.3)  # the server has accepted all four
        t0 = time.monotonic()
        status, reply = _json(base + "/api/state")
        assert status == 503 and reply["error"] == "server busy" and time.monotonic() - t0 < 0.5
        for s in stalled:  # the stalled ones time out and free their slots
            while s.recv(4096):
                pass
        time.sleep(0.2)
        assert _json(base + "/api/state")[0] == 200
    finally:
        for s in stalled:
            s.close()
        srv.close()
        store.close()


def test_no_label_or_undo_after_the_trainer_took_the_epoch(server):
    srv, task, store, base = server
    for p in range(3):
        assert _json(base + "/api/label", {"epoch": 4, "pair": p, "choice": "right"})[0] == 200
    assert set(task.wait_complete(4, 5)) == {0, 1, 2}  # what HumanPreferenceReward does: it closes the epoch
    before = Path(store.path).read_text()
    got = _json(base + "/api/undo", {"epoch": 4})
    assert got[0] == 409 and "closed" in got[1]["error"]
    got = _json(base + "/api/label", {"epoch": 4, "pair": 0, "choice": "left"})
    assert got[0] == 409 and "closed" in got[1]["error"]
    assert Path(store.path).read_text() == before and len(store.effective(4)) == 3  # what was trained stays
    assert _json(base + "/api/state")[1]["closed"] is True


def test_human_reward_closes_the_epoch_it_consumed(tmp_path):
    from fdfo_fast.human import HumanPreferenceReward

    reward = HumanPreferenceReward(tmp_path, port=0, timeout=60, token=TOKEN)
    try:
        _label_epoch(reward, torch.rand(4, 3, 8, 8) * 2 - 1, ["a", "a", "b", "b"], [1, 2, 3, 4], lambda p: "left")
        base = f"http://127.0.0.1:{reward.server.port}"
        assert _json(base + "/api/undo", {"epoch": 0})[0] == 409
        assert len(reward.store.effective(0)) == 2
    finally:
        reward.close()


def test_every_bad_request_gets_a_4xx_not_a_dropped_connection(server):
    srv, task, store, base = server
    port, ok = srv.port, {"X-Label-Token": TOKEN, "Content-Type": "application/json"}
    for deep in (b"[" * 2000 + b"]" * 2000, b'{"epoch": ' + b"[" * 4000, b'{"a":' + b"[" * 3000 + b"]" * 1000):
        got = _raw(port, "POST", "/api/label", deep, ok)
        assert got[0] == 400 and "not JSON" in got[1]["error"], deep[:20]
    got = _raw(port, "POST", "/api/label", b"[" * (human_max_body() + 1), ok)
    assert got[0] == 413
    # non-ASCII tokens, in the query (percent-encoded UTF-8) and in the header (raw Latin-1 bytes)
    for path in ("/api/state?token=%C3%A9t%C3%A9", "/api/state?token=%FF", "/?token=%E2%82%AC"):
        got = _raw(port, "GET", path)
        assert got[0] == 403, path
    got = _raw(port, "POST", "/api/label", LABEL, {"X-Label-Token": b"\xe9t\xe9", "Content-Type": "application/json"})
    assert got[0] == 403 and "token" in got[1]["error"]
    got = _raw(port, "POST", "/api/label", LABEL, {"X-Label-Token": TOKEN, "Content-Type": "application/json",
                                                   "Content-Length": "abc"})  # fmt: skip
    assert 400 <= got[0] < 500
    assert not Path(store.path).exists() or Path(store.path).read_text() == ""


def human_max_body():
    import fdfo_fast.human as human

    return human.MAX_BODY


def test_client_disconnects_are_logged_quietly_not_as_tracebacks(server, capfd):
    import struct

    srv, task, store, base = server
    capfd.readouterr()
    for i in range(60):
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        if i % 3 == 0:  # ask for the page, then reset before reading it: the server's write hits a dead socket
            s.sendall(f"GET /?token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n\r\n".encode())
        elif i % 3 == 1:  # promise a body, send part of it, hang up
            s.sendall(f"POST /api/label HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nX-Label-Token: {TOKEN}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"ep".encode())  # fmt: skip
        else:  # half a request line
            s.sendall(b"GET /api/st")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
        s.close()
    time.sleep(0.5)
    assert _json(base + "/api/state")[0] == 200  # still serving
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Error" not in err, err[-2000:]
