"""One thread that owns the model and runs every inference, fed by a bounded queue.

Paddle Inference predictors fail (`RuntimeError: std::exception` in `predictor.run()`) when they are
called from a different thread each time, as a thread-per-request server does; one owner thread
serves every runtime (dynamic, static, ONNX) alike and keeps one request on the CPU at a time.

    worker = InferenceWorker(max_pending=8)
    job = worker.submit(lambda check: infer(pipeline, request, on_step=lambda *_: check()))  # Busy if full
    while not job.wait(0.25):
        if client_gone(): job.cancel()          # the pipeline stops at its next step
    reply = job.result()                        # re-raises the work's exception, Cancelled if cancelled
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any


class Busy(Exception):
    """The queue of pending work is full; `retry_after_s` estimates when a slot frees up."""

    def __init__(self, pending: int, retry_after_s: int):
        super().__init__(f"busy: the queue for the model is full ({pending} waiting); retry in about {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Cancelled(Exception):
    """The job was cancelled (its client left, or the server is stopping)."""


class Job:
    def __init__(self, work: Callable[[Callable[[], None]], Any]):
        self._work = work
        self._done = threading.Event()
        self._cancelled = threading.Event()
        self._value = None
        self._error: BaseException | None = None

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        """Raise Cancelled once the job is cancelled: the work calls it between its steps."""
        if self._cancelled.is_set():
            raise Cancelled("cancelled")

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def result(self):
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value

    def _run(self) -> None:
        try:
            self.check()
            self._value = self._work(self.check)
        except BaseException as error:  # handed to the waiting thread, whatever it is
            self._error = error
        finally:
            self._done.set()


class InferenceWorker:
    """Runs submitted work one job at a time on its own thread; at most `max_pending` jobs wait."""

    def __init__(self, max_pending: int = 8):
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_pending)
        self._current: Job | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # submit and stop: nothing is queued after stop drains the queue
        self._seconds_per_job = 10.0  # a first guess for Retry-After until a job has run
        self._thread = threading.Thread(target=self._serve, name="riffusion-inference", daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[Callable[[], None]], Any]) -> Job:
        """Queue `work(check)`; `check()` raises Cancelled once the job is cancelled. Busy when full."""
        with self._lock:
            if self._stopping.is_set():
                raise Cancelled("the server is stopping")
            job = Job(work)
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                pending = self._queue.qsize()
                raise Busy(pending, max(1, math.ceil(self._seconds_per_job * (pending + 1)))) from None
        return job

    @property
    def pending(self) -> int:
        """Jobs waiting (not counting the one running)."""
        return self._queue.qsize()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running and the waiting jobs and end the thread (waits up to `timeout` for the
        running step to finish)."""
        with self._lock:
            self._stopping.set()
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job.cancel()
                    job._run()  # ends at once as Cancelled, waking its waiter
            current = self._current
            if current is not None:
                current.cancel()
            self._queue.put(None)
        self._thread.join(timeout)

    def _serve(self) -> None:
        while (job := self._queue.get()) is not None:
            self._current = job
            if self._stopping.is_set():  # stop() may have looked at _current just before it was set
                job.cancel()
            started = time.monotonic()
            job._run()
            self._current = None
            if not job.cancelled:
                self._seconds_per_job = 0.5 * self._seconds_per_job + 0.5 * (time.monotonic() - started)
