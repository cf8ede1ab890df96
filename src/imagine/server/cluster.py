"""Several machines, one durable queue: API nodes (``imagine serve --queue redis://...``) put jobs on Redis
through RQ, workers (``imagine worker --queue ...``) run them; any number of each.

The queue is RQ's (one list per model, so a worker listens only for the models it can load and, by
ordering those lists, takes jobs for the models it holds first; JSON-serialised jobs, no pickle). RQ
gives the lease: a running job sits in its StartedJobRegistry with an expiry the worker's heartbeat keeps
pushing forward (every lease / 4 seconds); when a worker dies the expiry passes, and the registry's
cleanup (run by idle workers and by every API node's sweeper) enqueues the job again (its ``Retry``), where
another worker runs it from the same payload, seed included, so the same PNG.

What the queue does not hold lives beside it under ``imagine:`` keys, written by small Lua scripts so that
each change is atomic: a job's state (a hash: status, progress, the request as GET shows it; a version
that grows with every change), its latest preview and, when finished, its images. Finishing is
first-writer-wins, so a job a stalled worker finishes after it was run again keeps exactly one result; the
finished jobs' images are bounded in bytes, the oldest dropped first. Workers register themselves (device,
the models they can load, the models they hold, their job) under keys that expire unless renewed, so a
dead worker vanishes from ``imagine status`` within a lease. Cancellation is a flag on the job's hash the
running worker polls between steps.

With Redis's append-only file on (``appendonly yes``), a Redis restart loses no queued or finished job:
everything here is Redis data."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis
from rq import Callback, Queue, Retry
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job as RQJob
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty
from rq.worker import SimpleWorker, WorkerStatus

from imagine.pipelines.generate import Cancelled
from imagine.server.jobs import ImageResult, Job, QueueFull
from imagine.server.jobstore import TERMINAL
from imagine.server.service import RequestError

log = logging.getLogger("imagine.cluster")

PREFIX = "imagine:"
LIVE = PREFIX + "live"  # zset: queued and running jobs, by submission time
FINISHED = PREFIX + "finished"  # zset: finished jobs, by finishing time
KEPT = PREFIX + "kept_bytes"  # the finished jobs' images, in bytes
CONFIG = PREFIX + "config"  # hash: max_kept_bytes, max_kept_jobs (the API nodes write it)
WORKERS = PREFIX + "workers"  # set of worker names (each also a hash that expires)
FAILURES = PREFIX + "failures"  # list: the last failures, newest first (JSON)
EXECUTE = "imagine.server.cluster.execute"
ABANDONED = "imagine.server.cluster.abandoned"
DEFAULT_LEASE = 30.0
RETRIES = 3  # runs a job may lose to dead workers before it fails


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def queue_name(model: str) -> str:
    """The RQ queue of one model's jobs."""
    return f"imagine.model.{model}"


def connect(url: str):
    """A Redis client for ``redis://HOST:PORT/DB`` (``rediss://`` for TLS, ``unix://`` for a socket), checked
    now so that a wrong URL stops a start with the reason."""

    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"--queue takes a Redis URL (redis://HOST:PORT/DB), got {url!r}")
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=10)
        client.ping()
    except redis.exceptions.RedisError as err:
        raise ValueError(f"cannot reach the queue's Redis server at {url}: {err}") from None
    return client


