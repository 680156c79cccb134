"""RequestBatcher: requests from many threads answered in batches, with a bound on what it admits."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from captioner.apps.request_batcher import Busy, RequestBatcher


class Gate:
    """handle_batch that records its batches and holds each until released."""

    def __init__(self):
        self.batches: list[list[int]] = []
        self.release = threading.Event()
        self.entered = threading.Event()

    def __call__(self, requests: list[int]) -> list[int]:
        self.batches.append(list(requests))
        self.entered.set()
        assert self.release.wait(10), "the test never released the batch"
        return [request * 10 for request in requests]


def _wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_requests_that_wait_together_are_served_in_one_batch_in_order():
    gate = Gate()
    batcher = RequestBatcher(gate, max_batch_size=4, max_pending=20)
    with ThreadPoolExecutor(9) as pool:
        first = pool.submit(batcher.submit, 0)
        assert gate.entered.wait(10)  # the worker is busy with request 0 ...
        rest = [pool.submit(batcher.submit, n) for n in range(1, 9)]
        _wait_for(lambda: batcher.pending == 9)  # ... while 8 more queue up
        gate.release.set()
        answers = [first.result(10)] + [future.result(10) for future in rest]
    assert answers == [n * 10 for n in range(9)]
    assert gate.batches[0] == [0]
    assert sorted(n for batch in gate.batches[1:] for n in batch) == list(range(1, 9))
    assert [len(batch) for batch in gate.batches[1:]] == [4, 4]  # max_batch_size, not one at a time
    assert batcher.batch_sizes == [1, 4, 4] and batcher.pending == 0


def test_beyond_max_pending_the_answer_is_busy_at_once():
    gate = Gate()
    batcher = RequestBatcher(gate, max_batch_size=2, max_pending=3)
    with ThreadPoolExecutor(3) as pool:
        admitted = [pool.submit(batcher.submit, n) for n in range(3)]
        _wait_for(lambda: batcher.pending == 3)
        started = time.monotonic()
        with pytest.raises(Busy) as busy:
            batcher.submit(99)
        assert time.monotonic() - started < 1 and busy.value.pending == 3
        assert "try again" in str(busy.value)
        gate.release.set()
        assert [future.result(10) for future in admitted] == [0, 10, 20]
    assert batcher.submit(5) == 50  # room again once they are answered


def test_a_failing_batch_fails_its_requests_and_the_batcher_goes_on():
    calls = []

    def handle(requests):
        calls.append(requests)
        if len(calls) == 1:
            raise RuntimeError("model exploded")
        return requests

    batcher = RequestBatcher(handle)
    with pytest.raises(RuntimeError, match="model exploded"):
        batcher.submit(1)
    assert batcher.submit(2) == 2 and batcher.pending == 0


def test_a_wrong_number_of_answers_is_an_error_not_a_hang():
    batcher = RequestBatcher(lambda requests: requests[:-1])
    with pytest.raises(RuntimeError, match="answered 0 of 1"):
        batcher.submit(1, timeout=10)


def test_the_worker_thread_ends_when_idle_and_restarts_on_demand():
    batcher = RequestBatcher(lambda requests: requests, idle_seconds=0.05)
    assert batcher.submit(1) == 1
    _wait_for(lambda: not any(t.name == batcher.thread_name for t in threading.enumerate()))
    assert batcher.submit(2) == 2


def test_settings_are_checked():
    with pytest.raises(ValueError):
        RequestBatcher(lambda requests: requests, max_batch_size=0)
