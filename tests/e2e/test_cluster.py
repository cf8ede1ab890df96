"""Several API nodes and workers on one Redis queue (server/cluster.py), as separate processes around a real
redis-server (Debian's; the tests start it on a free port in a temp folder, append-only file on): a job
submitted to one node is read from the other; a worker killed mid-job loses nothing; Redis restarted with
jobs queued and finished loses none; cancel reaches the worker; a model no worker serves waits, then fails;
the A1111 client path goes through a node; a worker holds no port."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from imagine.weights import DEFAULT_MODEL, FAST_MODEL
from tests.redis_server import RedisServer, free_port, needs_redis, wait_for

pytestmark = needs_redis
LEASE = 3
WAIT = 4  # seconds a job waits for a worker that serves its model


class Cluster:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.redis = RedisServer(tmp)
        self.procs: dict[str, subprocess.Popen] = {}
        self.nodes: dict[str, httpx.Client] = {}
        orphan = tmp / "orphan"  # a model the API nodes serve and no worker can load
        orphan.symlink_to(DEFAULT_MODEL, target_is_directory=True)
        self.models = [str(DEFAULT_MODEL), str(FAST_MODEL), str(orphan)]

    def env(self):
        return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def node(self, name: str, *extra: str, auth: tuple[str, str] | None = None):
        port = free_port()
        args = [sys.executable, "-m", "imagine", "serve", "--queue", self.redis.url, "--port", str(port),
                "--out", str(self.tmp / name), "--lease", str(LEASE), "--wait-timeout", str(WAIT),
                "--max-steps", "60", *[a for m in self.models for a in ("--model", m)], *extra]
        env = self.env() | ({"IMAGINE_API_AUTH": ":".join(auth)} if auth else {})
        self.procs[name] = subprocess.Popen(args, env=env, stdout=open(self.tmp / f"{name}.log", "w"),
                                            stderr=subprocess.STDOUT)
        self.nodes[name] = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, auth=auth)

    def worker(self, name: str, *models: str, preload: bool = False):
        args = [sys.executable, "-m", "imagine", "worker", "--queue", self.redis.url, "--name", name,
                "--lease", str(LEASE), "--device", "cpu", *[a for m in models for a in ("--model", m)],
                *(["--preload"] if preload else [])]
        self.procs[name] = subprocess.Popen(args, env=self.env(), stdout=open(self.tmp / f"{name}.log", "w"),
                                            stderr=subprocess.STDOUT)

    def ready(self, node: str = "a") -> bool:
        try:
            return self.nodes[node].get("/api/v1/status").status_code == 200
        except httpx.HTTPError:
            return False

    def workers(self) -> dict[str, dict]:
        return {w["name"]: w for w in self.nodes["a"].get("/api/v1/cluster").json()["workers"]}

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp.glob("*.log")))

    def stop(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.procs.values():
            proc.wait(10)
        if self.redis.proc is not None and self.redis.proc.poll() is None:
            self.redis.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    c.redis.start()
    c.node("a")
    c.node("b", auth=("ann", "secret"))
    c.worker("w1", str(DEFAULT_MODEL))
    c.worker("w2", str(DEFAULT_MODEL))
    c.worker("w3", str(FAST_MODEL), preload=True)
    try:
        wait_for(lambda: c.ready("a") and c.ready("b"), 90, "two API nodes")
        wait_for(lambda: len(c.workers()) == 3, 90, "three workers")
        yield c
    except AssertionError:
        print(c.logs())
        raise
    finally:
        c.stop()


SLOW = {"width": 128, "height": 128, "steps": 40, "n": 2}  # seconds on one thread: long enough to act on mid-job


def job(client: httpx.Client, **request) -> str:
    r = client.post("/api/v1/jobs", json=request)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def state(client: httpx.Client, job_id: str) -> dict:
    return client.get(f"/api/v1/jobs/{job_id}", params={"base64": "false"}).json()


def finished(client: httpx.Client, job_id: str, timeout: float = 60) -> dict:
    return wait_for(lambda: (s := state(client, job_id))["status"] in ("done", "failed", "cancelled") and s,
                    timeout, f"job {job_id}")


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_a_job_submitted_to_one_node_is_read_from_the_other(cluster):
    a, b = cluster.nodes["a"], cluster.nodes["b"]
    job_id = job(a, prompt="a red circle", steps=6, seed=11, n=2)
    out = finished(b, job_id)
    assert out["status"] == "done", out
    assert len(out["images"]) == 2 and [im["seed"] for im in out["images"]] == [11, 12]
    png_a = a.get(f"/api/v1/jobs/{job_id}/images/1.png").content
    png_b = b.get(f"/api/v1/jobs/{job_id}/images/1.png").content
    assert png_a == png_b and png_a.startswith(b"\x89PNG")
    # the routing: the default model's jobs go to w1 or w2, the LCM's to w3 alone (which loaded it at start)
    assert cluster.workers()["w3"]["held"] == ["shapes-lcm"]
    lcm = finished(a, job(b, prompt="a blue square", model="shapes-lcm", steps=4, seed=1))
    assert lcm["status"] == "done" and lcm["worker"] == "w3"
    assert any("shapes-default" in w["held"] for name, w in cluster.workers().items() if name != "w3")
    # the events stream of a job on another node: progress, then done
    job_id = job(a, prompt="a green triangle", steps=10, seed=2)
    with b.stream("GET", f"/api/v1/jobs/{job_id}/events") as r:
        lines = list(r.iter_lines())
    events = [line.split(": ", 1)[1] for line in lines if line.startswith("event: ")]
    assert events[-1] == "done" and "progress" in events
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert any(d.get("preview") for d in data[:-1])  # the worker's previews reach the other node


def test_the_limits_and_auth_stay_at_the_nodes(cluster):
    a, b = cluster.nodes["a"], cluster.nodes["b"]
    r = a.post("/api/v1/jobs", json={"prompt": "x", "steps": 80})
    assert r.status_code == 422 and "max_steps=60" in r.json()["detail"]
    assert httpx.get(str(b.base_url) + "/api/v1/status").status_code == 401  # b asks for its --api-auth
    assert a.get("/api/v1/status").json()["queue"] == "redis"
    r = a.post("/api/v1/jobs", json={"prompt": "x", "model": "no-such-model"})
    assert r.status_code == 404


def test_a1111_clients_go_through_a_node(cluster):
    b = cluster.nodes["b"]
    r = b.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 5, "seed": 4, "batch_size": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 1 and json.loads(body["info"])["seed"] == 4
    assert Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).size == (64, 64)
    # a refusal of A1111's own stays at the node
    r = b.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 5, "enable_hr": True, "hr_upscaler": "nonsense"})
    assert r.status_code in (404, 422)
    # the progress of a job running on a worker reaches the node asked
    job_id = job(cluster.nodes["a"], prompt="a blue square", seed=3, **SLOW)
    progress = wait_for(lambda: (p := b.get("/sdapi/v1/progress").json())["state"]["sampling_step"] > 0 and p, 30,
                        "A1111 progress")
    assert job_id in progress["state"]["job"] and progress["progress"] > 0
    assert b.post("/sdapi/v1/interrupt").status_code == 200
    assert finished(b, job_id)["status"] == "cancelled"


def test_cancel_reaches_the_worker_running_the_job(cluster):
    a, b = cluster.nodes["a"], cluster.nodes["b"]
    job_id = job(a, prompt="a red circle", seed=5, **SLOW)
    worker = wait_for(lambda: (s := state(a, job_id))["step"] > 0 and s["worker"], 30, "the job to start")
    r = b.delete(f"/api/v1/jobs/{job_id}")
    assert r.status_code == 200
    out = finished(a, job_id, 15)
    assert out["status"] == "cancelled" and out["step"] < SLOW["steps"]
    wait_for(lambda: cluster.workers()[worker]["job"] is None, 10, "the worker to be free again")
    # a queued job is cancelled at once, before any worker sees it: queue more than the two workers take
    ids = [job(a, prompt="a red circle", seed=s, **SLOW) for s in range(3)]
    r = b.delete(f"/api/v1/jobs/{ids[-1]}")
    assert r.json()["status"] in ("cancelled", "running")
    for i in ids[:-1]:
        b.delete(f"/api/v1/jobs/{i}")
    for i in ids:
        assert finished(a, i, 30)["status"] == "cancelled"


def test_a_worker_killed_mid_job_loses_nothing(cluster):
    a, b = cluster.nodes["a"], cluster.nodes["b"]
    request = {"prompt": "a red circle and a blue square", "seed": 77, **SLOW}
    job_id = job(a, **request)
    victim = wait_for(lambda: (s := state(a, job_id))["step"] > 2 and s["worker"], 30, "the job to run a few steps")
    reference = job(b, **request)  # the same request, never interrupted (on the other worker, meanwhile)
    cluster.procs[victim].send_signal(signal.SIGKILL)
    cluster.procs[victim].wait(10)
    out = finished(b, job_id, 90)
    assert out["status"] == "done", out
    assert len(out["images"]) == 2  # exactly one result kept
    import redis

    r = redis.Redis.from_url(cluster.redis.url)
    assert r.hget(f"imagine:job:{job_id}", "attempts") == b"2"
    assert out["worker"] != victim
    assert victim not in cluster.workers()  # its registration lapsed with its lease
    # the same seed gives the same PNG: the run again equals the run that was never interrupted
    assert finished(a, reference, 60)["status"] == "done"
    for i in range(2):
        first = a.get(f"/api/v1/jobs/{job_id}/images/{i}.png").content
        second = a.get(f"/api/v1/jobs/{reference}/images/{i}.png").content
        assert np.array_equal(pixels(first), pixels(second))


def test_redis_restart_loses_no_job_and_a_model_no_worker_serves_waits_then_fails(cluster):
    a, b = cluster.nodes["a"], cluster.nodes["b"]
    done_id = job(a, prompt="a green triangle", steps=4, seed=8)
    done = finished(a, done_id)
    assert done["status"] == "done"
    waiting = job(a, prompt="a red circle", model="orphan", steps=4, seed=9)
    w = state(b, waiting)
    assert w["status"] == "queued" and "no live worker serves model 'orphan'" in w["message"]
    cluster.redis.kill()  # SIGKILL: only the append-only file survives
    assert a.get("/api/v1/status").status_code == 503  # said, not a traceback
    cluster.redis.start()
    assert state(b, waiting)["status"] == "queued"
    again = state(b, done_id)
    assert again["status"] == "done" and again["images"][0]["parameters"] == done["images"][0]["parameters"]
    png = f"/api/v1/jobs/{done_id}/images/0.png"
    assert b.get(png).content == a.get(png).content
    # the workers come back to the queue by themselves and take new work
    after = finished(b, job(a, prompt="a blue circle", steps=4, seed=10), 90)
    assert after["status"] == "done"
    failed = finished(a, waiting, WAIT + 30)
    assert failed["status"] == "failed" and "no live worker served model 'orphan'" in failed["error"]


def test_status_shows_the_workers_and_failures(cluster):
    from typer.testing import CliRunner

    from imagine.cli import app

    result = CliRunner().invoke(app, ["status", "--queue", cluster.redis.url, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert "w3" in {w["name"] for w in info["workers"]} and len(info["workers"]) == 2  # one was killed
    assert all(w["device"] == "cpu" for w in info["workers"])
    assert any("orphan" in (f.get("model") or "") for f in info["failures"])
    table = CliRunner().invoke(app, ["status", "--queue", cluster.redis.url])
    assert "w3" in table.output and "shapes-lcm" in table.output
    # a worker listens on no port: none of its sockets is in the kernel's table of listening ones
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if Path(table).exists():
            listening |= {line.split()[9] for line in Path(table).read_text().splitlines()[1:]
                          if line.split()[3] == "0A"}
    for w in info["workers"]:
        fds = Path(f"/proc/{w['pid']}/fd")
        sockets = {os.readlink(fd)[8:-1] for fd in fds.iterdir() if os.readlink(fd).startswith("socket:[")}
        assert sockets and not sockets & listening, (w["name"], sockets & listening)
    node = cluster.procs["a"].pid  # ... while an API node does
    assert {os.readlink(fd)[8:-1] for fd in Path(f"/proc/{node}/fd").iterdir()
            if os.readlink(fd).startswith("socket:[")} & listening


def test_the_web_uis_cluster_page_shows_the_workers(cluster):
    from playwright.sync_api import expect

    from tests.e2e.test_webui import _page

    with _page(str(cluster.nodes["a"].base_url)) as (page, errors):
        page.click("#tabs button[data-tab=cluster]")
        expect(page.locator("#cluster-queue")).to_contain_text("a Redis queue")
        expect(page.locator("#cluster-workers")).to_contain_text("w3")
        expect(page.locator("#cluster-workers")).to_contain_text("shapes-lcm")
        expect(page.locator("#cluster-failures")).to_contain_text("orphan")
        assert not errors
