"""fdfo-reward-server and the `remote` term: round trip bit for bit, round-robin, timeouts and retries, a killed
server under both failure policies, malformed answers, the server's refusals (401, 413, 400, 422, 500), and toy
training runs through a server."""

import http.client
import json
import logging
import math
import socket
import struct
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from fdfo_fast.checkpoint import TOY_BASE_CHECKPOINT, atomic_save, load_toy_model, read_checkpoint
from fdfo_fast.config import make_config
from fdfo_fast.errors import FdfoError
from fdfo_fast.reward_server import RewardServer, main
from fdfo_fast.rewards import CompositeReward
from fdfo_fast.rewards.base import Reward
from fdfo_fast.rewards.preprocess import to_uint8_nhwc
from fdfo_fast.rewards.remote import RemoteReward, encode_png, pack_request
from fdfo_fast.train import train
from fdfo_fast.world.grammar import eval_prompts
from fdfo_fast.world.render import render_batch

TERMS = "alignment:1,quality:0.1,jpeg_compressibility:0.01"
TINY = dict(
    num_steps=4, pairs_per_epoch=4, prompts_per_epoch=2, group_size=4, eval_per_category=1, eval_num_steps=4,
    opt_steps_per_epoch=2, progress=False, log_with="none", diversity_prompts=0, eval_every=0,
)  # fmt: skip


def _batch(n=6):
    """Shapes-world scenes as uint8 [n, 3, 16, 16], every other one with noise (so quality / JPEG sizes vary)."""
    items = eval_prompts(2)[:n]
    images = render_batch([p for p, _ in items], [s for _, s in items])
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1)) * 0.2
    images[1::2] += noise[1::2]
    return to_uint8_nhwc(images.clamp(-1, 1)).permute(0, 3, 1, 2).contiguous(), [p.text() for p, _ in items]


def _as_remote(scores: dict) -> dict:
    return {("remote" if k == "reward" else f"remote.{k}"): v for k, v in scores.items()}


@pytest.fixture
def serve():
    """serve(weights or CompositeReward, **RewardServer options) -> a started server, closed after the test."""
    started = []

    def start(reward=TERMS, **kw):
        server = RewardServer(reward if isinstance(reward, Reward) else CompositeReward(reward), **kw).start()
        started.append(server)
        return server

    yield start
    for s in started:
        s.close()


class Recorder:
    """A sleep that records its delays instead of waiting."""

    def __init__(self):
        self.delays = []

    def __call__(self, seconds):
        self.delays.append(seconds)


def _free_url() -> str:
    """A loopback URL nobody listens on (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# ---------------------------------------------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_round_trip_equals_in_process_scoring_bit_for_bit(serve, encoding):
    images, prompts = _batch(6)
    server = serve(max_batch=4)  # 6 images: two requests, reassembled in order
    remote = CompositeReward("remote:1", models=[RemoteReward(server.url, encoding=encoding)])
    local = CompositeReward(TERMS)
    got, want = remote(images, prompts), _as_remote(local(images, prompts))
    assert server.requests == 2
    assert set(got) == {"reward", *want} and torch.equal(got["reward"], want["remote"])
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    # float images: the composite's one uint8 conversion is what travels
    floats = images.float() / 127.5 - 1
    assert all(torch.equal(remote(floats, prompts)[k], v) for k, v in want.items())


class Echo(Reward):
    """Scores that show what reached the server: the seed plus the row's metadata 'bonus', and non-finite values."""

    names = ("echo", "wild")
    wants_seeds = True
    wants_metadata = True

    def __call__(self, images, prompts, seeds=None, metadata=None):
        echo = torch.tensor([s + m.get("bonus", 0) + len(p) / 1000 for s, m, p in zip(seeds, metadata, prompts)])
        wild = torch.tensor([math.nan, math.inf, -math.inf, 1.5, -0.0, 3.4e38])[: len(images)]
        return {"echo": echo.double(), "wild": wild}