# -- the atomic steps (Lua: Redis runs each whole, one at a time)
_START = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st or st == 'done' or st == 'failed' or st == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'running', 'started', ARGV[1], 'worker', ARGV[2], 'message', '',
           'progress', '0', 'step', '0', 'total', '0')
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
return 1
"""

# KEYS: job hash, its images, its preview, LIVE, FINISHED, KEPT, CONFIG
# ARGV: id, status, error, bad_request, finished, images JSON, bytes, prefix
_FINISH = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return -1 end
if st == 'done' or st == 'failed' or st == 'cancelled' then
  if ARGV[2] == 'done' and st == 'done' then redis.call('HINCRBY', ARGV[8] .. 'stats', 'finished_twice', 1) end
  return 0
end
local progress = '0'
if ARGV[2] == 'done' then progress = '1' end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'error', ARGV[3], 'bad_request', ARGV[4], 'finished', ARGV[5],
           'bytes', ARGV[7], 'progress', progress, 'message', '')
redis.call('HINCRBY', KEYS[1], 'version', 1)
if string.len(ARGV[6]) > 0 then redis.call('SET', KEYS[2], ARGV[6]) end
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[1])
local total = redis.call('INCRBY', KEYS[6], ARGV[7])
local max_bytes = tonumber(redis.call('HGET', KEYS[7], 'max_kept_bytes') or '268435456')
local max_jobs = tonumber(redis.call('HGET', KEYS[7], 'max_kept_jobs') or '10000')
while total > max_bytes or redis.call('ZCARD', KEYS[5]) > max_jobs do
  local oldest = redis.call('ZRANGE', KEYS[5], 0, 0)
  if #oldest == 0 then break end
  local key = ARGV[8] .. 'job:' .. oldest[1]
  total = total - tonumber(redis.call('HGET', key, 'bytes') or '0')
  redis.call('DEL', key, key .. ':images', key .. ':preview')
  redis.call('ZREM', KEYS[5], oldest[1])
end
redis.call('SET', KEYS[6], math.max(total, 0))
return 1
"""


@dataclass
class Cluster:
    """The Redis keys both sides read and write, and the RQ queues."""

    redis: Any
    lease: float = DEFAULT_LEASE
    _scripts: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._scripts = {"start": self.redis.register_script(_START), "finish": self.redis.register_script(_FINISH)}

    def queue(self, model: str):

        return Queue(queue_name(model), connection=self.redis, serializer=JSONSerializer)

    # -- jobs' state
    def state(self, job_id: str) -> dict[str, str] | None:
        raw = self.redis.hgetall(job_key(job_id))
        return {k.decode(): v.decode() for k, v in raw.items()} or None

    def job(self, job_id: str) -> Job | None:
        """A snapshot of the job as the API shows it (status, progress, preview; images once finished)."""
        with self.redis.pipeline() as pipe:
            pipe.hgetall(job_key(job_id))
            pipe.get(job_key(job_id) + ":preview")
            pipe.get(job_key(job_id) + ":images")
            raw, preview, images = pipe.execute()
        if not raw:
            return None
        h = {k.decode(): v.decode() for k, v in raw.items()}
        job = Job(kind=h["kind"], request=json.loads(h["request"]), model=h["model"], id=job_id,
                  status=h["status"], progress=float(h.get("progress") or 0), step=int(h.get("step") or 0),
                  total=int(h.get("total") or 0), error=h.get("error") or None,
                  bad_request=h.get("bad_request") == "1", warnings=json.loads(h.get("warnings") or "[]"),
                  save=h.get("save") == "1", created=float(h["created"]),
                  started=float(h["started"]) if h.get("started") else None,
                  finished=float(h["finished"]) if h.get("finished") else None, version=int(h.get("version") or 0),
                  preview=preview, message=h.get("message") or None, worker=h.get("worker") or None)
        if h.get("cancel") == "1":
            job.cancel_event.set()
        if images:
            job.images = [ImageResult(base64.b64decode(im["png"]), im["seed"], im["parameters"], im["record"],
                                      im.get("path")) for im in json.loads(images)]
        return job

    def start(self, job_id: str, worker: str) -> bool:
        """Mark the job running on ``worker``; False when it already ended (cancelled while queued)."""
        return bool(self._scripts["start"](keys=[job_key(job_id)], args=[time.time(), worker]))

    def finish(self, job_id: str, status: str, *, error: str | None = None, bad_request: bool = False,
               images: list[ImageResult] = ()) -> bool:
        """The job's end, first writer wins: False when it had already ended (another run of it finished,
        or it was cancelled). Finished jobs over the byte bound are forgotten, the oldest first."""
        data = [{"png": base64.b64encode(im.png).decode("ascii"), "seed": im.seed, "parameters": im.parameters,
                 "record": im.record, "path": im.path} for im in images]
        size = sum(len(im.png) for im in images)
        key = job_key(job_id)
        done = self._scripts["finish"](
            keys=[key, key + ":images", key + ":preview", LIVE, FINISHED, KEPT, CONFIG],
            args=[job_id, status, error or "", int(bad_request), time.time(), json.dumps(data) if data else "",
                  size, PREFIX])
        if done == 1 and status == "failed":
            with self.redis.pipeline() as pipe:
                pipe.lpush(FAILURES, json.dumps({"id": job_id, "error": error, "time": time.time(),
                                                 "model": (self.state(job_id) or {}).get("model")}))
                pipe.ltrim(FAILURES, 0, 49)
                pipe.execute()
        return done == 1

    def update(self, job_id: str, **fields: Any) -> None:
        """Progress from the running worker (ignored once the job ended)."""
        preview = fields.pop("preview", None)
        mapping = {k: (json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in fields.items()}
        with self.redis.pipeline() as pipe:
            if mapping:
                pipe.hset(job_key(job_id), mapping=mapping)
            if preview is not None:
                pipe.set(job_key(job_id) + ":preview", preview, ex=3600)
            pipe.hincrby(job_key(job_id), "version", 1)
            pipe.execute()

    # -- workers
    def workers(self) -> list[dict[str, Any]]:
        """The live workers (their registration has not expired), each with its device, models and job."""
        out = []
        for name in sorted(n.decode() for n in self.redis.smembers(WORKERS)):
            raw = self.redis.hgetall(f"{PREFIX}worker:{name}")
            if not raw:
                self.redis.srem(WORKERS, name)  # expired: it stopped renewing (dead)
                continue
            h = {k.decode(): v.decode() for k, v in raw.items()}
            out.append({"name": name, "host": h.get("host"), "pid": int(h.get("pid", 0)), "device": h.get("device"),
                        "models": json.loads(h.get("models", "[]")), "held": json.loads(h.get("held", "[]")),
                        "job": h.get("job") or None, "jobs_done": int(h.get("jobs_done", 0)),
                        "since": float(h.get("since", 0)), "seen": float(h.get("seen", 0))})
        return out

    def counts(self) -> dict[str, int]:
        """Jobs queued and running (their hashes' status), and finished jobs kept."""
        ids = [i.decode() for i in self.redis.zrange(LIVE, 0, -1)]
        with self.redis.pipeline() as pipe:
            for i in ids:
                pipe.hget(job_key(i), "status")
            statuses = [s.decode() if s else None for s in pipe.execute()]
        return {"queued": statuses.count("queued"), "running": statuses.count("running"),
                "finished": self.redis.zcard(FINISHED)}

    def kept_bytes(self) -> int:
        return int(self.redis.get(KEPT) or 0)

    def stats(self) -> dict[str, int]:
        """Counters: finished_twice (a job run to the end by two workers, the second result dropped)."""
        return {k.decode(): int(v) for k, v in self.redis.hgetall(PREFIX + "stats").items()}

    def failures(self, n: int = 20) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.redis.lrange(FAILURES, 0, n - 1)]


