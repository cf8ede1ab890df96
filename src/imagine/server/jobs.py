"""The job queue: a bounded FIFO served by one worker thread (one CPU or GPU, one job at a time).

Jobs share no mutable state: each carries its own request, progress, previews and results; the worker
runs them one by one and records any exception on the job that raised it, then moves on. Readers
(status polls, event streams) see a version counter that grows with every change."""

from __future__ import annotations

import collections
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["queued", "running", "done", "failed", "cancelled"]
TERMINAL = ("done", "failed", "cancelled")


@dataclass
class ImageResult:
    png: bytes  # with both metadata chunks
    seed: int
    parameters: str  # A1111's text
    record: dict[str, Any]  # our JSON record
    path: str | None = None  # where it was saved, if it was


@dataclass
class Job:
    kind: str
    request: dict[str, Any]  # validated settings, images decoded into ``inputs``
    model: str
    inputs: dict[str, Any] = field(default_factory=dict, repr=False)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: Status = "queued"
    progress: float = 0.0
    step: int = 0
    total: int = 0
    error: str | None = None
    bad_request: bool = False  # failed on what the request asked (a ValueError), not on the server
    images: list[ImageResult] = field(default_factory=list, repr=False)
    preview: bytes | None = field(default=None, repr=False)
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    version: int = 0
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)

    def update(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self, key, value)
        self.version += 1

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def eta(self) -> float | None:
        """Seconds left, from the pace so far (None before the first step)."""
        if self.status != "running" or not self.started or self.progress <= 0:
            return None
        elapsed = time.time() - self.started
        return elapsed * (1 - self.progress) / self.progress


class QueueFull(Exception):
    def __init__(self, limit: int, retry_after: int):
        super().__init__(f"the queue is full ({limit} jobs waiting, the --max-queue limit): retry in {retry_after} s")
        self.limit, self.retry_after = limit, retry_after


class JobQueue:
    """``runner(job)`` does the work and fills ``job.images``; it may raise (the job fails) or raise
    ``Cancelled`` (the job is cancelled). Finished jobs are kept (the last ``keep``) for their results."""

    def __init__(self, runner: Callable[[Job], None], max_queue: int = 16, keep: int = 256,
                 cancelled_error: type[BaseException] = Exception):
        self.runner, self.max_queue, self.keep = runner, max_queue, keep
        self._cancelled_error = cancelled_error
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._durations: collections.deque[float] = collections.deque(maxlen=20)
        self._thread: threading.Thread | None = None
        self.current: Job | None = None

    # -- lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="imagine-jobs", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            if self.current is not None:
                self.current.cancel_event.set()
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    # -- client side
    def submit(self, job: Job) -> Job:
        with self._lock:
            waiting = sum(1 for j in self._jobs.values() if j.status == "queued")
            if waiting >= self.max_queue:
                raise QueueFull(self.max_queue, self.retry_after(waiting))
            self._jobs[job.id] = job
            self._forget_old()
        self._queue.put(job)
        return job

    def retry_after(self, waiting: int) -> int:
        mean = sum(self._durations) / len(self._durations) if self._durations else 5.0
        return max(1, round(mean * (waiting + 1)))

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def cancel(self, job: Job) -> None:
        """Queued: cancelled now. Running: cancelled at the end of its current step."""
        job.cancel_event.set()
        with self._lock:
            if job.status == "queued":
                job.update(status="cancelled", finished=time.time())

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(("queued", "running", "done", "failed", "cancelled"), 0)
        for job in list(self._jobs.values()):
            out[job.status] += 1
        return out

    # -- worker side
    def _forget_old(self) -> None:
        finished = [k for k, j in self._jobs.items() if j.done]
        for key in finished[: max(0, len(finished) - self.keep)]:
            del self._jobs[key]

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                if job.status != "queued":  # cancelled while waiting
                    continue
                job.update(status="running", started=time.time())
                self.current = job
            try:
                self.runner(job)
            except self._cancelled_error:
                job.update(status="cancelled", finished=time.time())
            except Exception as err:  # one job's failure never takes the worker down
                bad = isinstance(err, ValueError)
                job.update(status="failed", error=str(err) if bad else f"{type(err).__name__}: {err}",
                           bad_request=bad, finished=time.time())
            else:
                job.update(status="done", progress=1.0, finished=time.time())
            finally:
                self.current = None
                if job.started is not None:
                    self._durations.append(time.time() - job.started)
