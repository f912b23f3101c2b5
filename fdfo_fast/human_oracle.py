"""A scripted "oracle human": headless Chromium clicking through the real labelling page, preferring the image the
shapes world's programmatic scorer says matches the prompt better. Used by the end-to-end tests and by

    python -m fdfo_fast.human_oracle --epochs 20 --out runs/human-oracle

which post-trains the toy model from page clicks only and prints held-out accuracy before -> after.
Needs Debian's chromium + chromium-driver and the `selenium` package (`pip install -e '.[human]'` in the checkout).
"""

from __future__ import annotations

import argparse
import io
import threading
import time
import urllib.request

import numpy as np
import torch

from fdfo_fast.errors import FdfoError, cli_entry

CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
)  # fmt: skip


def make_driver(chromium: str = "/usr/bin/chromium", chromedriver: str = "/usr/bin/chromedriver"):
    """Headless Chromium through Selenium with the system's browser and driver (nothing is downloaded)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise FdfoError("the page oracle needs selenium: pip install -e '.[human]' in the fdfo_fast checkout") from None
    import os
    import tempfile

    for path in (chromium, chromedriver):
        if not os.path.exists(path):
            raise FdfoError(f"{path} not found: apt-get install chromium chromium-driver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='fdfo-chromium-')}")
    return webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)


def _image(url: str) -> torch.Tensor:
    from PIL import Image

    with urllib.request.urlopen(url, timeout=10) as r:
        arr = np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1


class PageOracle(threading.Thread):
    """Labels every pair the page shows until `stop()`: reads the prompt and both images from the page, scores them
    with `score(images [2, 3, H, W], prompt) -> [2]`, clicks left / right / no preference."""

    def __init__(self, url: str, score=None, poll: float = 0.05):
        super().__init__(daemon=True, name="page-oracle")
        self.url, self.poll = url, poll
        if score is None:
            from fdfo_fast.rewards import AlignmentReward

            scorer = AlignmentReward()
            score = lambda imgs, prompt: scorer(imgs, [prompt, prompt])["alignment"]  # noqa: E731
        self.score = score
        self.clicks: list[tuple[int, int, str]] = []  # (epoch, pair, choice)
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def stop(self):
        self._halt.set()

    def run(self):
        from selenium.webdriver.common.by import By

        try:
            driver = make_driver()
        except BaseException as err:  # reported by the caller
            self.error = err
            return
        try:
            driver.get(self.url)
            while not self._halt.is_set():
                body = driver.find_element(By.TAG_NAME, "body")
                pair, epoch = body.get_attribute("data-pair"), body.get_attribute("data-epoch")
                left = driver.find_element(By.ID, "left").get_attribute("src")
                right = driver.find_element(By.ID, "right").get_attribute("src")
                if not pair or not left or not right:
                    time.sleep(self.poll)
                    continue
                prompt = driver.find_element(By.ID, "prompt").text
                s = self.score(torch.stack([_image(left), _image(right)]), prompt)
                choice = "left" if s[0] > s[1] else "right" if s[1] > s[0] else "none"
                driver.find_element(By.ID, f"btn-{choice}").click()
                self.clicks.append((int(epoch), int(pair), choice))
                deadline = time.time() + 10  # wait until the page moved on (or the epoch ended)
                while time.time() < deadline and body.get_attribute("data-pair") == pair:
                    if body.get_attribute("data-epoch") != epoch:
                        break
                    time.sleep(self.poll)
        except BaseException as err:
            if not self._halt.is_set():
                self.error = err
        finally:
            driver.quit()


@cli_entry
def main(argv=None):
    import secrets
    import socket

    from fdfo_fast.config import make_config
    from fdfo_fast.train import train

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/human-oracle")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--pairs-per-epoch", type=int, default=32)
    p.add_argument("--eval-per-category", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_urlsafe(16)
    cfg = make_config(
        "toy-fdfo",
        overrides=dict(
            out=args.out, epochs=args.epochs, pairs_per_epoch=args.pairs_per_epoch, reward="human:1",
            human_port=port, human_token=token, eval_every=0, eval_per_category=args.eval_per_category,
            seed=args.seed,
        ),
    )  # fmt: skip
    oracle = PageOracle(f"http://127.0.0.1:{port}/?token={token}")  # the server wants the run's token
    oracle.start()
    t0 = time.time()
    try:
        train(cfg)
    finally:
        oracle.stop()
        oracle.join(timeout=30)
    if oracle.error:
        raise FdfoError(f"the page oracle failed: {oracle.error}")
    import json
    from pathlib import Path

    evals = [json.loads(x) for x in (Path(args.out) / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    before, after = evals[0]["eval/geneval"], evals[-1]["eval/geneval"]
    print(f"{len(oracle.clicks)} pairs labelled through the page in {time.time() - t0:.0f} s")
    print(f"held-out accuracy: {100 * before:.1f}% -> {100 * after:.1f}%")


if __name__ == "__main__":
    main()