class RedisJobs:
    """The API node's side: what JobQueue offers the routes (submit, get, cancel, counts, current), over
    Redis. No model is loaded here; a sweeper thread gives back the jobs of dead workers (RQ's registry
    cleanup), tells a queued job that no live worker serves its model, and fails it after ``wait_timeout``."""

    def __init__(self, cluster: Cluster, max_queue: int = 16, max_kept_bytes: int = 256 * 1024 * 1024,
                 wait_timeout: float = 600.0, sweep_every: float = 2.0, models: list[str] = ()):
        self.cluster, self.max_queue, self.wait_timeout = cluster, max_queue, wait_timeout
        self.sweep_every = sweep_every
        self.models = list(models)  # the queues this node sweeps
        self.redis = cluster.redis
        self.redis.hset(CONFIG, mapping={"max_kept_bytes": max_kept_bytes, "max_kept_jobs": 10_000})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.store = None  # no SQLite store: Redis holds every job

    # -- lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sweeper, name="imagine-sweeper", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # -- client side
    def submit(self, job: Job, payload: dict[str, Any], *, restored: bool = False) -> Job:

        waiting = self.counts()["queued"]
        if waiting >= self.max_queue:
            raise QueueFull(self.max_queue, self.retry_after(waiting))
        serving = [w for w in self.cluster.workers() if job.model in w["models"]]
        message = "" if serving else self._no_worker(job.model)
        with self.redis.pipeline() as pipe:
            pipe.hset(job_key(job.id), mapping={
                "kind": job.kind, "model": job.model, "status": "queued", "request": json.dumps(job.request),
                "save": int(job.save), "warnings": json.dumps(job.warnings), "created": job.created, "version": 1,
                "message": message, "progress": 0, "step": 0, "total": 0})
            pipe.zadd(LIVE, {job.id: job.created})
            pipe.execute()
        self.cluster.queue(job.model).enqueue(
            EXECUTE, job.id, job.kind, payload, job.save, job.created, job_id=job.id, job_timeout=-1, result_ttl=0,
            failure_ttl=3600, retry=Retry(max=RETRIES), on_failure=Callback(ABANDONED),
            description=f"{job.kind} on {job.model}")
        return self.get(job.id) or job

    def get(self, job_id: str) -> Job | None:
        return self.cluster.job(job_id)

    def cancel(self, job: Job) -> None:
        """Queued: taken off the queue and cancelled now. Running: the flag its worker reads between steps."""

        state = self.cluster.state(job.id) or {}
        if state.get("status") == "queued":
            try:
                RQJob.fetch(job.id, connection=self.redis).cancel()
            except (NoSuchJobError, InvalidJobOperation):
                pass  # already taken by a worker: the flag below reaches it
            if self.cluster.finish(job.id, "cancelled"):
                job.update(status="cancelled", finished=time.time())
                return
        if state.get("status") not in TERMINAL:
            self.redis.hset(job_key(job.id), "cancel", 1)
            self.redis.hincrby(job_key(job.id), "version", 1)
        job.cancel_event.set()

    def counts(self) -> dict[str, int]:
        return self.cluster.counts()

    def kept_bytes(self) -> int:
        return self.cluster.kept_bytes()

    def retry_after(self, waiting: int) -> int:
        return max(1, 5 * (waiting + 1))

    @property
    def current(self) -> Job | None:
        """A1111's one current job: the running job started last, on any worker."""
        running = []
        for i in self.redis.zrange(LIVE, 0, -1):
            state = self.cluster.state(i.decode())
            if state and state.get("status") == "running":
                running.append((float(state.get("started") or 0), i.decode()))
        return self.get(max(running)[1]) if running else None

    # -- the sweeper
    def _no_worker(self, model: str) -> str:
        return (f"waiting: no live worker serves model {model!r}; start one that can load it (imagine worker "
                f"--queue URL --model {model}); the job fails after {self.wait_timeout:g} s")

    def sweep(self) -> None:
        """One pass (every node runs it; each step is safe to run twice)."""

        for model in self.models:  # jobs of dead workers: queued again (or failed after RETRIES)
            queue = self.cluster.queue(model)
            if queue.acquire_maintenance_lock():
                try:
                    StartedJobRegistry(queue=queue, death_penalty_class=TimerDeathPenalty).cleanup()
                finally:
                    queue.release_maintenance_lock()
        serving: set[str] = set()
        for w in self.cluster.workers():
            serving.update(w["models"])
        now = time.time()
        for raw in self.redis.zrange(LIVE, 0, -1):
            job_id = raw.decode()
            state = self.cluster.state(job_id)
            if state is None:
                self.redis.zrem(LIVE, job_id)
                continue
            if state.get("status") != "queued":
                continue
            model = state["model"]
            if model in serving:
                if state.get("message", "").startswith("waiting: no live worker"):
                    self.cluster.update(job_id, message="")
                continue
            if now - float(state["created"]) > self.wait_timeout:
                try:
                    RQJob.fetch(job_id, connection=self.redis).cancel()
                except Exception:
                    pass
                self.cluster.finish(job_id, "failed", error=f"no live worker served model {model!r} within "
                                    f"{self.wait_timeout:g} s (the --wait-timeout): start a worker that can load "
                                    "it, then submit the job again")
            elif not state.get("message"):
                self.cluster.update(job_id, message=self._no_worker(model))

    def _sweeper(self) -> None:
        while not self._stop.wait(self.sweep_every):
            try:
                self.sweep()
            except Exception as err:
                log.warning("sweeper: %s", err)


