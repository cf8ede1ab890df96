"""Load check of `imagine serve`: 8 concurrent clients for 60 s against loopback with a tiny model.

Half the clients use the A1111 endpoint (/sdapi/v1/txt2img, which waits for its images), half our job API
(POST a job, poll it to the end). Every answer must be 2xx or 429 (queue full, with Retry-After, which
the clients honour); no 5xx. The server's resident memory is sampled every second: it must stay flat.

    python benchmarks/serve_load.py            # writes docs/benchmarks/serve_load.{json,md}
"""

from __future__ import annotations

import argparse
import collections
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-queue", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "serve_load")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imagine-load-"))
    model = work / "tiny-model"
    subprocess.run([sys.executable, "-m", "imagine", "train", "--data", "builtin:shapes", "--preset", "tiny-t2i",
                    "--out", str(model), "--steps", "10"], check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "imagine", "serve", "--model", str(model), "--port", str(port),
                               "--out", str(work / "outputs"), "--max-queue", str(args.max_queue)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/api/v1/status", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    statuses: collections.Counter[int] = collections.Counter()
    latencies: list[float] = []
    images = [0]
    lock = threading.Lock()
    stop = time.time() + args.seconds
    memory = []

    def record(status: int, seconds: float | None = None, n: int = 0) -> None:
        with lock:
            statuses[status] += 1
            if seconds is not None:
                latencies.append(seconds)
            images[0] += n

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            i = 0
            while time.time() < stop:
                i += 1
                body = {"prompt": f"a red circle {k} {i}", "steps": 8, "seed": k * 1000 + i}
                started = time.perf_counter()
                if k % 2 == 0:
                    r = c.post("/sdapi/v1/txt2img", json=body)
                    record(r.status_code, time.perf_counter() - started if r.status_code == 200 else None,
                           len(r.json()["images"]) if r.status_code == 200 else 0)
                else:
                    r = c.post("/api/v1/jobs", json=body)
                    record(r.status_code)
                    if r.status_code == 202:
                        job = r.json()["id"]
                        while True:
                            s = c.get(f"/api/v1/jobs/{job}", params={"base64": "false"})
                            if s.status_code != 200 or s.json()["status"] in ("done", "failed", "cancelled"):
                                record(s.status_code, time.perf_counter() - started, len(s.json().get("images", [])))
                                break
                            time.sleep(0.05)
                if r.status_code == 429:
                    time.sleep(min(2.0, float(r.headers.get("Retry-After", "1"))))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        memory.append(rss_mb(server.pid))
        time.sleep(1)
    server.terminate()
    server.wait(timeout=30)
    fivexx = sum(v for k, v in statuses.items() if k >= 500)
    other = sum(v for k, v in statuses.items() if k not in (200, 202, 429) and k < 500)
    lat = sorted(latencies)
    result = {"clients": args.clients, "seconds": args.seconds, "max_queue": args.max_queue,
              "statuses": dict(statuses), "5xx": fivexx, "unexpected_4xx": other, "images": images[0],
              "images_per_s": images[0] / args.seconds,
              "latency_p50_s": lat[len(lat) // 2] if lat else None,
              "latency_p95_s": lat[int(len(lat) * 0.95)] if lat else None,
              "rss_mb_first_10s": max(memory[:10]), "rss_mb_last_10s": max(memory[-10:]), "rss_mb_samples": memory}
    print(json.dumps({k: v for k, v in result.items() if k != "rss_mb_samples"}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text("\n".join([
        "# Serving load check", "",
        f"`python benchmarks/serve_load.py`: {args.clients} concurrent clients for {args.seconds:.0f} s against "
        f"`imagine serve` on loopback (tiny-t2i model, 8 steps, --max-queue {args.max_queue}); half use "
        "/sdapi/v1/txt2img, half the job API.", "",
        "| answers | 5xx | other 4xx | images | images/s | latency p50 / p95 | server RSS first 10 s / last 10 s |",
        "|---|---|---|---|---|---|---|",
        f"| {dict(sorted(statuses.items()))} | {fivexx} | {other} | {images[0]} | {result['images_per_s']:.2f} | "
        f"{result['latency_p50_s']:.2f} s / {result['latency_p95_s']:.2f} s | {result['rss_mb_first_10s']:.0f} MB / "
        f"{result['rss_mb_last_10s']:.0f} MB |", ""]))
    if fivexx or other:
        raise SystemExit(f"load check failed: {fivexx} 5xx, {other} unexpected 4xx")


if __name__ == "__main__":
    main()
