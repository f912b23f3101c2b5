"""Scoring an epoch's images while the next chunk samples (`--overlap-scoring`, on by default).

A rollout samples its prompts in chunks (`--sample-batch`), decodes each chunk, and scores the images. Sequentially,
every chunk's reward waits for the whole epoch's sampling; a reward model on another GPU, a remote reward server or a
VLM then adds its whole latency to the epoch. `ChunkScorer` takes each chunk's images as they are decoded and scores
them on a worker thread (on CUDA: its own stream, after an event recorded behind the decode), while the main thread
samples the next chunk. The queue between them is bounded (`max_pending` chunks), so a slow reward holds sampling
back instead of piling up images.

The result is the same as scoring the whole batch at once, bit for bit (tests/test_scoring.py): the worker scores
rows in calls that cover whole `score_block`s from the batch's start (the least common multiple of the parts'
micro-batches), so every reward model sees exactly the micro-batches one call over the batch would form, and the
padded tail last; rewards needing the whole batch (the human term, `score_block` None) are scored once after the
last chunk; the weighted sum is formed row by row at the end. What overlaps is scoring with *sampling*; the decode
stays on the main thread (under ZeRO-3 it is the same collective sequence on every rank).
"""

from __future__ import annotations

import contextlib
import contextvars
import queue
import threading

import torch

from fdfo_fast.rewards import CompositeReward
from fdfo_fast.rewards.base import SCORED_ROWS

_DONE = object()  # the queue's end marker


class ChunkScorer:
    """Rows arrive in order (`add`); `result()` returns the composite's output for all of them, in row order.

    `overlap=False` (or a reward whose parts all need the whole batch) scores everything in `result()`: exactly the
    sequential path. Errors raised on the worker (a plugin's FdfoError, a server that stays down) re-raise in the
    main thread at the next `add` or at `result`.
    """

    def __init__(
        self,
        reward: CompositeReward,
        prompts: list[str],
        seeds: list[int] | None = None,
        overlap: bool = True,
        max_pending: int = 2,
    ):
        self.reward, self.prompts, self.seeds = reward, list(prompts), seeds
        self.images: list[torch.Tensor] = []  # the chunks received, in order (joined into one by `result`)
        # a plain callable (tests script rewards) has no parts to stream: it is scored after sampling
        self.streamed = [p for p in getattr(reward, "parts", ()) if p.score_block is not None]
        self.block = reward.score_block if self.streamed else 1
        self.overlap = overlap and bool(self.streamed)
        self.scored = 0  # rows the worker has scored (streamed parts)
        self.scored_terms: list[dict[str, torch.Tensor]] = []
        self.ticks = 0  # SCORED_ROWS reports of the worker, for the progress bar shown once sampling ends
        self.error: BaseException | None = None
        self.worker = None
        self.stream = None  # the worker's CUDA stream (made for the first CUDA chunk)
        if self.overlap:
            self.queue: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
            context = contextvars.copy_context()  # the worker reports scored rows through SCORED_ROWS (its own tick)
            self.worker = threading.Thread(target=context.run, args=(self._work,), name="fdfo-scoring", daemon=True)
            self.worker.start()

    # -- main thread ----------------------------------------------------------------------------------------------
    def add(self, images: torch.Tensor) -> None:
        """The next rows' decoded images."""
        self._raise_worker_error()
        event = None
        if self.overlap and images.is_cuda:  # the worker's stream must not read before the decode has written
            event = torch.cuda.Event()
            event.record()
        self.images.append(images)
        if self.overlap:
            self._put((images, event))

    def result(self, bar=None) -> dict[str, torch.Tensor]:
        """Every term and the weighted `reward` for all rows (waits for the worker; scores what is left)."""
        images = torch.cat(self.images) if len(self.images) != 1 else self.images[0]
        self.images = [images]  # the caller may want them too (evaluation's grids): joined once
        if len(images) != len(self.prompts):
            raise RuntimeError(f"scored {len(images)} images for {len(self.prompts)} prompts")
        if not self.overlap:
            return self.reward(images, self.prompts, seeds=self.seeds)
        self._put(_DONE)
        while self.worker.is_alive():
            self.worker.join(timeout=0.1)
            if bar is not None:
                bar.update(self.take_ticks())
        self._raise_worker_error()
        terms = {name: torch.cat([t[name] for t in self.scored_terms]) for name in self.scored_terms[0]}
        whole = [p for p in self.reward.parts if p.score_block is None]
        if whole:  # after the streamed parts: their scores are complete, the whole-batch part sees every row
            terms.update(self.reward.score_terms(images, self.prompts, self.seeds, parts=whole))
        return self.reward.weigh({n: terms[n] for p in self.reward.parts for n in p.names})

    def close(self) -> None:
        """Stop the worker (after an error or an interrupt in the main thread): it finishes its current call."""
        if self.worker is not None and self.worker.is_alive():
            self.error = self.error or RuntimeError("scoring stopped")
            try:
                self.queue.put_nowait(_DONE)
            except queue.Full:
                pass
            self.worker.join(timeout=5.0)

    def _put(self, item) -> None:
        while True:  # a bounded wait, so an error on the worker is seen instead of blocking forever
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                self._raise_worker_error()

    def _raise_worker_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, RuntimeError("scoring stopped after an error")
            raise error

    def take_ticks(self) -> int:
        n, self.ticks = self.ticks, 0
        return n

    # -- worker thread -------------------------------------------------------------------------------------------
    def _tick(self, n: int) -> None:
        self.ticks += n

    def _work(self) -> None:
        SCORED_ROWS.set(self._tick)
        pending: list[torch.Tensor] = []  # received rows not yet scored, in order
        try:
            while True:
                item = self.queue.get()
                last = item is _DONE
                if not last:
                    images, event = item
                    if event is not None:
                        if self.stream is None:  # scoring kernels queue behind the decode, not behind sampling
                            self.stream = torch.cuda.Stream(images.device)
                        self.stream.wait_event(event)
                        images.record_stream(self.stream)
                    pending.append(images)
                available = sum(len(x) for x in pending)
                n = available if last else available - (self.scored + available) % self.block
                n = max(0, n)  # whole blocks from the batch's start; everything once the last chunk is in
                if n:
                    rows = torch.cat(pending) if len(pending) > 1 else pending[0]
                    pending = [rows[n:]] if n < len(rows) else []
                    self._score(rows[:n])
                if last:
                    return
        except BaseException as err:  # handed to the main thread (add / result re-raise it)
            self.error = err

    def _score(self, images: torch.Tensor) -> None:
        lo, hi = self.scored, self.scored + len(images)
        seeds = None if self.seeds is None else self.seeds[lo:hi]
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            terms = self.reward.score_terms(images, self.prompts[lo:hi], seeds, parts=self.streamed)
        self.scored_terms.append(terms)
        self.scored = hi
