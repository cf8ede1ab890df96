"""The serving load check with hostile requests mixed in: 4 clients for 60 s against `imagine serve` on loopback
(the shipped model), each sending every third request from a list of hostile ones (decompression and text-chunk
bombs, preprocessor and upscale sizes far past the limits, hires steps past max_steps, paths as LoRA and
ControlNet names, unconvertible A1111 fields, a lone surrogate, options that would break other clients) and
ordinary generations otherwise. Every hostile request must get a 4xx, every ordinary one a 2xx or 429; no 5xx;
the server's resident memory is sampled every second and must stay bounded.

    python benchmarks/serve_hostile.py            # writes docs/benchmarks/serve_hostile.{json,md}
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import tempfile
import threading
import time
import zlib
from pathlib import Path

import httpx
from PIL import Image

from serving import png_base64, run_clients, start_server

ROOT = Path(__file__).resolve().parents[1]


def decompression_bomb(width: int, height: int) -> str:
    """A PNG (base64) that claims to be ``width`` x ``height``; its data is one pixel's, so it never needs
    decoding to be refused."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    at = data.index(b"IHDR")
    data[at + 4: at + 12] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[at + 17: at + 21] = zlib.crc32(bytes(data[at: at + 17])).to_bytes(4, "big")
    return base64.b64encode(bytes(data)).decode()