def test_prompts_seeds_metadata_and_non_finite_scores_travel(serve):
    server = serve(CompositeReward("echo:1", models=[Echo()]))
    remote = CompositeReward("remote.echo:2", models=[RemoteReward(server.url)])  # a remote.* term weighted
    remote.prompt_metadata = {"b": {"bonus": 100}}
    images = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    out = remote(images, ["a", "b", "cc", "b", "a", "ddd"], seeds=[1, 2, 3, 4, 5, 2**40])
    want = torch.tensor([1.001, 102.001, 3.002, 104.001, 5.001, 2.0**40 + 0.003])  # float32, as the server sends
    assert out["remote.echo"].tolist() == want.tolist()
    assert torch.equal(out["reward"], 2 * out["remote.echo"])
    wild = out["remote.wild"]
    assert math.isnan(wild[0]) and wild[1] == math.inf and wild[2] == -math.inf
    assert wild[3:].tolist() == torch.tensor([1.5, -0.0, 3.4e38]).tolist()


def test_two_servers_share_the_requests_round_robin(serve):
    images, prompts = _batch(8)
    a, b = serve(max_batch=2), serve(max_batch=2)
    remote = RemoteReward(f"{a.url},{b.url}")
    got = remote(images, prompts)
    assert (a.requests, b.requests) == (2, 2)
    want = _as_remote(CompositeReward(TERMS)(images, prompts))
    assert all(torch.equal(got[k], v) for k, v in want.items())


# ---------------------------------------------------------------------------------------------------------------
# Failures
# ---------------------------------------------------------------------------------------------------------------
def test_a_slow_server_times_out_is_retried_with_backoff_then_the_policy_applies(serve):
    images, prompts = _batch(2)
    server = serve(delay_s=1.0)
    sleep = Recorder()
    stop = RemoteReward(server.url, timeout=0.2, retries=2, sleep=sleep)
    with pytest.raises(FdfoError, match=r"unavailable after 3 attempts .*timed out.*--remote-on-failure skip"):
        stop(images, prompts)
    assert sleep.delays == [0.5, 1.0]
    skip = RemoteReward(server.url, timeout=0.2, retries=1, on_failure="skip", sleep=Recorder())
    out = skip(images, prompts)
    assert set(out) == set(skip.names) and all(torch.isnan(v).all() and v.shape == (2,) for v in out.values())
    assert skip.failed_batches == 1 and skip.take_failed_batches() == 1 and skip.take_failed_batches() == 0


def test_backoff_doubles_up_to_its_cap_and_a_failed_server_is_skipped_next(serve):
    images, prompts = _batch(2)
    dead, alive = serve(), serve()
    sleep = Recorder()
    remote = RemoteReward(f"{dead.url},{alive.url}", retries=6, sleep=sleep)
    dead.close()
    remote(images, prompts)  # the dead server first, then the retry on the live one
    assert sleep.delays == [0.5] and alive.requests == 1
    remote(images, prompts)  # the dead server is left out while the other is up: no failure, no wait
    assert sleep.delays == [0.5] and alive.requests == 2
    alive.close()
    with pytest.raises(FdfoError, match="unavailable after 7 attempts"):
        remote(images, prompts)
    assert sleep.delays[1:] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]


