"""riffusion.worker without a model: every job runs on the one owner thread whoever submits it, the
queue is bounded (Busy with a Retry-After estimate), errors reach the waiter, cancellation stops work
between steps, and stop() ends waiting and running jobs at once."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from riffusion.worker import Busy, Cancelled, InferenceWorker


def test_jobs_from_many_threads_run_on_one_thread():
    worker = InferenceWorker(max_pending=64)
    try:
        with ThreadPoolExecutor(max_workers=16) as pool:
            idents = list(pool.map(lambda _: worker.submit(lambda check: threading.get_ident()).result(), range(48)))
        assert len(set(idents)) == 1 and idents[0] != threading.get_ident()
    finally:
        worker.stop()


def test_the_works_exception_reaches_the_waiter():
    worker = InferenceWorker()
    try:
        job = worker.submit(lambda check: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            job.result()
        assert worker.submit(lambda check: "still serving").result() == "still serving"
    finally:
        worker.stop()


def test_a_full_queue_is_busy_with_a_retry_estimate():
    worker = InferenceWorker(max_pending=2)
    release = threading.Event()
    try:
        running = worker.submit(lambda check: release.wait(10))
        while worker.pending:  # the worker has taken it
            time.sleep(0.01)
        waiting = [worker.submit(lambda check: "done") for _ in range(2)]
        with pytest.raises(Busy) as busy:
            worker.submit(lambda check: "refused")
        assert busy.value.retry_after_s >= 1 and "(2 waiting)" in str(busy.value)
        release.set()
        assert running.result() is True and [job.result() for job in waiting] == ["done", "done"]
    finally:
        worker.stop()


def test_cancel_stops_the_work_at_its_next_check():
    worker = InferenceWorker()
    steps = []

    def work(check):
        for step in range(1000):
            check()
            steps.append(step)
            time.sleep(0.01)

    try:
        job = worker.submit(work)
        while len(steps) < 5:
            time.sleep(0.01)
        job.cancel()
        with pytest.raises(Cancelled):
            job.result()
        assert 5 <= len(steps) < 50
    finally:
        worker.stop()


def test_stop_cancels_running_and_waiting_jobs_and_refuses_new_ones():
    worker = InferenceWorker(max_pending=4)

    def endless(check):
        while True:
            check()
            time.sleep(0.01)

    running = worker.submit(endless)
    while worker.pending:
        time.sleep(0.01)
    waiting = worker.submit(lambda check: "never")
    started = time.monotonic()
    worker.stop()
    assert time.monotonic() - started < 2
    for job in (running, waiting):
        with pytest.raises(Cancelled):
            job.result()
    with pytest.raises(Cancelled):
        worker.submit(lambda check: "late")