def ztxt_bomb() -> str:
    """A 16x16 PNG (base64, about 50 KB) whose zTXt chunk inflates to 50 MB."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="PNG")
    data = buffer.getvalue()
    payload = b"parameters\x00\x00" + zlib.compress(b"a" * 50_000_000, 9)
    chunk = len(payload).to_bytes(4, "big") + b"zTXt" + payload + zlib.crc32(b"zTXt" + payload).to_bytes(4, "big")
    end = data.rindex(b"IEND") - 4
    return base64.b64encode(data[:end] + chunk + data[end:]).decode()


def hostile_requests() -> list[tuple[str, str, dict | bytes]]:
    small = png_base64(Image.new("RGB", (64, 64), "red"))
    ztxt, bomb = ztxt_bomb(), decompression_bomb(100_000, 100_000)
    return [
        ("detect 8192", "/controlnet/detect", {"controlnet_module": "canny", "controlnet_input_images": [small],
                                               "controlnet_processor_res": 8192}),
        ("A1111 unit 4096", "/sdapi/v1/txt2img", {"prompt": "x", "steps": 2, "alwayson_scripts": {"controlnet": {
            "args": [{"module": "canny", "image": small, "processor_res": 4096}]}}}),
        ("hires steps 999", "/api/v1/jobs", {"prompt": "x", "steps": 2, "hires_scale": 2, "hires_steps": 999}),
        ("hr_second_pass_steps 999", "/sdapi/v1/txt2img", {"prompt": "x", "steps": 2, "enable_hr": True,
                                                           "hr_second_pass_steps": 999}),
        ("upscale 16x SR", "/api/v1/upscale", {"images": [small], "scale": 16, "upscaler": "shapes-sr"}),
        ("zTXt bomb png-info", "/sdapi/v1/png-info", {"image": ztxt}),
        ("zTXt bomb img2img", "/api/v1/jobs", {"kind": "img2img", "prompt": "x", "init_image": ztxt}),
        ("decompression bomb", "/sdapi/v1/img2img", {"prompt": "x", "init_images": [bomb]}),
        ("lone surrogate", "/api/v1/jobs", b'{"prompt": "red \\ud800"}'),
        ("LoRA path", "/sdapi/v1/txt2img", {"prompt": "x <lora:/etc/shadow:1>", "steps": 2}),
        ("ControlNet path", "/api/v1/jobs", {"prompt": "x", "controls": [{"image": small, "model": "/etc"}]}),
        ("hr_scale abc", "/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": True, "hr_scale": "abc"}),
        ("eta abc", "/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "Euler a", "eta": "abc"}),
        ("cfg 1e308", "/api/v1/jobs", {"prompt": "x", "cfg_scale": 1e308}),
        ("seed 2**70", "/sdapi/v1/txt2img", {"prompt": "x", "seed": 2**70}),
        ("clip skip 1000 option", "/sdapi/v1/options", {"CLIP_stop_at_last_layers": 1000}),
        ("ENSD 10**30 option", "/sdapi/v1/options", {"eta_noise_seed_delta": 10**30}),
        ("merge -training", "/api/v1/merge", {"primary": "shapes-default", "secondary": "shapes-default",
                                              "name": "x-training"}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "serve_hostile")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imagine-hostile-"))
    server, url = start_server(work / "outputs", "--max-queue", "4")
    hostile = hostile_requests()
    by_case: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    ordinary: collections.Counter[int] = collections.Counter()
    lock = threading.Lock()
    stop = time.time() + args.seconds

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=300) as c:
            i = 0
            while time.time() < stop:
                i += 1
                if i % 3 == 0:
                    name, path, body = hostile[(k * 7 + i) % len(hostile)]
                    r = (c.post(path, content=body, headers={"content-type": "application/json"})
                         if isinstance(body, bytes) else c.post(path, json=body))
                    with lock:
                        by_case[name][r.status_code] += 1
                    continue
                body = {"prompt": f"a red circle {k} {i}", "steps": args.steps, "seed": k * 1000 + i}
                r = c.post("/sdapi/v1/txt2img" if i % 2 else "/api/v1/jobs", json=body)
                with lock:
                    ordinary[r.status_code] += 1
                if r.status_code == 429:
                    time.sleep(min(2.0, float(r.headers.get("Retry-After", "1"))))

    memory = run_clients(client, args.clients, server.pid)
    with httpx.Client(base_url=url, timeout=60) as c:  # still serving, options untouched
        alive = c.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2}).status_code
    server.terminate()
    server.wait(timeout=30)
    hostile_total = sum(sum(v.values()) for v in by_case.values())
    hostile_4xx = sum(n for v in by_case.values() for s, n in v.items() if 400 <= s < 500)
    fivexx = sum(n for v in by_case.values() for s, n in v.items() if s >= 500) + \
        sum(n for s, n in ordinary.items() if s >= 500)
    result = {"clients": args.clients, "seconds": args.seconds, "hostile_requests": hostile_total,
              "hostile_4xx": hostile_4xx, "ordinary": dict(ordinary), "5xx": fivexx, "alive_after": alive,
              "by_case": {k: dict(v) for k, v in sorted(by_case.items())}, "rss_mb_max": max(memory),
              "rss_mb_first_10s": max(memory[:10]), "rss_mb_last_10s": max(memory[-10:]), "rss_mb_samples": memory}
    print(json.dumps({k: v for k, v in result.items() if k != "rss_mb_samples"}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    md = ["# Serving under hostile requests", "",
          f"`python benchmarks/serve_hostile.py`: {args.clients} clients for {args.seconds:.0f} s against `imagine "
          f"serve` on loopback (the shipped model, {args.steps} steps, --max-queue 4); every third request is one of "
          f"{len(hostile)} hostile ones, the rest ordinary txt2img through both APIs.", "",
          "| hostile requests | of them 4xx | ordinary answers | 5xx | server RSS max (first 10 s / last 10 s) | "
          "serving after |", "|---|---|---|---|---|---|",
          f"| {hostile_total} | {hostile_4xx} | {dict(sorted(ordinary.items()))} | {fivexx} | "
          f"{result['rss_mb_max']:.0f} MB ({result['rss_mb_first_10s']:.0f} / {result['rss_mb_last_10s']:.0f}) | "
          f"{alive} |", "", "| hostile case | answers |", "|---|---|"]
    md += [f"| {name} | {dict(sorted(v.items()))} |" for name, v in sorted(by_case.items())]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    if fivexx or hostile_4xx != hostile_total or alive != 200:
        raise SystemExit(f"hostile load check failed: {fivexx} 5xx, {hostile_total - hostile_4xx} hostile requests "
                         f"not refused, serving after: {alive}")


if __name__ == "__main__":
    main()
