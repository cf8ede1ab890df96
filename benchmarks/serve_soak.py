"""Memory soak of `imagine serve`: img2img requests carrying 2048x2048 init images, resident memory sampled
over time. Finished jobs keep their PNGs in the job store (bounded by --max-kept-mb), never in memory, and a
job lets go of its decoded init image when it ends, so memory must be flat after warm-up.

    python benchmarks/serve_soak.py            # writes docs/benchmarks/serve_soak.{json,md,png}

Clients send A1111 img2img requests (half) and job-API img2img jobs (half), each with its own 2048x2048
photograph-like init image (about 6 MB of base64), back to back, for --seconds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageFilter

from serving import png_base64, rss_mb, start_server

ROOT = Path(__file__).resolve().parents[1]


def init_image(seed: int, side: int = 2048) -> str:
    """A smooth random picture (blurred noise plus gradients): big, and not a PNG-friendly flat field."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 255, (side // 32, side // 32, 3), dtype=np.uint8))
    image = small.resize((side, side), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    noise = rng.integers(-6, 7, (side, side, 3))
    return png_base64(Image.fromarray(np.clip(np.asarray(image, dtype=int) + noise, 0, 255).astype(np.uint8)))


def write_report(result: dict, out: Path) -> None:
    """The JSON, a plot of RSS over time and the markdown table. Flatness is judged on each third of the
    time after warm-up: its median (the level between requests) and its maximum (with requests in flight)."""
    samples, warmup = result["samples"], result["warmup_s"]
    window = [m for t, m in samples if t >= warmup]
    n = len(window) // 3
    thirds = [window[:n], window[n:2 * n], window[2 * n:]]
    result["rss_mb_median_by_third"] = [float(np.median(t)) for t in thirds]
    result["rss_mb_max_by_third"] = [float(max(t)) for t in thirds]
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([t for t, _ in samples], [m for _, m in samples])
    ax.axvline(warmup, color="grey", linestyle=":")
    ax.set_xlabel("seconds")
    ax.set_ylabel("server RSS (MB)")
    ax.set_title(f"img2img with 2048x2048 init images: {result['requests_done']} requests")
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    med, top = result["rss_mb_median_by_third"], result["rss_mb_max_by_third"]
    out.with_suffix(".md").write_text("\n".join([
        "# Serving memory soak", "",
        f"`python benchmarks/serve_soak.py`: {result['clients']} clients for {result['seconds']:.0f} s, each request "
        f"an img2img (A1111's endpoint and the job API in turn) with a {result['init_image']}, {result['steps']} steps "
        f"at 64x64, the shipped model, --max-kept-mb {result['max_kept_mb']:g}. RSS sampled every 0.5 s; after "
        f"{warmup:g} s of warm-up the time is cut in thirds: the median is the level between requests, the "
        "maximum the level with two 2048x2048 requests in flight.", "",
        "| requests done | failures | RSS median, 1st / 2nd / 3rd third | RSS max, 1st / 2nd / 3rd third | "
        "kept in the job store at the end |", "|---|---|---|---|---|",
        f"| {result['requests_done']} | {len(result['failures'])} | "
        + " / ".join(f"{v:.0f}" for v in med) + " MB | " + " / ".join(f"{v:.0f}" for v in top) + " MB | "
        f"{result['kept_bytes_at_end'] / 2**20:.1f} MiB |", "", "![RSS over time](serve_soak.png)", ""]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=30, help="seconds before the flatness window starts")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-kept-mb", type=float, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "serve_soak")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the saved JSON")
    args = parser.parse_args()
    if args.report_only:
        write_report(json.loads(args.out.with_suffix(".json").read_text()), args.out)
        return
    work = Path(tempfile.mkdtemp(prefix="imagine-soak-"))
    images = [init_image(s) for s in range(4)]
    server, url = start_server(work / "outputs", "--max-kept-mb", str(args.max_kept_mb), "--max-request-mb", "32")
    start = time.time()
    stop = start + args.seconds
    done, failures, lock = [0], [], threading.Lock()
    samples: list[tuple[float, float]] = []

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=300) as c:
            i = 0
            while time.time() < stop:
                i += 1
                body = {"prompt": "a red circle", "steps": args.steps, "seed": k * 10_000 + i, "width": 64,
                        "height": 64}
                init = images[(k + i) % len(images)]
                if (k + i) % 2:
                    r = c.post("/sdapi/v1/img2img", json={**body, "init_images": [init], "denoising_strength": 0.6})
                    ok = r.status_code == 200
                else:
                    r = c.post("/api/v1/jobs", json={**body, "kind": "img2img", "init_image": init, "strength": 0.6})
                    ok = r.status_code == 202
                    if ok:
                        job = r.json()["id"]
                        state = "queued"
                        while state not in ("done", "failed", "cancelled"):
                            time.sleep(0.05)
                            state = c.get(f"/api/v1/jobs/{job}", params={"base64": "false"}).json()["status"]
                        ok = state == "done"
                with lock:
                    if ok:
                        done[0] += 1
                    else:
                        failures.append(r.status_code)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        samples.append((time.time() - start, rss_mb(server.pid)))
        time.sleep(0.5)
    status = httpx.get(url + "/api/v1/status").json()
    server.terminate()
    server.wait(timeout=30)
    result = {"seconds": args.seconds, "clients": args.clients, "steps": args.steps, "init_image": "2048x2048 PNG, "
              f"about {len(images[0]) / 2**20:.1f} MiB of base64", "requests_done": done[0], "failures": failures,
              "max_kept_mb": args.max_kept_mb, "kept_bytes_at_end": status["kept_bytes"],
              "jobs_at_end": status["jobs"], "warmup_s": args.warmup, "samples": samples}
    write_report(result, args.out)
    if failures:
        raise SystemExit(f"soak failed: {len(failures)} requests failed ({failures[:5]})")


if __name__ == "__main__":
    main()
