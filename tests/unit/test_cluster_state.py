"""The Redis side of server/cluster.py, in process against a real redis-server: a job ends once (first writer
wins), finished jobs' images are bounded in bytes (the oldest dropped first), a job cancelled while queued is
never started, a dead worker's job is queued again by the registry's cleanup (RQ's lease) and fails after
its last retry, and the sweeper tells a waiting job why it waits."""

from __future__ import annotations

import time

import pytest

from imagine.server.cluster import LIVE, RETRIES, Cluster, RedisJobs, held_first, job_key, queue_name
from imagine.server.jobs import ImageResult, Job, QueueFull
from tests.redis_server import RedisServer, needs_redis

pytestmark = needs_redis


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield s
    s.kill()


@pytest.fixture
def jobs(server):
    import redis

    client = redis.Redis.from_url(server.url)
    client.flushdb()
    return RedisJobs(Cluster(client, lease=2), max_queue=4, max_kept_bytes=2500, wait_timeout=0.5, models=["m"])


def submit(jobs: RedisJobs, model: str = "m") -> Job:
    return jobs.submit(Job(kind="txt2img", request={"prompt": "x", "seed": 1}, model=model), {"prompt": "x"})


def image(size: int) -> ImageResult:
    return ImageResult(b"\x89PNG" + bytes(size - 4), 1, "x", {"kind": "txt2img"})


def test_a_job_ends_once(jobs):
    job = submit(jobs)
    assert jobs.get(job.id).status == "queued"
    assert jobs.cluster.start(job.id, "w1")
    assert jobs.cluster.finish(job.id, "done", images=[image(100)])
    assert not jobs.cluster.finish(job.id, "done", images=[image(300), image(300)])  # a second run's result
    assert jobs.cluster.stats() == {"finished_twice": 1}  # dropped, and counted
    out = jobs.get(job.id)
    assert out.status == "done" and len(out.images) == 1 and len(out.images[0].png) == 100
    assert jobs.kept_bytes() == 100 and jobs.counts() == {"queued": 0, "running": 0, "finished": 1}
    assert not jobs.cluster.start(job.id, "w2")  # an ended job never starts again


def test_finished_images_are_bounded_oldest_first(jobs):
    ids = []
    for _ in range(4):
        job = submit(jobs)
        jobs.cluster.start(job.id, "w")
        jobs.cluster.finish(job.id, "done", images=[image(1000)])
        ids.append(job.id)
        time.sleep(0.01)
    assert [jobs.get(i) is None for i in ids] == [True, True, False, False]  # 2500 bytes keep two
    assert jobs.kept_bytes() == 2000


def test_a_queued_job_cancelled_is_never_run(jobs):
    job = submit(jobs)
    jobs.cancel(jobs.get(job.id))
    assert jobs.get(job.id).status == "cancelled"
    assert not jobs.cluster.start(job.id, "w1")
    assert jobs.cluster.queue("m").count == 0  # taken off RQ's list too
    running = submit(jobs)
    jobs.cluster.start(running.id, "w1")
    jobs.cancel(jobs.get(running.id))  # running: a flag the worker polls
    assert jobs.get(running.id).status == "running" and jobs.get(running.id).cancel_event.is_set()


def test_the_queue_bound_holds(jobs):
    for _ in range(4):
        submit(jobs)
    with pytest.raises(QueueFull):
        submit(jobs)


def test_a_dead_workers_job_is_queued_again_then_fails(jobs):
    from rq.job import Job as RQJob
    from rq.registry import StartedJobRegistry

    job = submit(jobs)
    queue = jobs.cluster.queue("m")
    registry = StartedJobRegistry(queue=queue)
    for attempt in range(RETRIES + 1):
        rq_job = queue.dequeue_any([queue], None, connection=jobs.redis, serializer=queue.serializer)[0]
        assert rq_job.id == job.id
        jobs.cluster.start(job.id, f"w{attempt}")
        # what a worker leaves when it dies mid-job: the job started, its execution in the registry with an
        # expiry (the lease) that no heartbeat pushes forward any more
        registry.connection.zadd(registry.key, {f"{job.id}:{attempt}": time.time() - 1})
        rq_job.set_status("started")
        jobs.sweep()  # the lease lapsed: the cleanup re-queues it (or, after the last retry, fails it)
        state = jobs.get(job.id)
        if attempt < RETRIES:
            assert state.status == "queued" and "stopped while running it" in state.message
            assert RQJob.fetch(job.id, connection=jobs.redis).get_status() == "queued"
        else:
            assert state.status == "failed" and "workers died running this job" in state.error


def test_the_sweeper_says_why_a_job_waits_and_fails_it(jobs):
    job = submit(jobs, model="nobody")
    assert "no live worker serves model 'nobody'" in jobs.get(job.id).message
    jobs.redis.hset("imagine:worker:w9", mapping={"models": '["nobody"]', "held": "[]"})
    jobs.redis.sadd("imagine:workers", "w9")
    jobs.sweep()
    assert not jobs.get(job.id).message  # a worker that serves it came
    jobs.redis.delete("imagine:worker:w9")  # ... and died
    time.sleep(0.6)
    jobs.sweep()
    out = jobs.get(job.id)
    assert out.status == "failed" and "no live worker served model 'nobody' within 0.5 s" in out.error
    assert jobs.redis.zscore(LIVE, job.id) is None and jobs.cluster.queue("nobody").count == 0
    assert jobs.cluster.failures()[0]["id"] == job.id
    assert queue_name("nobody") == "imagine.model.nobody" and job_key(job.id).startswith("imagine:job:")


def test_a_worker_takes_jobs_for_the_models_it_holds_first(jobs):
    older = submit(jobs, model="a")  # waiting longer
    newer = submit(jobs, model="b")
    queues = [jobs.cluster.queue("a"), jobs.cluster.queue("b")]
    first = held_first(queues, {"b"})
    assert [q.name for q in first] == ["imagine.model.b", "imagine.model.a"]
    taken = queues[0].dequeue_any(first, None, connection=jobs.redis, serializer=queues[0].serializer)[0]
    assert taken.id == newer.id  # the held model's job, though the other waited longer
    assert queues[0].dequeue_any(held_first(queues, set()), None, connection=jobs.redis,
                                 serializer=queues[0].serializer)[0].id == older.id