# -- the worker side
class RemoteJob(Job):
    """The job as a worker runs it: every change the runner makes (progress, previews) goes to Redis, except
    the images, which the finish writes."""

    cluster: Cluster | None = None

    def update(self, **changes: Any) -> None:
        super().update(**changes)
        sent = {k: v for k, v in changes.items() if k in ("progress", "step", "total", "preview")}
        if sent and self.cluster is not None:
            self.cluster.update(self.id, **sent)


@dataclass
class WorkerContext:
    service: Any  # server.service.Service with the worker's models (loaded on use)
    cluster: Cluster
    name: str
    held: set = field(default_factory=set)
    job: str | None = None
    jobs_done: int = 0
    announce: Any = None  # writes the registration now (a job taken or ended, a model loaded)

    def changed(self) -> None:
        if self.announce is not None:
            try:
                self.announce()
            except Exception as err:  # Redis away: the next renewal says it
                log.warning("registration: %s", err)


_CONTEXT: WorkerContext | None = None  # the worker process's own (set by run_worker); RQ calls execute here


def execute(job_id: str, kind: str, payload: dict[str, Any], save: bool, created: float) -> None:
    """RQ's job function, on a worker: check the request against the model (loading it on first use), run it
    with progress going to Redis, and finish it (once). Never raises: a job's failure is its own record."""

    ctx = _CONTEXT
    if ctx is None:
        raise RuntimeError("imagine.server.cluster.execute runs inside `imagine worker`")
    cluster = ctx.cluster
    if not cluster.start(job_id, ctx.name):
        return  # cancelled (or finished by another run) before it started
    ctx.job = job_id
    ctx.changed()
    stop = threading.Event()
    try:
        try:
            job = ctx.service.make_job(payload, kind, save=save, job_id=job_id, created=created)
        except (RequestError, KeyError, ValueError) as err:
            cluster.finish(job_id, "failed", error=str(err), bad_request=True)
            return
        ctx.held.add(job.model)  # make_job loaded it: said now, so the job's end finds it said
        ctx.changed()
        remote = RemoteJob(**{f: getattr(job, f) for f in ("kind", "request", "model", "inputs", "save", "id",
                                                            "warnings", "created")})
        remote.cluster = cluster
        remote.started = time.time()
        watcher = threading.Thread(target=_watch_cancel, args=(cluster, job_id, remote.cancel_event, stop),
                                   daemon=True)
        watcher.start()
        try:
            ctx.service.run(remote)
        except Cancelled:
            cluster.finish(job_id, "cancelled")
        except Exception as err:
            bad = isinstance(err, ValueError)
            cluster.finish(job_id, "failed", error=str(err) if bad else f"{type(err).__name__}: {err}",
                           bad_request=bad)
        else:
            cluster.finish(job_id, "done", images=remote.images)
        ctx.jobs_done += 1
    finally:
        stop.set()
        ctx.job = None
        ctx.changed()


