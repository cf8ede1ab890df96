"""Scale-out on one machine: imagine serve --queue and imagine worker processes around a real redis-server.

1. Throughput: the same batch of jobs (the shipped model, 64 x 64, 20 steps) with 1 worker, then 2 (one thread
   each, OMP_NUM_THREADS=1), submitted at once to one API node; jobs per second from the first submission to
   the last finish.
2. Chaos: a load of jobs submitted at a steady rate for --seconds (60) to two API nodes in turn, with two
   workers, one of them killed (SIGKILL) every --kill-every (15) s and started again at once. Then the queue
   drains. Counted: jobs submitted, done, failed, lost (never finished), duplicated (a second result written:
   the queue's finished_twice counter; kept results are one per job by construction), the runs lost to kills
   (attempts beyond the first), and the latency from submission to result (p50, p95).

    python benchmarks/cluster_load.py   # writes docs/benchmarks/cluster_load.{json,md}; needs redis-server
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import redis

ROOT = Path(__file__).resolve().parent.parent
REQUEST = {"prompt": "a red circle and a blue square", "steps": 20, "width": 64, "height": 64}
LEASE = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        try:
            if predicate():
                return
        except (httpx.HTTPError, redis.RedisError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


class Rig:
    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.redis_proc = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(folder),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""], stdout=subprocess.DEVNULL)
        self.redis = redis.Redis(port=self.port)
        wait_for(self.redis.ping, 10, "redis-server")
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.nodes, self.workers = [], {}

    def node(self) -> httpx.Client:
        port = free_port()
        subprocess.Popen([sys.executable, "-m", "imagine", "serve", "--queue", self.url, "--port", str(port),
                          "--out", str(self.folder / f"node{port}"), "--lease", str(LEASE), "--max-queue", "10000"],
                         env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        wait_for(lambda: client.get("/api/v1/status").status_code == 200, 90, "an API node")
        self.nodes.append(client)
        return client

    def worker(self, name: str) -> None:
        self.workers[name] = subprocess.Popen(
            [sys.executable, "-m", "imagine", "worker", "--queue", self.url, "--name", name, "--lease", str(LEASE),
             "--device", "cpu"], env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def live_workers(self) -> set[str]:
        return {w["name"] for w in self.nodes[0].get("/api/v1/cluster").json()["workers"]}

    def kill(self, name: str) -> None:
        self.workers[name].send_signal(signal.SIGKILL)
        self.workers[name].wait()

    def close(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.kill()
        subprocess.run(["pkill", "-f", "--", f"--queue {self.url}"], check=False)
        self.redis_proc.kill()


def submit(node: httpx.Client, seed: int) -> str:
    r = node.post("/api/v1/jobs", json={**REQUEST, "seed": seed})
    r.raise_for_status()
    return r.json()["id"]


def states(rig: Rig, ids: list[str]) -> list[dict]:
    out = []
    for i in ids:
        h = {k.decode(): v.decode() for k, v in rig.redis.hgetall(f"imagine:job:{i}").items()}
        out.append(h)
    return out


def drain(rig: Rig, ids: list[str], timeout: float) -> list[dict]:
    end = time.time() + timeout
    while time.time() < end:
        s = states(rig, ids)
        if all(h.get("status") in ("done", "failed", "cancelled") for h in s):
            return s
        time.sleep(0.5)
    return states(rig, ids)


def throughput(rig: Rig, workers: int, jobs: int) -> dict:
    for k in range(workers):
        rig.worker(f"t{workers}-{k}")
    wait_for(lambda: len(rig.live_workers()) == workers, 90, f"{workers} workers")
    warm = [submit(rig.nodes[0], 10_000 + k) for k in range(workers * 2)]  # each worker loads the model
    drain(rig, warm, 120)
    start = time.time()
    ids = [submit(rig.nodes[0], k) for k in range(jobs)]
    done = drain(rig, ids, 600)
    last = max(float(h["finished"]) for h in done)
    for k in range(workers):
        rig.kill(f"t{workers}-{k}")
    wait_for(lambda: not rig.live_workers(), 3 * LEASE, "the workers to lapse")
    return {"workers": workers, "jobs": jobs, "seconds": round(last - start, 2),
            "jobs_per_s": round(jobs / (last - start), 3)}


def chaos(rig: Rig, seconds: float, kill_every: float, rate: float) -> dict:
    for name in ("c0", "c1"):
        rig.worker(name)
    wait_for(lambda: {"c0", "c1"} <= rig.live_workers(), 90, "two workers")
    ids, kills, start, k = [], 0, time.time(), 0
    next_kill = start + kill_every
    while time.time() - start < seconds:
        ids.append(submit(rig.nodes[len(ids) % len(rig.nodes)], 50_000 + len(ids)))
        if time.time() >= next_kill:
            victim = f"c{k % 2}"
            rig.kill(victim)
            rig.worker(victim)  # started again at once (a supervisor's restart)
            kills, k, next_kill = kills + 1, k + 1, next_kill + kill_every
        time.sleep(1 / rate)
    final = drain(rig, ids, 300)
    status = [h.get("status") for h in final]
    latency = [float(h["finished"]) - float(h["created"]) for h in final if h.get("status") == "done"]
    stats = {k.decode(): int(v) for k, v in rig.redis.hgetall("imagine:stats").items()}
    return {"seconds": seconds, "kill_every": kill_every, "rate_per_s": rate, "kills": kills,
            "submitted": len(ids), "done": status.count("done"), "failed": status.count("failed"),
            "lost": sum(s not in ("done", "failed", "cancelled") for s in status),
            "duplicated": stats.get("finished_twice", 0),
            "runs_lost_to_kills": sum(int(h.get("attempts", 1)) - 1 for h in final),
            "latency_p50_s": round(float(np.percentile(latency, 50)), 2),
            "latency_p95_s": round(float(np.percentile(latency, 95)), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--kill-every", type=float, default=15)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("needs redis-server (apt install redis-server)")
    with tempfile.TemporaryDirectory() as tmp:
        rig = Rig(Path(tmp))
        try:
            rig.node()
            rig.node()
            runs = [throughput(rig, 1, args.jobs), throughput(rig, 2, args.jobs)]
            rate = 0.8 * runs[1]["jobs_per_s"]  # below two workers' pace: the queue stays short but never empty
            load = chaos(rig, args.seconds, args.kill_every, rate)
        finally:
            rig.close()
    report = {"request": REQUEST, "lease_s": LEASE, "throughput": runs, "chaos": load,
              "machine": f"{os.cpu_count()} CPUs, workers at one thread each"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cluster_load.json").write_text(json.dumps(report, indent=2))
    lines = ["# Scale-out: API nodes and workers on one Redis queue", "",
             "`python benchmarks/cluster_load.py` (this machine: " + report["machine"] + "; the shipped model, "
             f"64 x 64, 20 steps; lease {LEASE} s).", "",
             "| workers | jobs | seconds | jobs/s | speed-up |", "|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['workers']} | {r['jobs']} | {r['seconds']} | {r['jobs_per_s']} | "
                     f"{r['jobs_per_s'] / runs[0]['jobs_per_s']:.2f}x |")
    c = load
    lines += ["", f"Chaos: {c['seconds']:g} s of load at {c['rate_per_s']:.2f} jobs/s over two API nodes, two workers, "
              f"one killed (SIGKILL) every {c['kill_every']:g} s and restarted ({c['kills']} kills):", "",
              "| submitted | done | failed | lost | duplicated | runs lost to kills | p50 latency | p95 latency |",
              "|---|---|---|---|---|---|---|---|",
              f"| {c['submitted']} | {c['done']} | {c['failed']} | {c['lost']} | {c['duplicated']} | "
              f"{c['runs_lost_to_kills']} | {c['latency_p50_s']} s | {c['latency_p95_s']} s |", ""]
    (args.out / "cluster_load.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
