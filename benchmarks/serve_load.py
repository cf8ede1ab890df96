"""Load check of `imagine serve`: 8 concurrent clients for 60 s against loopback with the shipped 64x64
model (or --model DIR).

The clients take turns at three requests: A1111's /sdapi/v1/txt2img (which waits for its images), our
job API (POST a job, poll it to the end), and A1111's /sdapi/v1/img2img carrying a 512x512 init image.
Every answer must be 2xx or 429 (queue full, with Retry-After, which the clients honour); no 5xx. The
server's resident memory is sampled every second: it must stay flat.

    python benchmarks/serve_load.py            # writes docs/benchmarks/serve_load.{json,md}
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from serving import png_base64, run_clients, start_server

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-queue", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "serve_load")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imagine-load-"))
    model_args = ["--model", str(args.model)] if args.model else []
    server, url = start_server(work / "outputs", *model_args, "--max-queue", str(args.max_queue))
    rng = np.random.default_rng(0)
    init = png_base64(Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)))
    statuses: collections.Counter[int] = collections.Counter()
    latencies: list[float] = []
    images = [0]
    lock = threading.Lock()
    stop = time.time() + args.seconds

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
                body = {"prompt": f"a red circle {k} {i}", "steps": args.steps, "seed": k * 1000 + i}
                started = time.perf_counter()
                if (k + i) % 3 == 2:
                    r = c.post("/sdapi/v1/img2img", json={**body, "init_images": [init], "width": 64, "height": 64,
                                                          "denoising_strength": 0.6})
                    record(r.status_code, time.perf_counter() - started if r.status_code == 200 else None,
                           len(r.json()["images"]) if r.status_code == 200 else 0)
                elif (k + i) % 3 == 0:
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

    memory = run_clients(client, args.clients, server.pid)
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
        f"`imagine serve` on loopback ({args.model or 'the shipped 64x64 model'}, {args.steps} steps, --max-queue "
        f"{args.max_queue}); the requests rotate between /sdapi/v1/txt2img, the job API and /sdapi/v1/img2img "
        "with a 512x512 init image.", "",
        "| answers | 5xx | other 4xx | images | images/s | latency p50 / p95 | server RSS first 10 s / last 10 s |",
        "|---|---|---|---|---|---|---|",
        f"| {dict(sorted(statuses.items()))} | {fivexx} | {other} | {images[0]} | {result['images_per_s']:.2f} | "
        f"{result['latency_p50_s']:.2f} s / {result['latency_p95_s']:.2f} s | {result['rss_mb_first_10s']:.0f} MB / "
        f"{result['rss_mb_last_10s']:.0f} MB |", ""]))
    if fivexx or other:
        raise SystemExit(f"load check failed: {fivexx} 5xx, {other} unexpected 4xx")


if __name__ == "__main__":
    main()