def _watch_cancel(cluster: Cluster, job_id: str, event: threading.Event, stop: threading.Event) -> None:
    while not stop.wait(0.2):
        try:
            if cluster.redis.hget(job_key(job_id), "cancel") == b"1":
                event.set()
                return
        except Exception:
            pass


def abandoned(job, connection, exc_type, exc_value, traceback) -> None:
    """RQ's failure callback, called when a job's lease lapsed (its worker died): queued again while it has
    runs left, else failed with the reason."""
    cluster = Cluster(connection)
    if exc_type is not None and exc_type.__name__ != "AbandonedJobError":
        return
    if job.retries_left:
        state = cluster.state(job.id) or {}
        if state.get("status") == "running":
            cluster.update(job.id, status="queued", message=f"its worker ({state.get('worker')}) stopped while "
                           "running it; queued again", progress=0, step=0)
    else:
        cluster.finish(job.id, "failed", error=f"{RETRIES + 1} workers died running this job; it was not "
                       "run again (it may be what kills them: check its size against the workers' memory)")


def held_first(queues: list, held) -> list:
    """The order a worker listens in (RQ takes from the first non-empty queue): the queues of the models it
    holds first, so a model loaded stays busy while others wait for a worker that holds theirs or is free."""
    names = {queue_name(m) for m in held}
    return [q for q in queues if q.name in names] + [q for q in queues if q.name not in names]


