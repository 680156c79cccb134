"""Serve requests that arrive one by one, from many threads, in batches on one worker thread.

A web server hands each visitor's request to its own thread; the CNN and the decoder are much faster per
image on a batch than one image at a time. `RequestBatcher.submit` queues a request and blocks until its
answer is ready; the worker takes whatever has queued up (up to `max_batch_size`, after waiting at most
`gather_seconds` for more to arrive) and answers them with one call of `handle_batch`. It admits at most
`max_pending` requests at once (queued or being served); beyond that `submit` raises `Busy` at once, so
a visitor hears "busy, try again" instead of waiting without end.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

Request = TypeVar("Request")
Answer = TypeVar("Answer")


class Busy(RuntimeError):
    """The batcher holds `max_pending` requests already; try again later."""

    def __init__(self, pending: int):
        super().__init__(f"{pending} requests are being served or waiting; try again in a few seconds")
        self.pending = pending


class RequestBatcher(Generic[Request, Answer]):
    """Answers requests from any thread with batched calls of `handle_batch(requests) -> answers` (same
    order, same length) on one worker thread, started on demand and ended after `idle_seconds` without
    work (so an unused batcher holds no thread)."""

    def __init__(self, handle_batch: Callable[[list[Request]], Sequence[Answer]], max_batch_size: int = 16,
                 max_pending: int = 64, gather_seconds: float = 0.005, idle_seconds: float = 5.0):
        if max_batch_size < 1 or max_pending < 1:
            raise ValueError("max_batch_size and max_pending must be at least 1")
        self.handle_batch = handle_batch
        self.max_batch_size = max_batch_size
        self.max_pending = max_pending
        self.gather_seconds = gather_seconds
        self.idle_seconds = idle_seconds
        self.batch_sizes: list[int] = []  # of every batch served, for tests and benchmarks
        self.batch_seconds: list[float] = []  # how long handle_batch took for each
        self._waiting: deque[tuple[Request, Future]] = deque()
        self._pending = 0  # admitted and not yet answered: waiting + being served
        self._lock = threading.Condition()
        self._worker: threading.Thread | None = None
        self.thread_name = f"request-batcher-{id(self):x}"

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, request: Request, timeout: float | None = None) -> Answer:
        """The answer to `request` (blocks until it is served); raises Busy when the batcher is full, and
        what `handle_batch` raised when it failed."""
        future: Future = Future()
        with self._lock:
            if self._pending >= self.max_pending:
                raise Busy(self._pending)
            self._pending += 1
            self._waiting.append((request, future))
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name=self.thread_name, daemon=True)
                self._worker.start()
            self._lock.notify()
        return future.result(timeout)

    def _next_batch(self) -> list[tuple[Request, Future]] | None:
        """Up to max_batch_size waiting requests, after gathering briefly; None when idle too long."""
        with self._lock:
            if not self._waiting:
                self._lock.wait_for(lambda: self._waiting, timeout=self.idle_seconds)
                if not self._waiting:
                    self._worker = None  # decided under the lock: the next submit starts a new worker
                    return None
            # The first request is here; give its neighbours a moment to join the batch.
            deadline = time.monotonic() + self.gather_seconds
            while len(self._waiting) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
                self._lock.wait(left)
            count = min(len(self._waiting), self.max_batch_size)
            return [self._waiting.popleft() for _ in range(count)]

    def _serve(self) -> None:
        while (batch := self._next_batch()) is not None:
            requests = [request for request, _ in batch]
            started = time.perf_counter()
            try:
                answers = list(self.handle_batch(requests))
                if len(answers) != len(requests):
                    raise RuntimeError(f"handle_batch answered {len(answers)} of {len(requests)} requests")
            except Exception as error:  # every waiting visitor gets the error, none waits for ever
                answers, failure = [], error
            else:
                failure = None
            with self._lock:
                self.batch_sizes.append(len(batch))
                self.batch_seconds.append(time.perf_counter() - started)
                self._pending -= len(batch)
            for index, (_, future) in enumerate(batch):
                if failure is None:
                    future.set_result(answers[index])
                else:
                    future.set_exception(failure)
