"""The job queue: a bounded FIFO served by one worker thread (one CPU or GPU, one job at a time).

Jobs share no mutable state: each carries its own request, progress, previews and results; the worker
runs them one by one and records any exception on the job that raised it, then moves on. Readers
(status polls, event streams) see a version counter that grows with every change.

Only live jobs (queued or running) are held in memory; every job is also a row in the JobStore, and a
finished job lives on there alone, with its images, within the store's byte bound. A job's decoded
inputs are let go the moment it ends."""

from __future__ import annotations

import collections
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from imagine.server.jobstore import TERMINAL, JobStore

Status = Literal["queued", "running", "done", "failed", "cancelled"]


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
    request: dict[str, Any]  # the settings as clients see them (no images)
    model: str
    inputs: dict[str, Any] = field(default_factory=dict, repr=False)  # the pipeline Request; cleared at the end
    save: bool = True  # write the PNGs to the output folder too
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: Status = "queued"
    progress: float = 0.0
    step: int = 0
    total: int = 0
    error: str | None = None
    bad_request: bool = False  # failed on what the request asked (a ValueError), not on the server
    warnings: list[str] = field(default_factory=list)  # what the client should know (words the model never saw)
    images: list[ImageResult] = field(default_factory=list, repr=False)
    preview: bytes | None = field(default=None, repr=False)
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    version: int = 0
    message: str | None = None  # why a queued job waits, or was queued again (a Redis queue's; server/cluster.py)
    worker: str | None = None  # the worker that runs or ran it (a Redis queue's)
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

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Job:
        """A finished job as the store keeps it."""
        images = [ImageResult(im["png"], im["seed"], im["parameters"], im["record"], im["path"])
                  for im in row["images"]]
        return cls(kind=row["kind"], request=row["request"], model=row["model"], save=row["save"], id=row["id"],
                   status=row["status"], error=row["error"], bad_request=row["bad_request"], images=images,
                   warnings=row.get("warnings", []),
                   created=row["created"], started=row["started"], finished=row["finished"],
                   progress=1.0 if row["status"] == "done" else 0.0)


class QueueFull(Exception):
    def __init__(self, limit: int, retry_after: int):
        super().__init__(f"the queue is full ({limit} jobs waiting, the --max-queue limit): retry in {retry_after} s")
        self.limit, self.retry_after = limit, retry_after


class JobQueue:
    """``runner(job)`` does the work and fills ``job.images``; it may raise (the job fails) or raise
    ``Cancelled`` (the job is cancelled). Finished jobs are kept in ``store``."""

    def __init__(self, runner: Callable[[Job], None], store: JobStore, max_queue: int = 16,
                 cancelled_error: type[BaseException] = Exception):
        self.runner, self.store, self.max_queue = runner, store, max_queue
        self._cancelled_error = cancelled_error
        self._live: dict[str, Job] = {}  # queued and running
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
    def submit(self, job: Job, payload: dict[str, Any], *, restored: bool = False) -> Job:
        """Queue a job; ``payload`` is the request as received (kept in the store while the job waits, so a
        restarted server can run it). ``restored``: a job the store already holds, queued again at start-up."""
        with self._lock:
            waiting = sum(1 for j in self._live.values() if j.status == "queued")
            if waiting >= self.max_queue and not restored:
                raise QueueFull(self.max_queue, self.retry_after(waiting))
            if not restored:
                self.store.insert(job, payload)
            self._live[job.id] = job
        self._queue.put(job)
        return job

    def retry_after(self, waiting: int) -> int:
        mean = sum(self._durations) / len(self._durations) if self._durations else 5.0
        return max(1, round(mean * (waiting + 1)))

    def get(self, job_id: str) -> Job | None:
        job = self._live.get(job_id)
        if job is not None:
            return job
        row = self.store.load(job_id)
        return Job.from_row(row) if row is not None else None

    def cancel(self, job: Job) -> None:
        """Queued: cancelled now. Running: cancelled at the end of its current step."""
        job.cancel_event.set()
        with self._lock:
            if job.status == "queued" and job.id in self._live:
                job.update(status="cancelled", finished=time.time())
                self._end(job)

    def counts(self) -> dict[str, int]:
        return self.store.counts()

    # -- worker side
    def _end(self, job: Job) -> None:
        """A job reached a terminal status: record it, let go of its inputs (the request and its decoded
        images) and of it."""
        job.inputs.clear()
        self.store.finished(job)
        self._live.pop(job.id, None)

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
            self.store.started(job)
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
                with self._lock:
                    self._end(job)
                    self.current = None
                if job.started is not None:
                    self._durations.append(time.time() - job.started)