def run_worker(cluster: Cluster, service, *, name: str | None = None, burst: bool = False,
               held: set[str] = frozenset()) -> None:
    """The worker loop: RQ's SimpleWorker (jobs run in this process, so loaded models stay) listening on the
    queues of the models this worker can load, those it holds first; a registration renewed every lease / 4
    s; returns when stopped (SIGINT/SIGTERM: the running job finishes first) or, with ``burst``, when idle.
    ``held``: the models this worker has loaded before its first job (it takes their jobs first)."""

    global _CONTEXT
    name = name or f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:4]}"
    ctx = _CONTEXT = WorkerContext(service, cluster, name, set(held))  # held: models loaded already (--preload)
    models = service.store.names()
    lease = cluster.lease

    class Worker(SimpleWorker):
        def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
            return max(2, round(lease))  # the lease: renewed every lease / 4 s while the job runs

        def reorder_queues(self, reference_queue) -> None:  # after each job taken: what it holds first
            self._ordered_queues = held_first(self._ordered_queues, ctx.held)

        def execute_job(self, job, queue):
            stop = threading.Event()
            execution = self.prepare_execution(job)

            def beat():
                while not stop.wait(lease / 4):
                    try:
                        self.maintain_heartbeats(job, execution)
                    except Exception as err:
                        log.warning("heartbeat: %s", err)

            thread = threading.Thread(target=beat, daemon=True)
            thread.start()
            try:
                self.perform_job(job, queue, execution)
            finally:
                stop.set()
                thread.join(timeout=5)
            self.set_state(WorkerStatus.IDLE)

    registered = threading.Event()
    stop = threading.Event()

    def register():
        key = f"{PREFIX}worker:{name}"
        since = time.time()
        while True:
            try:
                with cluster.redis.pipeline() as pipe:
                    pipe.hset(key, mapping={"host": socket.gethostname(), "pid": os.getpid(),
                                            "device": str(service.store.device), "models": json.dumps(models),
                                            "held": json.dumps(sorted(ctx.held)), "job": ctx.job or "",
                                            "jobs_done": ctx.jobs_done, "since": since, "seen": time.time()})
                    pipe.expire(key, max(2, round(lease)))
                    pipe.sadd(WORKERS, name)
                    pipe.execute()
                registered.set()
            except Exception as err:
                log.warning("registration: %s", err)
            if stop.wait(lease / 4):
                cluster.redis.delete(key)
                cluster.redis.srem(WORKERS, name)
                return

    reg = threading.Thread(target=register, name="imagine-register", daemon=True)
    reg.start()
    registered.wait(10)
    try:
        while not stop.is_set():
            worker = Worker([cluster.queue(m) for m in models], connection=cluster.redis,
                            name=f"{name}-{uuid.uuid4().hex[:4]}", serializer=JSONSerializer,
                            worker_ttl=max(20, round(lease) + 15), maintenance_interval=max(1, round(lease)),
                            job_monitoring_interval=max(1, round(lease / 4)))
            worker.reorder_queues(None)
            worker.work(burst=burst, logging_level="WARNING")
            if burst or worker._stop_requested:
                break
            time.sleep(1)  # Redis went away and RQ gave up this worker: a new one, once Redis answers
    finally:
        stop.set()
        reg.join(timeout=5)


def describe(cluster: Cluster) -> dict[str, Any]:
    """What ``imagine status --queue`` and the web UI's cluster page show: workers, jobs per model, failures."""
    per_model: dict[str, dict[str, int]] = {}
    for raw in cluster.redis.zrange(LIVE, 0, -1):
        state = cluster.state(raw.decode())
        if state and state.get("status") in ("queued", "running"):
            counts = per_model.setdefault(state["model"], {"queued": 0, "running": 0})
            counts[state["status"]] += 1
    return {"queue": "redis", "lease_seconds": cluster.lease, "workers": cluster.workers(),
            "jobs": cluster.counts(), "models": per_model, "kept_bytes": cluster.kept_bytes(),
            "failures": cluster.failures(), "stats": cluster.stats()}