def test_a_killed_server_process_stops_the_run_or_scores_nan_under_skip(tmp_path):
    """The real command: the server prints its URL, scores, is SIGKILLed; "stop" is one error naming it, "skip"
    NaN rows and the counter."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fdfo_fast.reward_server", "--reward", "alignment:1", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), (url, proc.stderr.read() if proc.poll() is not None else "")
        images, prompts = _batch(4)
        stop = RemoteReward(url, retries=1, sleep=Recorder())
        skip = RemoteReward(url, retries=1, on_failure="skip", sleep=Recorder())
        want = CompositeReward("alignment:1")(images, prompts)
        assert torch.equal(stop(images, prompts)["remote.alignment"], want["alignment"])
    finally:
        proc.kill()
        proc.wait(timeout=60)
    with pytest.raises(FdfoError) as err:
        stop(images, prompts)
    assert url in str(err.value) and "\n" not in str(err.value) and "--remote-on-failure skip" in str(err.value)
    out = skip(images, prompts)
    assert all(torch.isnan(v).all() for v in out.values()) and skip.failed_batches == 1


def test_construction_asks_every_server_and_refuses_what_it_cannot_use(serve):
    with pytest.raises(FdfoError, match="is not reachable"):
        RemoteReward(_free_url())
    a, b = serve("alignment:1"), serve("quality:1")
    with pytest.raises(FdfoError, match="serve different terms"):
        RemoteReward(f"{a.url},{b.url}")
    with pytest.raises(FdfoError, match="not a server address"):
        RemoteReward("127.0.0.1:80")
    with pytest.raises(FdfoError, match="needs --reward-servers|requires|required"):
        make_config(overrides=dict(reward="remote:1"))


class _Fake(BaseHTTPRequestHandler):
    """A server that answers /info and /score with whatever the test set."""

    info: dict = {}
    score: bytes = b""

    def log_message(self, *args):
        pass

    def _answer(self, body: bytes):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._answer(json.dumps(self.info).encode())

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self._answer(self.score)


@pytest.fixture
def fake():
    servers = []

    def start(info=None, score=b""):
        info = info or {"terms": ["reward", "x"], "weights": {"x": 1.0}, "max_request_bytes": 1 << 20,
                        "max_batch": 8, "encodings": ["raw", "png"], "protocol": 1}  # fmt: skip
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), type("F", (_Fake,), {"info": info, "score": score}))
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


@pytest.mark.parametrize(
    "answer, match",
    [
        (b"<html>oops</html>", "not JSON"),
        (b'{"result": 1}', "without a 'scores' object"),
        (b'{"scores": {"reward": [1, 2], "x": [1]}}', "answered 1 values for term 'x'; 2 images were sent"),
        (b'{"scores": {"reward": [1, 2], "y": [1, 2]}}', r"answered terms \['reward', 'y'\]"),
        (b'{"scores": {"reward": [1, 2], "x": [1, "many"]}}', "not a number"),
        (b'{"scores": {"reward": [1, 2], "x": [1, true]}}', "not a number"),
    ],
)
def test_an_answer_that_breaks_the_protocol_is_an_error_under_either_policy(fake, answer, match):
    url = fake(score=answer)
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    for policy in ("stop", "skip"):
        with pytest.raises(FdfoError, match=match):
            RemoteReward(url, on_failure=policy)(images, ["a", "b"])


def test_a_server_of_another_protocol_is_refused(fake):
    with pytest.raises(FdfoError, match="speaks protocol 2; this fdfo_fast speaks 1"):
        RemoteReward(fake(info={"protocol": 2}))


# ---------------------------------------------------------------------------------------------------------------
# The server's refusals
# ---------------------------------------------------------------------------------------------------------------
def _post(server, body: bytes, headers=None, path="/score"):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/octet-stream", **(headers or {})})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read())
    conn.close()
    return out


def _body(n=2, h=4, w=4, encoding="raw", prompts=None, images=b"", **head):
    header = {"n": n, "height": h, "width": w, "encoding": encoding, "prompts": prompts or ["a red circle"] * n,
              "metadata": None, "seeds": None, **head}  # fmt: skip
    raw = json.dumps(header).encode()
    return struct.pack(">I", len(raw)) + raw + images


def test_a_wrong_or_missing_token_is_401(serve):
    server = serve("quality:1", token="s3cret")
    with pytest.raises(FdfoError, match="HTTP 401.*--remote-token"):
        RemoteReward(server.url)
    with pytest.raises(FdfoError, match="HTTP 401"):
        RemoteReward(server.url, token="s3cref")
    assert _post(server, _body(images=bytes(96)))[0] == 401
    out = RemoteReward(server.url, token="s3cret")(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), ["x"])
    assert out["remote"].shape == (1,)


def test_an_oversized_body_is_413_before_it_is_read(serve):
    server = serve("quality:1", max_request_bytes=1 << 20)
    with socket.create_connection((server.host, server.port), timeout=30) as s:  # headers only: no body follows
        s.sendall(b"POST /score HTTP/1.1\r\nHost: %s\r\nContent-Type: application/octet-stream\r\n"
                  b"Content-Length: 1000000000\r\n\r\n" % f"127.0.0.1:{server.port}".encode())  # fmt: skip
        reply = b""
        while chunk := s.recv(4096):  # the server answers and closes
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.0 413") and "exceeds the server's 1048576" in reply
    # the client splits a batch to fit: 3 images of 420² (529 kB each) go in separate requests
    big = torch.zeros(3, 3, 420, 420, dtype=torch.uint8)
    assert RemoteReward(server.url)(big, ["p"] * 3)["remote"].shape == (3,) and server.requests == 3
    with pytest.raises(FdfoError, match="exceeds the reward servers' request limit.*--max-request-mb"):
        RemoteReward(server.url)(torch.zeros(1, 3, 600, 600, dtype=torch.uint8), ["p"])


def test_malformed_requests_are_400_with_a_reason(serve):
    server = serve("alignment:1", max_batch=4)
    png = encode_png(np.zeros((4, 4, 3), np.uint8))
    cases = [
        (b"\x00\x00", "shorter than its 4-byte header"),
        (struct.pack(">I", 5) + b"nope!", "header is not JSON"),
        (_body(images=bytes(95)), "95 bytes for n·H·W·3 = 96"),
        (_body(prompts=["a red circle"] * 3, images=bytes(96)), "3 prompts for n = 2"),
        (_body(n=5, prompts=["x"] * 5), "'n' must be an integer in [1, 4]"),
        (_body(encoding="jpeg"), "'encoding' must be one of"),
        (_body(seeds=[1, True], images=bytes(96)), "'seeds' must be null or a list of integers"),
        (_body(n=1, encoding="png", prompts=["x"], images=struct.pack(">I", 9) + b"not a png"), "not a valid PNG"),
        (_body(n=1, h=5, encoding="png", prompts=["x"], images=struct.pack(">I", len(png)) + png), "expected RGB 4x5"),
        (_body(n=1, encoding="png", prompts=["x"], images=struct.pack(">I", len(png)) + png + b"!"), "bytes after"),
    ]
    for body, reason in cases:
        status, answer = _post(server, body)
        assert status == 400 and reason in answer["error"], (reason, status, answer)
    assert _post(server, b"", path="/nope")[0] == 404
    assert server.requests == 0


def test_a_refused_batch_is_422_and_a_crash_is_500_logged_on_the_server(serve, caplog):
    server = serve("alignment:1")
    images = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(FdfoError, match="HTTP 422 prompt 'not a shape' is not a shapes-world prompt"):
        RemoteReward(server.url, on_failure="skip")(images, ["not a shape"])  # a refusal, not an outage

    class Crash(Reward):
        names = ("crash",)

        def __call__(self, images, prompts):
            raise RuntimeError("a bug in the reward")

    crashing = serve(CompositeReward("crash:1", models=[Crash()]))
    with caplog.at_level(logging.ERROR, logger="fdfo_fast"):
        with pytest.raises(FdfoError, match="HTTP 500: internal error: RuntimeError"):
            RemoteReward(crashing.url, retries=0)(images, ["x"])
    assert "a bug in the reward" in caplog.text  # the traceback stays on the server's side


def test_a_foreign_host_header_is_403_and_non_loopback_needs_a_token(serve, capsys):
    server = serve("quality:1")
    assert _post(server, _body(), headers={"Host": "evil.example:80"})[0] == 403
    with pytest.raises(FdfoError, match="not loopback: give --token"):
        RewardServer(CompositeReward("quality:1"), host="0.0.0.0")
    for argv, message in (
        (["--host", "0.0.0.0"], "error: --host 0.0.0.0 is not loopback: give --token"),
        (["--reward", "human:1"], "error: --reward human: nobody labels on a reward server"),
        (["--reward", "nope:1"], "error: unknown reward term 'nope'"),
        (["--reward", "remote:1"], "error: --reward remote: a reward server scores itself"),
        (["--remote-token", "x"], "error: unrecognized arguments: --remote-token"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_pack_request_sends_the_pixels_without_a_copy():
    pixels = np.zeros((2, 4, 4, 3), np.uint8)
    parts = pack_request(pixels, ["a", "b"], None, [1, 2], "raw")
    assert np.shares_memory(np.frombuffer(parts[-1], np.uint8), pixels)


# ---------------------------------------------------------------------------------------------------------------
# Training through a server
# ---------------------------------------------------------------------------------------------------------------
def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_with_the_remote_term_logs_the_local_alignment_values(serve, tmp_path):
    server = serve("alignment:1")
    train(make_config(overrides=dict(out=str(tmp_path), epochs=1, reward="remote:1,alignment:0",
                                     reward_servers=server.url, **TINY)))  # fmt: skip
    recs = _records(tmp_path / "metrics.jsonl")
    kinds = [r["kind"] for r in recs]
    assert kinds == ["eval", "train", "eval"]
    for r in recs:
        prefix = "eval/" if r["kind"] == "eval" else "reward/"
        assert r[f"{prefix}remote.alignment"] == r[f"{prefix}alignment"] == r[f"{prefix}remote"]
    assert "skipped" not in recs[1] and recs[1]["skipped_epochs_reward_unavailable"] == 0


def test_training_with_a_dead_server_under_skip_counts_the_epoch_and_resumes_elsewhere(serve, tmp_path, monkeypatch):
    server = serve("alignment:1")
    connect = RemoteReward.__init__

    def connect_then_kill(self, *args, **kw):  # the server dies right after the trainer asked for its terms
        connect(self, *args, **kw)
        server.close()

    monkeypatch.setattr(RemoteReward, "__init__", connect_then_kill)
    opts = dict(out=str(tmp_path), reward="remote:1", reward_servers=server.url, remote_on_failure="skip",
                remote_retries=0, **TINY)  # fmt: skip
    train(make_config(overrides=dict(opts, epochs=1)))
    recs = _records(tmp_path / "metrics.jsonl")
    assert recs[1]["skipped"] == "reward server unavailable" and "loss" not in recs[1]
    assert recs[1]["skipped_epochs_reward_unavailable"] == 1 and recs[1]["skipped_epochs_nonfinite"] == 0
    assert math.isnan(recs[0]["eval/remote"]) and math.isfinite(recs[0]["eval/geneval"])  # geneval: the local term
    ckpt = read_checkpoint(tmp_path / "checkpoint.pt")
    base = load_toy_model(TOY_BASE_CHECKPOINT).state_dict()
    assert all(torch.equal(ckpt["model"][k], base[k]) for k in base)  # never trained on the missing reward
    # a checkpoint written before the counter existed resumes, against a server on another port
    del ckpt["counters"]["skipped_epochs_reward_unavailable"]
    atomic_save(ckpt, tmp_path / "checkpoint.pt")
    monkeypatch.setattr(RemoteReward, "__init__", connect)
    again = serve("alignment:1")
    train(make_config(overrides=dict(opts, epochs=2, reward_servers=again.url), base=ckpt["config"]), resume=True)
    last = [r for r in _records(tmp_path / "metrics.jsonl") if r["kind"] == "train"][-1]
    assert "skipped" not in last and "loss" in last and last["skipped_epochs_reward_unavailable"] == 0
    assert again.requests > 0


def test_the_transport_benchmark_runs_and_ends_with_json():
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "reward_transport.py"
    cmd = [sys.executable, str(script), "--n", "2", "--size", "32", "--reps", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    assert [(r["content"], r["encoding"]) for r in rows] == [
        (c, e) for c in ("smooth", "grain", "noise") for e in ("raw", "png-1", "png-6")
    ]
    raw = [r for r in rows if r["encoding"] == "raw"]
    pixels_mb = 2 * 32 * 32 * 3 / 1e6  # + the small JSON header
    assert all(r["ratio_to_raw"] == 1.0 and pixels_mb < r["mb"] < pixels_mb + 0.001 for r in raw)
